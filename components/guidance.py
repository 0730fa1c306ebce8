"""Class guidance: how labels are dropped in training, folded into targets, and applied when sampling.

Labels are 0..K−1; the null label K is the unconditional branch.
"""
from __future__ import annotations

import torch
from torch import Tensor

from components.registry import GUIDANCE
from components.schedules import _bc


def cfg_combine(net, z: Tensor, r: Tensor, t: Tensor, y: Tensor, null_label: int, scale: float) -> Tensor:
    """Classifier-free guidance u∅ + w·(u_y − u∅) (Ho & Salimans 2022); rows with y = ∅ stay unguided."""
    if scale == 1.0:
        return net(z, r, t, y)
    null = torch.full_like(y, null_label)
    both = net(torch.cat([z, z]), torch.cat([r, r]), torch.cat([t, t]), torch.cat([y, null]))
    cond, uncond = both.chunk(2)
    guided = uncond + scale * (cond - uncond)
    return torch.where(_bc(y == null_label, z), cond, guided)


class Guidance:
    def __init__(self, label_dropout: float = 0.0, scale: float = 1.0):
        if not 0.0 <= label_dropout <= 1.0:
            raise ValueError(f"label_dropout must be in [0, 1], got {label_dropout}")
        self.label_dropout, self.scale = label_dropout, scale

    def drop_labels(self, y: Tensor, null_label: int, generator=None) -> Tensor:
        if self.label_dropout == 0.0:
            return y
        drop = torch.rand(y.shape, generator=generator, device=y.device) < self.label_dropout
        return torch.where(drop, torch.full_like(y, null_label), y)

    def fold(self, v: Tensor, model, z: Tensor, t: Tensor, y: Tensor, null_label: int) -> Tensor:
        """Training-time change of the velocity target ṽ (identity unless guidance is folded in)."""
        return v

    def sample_velocity(self, net, z, r, t, y, null_label: int, scale: float | None = None) -> Tensor:
        scale = self.scale if scale is None else scale
        return cfg_combine(net, z, r, t, y, null_label, scale)


@GUIDANCE.register("none")
class NoGuidance(Guidance):
    """No label dropout and no guidance: a plain (class-)conditional model."""

    def __init__(self):
        super().__init__(0.0, 1.0)


@GUIDANCE.register("cfg")
class CFG(Guidance):
    """Classifier-free guidance: drop labels with probability ``label_dropout``; sample with ``scale``."""

    def __init__(self, label_dropout: float = 0.1, scale: float = 1.0):
        super().__init__(label_dropout, scale)


@GUIDANCE.register("meanflow_cfg")
class MeanFlowCFG(Guidance):
    """Guidance folded into the target (MeanFlow, Geng et al. 2025, eq. 21; ESC §4):

        ṽ = ω·v + κ·u_θ(z_t, t, t | y) + (1 − ω − κ)·u_θ(z_t, t, t | ∅)   for t ∈ [t_min, t_max],

    u_θ under stop-gradient; unconditional rows and t outside the interval keep ṽ = v.
    Sampling is then unguided (scale 1): one network evaluation per step.
    """

    def __init__(self, omega: float = 1.0, kappa: float = 0.5, t_min: float = 0.0, t_max: float = 1.0,
                 label_dropout: float = 0.1):
        super().__init__(label_dropout, 1.0)
        if not 0.0 <= t_min <= t_max <= 1.0:
            raise ValueError(f"need 0 ≤ t_min ≤ t_max ≤ 1, got [{t_min}, {t_max}]")
        self.omega, self.kappa, self.t_min, self.t_max = omega, kappa, t_min, t_max

    @torch.no_grad()
    def fold(self, v, model, z, t, y, null_label):
        null = torch.full_like(y, null_label)
        both = model(torch.cat([z, z]), torch.cat([t, t]), torch.cat([t, t]), torch.cat([y, null])).to(v.dtype)
        cond, uncond = both.chunk(2)
        guided = self.omega * v + self.kappa * cond + (1 - self.omega - self.kappa) * uncond
        use = (y != null_label) & (t >= self.t_min) & (t <= self.t_max)
        return torch.where(_bc(use, v), guided, v)
