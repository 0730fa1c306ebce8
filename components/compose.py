"""The one function that turns a batch into a loss, and the sampler (DESIGN §2–3).

Order: sample (t, r) → noise the data with the schedule → the target returns
prediction and stop-gradient target → the weighting gives per-sample losses
→ one mean. Every random draw comes from the explicit ``generator``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from components.targets.base import Nets, Problem, TargetOutput


@dataclass
class Components:
    """A built design: one object per kind (the backbone is the network itself)."""

    schedule: object
    time_sampler: object
    target: object
    weighting: nn.Module
    backbone: nn.Module
    guidance: object

    def as_dict(self) -> dict:
        return dict(schedule=self.schedule, time_sampler=self.time_sampler, target=self.target,
                    weighting=self.weighting, backbone=self.backbone, guidance=self.guidance)


def training_loss(c: Components, nets: Nets, x: Tensor, labels: Tensor, *, null_label: int,
                  generator: torch.Generator | None = None, step: int = 0) -> tuple[Tensor, Tensor, TargetOutput]:
    """(mean loss, per-sample loss (B,), target output) for one batch x (B, ...) with labels (B,)."""
    t, r = c.time_sampler(x.shape[0], step=step, generator=generator, device=x.device)
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    z = c.schedule.noise(x, eps, t)
    y = c.guidance.drop_labels(labels, null_label, generator)
    pb = Problem(x=x, eps=eps, t=t, r=r, z=z, labels=labels, y=y, null_label=null_label,
                 schedule=c.schedule, generator=generator, step=step, time_sampler=c.time_sampler)
    out = c.target(nets, pb)
    per_sample = c.weighting(out)
    return per_sample.mean(), per_sample, out


def sampling_mode(c: Components) -> str:
    """How a design is sampled: ``euler`` (instantaneous velocity only), ``consistency`` (trained
    with r = 0 only: denoise, then renoise) or ``flow_map`` (average velocity over any [r, t])."""
    if not c.target.average_velocity:
        return "euler"
    return "consistency" if getattr(c.time_sampler, "always_r_zero", False) else "flow_map"


@torch.no_grad()
def sample(net, guidance, noise: Tensor, nfe: int, y: Tensor, *, null_label: int,
           average_velocity: bool = True, cfg_scale: float | None = None, mode: str | None = None,
           schedule=None, generator: torch.Generator | None = None) -> Tensor:
    """Walk 1 = t_0 > … > t_N = 0 uniformly; one step: x = ε − u_θ(ε, 0, 1).

    - ``flow_map``: z ← z − (t_i − t_{i+1})·u_θ(z, t_{i+1}, t_i);
    - ``euler`` (models that only learned the instantaneous velocity): u_θ(z, t_i, t_i);
    - ``consistency`` (multistep consistency sampling, Song et al. 2023, Alg. 1): x̂ = z − t_i·u_θ(z, 0, t_i),
      then z ← α(t_{i+1})·x̂ + σ(t_{i+1})·ε' with fresh noise ε' from ``generator``.
    ``mode`` defaults to flow_map or euler by ``average_velocity``.
    """
    if nfe < 1:
        raise ValueError(f"nfe must be ≥ 1, got {nfe}")
    mode = mode or ("flow_map" if average_velocity else "euler")
    if mode == "consistency" and schedule is None:
        raise ValueError("consistency sampling needs the schedule")
    z, b = noise, noise.shape[0]
    grid = torch.linspace(1.0, 0.0, nfe + 1, device=noise.device)
    for i in range(nfe):
        t_cur, t_next = grid[i].expand(b), grid[i + 1].expand(b)
        if mode == "consistency":
            x = z - grid[i] * guidance.sample_velocity(net, z, torch.zeros_like(t_cur), t_cur, y, null_label,
                                                       cfg_scale).to(z.dtype)
            if i == nfe - 1:
                return x
            eps = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            z = schedule.noise(x, eps, t_next)
            continue
        r = t_next if mode == "flow_map" else t_cur
        u = guidance.sample_velocity(net, z, r, t_cur, y, null_label, cfg_scale)
        z = z - (grid[i] - grid[i + 1]) * u.to(z.dtype)
    return z
