from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from components.registry import TARGET
from components.schedules import _bc
from components.targets.base import Target, TargetOutput, velocity_slug


@TARGET.register("tvm", slug=velocity_slug("tvm"))
class TerminalVelocityMatching(Target):
    """Terminal Velocity Matching (Zhou, Parger, Haque, Song 2025, §3, the TVM objective): the flow
    map's derivative in its *terminal* time r matches the velocity there,

        d/dr X_θ(t→r)(z_t) = u_θ − (t − r)·∂_r u_θ   ≈   v_T(X_θ(t→r)(z_t), r) = u_T(X, r, r),

    ∂_r u_θ by forward-mode JVP along (0, 1, 0) in (z, r, t) — the paper's (0, 0, 1) in (x_t, t, s) —
    with gradients through it (``jvp_grad=True``, the released code; False: the derivative detached),
    or a central difference in r (``jvp="finite_difference"``). The terminal point X_θ(t→r)(z_t) and
    the teacher u_T (``"ema"`` at ``ema``: the code's EMA target at 0.99; ``"online"``: the model) are
    under no gradient. The r = t rows are TVM's flow-matching term at a second time (the reference gives
    every sample both terms, at a second time s' of its own; a target output holds one residual per
    row): u_θ(z_t, t, t) regresses ṽ, guided as ṽ_ω = ω·ṽ + (1 − ω)·u_T(z_t, t, t | ∅, ω = 1) when the
    guidance feeds ω to the network (``cfg_input``; ṽ on rows with dropped labels). Both residuals are
    divided by ω (the code's loss weight 1/ω²), with ω = 1 without such guidance.
    """

    guidance_input = True

    def __init__(self, jvp_grad: bool = True, jvp: Literal["exact", "finite_difference"] = "exact",
                 fd_step: float = 1e-3, teacher: Literal["ema", "online"] = "ema", ema: float = 0.99,
                 velocity: Literal["conditional", "plugin"] = "conditional", plugin_prob: float = 0.5):
        super().__init__(velocity, plugin_prob)
        if fd_step <= 0 or not 0.0 <= ema < 1.0:
            raise ValueError(f"tvm needs fd_step > 0 and ema in [0, 1), got {fd_step}, {ema}")
        self.jvp_grad, self.jvp, self.fd_step = jvp_grad, jvp, fd_step
        self.teacher_ema = ema if teacher == "ema" else None

    def terminal_derivative(self, model, z: Tensor, r: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(u_θ(z, r, t), ∂_r u_θ(z, r, t)), both with gradient unless ``jvp_grad`` is off."""
        if self.jvp == "exact":
            with sdpa_kernel([SDPBackend.MATH]):  # fused attention kernels lack forward-mode AD
                u, du = torch.func.jvp(lambda r_: model(z, r_, t, y), (r,), (torch.ones_like(r),))
        else:
            lo, hi = (r - self.fd_step).clamp(min=0.0), torch.minimum(r + self.fd_step, t)
            u = model(z, r, t, y)
            with torch.set_grad_enabled(self.jvp_grad and torch.is_grad_enabled()):
                du = (model(z, hi, t, y) - model(z, lo, t, y)) / _bc(hi - lo, z)
        return u, du if self.jvp_grad else du.detach()

    def __call__(self, nets, pb):
        gd = nets.guidance
        cond = gd.draw(pb)
        scale = cond.scale if cond is not None else torch.ones_like(pb.t)
        v = self.velocity(nets, pb)
        pred, target = torch.zeros_like(pb.z), torch.zeros_like(v)
        pair = pb.t > pb.r
        for rows, part in ((pair, self.terminal), (~pair, self.flow_matching)):
            if bool(rows.any()):
                i = rows.nonzero().squeeze(1)
                p, q = part(nets, pb, v, i, cond.rows(i) if cond is not None else None)
                pred, target = pred.index_put((i,), p.to(pred.dtype)), target.index_put((i,), q.to(target.dtype))
        w = _bc(scale, pb.z)
        return TargetOutput(pred / w.to(pred.dtype), (target / w.to(target.dtype)).detach(), pb.t, pb.r)

    def terminal(self, nets, pb, v, i, cond):
        """(d/dr X_θ(t→r), u_T(X_θ(t→r), r, r)) on the rows ``i`` (r < t)."""
        gd, z, r, t, y = nets.guidance, pb.z[i], pb.r[i], pb.t[i], pb.y[i]
        u, du = self.terminal_derivative(gd.bind(nets.model, cond), z, r, t, y)
        with torch.no_grad():
            x_r = z - _bc(t - r, z) * u.detach().to(z.dtype)
            target = gd.bind(self.teacher(nets), cond)(x_r, r, r, y)
        return u - _bc(t - r, u) * du, target

    def flow_matching(self, nets, pb, v, i, cond):
        """(u_θ(z_t, t, t), ṽ or the guided ṽ_ω) on the rows ``i`` (r = t)."""
        gd, z, t, y, vi = nets.guidance, pb.z[i], pb.t[i], pb.y[i], v[i]
        pred = gd.bind(nets.model, cond)(z, t, t, y)
        if cond is None:
            return pred, vi
        with torch.no_grad():
            uncond = gd.bind(self.teacher(nets), cond.unguided())(z, t, t, torch.full_like(y, pb.null_label))
            w = _bc(cond.scale, vi).to(vi.dtype)
            guided = w * vi + (1 - w) * uncond.to(vi.dtype)
        return pred, torch.where(_bc(y == pb.null_label, vi), vi, guided)
