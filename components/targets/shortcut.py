from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from components.guidance import cfg_combine
from components.registry import TARGET
from components.schedules import _bc
from components.targets.base import Target, TargetOutput, velocity_slug


@TARGET.register("shortcut", slug=velocity_slug("shortcut"))
class Shortcut(Target):
    """Shortcut self-consistency (Frans et al. 2025, eq. 5), in the t = 1-noise convention.

    Rows whose step d = t − r exceeds the smallest step 1/``base_steps`` are
    bootstrap rows: with s = t − d/2 (the half-way time),
        u₁ = u_T(z_t, s, t),  z_s = z_t − (d/2)·u₁  (clipped to ±``midpoint_clip``),
        u₂ = u_T(z_s, r, s),  target = (u₁ + u₂)/2  (clipped to ±``clip``),
    u_T the teacher (``teacher="ema"``: EMA weights at rate ``ema``, as in the
    released code; ``"online"``: the model itself) under no gradient. The other rows are
    flow matching: u_θ(z_t, r, t) regresses ṽ at the smallest step. Clips of 0 are off.

    Details of the released code (kvfrans/shortcut-models, ``targets_shortcut.py``), the defaults:

    - ``midpoint_clip=4``: the intermediate point z_s is clipped to [−4, 4] before the second
      half step (as the target is, ``clip=4``).
    - ``bootstrap_cfg`` = w ≠ 1: classifier-free guidance u∅ + w·(u_y − u∅) inside the teacher, on
      the bootstrap rows of the smallest bootstrap step d = 2/``base_steps`` only
      (``bootstrap_cfg_rows="smallest_step"``: the released code's first B_boot/log₂N bootstrap rows,
      the rows of that level), whose half steps are flow-matching queries; the larger steps inherit
      the guidance through the bootstrap. ``"all"``: guidance on every bootstrap row.
    - ``bootstrap_labels="real"``: bootstrap rows keep the data's labels (``Problem.labels``) for the
      teacher and the student; label dropout (``Problem.y``) applies to the flow-matching rows only.
      ``"dropped"``: every row uses ``Problem.y``.
    """

    def __init__(self, base_steps: int = 128, teacher: Literal["ema", "online"] = "ema", ema: float = 0.999,
                 clip: float = 4.0, midpoint_clip: float = 4.0, bootstrap_cfg: float = 1.0,
                 bootstrap_cfg_rows: Literal["smallest_step", "all"] = "smallest_step",
                 bootstrap_labels: Literal["real", "dropped"] = "real",
                 velocity: Literal["conditional", "plugin"] = "conditional", plugin_prob: float = 0.5):
        super().__init__(velocity, plugin_prob)
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"shortcut ema must be in [0, 1), got {ema}")
        if clip < 0 or midpoint_clip < 0:
            raise ValueError(f"shortcut clip and midpoint_clip must be ≥ 0 (0: off), got {clip}, {midpoint_clip}")
        self.base_steps, self.clip, self.midpoint_clip = base_steps, clip, midpoint_clip
        self.bootstrap_cfg, self.bootstrap_cfg_rows, self.bootstrap_labels = bootstrap_cfg, bootstrap_cfg_rows, bootstrap_labels
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
        y = torch.where(boot, pb.labels, pb.y) if self.bootstrap_labels == "real" else pb.y
        target = self.velocity(nets, pb)
        n = len(pb.t)
        k = _bootstrap_rows(pb.time_sampler, n)
        if k is None:  # times from elsewhere: find the bootstrap rows (one host sync, the count)
            idx = boot.nonzero().squeeze(1)
            if len(idx):
                target = target.clone()
                target[idx] = self.bootstrap(nets, pb.z[idx], pb.r[idx], pb.t[idx], y[idx], pb.null_label,
                                             bounds=(0, len(idx))).to(target.dtype)
        elif k:  # the dyadic sampler's first k rows: static shapes, no host sync (torch.where keeps any other row)
            u = self.bootstrap(nets, pb.z[:k], pb.r[:k], pb.t[:k], y[:k], pb.null_label,
                               bounds=_smallest_step_rows(pb.time_sampler, n)).to(target.dtype)
            head = torch.where(_bc(boot[:k], u), u, target[:k])
            target = torch.cat([head, target[k:]]) if k < n else head
        pred = nets.model(pb.z, pb.r, pb.t, y)
        return TargetOutput(pred, target.detach(), pb.t, pb.r)

    def guided_rows(self, t: Tensor, r: Tensor) -> Tensor:
        """The bootstrap rows that get the teacher's CFG: those of the smallest bootstrap step 2/N, or all."""
        if self.bootstrap_cfg_rows == "all":
            return torch.ones_like(t, dtype=torch.bool)
        return ((t - r) * self.base_steps - 2.0).abs() < 0.5

    @torch.no_grad()
    def bootstrap(self, nets, z, r, t, y, null_label, bounds: tuple[int, int] | None = None):
        """The bootstrap target of rows (z, r, t, y). ``bounds`` = (lo, hi): how many of them at least and at
        most get the teacher's CFG (:meth:`guided_rows`; default 0 and all), which keeps every shape static."""
        teacher = self.teacher(nets)
        n = len(t)
        if self.bootstrap_cfg == 1.0:  # decided on the host: no guided rows
            return self._two_halves(lambda z_, r_, t_: teacher(z_, r_, t_, y), z, r, t)
        if self.bootstrap_cfg_rows == "all":
            return self._two_halves(lambda z_, r_, t_: cfg_combine(teacher, z_, r_, t_, y, null_label,
                                                                   self.bootstrap_cfg), z, r, t)
        guided = self.guided_rows(t, r)
        lo, hi = bounds if bounds is not None else (0, n)
        # the guided rows first, in row order (as nonzero() lists them), then the others: the first hi rows
        # hold every guided row, the rows from lo on every unguided one
        order = torch.argsort((~guided).to(torch.uint8), stable=True)
        first, rest = order[:hi], order[lo:]
        keep = _bc(guided[first], z)

        def query(z_, r_, t_):
            u = torch.empty_like(z_)
            u[rest] = teacher(z_[rest], r_[rest], t_[rest], y[rest]).to(u.dtype)
            g = cfg_combine(teacher, z_[first], r_[first], t_[first], y[first], null_label,
                            self.bootstrap_cfg).to(u.dtype)
            u[first] = torch.where(keep, g, u[first])
            return u

        return self._two_halves(query, z, r, t)

    def _two_halves(self, query, z, r, t):
        """½[u(z_t, s, t) + u(z_s, r, s)], s the half-way time, z_s = z_t − (t − s)·u(z_t, s, t) (clipped)."""
        s = 0.5 * (t + r)
        u1 = query(z, s, t)
        z_s = z - _bc(t - s, z) * u1
        if self.midpoint_clip > 0:
            z_s = z_s.clamp(-self.midpoint_clip, self.midpoint_clip)
        u2 = query(z_s, r, s)
        u = 0.5 * (u1 + u2)
        return u.clamp(-self.clip, self.clip) if self.clip > 0 else u


def _bootstrap_rows(sampler, n: int) -> int | None:
    """How many leading rows of a batch of n are the bootstrap rows, as the time sampler lays them out
    (the dyadic sampler: a host-side count); None: the sampler does not say."""
    count = getattr(sampler, "bootstrap_rows", None)
    return int(count(n)) if callable(count) else None


def _smallest_step_rows(sampler, n: int) -> tuple[int, int] | None:
    """The sampler's bounds on how many bootstrap rows have the smallest bootstrap step (None: not known)."""
    bounds = getattr(sampler, "smallest_step_rows", None)
    return tuple(int(b) for b in bounds(n)) if callable(bounds) else None
