from __future__ import annotations

from typing import Literal

import torch

from components.guidance import cfg_combine
from components.registry import TARGET
from components.schedules import _bc
from components.targets.base import Target, TargetOutput, velocity_slug


@TARGET.register("shortcut", slug=velocity_slug("shortcut"))
class Shortcut(Target):
    """Shortcut self-consistency (Frans et al. 2025, eq. 5), in the t = 1-noise convention.

    Rows whose step d = t − r exceeds the smallest step 1/``base_steps`` are
    bootstrap rows: with s = t − d/2 (the half-way time),
        u₁ = u_T(z_t, s, t),  z_s = z_t − (d/2)·u₁,  u₂ = u_T(z_s, r, s),
        target = (u₁ + u₂)/2   (clipped to ±``clip`` as in the released code; 0: no clipping),
    u_T the teacher (``teacher="ema"``: EMA weights at rate ``ema``, as in the
    released code; ``"online"``: the model itself) under no gradient, with CFG
    at scale ``bootstrap_cfg`` inside the teacher (1: off). The other rows are
    flow matching: u_θ(z_t, r, t) regresses ṽ at the smallest step.
    """

    def __init__(self, base_steps: int = 128, teacher: Literal["ema", "online"] = "ema", ema: float = 0.999,
                 clip: float = 4.0, bootstrap_cfg: float = 1.0,
                 velocity: Literal["conditional", "plugin"] = "conditional", plugin_prob: float = 0.5):
        super().__init__(velocity, plugin_prob)
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"shortcut ema must be in [0, 1), got {ema}")
        self.base_steps, self.clip, self.bootstrap_cfg = base_steps, clip, bootstrap_cfg
        self.teacher_ema = ema if teacher == "ema" else None

    def compatible(self, components):
        sampler = components.get("time_sampler")
        n = getattr(sampler, "base_steps", None)
        if n is not None and n != self.base_steps:
            return [f"shortcut target base_steps={self.base_steps} differs from the dyadic sampler's "
                    f"base_steps={n}: the flow-matching rows would be bootstrapped"]
        return []

    def __call__(self, nets, pb):
        d = pb.t - pb.r
        boot = d > (1.0 + 1e-4) / self.base_steps
        target = self.velocity(nets, pb)
        if bool(boot.any()):
            idx = boot.nonzero().squeeze(1)
            target = target.clone()
            target[idx] = self.bootstrap(nets, pb.z[idx], pb.r[idx], pb.t[idx], pb.y[idx], pb.null_label).to(target.dtype)
        pred = nets.model(pb.z, pb.r, pb.t, pb.y)
        return TargetOutput(pred, target.detach(), pb.t, pb.r)

    @torch.no_grad()
    def bootstrap(self, nets, z, r, t, y, null_label):
        teacher = self.teacher(nets)
        s = 0.5 * (t + r)
        u1 = cfg_combine(teacher, z, s, t, y, null_label, self.bootstrap_cfg)
        z_s = z - _bc(t - s, z) * u1
        u2 = cfg_combine(teacher, z_s, r, s, y, null_label, self.bootstrap_cfg)
        u = 0.5 * (u1 + u2)
        return u.clamp(-self.clip, self.clip) if self.clip > 0 else u
