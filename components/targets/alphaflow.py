from __future__ import annotations

import math
from typing import Literal

import torch

from components.registry import TARGET
from components.schedules import _bc
from components.targets.base import Target, TargetOutput, velocity_slug
from components.targets.meanflow import total_derivative


@TARGET.register("alphaflow", slug=velocity_slug("alphaflow"))
class AlphaFlow(Target):
    """α-Flow (Zhang et al. 2025, the α-Flow objective of §4): with δ = α·(t − r),

        u_tgt = [δ·ṽ + (t − δ − r)·u_T(z_t − δ·ṽ, r, t − δ)] / (t − r),

    u_T the teacher under no gradient (``"online"``: the model, as the released code; ``"ema"``: its EMA
    at ``ema``). α = 1 is trajectory flow matching (u_tgt = ṽ, no extra forward), α → 0 MeanFlow; below
    ``clamp`` α is 0 and the target is MeanFlow's ṽ − (t − r)·du/dt (JVP, or ``jvp="finite_difference"``),
    above 1 − ``clamp`` it is 1. r = t rows regress ṽ. ``clip`` > 0 clips u_tgt to ±clip (0: off).

    ``normalise=True`` regresses u⁻ + (u_tgt − u⁻)/α (u⁻ = sg u_T(z_t, r, t)): the same minimiser, with a
    residual that does not shrink with α and tends to MeanFlow's as α → 0. The reference instead
    multiplies those rows' adaptive loss by α, which under the adaptive weighting is the same gradient up
    to its constant c. ``False``: u_tgt itself.

    α anneals from ``alpha_start`` to ``alpha_end`` between the fractions ``anneal_from`` and
    ``anneal_to`` of the run (``train.steps``): ``sigmoid`` (the code: start + (end − start)·σ(γ·(k − k_mid)/
    (k_to − k_from)), γ = ``gamma``), ``linear``, or ``constant`` (α = ``alpha_start`` throughout).
    """

    def __init__(self, alpha_start: float = 1.0, alpha_end: float = 0.0,
                 anneal: Literal["sigmoid", "linear", "constant"] = "sigmoid", anneal_from: float = 0.0,
                 anneal_to: float = 1.0, gamma: float = 25.0, clamp: float = 0.005, clip: float = 0.0,
                 normalise: bool = True, teacher: Literal["online", "ema"] = "online", ema: float = 0.999,
                 jvp: Literal["exact", "finite_difference"] = "exact", fd_step: float = 1e-3,
                 velocity: Literal["conditional", "plugin"] = "conditional", plugin_prob: float = 0.5,
                 *, train_steps: int | None = None):
        super().__init__(velocity, plugin_prob)
        if not (0.0 <= alpha_start <= 1.0 and 0.0 <= alpha_end <= 1.0):
            raise ValueError(f"alphaflow α must stay in [0, 1], got {alpha_start} → {alpha_end}")
        if anneal != "constant":
            if not 0.0 <= anneal_from < anneal_to <= 1.0:
                raise ValueError(f"alphaflow anneal_from < anneal_to are fractions of the run in [0, 1], "
                                 f"got {anneal_from}, {anneal_to}")
            if not train_steps:
                raise ValueError("alphaflow anneals α over a fraction of train.steps, which is unknown here")
        if not 0.0 <= clamp < 0.5 or clip < 0 or fd_step <= 0 or not 0.0 <= ema < 1.0:
            raise ValueError("alphaflow needs clamp in [0, ½), clip ≥ 0, fd_step > 0 and ema in [0, 1)")
        self.alpha_start, self.alpha_end, self.anneal = alpha_start, alpha_end, anneal
        self.gamma, self.clamp = gamma, clamp
        steps = train_steps or 0
        self.k_from, self.k_to = anneal_from * steps, anneal_to * steps
        self.clip, self.normalise, self.jvp, self.fd_step = clip, normalise, jvp, fd_step
        self.teacher_ema = ema if teacher == "ema" else None

    def alpha(self, step: int) -> float:
        """α at training step ``step`` (clamped to exactly 0 or 1 near the ends)."""
        a0, a1 = self.alpha_start, self.alpha_end
        if self.anneal == "constant" or step <= self.k_from:
            a = a0
        elif step >= self.k_to:
            a = a1
        else:
            span = self.k_to - self.k_from
            if self.anneal == "linear":
                a = a0 + (a1 - a0) * (step - self.k_from) / span
            else:
                p = (step - 0.5 * (self.k_from + self.k_to)) / span
                a = a0 + (a1 - a0) / (1.0 + math.exp(-self.gamma * p))
        return 0.0 if a < self.clamp else 1.0 if a > 1.0 - self.clamp else a

    def __call__(self, nets, pb):
        a = self.alpha(pb.step)
        v = self.velocity(nets, pb)
        gap = _bc(pb.t - pb.r, v)
        if a == 0.0:  # MeanFlow's target (eq. 10 of Geng et al.)
            u, dudt = total_derivative(nets.model, pb.z, pb.r, pb.t, pb.y, v, self.jvp, self.fd_step)
            return TargetOutput(u, (v - gap * dudt.to(v.dtype)).detach(), pb.t, pb.r)
        u = nets.model(pb.z, pb.r, pb.t, pb.y)
        target = v
        pair = pb.t > pb.r
        if a < 1.0 and bool(pair.any()):
            target = v.clone()
            i = pair.nonzero().squeeze(1)
            target[i] = self.discrete(nets, pb, v, u, i, a).to(v.dtype)
        return TargetOutput(u, target.detach(), pb.t, pb.r)

    @torch.no_grad()
    def discrete(self, nets, pb, v, u, i, a: float):
        """The α-Flow target on the rows ``i`` (r < t)."""
        teacher = self.teacher(nets)
        z, r, t, y, vi = pb.z[i], pb.r[i], pb.t[i], pb.y[i], v[i]
        d = a * (t - r)
        u_next = teacher(z - _bc(d, z) * vi.to(z.dtype), r, t - d, y).to(vi.dtype)
        tgt = (_bc(d, vi) * vi + _bc(t - d - r, vi) * u_next) / _bc(t - r, vi)
        if self.clip > 0:
            tgt = tgt.clamp(-self.clip, self.clip)
        if not self.normalise:
            return tgt
        base = u[i].detach().to(vi.dtype) if teacher is nets.model else teacher(z, r, t, y).to(vi.dtype)
        return base + (tgt - base) / a
