"""Exact probability-flow quantities for Gaussian data (a test helper, not a test).

Data x ~ N(μ, s²·I) in D dimensions, path z_t = α(t)·x + σ(t)·ε (t = 0 data,
t = 1 noise, DESIGN §2). Then z_t ~ N(α(t)·μ, m(t)²·I) with
m(t) = sqrt(α(t)²·s² + σ(t)²), and

- posterior means   E[x | z_t = z] = μ + α·s²/m²·(z − α·μ),   E[ε | z_t = z] = σ/m²·(z − α·μ);
- marginal velocity v(z, t) = E[α'·x + σ'·ε | z_t = z] = α'·μ + (α·α'·s² + σ·σ')/m²·(z − α·μ);
- flow map          X(t→r)(z) = α(r)·μ + m(r)/m(t)·(z − α(t)·μ)  (the monotone map between the
  two isotropic Gaussian marginals, which is the probability-flow ODE's solution);
- average velocity  u(z, r, t) = (z − X(t→r)(z)) / (t − r), and u(z, t, t) = v(z, t).

Everything is written with torch ops so ``torch.func.jvp`` and autograd pass through.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _bc(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample (B,) tensor to broadcast against a (B, ...) batch."""
    return v.reshape(v.shape + (1,) * (like.dim() - v.dim()))


class OracleNet:
    """``net(z, r, t, y) -> u``: the exact average velocity of N(μ, s²·I) data on ``schedule`` (y ignored)."""

    def __init__(self, schedule, mu, s: float):
        self.schedule = schedule
        self.mu = torch.as_tensor(mu)
        self.s = float(s)
        if self.s <= 0:
            raise ValueError("s must be > 0")

    # -- per-time scalars (B,) ---------------------------------------------
    def m(self, t: Tensor) -> Tensor:
        a, sig = self.schedule.alpha(t), self.schedule.sigma(t)
        return torch.sqrt(a * a * self.s ** 2 + sig * sig)

    def _mu(self, z: Tensor) -> Tensor:
        return self.mu.to(dtype=z.dtype, device=z.device)

    # -- posterior ------------------------------------------------------------
    def posterior_x(self, z: Tensor, t: Tensor) -> Tensor:
        a, m = _bc(self.schedule.alpha(t), z), _bc(self.m(t), z)
        mu = self._mu(z)
        return mu + a * self.s ** 2 / m ** 2 * (z - a * mu)

    def posterior_eps(self, z: Tensor, t: Tensor) -> Tensor:
        a, sig, m = _bc(self.schedule.alpha(t), z), _bc(self.schedule.sigma(t), z), _bc(self.m(t), z)
        return sig / m ** 2 * (z - a * self._mu(z))

    # -- exact flow -------------------------------------------------------------
    def velocity(self, z: Tensor, t: Tensor) -> Tensor:
        """v(z, t) = E[α'x + σ'ε | z_t = z]."""
        da, ds = _bc(self.schedule.d_alpha(t), z), _bc(self.schedule.d_sigma(t), z)
        return da * self.posterior_x(z, t) + ds * self.posterior_eps(z, t)

    def flow_map(self, z: Tensor, t: Tensor, r: Tensor) -> Tensor:
        """X(t→r)(z) = α(r)·μ + m(r)/m(t)·(z − α(t)·μ)."""
        mu = self._mu(z)
        a_t, a_r = _bc(self.schedule.alpha(t), z), _bc(self.schedule.alpha(r), z)
        ratio = _bc(self.m(r) / self.m(t), z)
        return a_r * mu + ratio * (z - a_t * mu)

    def average_velocity(self, z: Tensor, r: Tensor, t: Tensor) -> Tensor:
        """u(z, r, t) = (z − X(t→r)(z))/(t − r); rows with r == t get v(z, t)."""
        t = torch.as_tensor(t, dtype=z.dtype, device=z.device) if not torch.is_tensor(t) else t
        r = torch.as_tensor(r, dtype=z.dtype, device=z.device) if not torch.is_tensor(r) else r
        same = t == r
        dt = torch.where(same, torch.ones_like(t), t - r)  # safe denominator; those rows are replaced below
        avg = (z - self.flow_map(z, t, r)) / _bc(dt, z)
        return torch.where(_bc(same, z), self.velocity(z, t), avg)

    def __call__(self, z: Tensor, r: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self.average_velocity(z, r, t)
