from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from components.registry import TARGET
from components.schedules import _bc
from components.targets.base import Target, TargetOutput, velocity_slug
from components.time_samplers import T_MIN


def particle_groups(t: Tensor, r: Tensor) -> Tensor:
    """Group index per row: consecutive rows with the same (t, r) are one particle group."""
    change = (t[1:] != t[:-1]) | (r[1:] != r[:-1])
    return torch.cat([torch.zeros(1, dtype=torch.long, device=t.device), change.long().cumsum(0)])


@TARGET.register("imm", slug=velocity_slug("imm"))
class IMM(Target):
    """Inductive Moment Matching (Zhou, Ermon, Song 2025, eq. 12 with the mapping of §4.2).

    For each particle group (rows sharing (t, r), from the ``imm`` time sampler) the
    one-step pushforward X_θ(t→r)(z_t) = z_t − (t − r)·u_θ(z_t, r, t) is matched in
    distribution to the two-step one X_T(s→r)(z_s), z_s = DDIM(z_t, ṽ, t → s), under
    stop-gradient (T: the online model, or its EMA at ``ema`` with ``teacher="ema"``).
    The intermediate time s ∈ [r, t] is IMM's mapping with a constant decrement:
    ``mapping="eta"``: η(s) = max(η(t) − Δ, η(r)), η = σ/α, Δ = η(``t_max``)/2^``k``;
    ``mapping="t"``: s = max(t − ``t_max``/2^``k``, r).

    Returns data-space outputs with the group index; the ``mmd`` weighting compares the
    groups' empirical distributions. With groups of one particle it is a pointwise
    consistency loss between the two pushforwards.
    """

    def __init__(self, k: int = 12, mapping: Literal["eta", "t"] = "eta", t_max: float = 0.994,
                 teacher: Literal["online", "ema"] = "online", ema: float = 0.999,
                 velocity: Literal["conditional", "plugin"] = "conditional", plugin_prob: float = 0.5):
        super().__init__(velocity, plugin_prob)
        if k < 0 or not T_MIN < t_max <= 1.0:
            raise ValueError(f"need k ≥ 0 and t_max in ({T_MIN}, 1], got k={k}, t_max={t_max}")
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"imm ema must be in [0, 1), got {ema}")
        self.k, self.mapping, self.t_max = k, mapping, t_max
        self.teacher_ema = ema if teacher == "ema" else None

    def intermediate(self, schedule, t: Tensor, r: Tensor) -> Tensor:
        """s(t, r) ∈ [r, t]: one constant decrement below t, never past r."""
        if self.mapping == "t":
            s = t - self.t_max / 2 ** self.k
        else:
            t_cap = torch.full_like(t, min(self.t_max, 1.0 - 1e-6))  # η(1) = ∞ on both built-in paths
            eta = lambda x: schedule.sigma(x) / schedule.alpha(x)  # noqa: E731
            step = eta(t_cap) / 2 ** self.k
            s = schedule.t_from_ratio((eta(torch.minimum(t, t_cap)) - step).clamp_min(0.0))
        return torch.minimum(torch.maximum(s, r), t)

    def __call__(self, nets, pb):
        v = self.velocity(nets, pb)
        gap = pb.t - pb.r
        pred = pb.z - _bc(gap, pb.z) * nets.model(pb.z, pb.r, pb.t, pb.y)
        with torch.no_grad():
            s = self.intermediate(pb.schedule, pb.t, pb.r)
            z_s = pb.schedule.ddim_step(pb.z, v, pb.t, s)
            target = z_s - _bc(s - pb.r, z_s) * self.teacher(nets)(z_s, pb.r, s, pb.y).to(z_s.dtype)
        return TargetOutput(pred, target.detach(), pb.t, pb.r, group=particle_groups(pb.t, pb.r))
