"""Weightings: distance and per-sample weight, (pred, target) → per-sample loss (B,).

Weightings are ``nn.Module``s so that learned ones (``learned_logvar``) are
trained with the network. Reduction over the batch happens once, in the loss.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from components.registry import WEIGHTING
from components.targets.base import TargetOutput


def _sq(out: TargetOutput) -> Tensor:
    """Per-sample squared error (B, D) in float32."""
    diff = (out.pred.float() - out.target.float())
    return (diff * diff).reshape(diff.shape[0], -1)


@WEIGHTING.register("l2")
class L2(nn.Module):
    """Mean squared error per sample: mean_d (pred − target)²."""

    def forward(self, out: TargetOutput) -> Tensor:
        return _sq(out).mean(1)


@WEIGHTING.register("adaptive")
class Adaptive(nn.Module):
    """Adaptive weighting (MeanFlow, Geng et al. 2025, §4.3): w = 1/sg(‖Δ‖² + c)^p applied to ‖Δ‖².

    ‖Δ‖² is the squared L2 norm (sum over dimensions) as in the paper; p = 1
    makes the loss scale-free (≈ a log-loss), p = 0 is plain ‖Δ‖².
    """

    def __init__(self, p: float = 1.0, c: float = 1e-3):
        super().__init__()
        self.p, self.c = p, c

    def forward(self, out):
        dist = _sq(out).sum(1)
        return dist / (dist.detach() + self.c) ** self.p


@WEIGHTING.register("pseudo_huber")
class PseudoHuber(nn.Module):
    """Pseudo-Huber distance (iCT, Song & Dhariwal 2024, eq. 9): √(‖Δ‖² + c²) − c.

    ``c`` defaults to 0.00054·√D, the paper's choice for D data dimensions.
    """

    def __init__(self, c: float | None = None, *, data_shape=None):
        super().__init__()
        dims = math.prod(data_shape) if data_shape is not None else 1
        self.c = c if c is not None else 0.00054 * math.sqrt(dims)

    def forward(self, out):
        return torch.sqrt(_sq(out).sum(1) + self.c ** 2) - self.c


@WEIGHTING.register("learned_logvar")
class LearnedLogVar(nn.Module):
    """Uncertainty weighting (EDM2, Karras et al. 2024, eq. 21; sCM): L·e^{−s(t, r)} + s(t, r).

    s is a learned log-variance over Fourier features of (t, t − r); the base
    distance L is ``l2`` (mean squared error) or ``adaptive`` (with p, c).
    ESC combines it with the adaptive weighting.
    """

    def __init__(self, base: Literal["l2", "adaptive"] = "adaptive", p: float = 1.0, c: float = 1e-3,
                 features: int = 64):
        super().__init__()
        self.base = Adaptive(p, c) if base == "adaptive" else L2()
        self.register_buffer("freqs", torch.randn(2, features, generator=torch.Generator().manual_seed(0)) * 4)
        self.register_buffer("phases", torch.rand(features, generator=torch.Generator().manual_seed(1)))
        self.linear = nn.Linear(features, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def logvar(self, t: Tensor, r: Tensor) -> Tensor:
        tr = torch.stack([t, t - r], dim=1).float()
        feats = torch.cos(2 * math.pi * (tr @ self.freqs + self.phases)) * math.sqrt(2)
        return self.linear(feats).squeeze(1)

    def forward(self, out):
        s = self.logvar(out.t, out.r)
        return self.base(out) * torch.exp(-s) + s
