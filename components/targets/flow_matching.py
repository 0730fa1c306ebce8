from __future__ import annotations

from typing import Literal

from components.registry import TARGET
from components.targets.base import Target, TargetOutput, velocity_slug


@TARGET.register("flow_matching", slug=velocity_slug("flow_matching"))
class FlowMatching(Target):
    """Flow matching (Lipman et al. 2023; Liu et al. 2023): u_θ(z_t, t, t) regresses ṽ.

    Trains the instantaneous velocity only (r is ignored), so the model is
    sampled with Euler steps on v_θ(z, t) = u_θ(z, t, t).
    """

    average_velocity = False

    def __init__(self, velocity: Literal["conditional", "plugin"] = "conditional", plugin_prob: float = 0.5):
        super().__init__(velocity, plugin_prob)

    def __call__(self, nets, pb):
        target = self.velocity(nets, pb)
        pred = nets.model(pb.z, pb.t, pb.t, pb.y)
        return TargetOutput(pred, target.detach(), pb.t, pb.t)
