"""What a target estimator sees and returns.

A target turns one noised batch into (prediction, stop-gradient target) per
sample; a weighting then reduces them. Networks are called as
``net(z, r, t, y) -> u``: the average velocity over [r, t] (DESIGN §2).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from components.schedules import Schedule
from components.velocity import conditional_velocity, plugin_velocity

Net = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


@dataclass
class Problem:
    """One training batch, noised. Per-sample tensors have leading dimension B.

    ``labels`` are the data's labels; ``y`` the conditioning after label
    dropout (null label ``null_label`` = unconditional).
    """

    x: Tensor
    eps: Tensor
    t: Tensor
    r: Tensor
    z: Tensor
    labels: Tensor
    y: Tensor
    null_label: int
    schedule: Schedule
    generator: torch.Generator | None = None
    step: int = 0
    time_sampler: object = None  # the design's sampler (grid samplers define the adjacent time s)


@dataclass
class Nets:
    """The trained network (with gradient), its teacher (no gradient: EMA or online) and the guidance."""

    model: Net
    teacher: Net
    guidance: object


@dataclass
class TargetOutput:
    pred: Tensor  # (B, ...) with gradient
    target: Tensor  # (B, ...) detached
    t: Tensor
    r: Tensor
    group: Tensor | None = None  # particle-group index per row (IMM)


def velocity_slug(name: str):
    """A target's slug: its name, with ``_plugin`` when it uses the plug-in velocity (ESC)."""
    return lambda kw: name + ("_plugin" if kw.get("velocity") == "plugin" else "")


class Target:
    """Base class. ``teacher_ema`` (None: no teacher) asks the loop to keep an EMA at that rate."""

    teacher_ema: float | None = None
    #: False: the network learns the instantaneous velocity only, so a sampler
    #: must query u(z, t, t) (Euler) rather than u(z, r, t).
    average_velocity: bool = True

    def __init__(self, velocity: str = "conditional", plugin_prob: float = 0.5):
        if velocity not in ("conditional", "plugin"):
            raise ValueError(f"velocity must be 'conditional' or 'plugin', got {velocity!r}")
        if not 0.0 <= plugin_prob <= 1.0:
            raise ValueError(f"plugin_prob must be in [0, 1], got {plugin_prob}")
        self.velocity_kind, self.plugin_prob = velocity, plugin_prob

    def velocity(self, nets: Nets, pb: Problem) -> Tensor:
        """ṽ: conditional (or, with probability p per row, plug-in) velocity, then guidance folded in."""
        v = conditional_velocity(pb.schedule, pb.x, pb.eps, pb.t)
        if self.velocity_kind == "plugin" and self.plugin_prob > 0:
            plug = plugin_velocity(pb.schedule, pb.z, pb.x, pb.t, pb.labels, pb.y == pb.null_label)
            use = torch.rand(pb.t.shape, generator=pb.generator, device=pb.t.device) < self.plugin_prob
            v = torch.where(use.reshape(use.shape + (1,) * (v.dim() - 1)), plug, v)
        return nets.guidance.fold(v, nets.model, pb.z, pb.t, pb.y, pb.null_label)

    def teacher(self, nets: Nets) -> Net:
        """The stop-gradient network of the target: the EMA teacher when ``teacher_ema`` is set, else the model."""
        return nets.teacher if self.teacher_ema is not None else nets.model

    def compatible(self, components: dict) -> list[str]:
        """Problems with the other components of a design (empty: fine)."""
        return []

    def __call__(self, nets: Nets, pb: Problem) -> TargetOutput:
        raise NotImplementedError
