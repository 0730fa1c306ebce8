from __future__ import annotations

from typing import Literal

import torch

from components.registry import TARGET
from components.schedules import _bc
from components.targets.base import Target, TargetOutput, velocity_slug


@TARGET.register("split_meanflow", slug=velocity_slug("split_meanflow"))
class SplitMeanFlow(Target):
    """SplitMeanFlow (Guo et al. 2025, Interval Splitting Consistency, §3): for r < s < t,

        (t − r)·u(z_t, r, t) = (s − r)·u(z_s, r, s) + (t − s)·u(z_t, s, t),

    an algebraic identity (additivity of the integral of v), so no JVP. With s = t − λ(t − r) and
    z_s = z_t − (t − s)·u₂ the target is u_tgt = (1 − λ)·u₁ + λ·u₂, u₂ = u_T(z_t, s, t),
    u₁ = u_T(z_s, r, s), under no gradient (T: ``"online"`` the model, as the paper's algorithm;
    ``"ema"`` its EMA at ``ema``). ``split`` chooses s: ``"uniform"`` λ ~ U(0, 1) per row (the paper),
    ``"midpoint"`` λ = ½ (the shortcut model's halving). The r = t rows are the boundary condition
    u(z_t, t, t) = ṽ (flow matching).
    """

    def __init__(self, split: Literal["uniform", "midpoint"] = "uniform",
                 teacher: Literal["online", "ema"] = "online", ema: float = 0.999,
                 velocity: Literal["conditional", "plugin"] = "conditional", plugin_prob: float = 0.5):
        super().__init__(velocity, plugin_prob)
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"split_meanflow ema must be in [0, 1), got {ema}")
        self.split = split
        self.teacher_ema = ema if teacher == "ema" else None

    def __call__(self, nets, pb):
        target = self.velocity(nets, pb)
        pair = pb.t > pb.r
        if bool(pair.any()):
            i = pair.nonzero().squeeze(1)
            target = target.clone()
            target[i] = self.split_target(nets, pb, i).to(target.dtype)
        pred = nets.model(pb.z, pb.r, pb.t, pb.y)
        return TargetOutput(pred, target.detach(), pb.t, pb.r)

    def fraction(self, pb, n: int):
        """λ ∈ (0, 1) per row: where s = t − λ(t − r) splits [r, t]."""
        if self.split == "midpoint":
            return torch.full((n,), 0.5, device=pb.t.device, dtype=pb.t.dtype)
        return torch.rand(n, generator=pb.generator, device=pb.t.device, dtype=pb.t.dtype)

    @torch.no_grad()
    def split_target(self, nets, pb, i):
        teacher = self.teacher(nets)
        z, r, t, y = pb.z[i], pb.r[i], pb.t[i], pb.y[i]
        lam = self.fraction(pb, len(i))
        s = t - lam * (t - r)
        u2 = teacher(z, s, t, y)
        u1 = teacher(z - _bc(t - s, z) * u2.to(z.dtype), r, s, y)
        return _bc(1 - lam, u1) * u1 + _bc(lam, u2) * u2
