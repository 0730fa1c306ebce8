from __future__ import annotations

from typing import Literal

import torch

from components.registry import TARGET
from components.schedules import _bc
from components.targets.base import Target, TargetOutput
from components.targets.meanflow import total_derivative


def _slug(kw: dict) -> str:
    return ("ct" if kw["mode"] == "discrete" else "sct") + ("_plugin" if kw.get("velocity") == "plugin" else "")


@TARGET.register("consistency", slug=_slug)
class Consistency(Target):
    """Consistency training towards the end point r of the flow map (CT and sCT in ESC's template).

    The consistency function is f_θ(z_t) = X_θ(t→r)(z_t) = z_t − (t − r)·u_θ(z_t, r, t)
    (r = 0 for CT/sCT: the data end). Its target, under stop-gradient:

    - ``mode="discrete"`` (CT, Song et al. 2023, eq. 10; iCT, Song & Dhariwal 2024): s < t the
      adjacent time — the grid sampler's ``previous(t)``, else t − ``delta`` — then
      z_s = DDIM(z_t, ṽ, t → s) (the same noise draw at s with the conditional velocity) and
      target X_T(s→r)(z_s) = z_s − (s − r)·u_T(z_s, r, s), T the teacher (``"online"``:
      stop-gradient of the model, iCT's choice; ``"ema"``: EMA weights at ``ema``).
    - ``mode="continuous"`` (sCT, Lu & Song 2025): the s → t limit. With the tangent
      g = df/dt = ṽ − u − w·(t − r)·du/dt along (ṽ, 0, 1) (forward-mode JVP, or a finite
      difference), normalised g/(‖g‖ + ``tangent_norm``) (0: off) and warmed up by
      w = min(1, step/``tangent_warmup``) (sCM's warm-up of the network's own time
      derivative), the target is f − (t − r)·g, i.e. u_tgt = u + g. Without normalisation and
      warm-up this is exactly the MeanFlow target ṽ − (t − r)·du/dt.

    ``space`` picks what the weighting compares: ``"velocity"`` (u_θ against u_tgt, ESC's
    template) or ``"data"`` (f_θ against its target, as CT does; the two differ by the factor
    (t − r) per row). Rows with r = t are flow matching (u_tgt = ṽ); in data space they weigh
    nothing (the factor t − r is 0), so pair samplers with r = t rows want ``space="velocity"``.
    """

    def __init__(self, mode: Literal["discrete", "continuous"] = "discrete",
                 space: Literal["velocity", "data"] = "velocity", delta: float = 0.0,
                 teacher: Literal["online", "ema"] = "online", ema: float = 0.999,
                 jvp: Literal["exact", "finite_difference"] = "exact", fd_step: float = 1e-3,
                 tangent_norm: float = 0.1, tangent_warmup: int = 0,
                 velocity: Literal["conditional", "plugin"] = "conditional", plugin_prob: float = 0.5):
        super().__init__(velocity, plugin_prob)
        if delta < 0 or tangent_norm < 0 or tangent_warmup < 0:
            raise ValueError("delta, tangent_norm and tangent_warmup must be ≥ 0")
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"consistency ema must be in [0, 1), got {ema}")
        self.mode, self.space, self.delta = mode, space, delta
        self.teacher_ema = ema if teacher == "ema" and mode == "discrete" else None
        self.jvp, self.fd_step = jvp, fd_step
        self.tangent_norm, self.tangent_warmup = tangent_norm, tangent_warmup

    def compatible(self, components):
        sampler = components.get("time_sampler")
        if self.mode == "discrete" and self.delta == 0 and not hasattr(sampler, "previous"):
            return ["discrete consistency needs an adjacent time s < t: use the 'discrete' time sampler "
                    "(its grid) or set design.target.delta > 0"]
        return []

    def __call__(self, nets, pb):
        v = self.velocity(nets, pb)
        gap = pb.t - pb.r
        if self.mode == "discrete":
            u = nets.model(pb.z, pb.r, pb.t, pb.y)
            u_tgt = self.discrete_target(nets, pb, v)
        else:
            u, dudt = total_derivative(nets.model, pb.z, pb.r, pb.t, pb.y, v, self.jvp, self.fd_step)
            u_tgt = u.detach() + self.tangent(v, u.detach(), dudt, gap, pb.step)
        u_tgt = torch.where(_bc(gap > 0, v), u_tgt.to(v.dtype), v).detach()  # r = t rows: flow matching
        if self.space == "data":
            return TargetOutput(pb.z - _bc(gap, u) * u, pb.z - _bc(gap, v) * u_tgt, pb.t, pb.r)
        return TargetOutput(u, u_tgt, pb.t, pb.r)

    @torch.no_grad()
    def discrete_target(self, nets, pb, v):
        """u_tgt = (z_t − X_T(s→r)(z_s))/(t − r) with z_s = DDIM(z_t, ṽ, t → s)."""
        prev = getattr(pb.time_sampler, "previous", None)
        s = prev(pb.t) if self.delta == 0 and prev is not None else pb.t - self.delta
        s = torch.minimum(torch.maximum(s, pb.r), pb.t)
        z_s = pb.schedule.ddim_step(pb.z, v, pb.t, s)
        x_r = z_s - _bc(s - pb.r, z_s) * self.teacher(nets)(z_s, pb.r, s, pb.y).to(z_s.dtype)
        gap = pb.t - pb.r
        return (pb.z - x_r) / _bc(torch.where(gap > 0, gap, torch.ones_like(gap)), x_r)

    def tangent(self, v, u, dudt, gap, step):
        """g = ṽ − u − w·(t − r)·du/dt, optionally normalised per row by ‖g‖ + c."""
        w = min(1.0, step / self.tangent_warmup) if self.tangent_warmup else 1.0
        g = v - u - w * _bc(gap, v) * dudt
        if self.tangent_norm > 0:
            norm = g.flatten(1).norm(dim=1)
            g = g / _bc(norm + self.tangent_norm, g)
        return g
