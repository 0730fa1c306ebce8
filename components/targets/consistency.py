from __future__ import annotations

import inspect
from typing import Literal

import torch
from torch import Tensor

from components.budget import steps_of
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
      adjacent time — the grid sampler's ``previous(t, step)`` (its grid at the training step), else
      t − ``delta`` — then
      z_s = DDIM(z_t, ṽ, t → s) (the same noise draw at s with the conditional velocity) and
      target X_T(s→r)(z_s) = z_s − (s − r)·u_T(z_s, r, s), T the teacher (``"online"``:
      stop-gradient of the model, iCT's choice; ``"ema"``: EMA weights at ``ema``).
    - ``mode="continuous"`` (sCT, Lu & Song 2025): the s → t limit, a step along the tangent
      f′ = df/dt = ṽ − u − (t − r)·du/dt (du/dt along (ṽ, 0, 1): forward-mode JVP, or a finite
      difference), with sCM's warm-up weight w = min(1, step/``tangent_warmup``) and tangent
      normalisation g/(‖g‖ + ``tangent_norm``) (0: off; ``tangent_norm_kind="rms"``: ‖g‖ is the
      per-entry RMS ‖g‖₂/√D as in the reference code, so the step's per-entry scale does not depend on
      D; ``"l2"``: the full L2 norm). ``tangent_form`` says in which parameterisation the tangent is
      split and stepped:

      * ``"ddim"`` (the reference, ESC's ``scm_cos_loss.py`` / ``scm_linear_loss.py``): the flow map
        written as the path's DDIM step f = A·z + B·F (A, B the DDIM coefficients t → r of the
        schedule; on the cosine path A = cos Δ, B = −(2/π)·sin Δ, Δ = π(t − r)/2, so F is TrigFlow's
        network output in t units; on the linear path F = u). The warm-up scales the part of
        f′ = [A·ṽ + ∂_tB·F] + [∂_tA·z + B·dF/dt] that holds the time derivatives of A and of the
        network: g = A·[(1 − w)·(A·ṽ + ∂_tB·F) + w·f′] (sCM: −cos²(σ_d F − dx/dt) − w·cos·sin·(x +
        σ_d dF/dt)); the target is F⁻ + ĝ, i.e. u_tgt = u⁻ − (B/(t − r))·ĝ.
      * ``"velocity"``: everything in u: g = (1 − w)·(ṽ − u) + w·f′, u_tgt = u⁻ + ĝ.

      The two coincide on the linear path; on the cosine path the ddim form starts (w = 0) as
      F → ṽ (a DDIM step with the velocity), the velocity form as u → ṽ (an Euler step). Without
      normalisation and warm-up the velocity form is exactly the MeanFlow target ṽ − (t − r)·du/dt;
      the ddim form has the same fixed point f′ = 0 with a per-row step A·(−B)/(t − r).
      ``tangent_warmup`` < 1 is a fraction of the run's ``train.steps`` (the reference's 10k of its
      1.2M-step run scales with a shorter run); an absolute warm-up longer than the run warns.

    ``space`` picks what the weighting compares: ``"velocity"`` (u_θ against u_tgt, ESC's
    template) or ``"data"`` (f_θ against its target, as CT does; the two differ by the factor
    (t − r) per row). Rows with r = t are flow matching (u_tgt = ṽ); in data space they weigh
    nothing (the factor t − r is 0), so pair samplers with r = t rows want ``space="velocity"``.
    """

    def __init__(self, mode: Literal["discrete", "continuous"] = "discrete",
                 space: Literal["velocity", "data"] = "velocity", delta: float = 0.0,
                 teacher: Literal["online", "ema"] = "online", ema: float = 0.999,
                 jvp: Literal["exact", "finite_difference"] = "exact", fd_step: float = 1e-3,
                 tangent_norm: float = 0.1, tangent_norm_kind: Literal["rms", "l2"] = "rms",
                 tangent_form: Literal["ddim", "velocity"] = "ddim", tangent_warmup: float = 0,
                 velocity: Literal["conditional", "plugin"] = "conditional", plugin_prob: float = 0.5,
                 *, train_steps: int | None = None):
        super().__init__(velocity, plugin_prob)
        if delta < 0 or tangent_norm < 0 or tangent_warmup < 0:
            raise ValueError("delta, tangent_norm and tangent_warmup must be ≥ 0")
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"consistency ema must be in [0, 1), got {ema}")
        tangent_warmup = steps_of(tangent_warmup, train_steps, "design.target.tangent_warmup",
                                  "the tangent never reaches full weight")
        self.mode, self.space, self.delta = mode, space, delta
        self.teacher_ema = ema if teacher == "ema" and mode == "discrete" else None
        self.jvp, self.fd_step = jvp, fd_step
        self.tangent_norm, self.tangent_norm_kind, self.tangent_form = tangent_norm, tangent_norm_kind, tangent_form
        self.tangent_warmup = int(round(tangent_warmup))

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
            u_tgt = self.continuous_target(pb, v, u.detach(), dudt)
        u_tgt = torch.where(_bc(gap > 0, v), u_tgt.to(v.dtype), v).detach()  # r = t rows: flow matching
        if self.space == "data":
            return TargetOutput(pb.z - _bc(gap, u) * u, pb.z - _bc(gap, v) * u_tgt, pb.t, pb.r)
        return TargetOutput(u, u_tgt, pb.t, pb.r)

    @torch.no_grad()
    def discrete_target(self, nets, pb, v):
        """u_tgt = (z_t − X_T(s→r)(z_s))/(t − r) with z_s = DDIM(z_t, ṽ, t → s)."""
        prev = getattr(pb.time_sampler, "previous", None)
        if self.delta == 0 and prev is not None:  # the grid's adjacent time, on the step's grid (curricula)
            s = prev(pb.t, step=pb.step) if "step" in inspect.signature(prev).parameters else prev(pb.t)
        else:
            s = pb.t - self.delta
        s = torch.minimum(torch.maximum(s, pb.r), pb.t)
        z_s = pb.schedule.ddim_step(pb.z, v, pb.t, s)
        x_r = z_s - _bc(s - pb.r, z_s) * self.teacher(nets)(z_s, pb.r, s, pb.y).to(z_s.dtype)
        gap = pb.t - pb.r
        return (pb.z - x_r) / _bc(torch.where(gap > 0, gap, torch.ones_like(gap)), x_r)

    def warmup_weight(self, step: int) -> float:
        """sCM's warm-up w = min(1, step/K) of the tangent's time-derivative part (1 without warm-up)."""
        return min(1.0, step / self.tangent_warmup) if self.tangent_warmup else 1.0

    def normalise(self, g: Tensor) -> Tensor:
        """g/(‖g‖ + c) per row, ‖g‖ the per-entry RMS (``"rms"``) or the L2 norm (``"l2"``); c = 0: g."""
        if self.tangent_norm <= 0:
            return g
        norm = g.flatten(1).norm(dim=1)
        if self.tangent_norm_kind == "rms":
            norm = norm / g[0].numel() ** 0.5
        return g / _bc(norm + self.tangent_norm, g)

    def continuous_target(self, pb, v: Tensor, u: Tensor, dudt: Tensor) -> Tensor:
        """u_tgt of sCT from u⁻ = sg(u_θ), its total derivative du/dt along (ṽ, 0, 1) and ṽ."""
        w = self.warmup_weight(pb.step)
        gap = _bc(pb.t - pb.r, v)
        fprime = v - u - gap * dudt  # df/dt along the path, f = z − (t − r)·u
        if self.tangent_form == "velocity":
            return u + self.normalise((1 - w) * (v - u) + w * fprime)
        a, b, db = (_bc(c, v).to(v.dtype) for c in ddim_coefficients(pb.schedule, pb.t, pb.r))
        safe_gap = torch.where(gap > 0, gap, torch.ones_like(gap))
        safe_b = torch.where(gap > 0, b, -torch.ones_like(b))
        f = pb.z.to(v.dtype) - gap * u
        net = (f - a * pb.z.to(v.dtype)) / safe_b  # F of f = A·z + B·F
        g = a * ((1 - w) * (a * v + db * net) + w * fprime)
        return u - (safe_b / safe_gap) * self.normalise(g)


def ddim_coefficients(schedule, t: Tensor, r: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(A, B, ∂B/∂t) of the schedule's DDIM step z_r = A(t, r)·z_t + B(t, r)·v from t to r.

    A = (α_r·σ′_t − σ_r·α′_t)/det, B = (σ_r·α_t − α_r·σ_t)/det, det = α_t·σ′_t − σ_t·α′_t (as
    ``Schedule.ddim_step``); ∂B/∂t at fixed r by forward-mode differentiation of the schedule.
    Linear path: (1, −(t − r), −1); cosine path: (cos Δ, −(2/π)·sin Δ, −cos Δ), Δ = π(t − r)/2.
    """
    def coeffs(t_):
        al, sg, da, ds = schedule.alpha(t_), schedule.sigma(t_), schedule.d_alpha(t_), schedule.d_sigma(t_)
        det = al * ds - sg * da
        a = (schedule.alpha(r) * ds - schedule.sigma(r) * da) / det
        b = (schedule.sigma(r) * al - schedule.alpha(r) * sg) / det
        return a, b

    (a, b), (_, db) = torch.func.jvp(coeffs, (t,), (torch.ones_like(t),))
    return a, b, db
