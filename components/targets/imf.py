from __future__ import annotations

from functools import partial
from typing import Literal

import torch
from torch import Tensor

from components.guidance import GuidanceCondition
from components.registry import TARGET
from components.schedules import _bc
from components.targets.base import Target, TargetOutput, velocity_slug
from components.targets.meanflow import total_derivative

VELOCITY_HEAD = "velocity"  # the backbone head the auxiliary velocity is read from


@TARGET.register("imf", slug=velocity_slug("imf"))
class ImprovedMeanFlow(Target):
    """Improved MeanFlow (Geng, Lu et al. 2025, §4.1 "the v-loss"): the average velocity u_θ is trained
    through the velocity it implies,

        V_θ = u_θ(z_t, r, t) + (t − r)·sg(du_θ/dt),   regressed on ṽ (or the guided ṽ_ω),

    the total derivative du/dt = v_θ·∂_z u + ∂_t u taken along the network's *predicted* velocity v_θ
    (tangent (v_θ, 0, 1) for (z, r, t); MeanFlow's identity u = v − (t − r)·du/dt read as V = v). With
    ``tangent="target"`` the tangent is ṽ and the residual V − ṽ is MeanFlow's u − u_tgt exactly.

    v_θ (no gradient, from the teacher: ``"online"`` the model, ``"ema"`` its EMA at ``ema``):
    ``velocity_head="aux"`` (the released code) reads an auxiliary velocity head of the backbone (attached
    at build time); ``"boundary"`` uses u_θ(z, t, t). With the aux head, the r = t rows train it (its
    prediction regresses ṽ_ω there) and the r ≠ t rows train V_θ — the reference gives every row both
    losses; a target output holds one residual per row.

    Guidance as an input (guidance ``cfg_input``, §4.2): per row ω and [t_min, t_max] are drawn and fed
    to u_θ; the target is ṽ_ω = ṽ + (1 − 1/ω')·(v_θ(z_t, t | y, ω') − v_θ(z_t, t | ∅, 1)) with
    ω' = ω on the interval and 1 off it (the velocity predictions on the full interval), ṽ on rows with
    dropped labels; the tangent is v_θ(· | y, ω'). ``tangent_labels="real"`` (the code) takes the
    tangent with the data's label also on dropped rows; ``"dropped"`` with the row's own.
    """

    guidance_input = True

    def __init__(self, velocity_head: Literal["aux", "boundary"] = "aux",
                 tangent: Literal["predicted", "target"] = "predicted",
                 tangent_labels: Literal["real", "dropped"] = "real",
                 jvp: Literal["exact", "finite_difference"] = "exact", fd_step: float = 1e-3,
                 teacher: Literal["online", "ema"] = "online", ema: float = 0.999,
                 velocity: Literal["conditional", "plugin"] = "conditional", plugin_prob: float = 0.5):
        super().__init__(velocity, plugin_prob)
        if fd_step <= 0 or not 0.0 <= ema < 1.0:
            raise ValueError(f"imf needs fd_step > 0 and ema in [0, 1), got {fd_step}, {ema}")
        self.velocity_head, self.tangent, self.tangent_labels = velocity_head, tangent, tangent_labels
        self.jvp, self.fd_step = jvp, fd_step
        self.teacher_ema = ema if teacher == "ema" else None

    def compatible(self, components):
        if self.velocity_head != "aux":
            return []
        backbone, sampler = components.get("backbone"), components.get("time_sampler")
        if not callable(getattr(backbone, "add_head", None)):
            return [f"imf velocity_head='aux' needs a backbone with output heads (add_head); "
                    f"{type(backbone).__name__} has none: use velocity_head='boundary'"]
        if getattr(sampler, "fraction_r_neq_t", 0.0) >= 1.0:
            return ["imf velocity_head='aux' trains the velocity head on the r = t rows, and the time sampler "
                    "has none (fraction_r_neq_t = 1)"]
        backbone.add_head(VELOCITY_HEAD)  # before the optimizer and the EMAs are made
        return []

    def predicted_velocity(self, net, guidance, cond):
        """v_θ(z, t | y, cond) as a function (z, t, y), from the aux head or u_θ(z, t, t)."""
        head = partial(net, head=VELOCITY_HEAD) if self.velocity_head == "aux" else net
        bound = guidance.bind(head, cond)
        return lambda z, t, y: bound(z, t, t, y)

    @torch.no_grad()
    def guided(self, nets, pb, v: Tensor, cond) -> tuple[Tensor, Tensor]:
        """(target ṽ_ω, tangent velocity v_θ(· | y, ω')); without guidance inputs (ṽ, v_θ(· | y))."""
        gd, teacher = nets.guidance, self.teacher(nets)
        y = pb.labels if self.tangent_labels == "real" else pb.y
        if cond is None:
            return v, self.predicted_velocity(teacher, gd, None)(pb.z, pb.t, y).to(v.dtype)
        inside = (pb.t >= cond.t_min) & (pb.t <= cond.t_max)
        w = torch.where(inside, cond.scale, torch.ones_like(cond.scale))
        guided_cond = GuidanceCondition(w, torch.zeros_like(w), torch.ones_like(w))
        both = self.predicted_velocity(teacher, gd, guided_cond.cat(guided_cond.unguided()))(
            torch.cat([pb.z, pb.z]), torch.cat([pb.t, pb.t]), torch.cat([y, torch.full_like(y, pb.null_label)]))
        v_c, v_u = both.to(v.dtype).chunk(2)
        target = v + _bc(1.0 - 1.0 / w, v) * (v_c - v_u)
        return torch.where(_bc(pb.y == pb.null_label, v), v, target), v_c

    def __call__(self, nets, pb):
        gd = nets.guidance
        cond = gd.draw(pb)
        v = self.velocity(nets, pb)
        target, v_c = self.guided(nets, pb, v, cond)
        tangent = v_c if self.tangent == "predicted" else v
        compound = pb.t > pb.r if self.velocity_head == "aux" else torch.ones_like(pb.t, dtype=torch.bool)
        pred = torch.zeros_like(pb.z)
        for rows, part in ((compound, self.compound), (~compound, self.head_rows)):
            if bool(rows.any()):
                i = rows.nonzero().squeeze(1)
                out = part(nets, pb, i, cond.rows(i) if cond is not None else None, tangent[i])
                pred = pred.index_put((i,), out.to(pred.dtype))
        return TargetOutput(pred, target.detach(), pb.t, pb.r)

    def compound(self, nets, pb, i, cond, tangent):
        """V_θ = u_θ + (t − r)·sg(du_θ/dt) on the rows ``i``, du/dt along (tangent, 0, 1)."""
        u, dudt = total_derivative(nets.guidance.bind(nets.model, cond), pb.z[i], pb.r[i], pb.t[i], pb.y[i],
                                   tangent, self.jvp, self.fd_step)
        return u + _bc(pb.t[i] - pb.r[i], u) * dudt.to(u.dtype)

    def head_rows(self, nets, pb, i, cond, tangent):
        """The auxiliary velocity head v_θ(z_t, t) on the r = t rows ``i``."""
        return self.predicted_velocity(nets.model, nets.guidance, cond)(pb.z[i], pb.t[i], pb.y[i])
