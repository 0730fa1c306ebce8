"""The one function that turns a batch into a loss, and the sampler (DESIGN §2–3).

Order: sample (t, r) → noise the data with the schedule → the target returns
prediction and stop-gradient target → the weighting gives per-sample losses
→ one mean. Every random draw comes from the explicit ``generator``.

Paired comparisons (DESIGN §3 "Composition", §5): the training loop passes a
:class:`Streams`, one generator per source of randomness (``time``, ``noise``,
``labels``, ``target``), each re-seeded at every step from a hash of
(seed, rank, step, stream). A design that draws more numbers from one source
(an r = 0 warm start, a plug-in velocity mask) therefore never shifts another:
two designs with the same seed see the same ε, the same label-dropout mask
and the same uniform/normal draws behind their times at every step, and a
resumed run needs no generator state to continue bit for bit.
"""
from __future__ import annotations

import hashlib
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


#: The sources of randomness of one training step, each its own stream (see :class:`Streams`).
STREAMS = ("time", "noise", "labels", "target")


def stream_seed(seed: int, step: int, stream: str, rank: int = 0) -> int:
    """The seed of ``stream`` at ``step``: a hash of (seed, rank, step, stream), 63 bits."""
    key = f"ablate-stream/{int(seed)}/{int(rank)}/{int(step)}/{stream}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


class Streams:
    """One ``torch.Generator`` per source of randomness of a training step (:data:`STREAMS`).

    ``at(step)`` re-seeds every stream from :func:`stream_seed` (no new
    generators: a hash and ``manual_seed`` per stream, on any device, no host
    sync), so the draws of step k depend on (seed, rank, k) only — not on the
    design, nor on what earlier steps drew. ``rank``: the data-parallel rank
    (each rank its own noise). :func:`training_loss` calls ``at(step)`` itself.
    """

    def __init__(self, seed: int, device="cpu", rank: int = 0):
        self.seed, self.rank, self.device = int(seed), int(rank), torch.device(device)
        self.generators = {name: torch.Generator(self.device) for name in STREAMS}
        self.step: int | None = None

    def at(self, step: int) -> "Streams":
        self.step = int(step)
        for name, g in self.generators.items():
            g.manual_seed(stream_seed(self.seed, self.step, name, self.rank))
        return self

    @property
    def time(self) -> torch.Generator:  # the time sampler's draws
        return self.generators["time"]

    @property
    def noise(self) -> torch.Generator:  # ε
        return self.generators["noise"]

    @property
    def labels(self) -> torch.Generator:  # label dropout
        return self.generators["labels"]

    @property
    def target(self) -> torch.Generator:  # the target's own draws (plug-in mask, …), Problem.generator
        return self.generators["target"]


def _route(generator, step: int) -> tuple:
    """(time, noise, labels, target) generators: a :class:`Streams` re-seeded at ``step``, or one plain
    generator (or None) shared by all four in sequence (unit tests and oracles that pass one generator)."""
    if isinstance(generator, Streams):
        s = generator.at(step)
        return s.time, s.noise, s.labels, s.target
    return generator, generator, generator, generator


def training_loss(c: Components, nets: Nets, x: Tensor, labels: Tensor, *, null_label: int,
                  generator: Streams | torch.Generator | None = None,
                  step: int = 0) -> tuple[Tensor, Tensor, TargetOutput]:
    """(mean loss, per-sample loss (B,), target output) for one batch x (B, ...) with labels (B,).

    ``generator``: a :class:`Streams` (the training loop; one call per step: the streams are re-seeded
    for ``step`` here) or a single generator that every draw shares in order.
    """
    g_time, g_noise, g_labels, g_target = _route(generator, step)
    t, r = c.time_sampler(x.shape[0], step=step, generator=g_time, device=x.device)
    eps = torch.randn(x.shape, generator=g_noise, device=x.device, dtype=x.dtype)
    z = c.schedule.noise(x, eps, t)
    y = c.guidance.drop_labels(labels, null_label, g_labels)
    pb = Problem(x=x, eps=eps, t=t, r=r, z=z, labels=labels, y=y, null_label=null_label,
                 schedule=c.schedule, generator=g_target, step=step, time_sampler=c.time_sampler)
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
           schedule=None, generator: torch.Generator | None = None,
           cfg_interval: tuple[float, float] | None = None) -> Tensor:
    """Walk 1 = t_0 > … > t_N = 0 uniformly; one step: x = ε − u_θ(ε, 0, 1).

    - ``flow_map``: z ← z − (t_i − t_{i+1})·u_θ(z, t_{i+1}, t_i);
    - ``euler`` (models that only learned the instantaneous velocity): u_θ(z, t_i, t_i);
    - ``consistency`` (multistep consistency sampling, Song et al. 2023, Alg. 1): x̂ = z − t_i·u_θ(z, 0, t_i),
      then z ← α(t_{i+1})·x̂ + σ(t_{i+1})·ε' with fresh noise ε' from ``generator``.
    ``mode`` defaults to flow_map or euler by ``average_velocity``. ``cfg_scale`` (None: the guidance's
    default) and ``cfg_interval`` = (t_min, t_max) (None: the guidance's default) choose the guidance at
    sampling time: a CFG scale, or the scale fed to a network trained with it as an input (``cfg_input``).
    """
    if nfe < 1:
        raise ValueError(f"nfe must be ≥ 1, got {nfe}")
    mode = mode or ("flow_map" if average_velocity else "euler")
    if mode == "consistency" and schedule is None:
        raise ValueError("consistency sampling needs the schedule")
    z, b = noise, noise.shape[0]
    extra = {} if cfg_interval is None else {"interval": tuple(cfg_interval)}  # older plugins lack the keyword
    grid = torch.linspace(1.0, 0.0, nfe + 1, device=noise.device)
    for i in range(nfe):
        t_cur, t_next = grid[i].expand(b), grid[i + 1].expand(b)
        if mode == "consistency":
            x = z - grid[i] * guidance.sample_velocity(net, z, torch.zeros_like(t_cur), t_cur, y, null_label,
                                                       cfg_scale, **extra).to(z.dtype)
            if i == nfe - 1:
                return x
            eps = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            z = schedule.noise(x, eps, t_next)
            continue
        r = t_next if mode == "flow_map" else t_cur
        u = guidance.sample_velocity(net, z, r, t_cur, y, null_label, cfg_scale, **extra)
        z = z - (grid[i] - grid[i + 1]) * u.to(z.dtype)
    return z
