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


def group_layout(group: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Rows laid out by particle group: (index (G, g), mask (G, g), inverse (B,)).

    ``index[k, j]`` is the row of the j-th particle of group k (groups in order of their labels,
    particles in row order), ``mask`` marks the real entries of the padding to g = the largest
    group (an uneven last group is padded), ``inverse[i]`` is the group of row i.
    """
    _, inverse, sizes = torch.unique(group, return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.arange(group.numel(), device=group.device) - starts[inverse[order]]
    width = int(sizes.max())
    index = torch.zeros(sizes.numel(), width, dtype=torch.long, device=group.device)
    mask = torch.zeros(sizes.numel(), width, dtype=torch.bool, device=group.device)
    index[inverse[order], rank] = order
    mask[inverse[order], rank] = True
    return index, mask, inverse


def group_pairwise_dist(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """‖a_gi − b_gj‖₂ (G, g, g) within each group of (G, g, D) particle sets, by direct differences.

    Floored at eps (IMM's max(‖·‖, ε): a finite gradient at 0). The Gram expansion
    ‖a‖² + ‖b‖² − 2a·b cancels catastrophically in float32 (a vector's distance to itself came out
    as 2·10⁻² at D = 4096) and its matmul runs in half precision under autocast; the differences stay
    exact for equal rows and are computed in float32 with autocast off. Memory is G·g²·D: only pairs
    inside a group are formed, never the B×B×D tensor.
    """
    with torch.autocast(device_type=a.device.type, enabled=False):
        diff = a.float()[:, :, None, :] - b.float()[:, None, :, :]
        sq = (diff * diff).sum(-1)
    return sq.clamp_min(eps * eps).sqrt()


@WEIGHTING.register("mmd")
class MMD(nn.Module):
    """Kernel MMD² between particle groups (IMM, Zhou, Ermon, Song 2025, eq. 8 and §4.3).

    Rows with the same ``out.group`` are particles of one distribution each for pred and
    target; every row of a group carries the group's V-statistic MMD² = mean k(p, p') +
    mean k(q, q') − 2·mean k(p, q) (the batch mean is the size-weighted mean over groups). Kernels on
    the flattened D dimensions, with IMM's scale w̃ = 1/|c_out| = 1/(``bandwidth``·(t − r)):
    ``laplace`` exp(−w̃·‖p − q‖/D), ``rbf`` exp(−w̃²·‖p − q‖²/2D). ``time_weight="imm"``
    multiplies by w(t) = ½·sigmoid(b − λ_t)·(−dλ_t/dt)·α_t^a/(α_t² + σ_t²), λ = log(α²/σ²)
    (IMM eq. 13). Without groups every row is its own group.
    """

    def __init__(self, kernel: Literal["laplace", "rbf"] = "laplace", bandwidth: float = 0.5,
                 time_weight: Literal["imm", "none"] = "imm", a: float = 2.0, b: float = 4.0, *, schedule=None):
        super().__init__()
        if bandwidth <= 0:
            raise ValueError(f"mmd bandwidth must be > 0, got {bandwidth}")
        if time_weight == "imm" and schedule is None:
            raise ValueError("mmd time_weight='imm' needs the design's schedule")
        self.kernel, self.bandwidth, self.time_weight, self.a, self.b = kernel, bandwidth, time_weight, a, b
        self.schedule = schedule

    def weight(self, t: Tensor) -> Tensor:
        t = t.float().clamp(1e-4, 1 - 1e-4)
        s = self.schedule
        al, sg = s.alpha(t), s.sigma(t)
        lam = 2 * (al.log() - sg.log())
        neg_dlam = 2 * (s.d_sigma(t) / sg - s.d_alpha(t) / al)
        return 0.5 * torch.sigmoid(self.b - lam) * neg_dlam * al ** self.a / (al * al + sg * sg)

    def forward(self, out):
        p, q = out.pred.float().flatten(1), out.target.float().flatten(1)
        n, dims = p.shape
        group = out.group if out.group is not None else torch.arange(n, device=p.device)
        index, mask, inverse = group_layout(group)
        pg, qg = p[index], q[index]  # (G, g, D); padded entries are masked out below
        # IMM's w̃ = 1/|c_out|, one per group (its rows share (t, r)); taken from each group's first row
        scale = 1.0 / (self.bandwidth * (out.t - out.r).float().clamp_min(1e-3))[index[:, 0]][:, None, None]
        pair = (mask[:, :, None] & mask[:, None, :]).float()

        def k(x, y):
            d = group_pairwise_dist(x, y) * scale
            return torch.exp(-d / dims) if self.kernel == "laplace" else torch.exp(-d * d / (2 * dims))

        size = mask.sum(1).float()
        per_group = ((k(pg, pg) + k(qg, qg) - 2 * k(pg, qg)) * pair).sum((1, 2)) / size ** 2  # V-statistic MMD²
        per_row = per_group[inverse]  # every row carries its group's MMD² (≥ 0)
        if self.time_weight == "imm":
            per_row = per_row * self.weight(out.t)
        return per_row
