"""Noise schedules (paths): z_t = α(t)·x + σ(t)·ε, t = 0 data, t = 1 noise.

Conditional velocity (DESIGN §2): v(z_t | x, ε) = α'(t)·x + σ'(t)·ε.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from components.registry import SCHEDULE


class Schedule:
    """α(t), σ(t), their derivatives, and the inverse of the ratio σ/α."""

    def alpha(self, t: Tensor) -> Tensor: ...
    def sigma(self, t: Tensor) -> Tensor: ...
    def d_alpha(self, t: Tensor) -> Tensor: ...
    def d_sigma(self, t: Tensor) -> Tensor: ...

    def t_from_ratio(self, ratio: Tensor) -> Tensor:
        """The t at which σ(t)/α(t) = ratio (noise-to-signal), ratio ≥ 0."""
        raise NotImplementedError

    def noise(self, x: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        return _bc(self.alpha(t), x) * x + _bc(self.sigma(t), x) * eps

    def velocity(self, x: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """Conditional velocity α'(t)·x + σ'(t)·ε."""
        return _bc(self.d_alpha(t), x) * x + _bc(self.d_sigma(t), x) * eps

    def ddim_step(self, z: Tensor, v: Tensor, t: Tensor, s: Tensor) -> Tensor:
        """DDIM step z_t → z_s along the path through (x̂, ε̂) that z and the velocity v imply.

        Solves z = α(t)·x̂ + σ(t)·ε̂, v = α'(t)·x̂ + σ'(t)·ε̂ (determinant α·σ' − σ·α' > 0 on
        both built-in paths), then returns α(s)·x̂ + σ(s)·ε̂. With the conditional velocity
        (x̂, ε̂) = (x, ε) exactly, so the step lands on the same noise draw at time s.
        """
        a, sg, da, ds = (_bc(f(t), z) for f in (self.alpha, self.sigma, self.d_alpha, self.d_sigma))
        det = a * ds - sg * da
        x_hat = (ds * z - sg * v) / det
        eps_hat = (a * v - da * z) / det
        return _bc(self.alpha(s), z) * x_hat + _bc(self.sigma(s), z) * eps_hat


def _bc(v: Tensor, like: Tensor) -> Tensor:
    """Broadcast a per-sample (B,) tensor against a (B, ...) batch."""
    return v.reshape(v.shape + (1,) * (like.dim() - v.dim()))


@SCHEDULE.register("linear")
class Linear(Schedule):
    """Rectified-flow / OT path: α = 1 − t, σ = t (velocity ε − x)."""

    def alpha(self, t):
        return 1 - t

    def sigma(self, t):
        return t

    def d_alpha(self, t):
        return -torch.ones_like(t)

    def d_sigma(self, t):
        return torch.ones_like(t)

    def t_from_ratio(self, ratio):
        return ratio / (1 + ratio)


@SCHEDULE.register("cosine")
class Cosine(Schedule):
    """Trigonometric path (TrigFlow, sCM): α = cos(πt/2), σ = sin(πt/2)."""

    def alpha(self, t):
        return torch.cos(0.5 * math.pi * t)

    def sigma(self, t):
        return torch.sin(0.5 * math.pi * t)

    def d_alpha(self, t):
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def d_sigma(self, t):
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * t)

    def t_from_ratio(self, ratio):
        return torch.atan(ratio) * (2 / math.pi)
