from __future__ import annotations

from typing import Literal

import torch

from components.registry import TARGET
from components.schedules import _bc
from components.targets.base import Target, TargetOutput, velocity_slug
from components.targets.jvp import exact_total_derivative


@TARGET.register("meanflow", slug=velocity_slug("meanflow"))
class MeanFlow(Target):
    """MeanFlow identity (Geng et al. 2025, eq. 10): u_tgt = ṽ − (t − r)·(d/dt) u_θ(z_t, r, t),

    with the total derivative d/dt u = ṽ·∂_z u + ∂_t u taken by forward-mode JVP
    (tangents (ṽ, 0, 1) for (z, r, t)) under stop-gradient, on the r < t rows only
    (``components/targets/jvp.py``: the prediction is an ordinary forward, the
    tangent has no graph). ``jvp="finite_difference"`` uses the central difference
    [u(z + hṽ, r, t + h) − u(z − hṽ, r, t − h)]/2h instead.
    """

    def __init__(self, jvp: Literal["exact", "finite_difference"] = "exact", fd_step: float = 1e-3,
                 velocity: Literal["conditional", "plugin"] = "conditional", plugin_prob: float = 0.5):
        super().__init__(velocity, plugin_prob)
        if fd_step <= 0:
            raise ValueError(f"fd_step must be > 0, got {fd_step}")
        self.jvp, self.fd_step = jvp, fd_step

    def __call__(self, nets, pb):
        v = self.velocity(nets, pb)
        u, dudt = self.total_derivative(nets.model, pb.z, pb.r, pb.t, pb.y, v)
        target = v - _bc(pb.t - pb.r, v) * dudt
        return TargetOutput(u, target.detach(), pb.t, pb.r)

    def total_derivative(self, model, z, r, t, y, v):
        """(u_θ(z, r, t), d/dt u_θ along (ṽ, 0, 1)); the second has no gradient."""
        return total_derivative(model, z, r, t, y, v, self.jvp, self.fd_step)


def total_derivative(model, z, r, t, y, v, jvp: str = "exact", fd_step: float = 1e-3):
    """(u_θ(z, r, t), d/dt u_θ(z_t, r, t) along the tangent (ṽ, 0, 1)), the derivative detached.

    ``jvp="exact"``: forward-mode AD on the rows with r < t (0 on the r = t rows, where every target
    multiplies it by t − r = 0), see :func:`exact_total_derivative`.
    ``"finite_difference"``: the central difference of two extra no-grad forwards.
    """
    if jvp == "exact":
        return exact_total_derivative(model, z, r, t, y, v)
    u = model(z, r, t, y)
    with torch.no_grad():  # central difference, kept inside r ≤ t ≤ 1
        hi = (t + fd_step).clamp(max=1.0)
        lo = torch.maximum(t - fd_step, r)
        lo = torch.where(hi - lo > 0, lo, t - fd_step)  # r = t = 1: one-sided step below
        vz = v.to(z.dtype)
        u_hi = model(z + _bc(hi - t, z) * vz, r, hi, y)
        u_lo = model(z + _bc(lo - t, z) * vz, r, lo, y)
        dudt = (u_hi - u_lo) / _bc(hi - lo, z)
    return u, dudt
