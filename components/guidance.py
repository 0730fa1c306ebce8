"""Class guidance: how labels are dropped in training, folded into targets, and applied when sampling.

Labels are 0..K−1; the null label K is the unconditional branch. Guidance of the ``cfg_input`` kind is a
network input instead: its scale (and interval) is drawn per row in training and fed to the backbone,
so one trained model is sampled at any scale with one evaluation per step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from components.registry import GUIDANCE
from components.schedules import _bc


def cfg_combine(net, z: Tensor, r: Tensor, t: Tensor, y: Tensor, null_label: int, scale: float | Tensor) -> Tensor:
    """Classifier-free guidance u∅ + w·(u_y − u∅) (Ho & Salimans 2022); rows with y = ∅ stay unguided.

    ``scale``: one w, or one per row (B,)."""
    if not torch.is_tensor(scale) and scale == 1.0:
        return net(z, r, t, y)
    null = torch.full_like(y, null_label)
    both = net(torch.cat([z, z]), torch.cat([r, r]), torch.cat([t, t]), torch.cat([y, null]))
    cond, uncond = both.chunk(2)
    w = _bc(scale.to(cond.dtype), cond) if torch.is_tensor(scale) else scale
    guided = uncond + w * (cond - uncond)
    return torch.where(_bc(y == null_label, z), cond, guided)


@dataclass
class GuidanceCondition:
    """Per-row guidance inputs (B,): the scale ω and the interval [t_min, t_max] it applies on."""

    scale: Tensor
    t_min: Tensor
    t_max: Tensor

    def rows(self, idx: Tensor) -> "GuidanceCondition":
        return GuidanceCondition(self.scale[idx], self.t_min[idx], self.t_max[idx])

    def unguided(self) -> "GuidanceCondition":
        """ω = 1 on the full interval [0, 1]: the plain conditional (or, with y = ∅, unconditional) field."""
        return GuidanceCondition(torch.ones_like(self.scale), torch.zeros_like(self.t_min), torch.ones_like(self.t_max))

    def cat(self, other: "GuidanceCondition") -> "GuidanceCondition":
        return GuidanceCondition(*(torch.cat([a, b]) for a, b in zip(
            (self.scale, self.t_min, self.t_max), (other.scale, other.t_min, other.t_max))))


class Guidance:
    #: True: the scale is a network input (``draw`` and ``bind``); the target must feed it.
    takes_input: bool = False

    def __init__(self, label_dropout: float = 0.0, scale: float = 1.0):
        if not 0.0 <= label_dropout <= 1.0:
            raise ValueError(f"label_dropout must be in [0, 1], got {label_dropout}")
        self.label_dropout, self.scale = label_dropout, scale

    def drop_labels(self, y: Tensor, null_label: int, generator=None) -> Tensor:
        if self.label_dropout == 0.0:
            return y
        drop = torch.rand(y.shape, generator=generator, device=y.device) < self.label_dropout
        return torch.where(drop, torch.full_like(y, null_label), y)

    def fold(self, v: Tensor, model, z: Tensor, t: Tensor, y: Tensor, null_label: int) -> Tensor:
        """Training-time change of the velocity target ṽ (identity unless guidance is folded in)."""
        return v

    def draw(self, pb) -> GuidanceCondition | None:
        """Training: the per-row guidance inputs of the batch ``pb`` (None: the network takes none)."""
        return None

    def bind(self, net, cond: GuidanceCondition | None):
        """``net`` as a function (z, r, t, y) → u with the guidance inputs ``cond`` fed (identity here)."""
        return net

    def sample_velocity(self, net, z, r, t, y, null_label: int, scale: float | None = None,
                        interval: tuple[float, float] | None = None) -> Tensor:
        """u at sampling. ``interval`` = (t_min, t_max): guide only the steps with t in it (Kynkäänniemi et
        al. 2024); None: every step."""
        scale = self.scale if scale is None else scale
        if interval is not None:
            inside = (t >= interval[0]) & (t <= interval[1])
            scale = torch.where(inside, torch.full_like(t, float(scale)), torch.ones_like(t))
        return cfg_combine(net, z, r, t, y, null_label, scale)


@GUIDANCE.register("none")
class NoGuidance(Guidance):
    """No label dropout and no guidance: a plain (class-)conditional model."""

    def __init__(self):
        super().__init__(0.0, 1.0)


@GUIDANCE.register("cfg")
class CFG(Guidance):
    """Classifier-free guidance: drop labels with probability ``label_dropout``; sample with ``scale``."""

    def __init__(self, label_dropout: float = 0.1, scale: float = 1.0):
        super().__init__(label_dropout, scale)


@GUIDANCE.register("meanflow_cfg")
class MeanFlowCFG(Guidance):
    """Guidance folded into the target (MeanFlow, Geng et al. 2025, eq. 21; ESC §4):

        ṽ = ω·v + κ·u_θ(z_t, t, t | y) + (1 − ω − κ)·u_θ(z_t, t, t | ∅)   for t ∈ [t_min, t_max],

    u_θ under stop-gradient; unconditional rows and t outside the interval keep ṽ = v.
    Sampling is then unguided (scale 1): one network evaluation per step.
    """

    def __init__(self, omega: float = 1.0, kappa: float = 0.5, t_min: float = 0.0, t_max: float = 1.0,
                 label_dropout: float = 0.1):
        super().__init__(label_dropout, 1.0)
        if not 0.0 <= t_min <= t_max <= 1.0:
            raise ValueError(f"need 0 ≤ t_min ≤ t_max ≤ 1, got [{t_min}, {t_max}]")
        self.omega, self.kappa, self.t_min, self.t_max = omega, kappa, t_min, t_max

    @torch.no_grad()
    def fold(self, v, model, z, t, y, null_label):
        null = torch.full_like(y, null_label)
        both = model(torch.cat([z, z]), torch.cat([t, t]), torch.cat([t, t]), torch.cat([y, null])).to(v.dtype)
        cond, uncond = both.chunk(2)
        guided = self.omega * v + self.kappa * cond + (1 - self.omega - self.kappa) * uncond
        use = (y != null_label) & (t >= self.t_min) & (t <= self.t_max)
        return torch.where(_bc(use, v), guided, v)


def power_law(u: Tensor, lo: float, hi: float, power: float) -> Tensor:
    """Inverse CDF at u ~ U(0, 1) of p(ω) ∝ ω^(−power) on [lo, hi] (hi = ∞ needs power > 1)."""
    if lo == hi:
        return torch.full_like(u, lo)
    if power == 1.0:
        return lo * (hi / lo) ** u
    a = 1.0 - power
    top = 0.0 if math.isinf(hi) else hi ** a
    return (lo ** a + u * (top - lo ** a)) ** (1.0 / a)


@GUIDANCE.register("cfg_input")
class CFGInput(Guidance):
    """Guidance as a network input (iMF, Geng et al. 2025, §4.2; TVM, Zhou et al. 2025): the scale ω
    and the interval [t_min, t_max] it acts on are drawn per row in training and fed to the backbone, so
    one model is sampled at any scale with one network evaluation per step.

    Training (:meth:`draw`, from the target's generator): ω ~ p(ω) ∝ ω^(−``power``) on
    [``scale_min``, ``scale_max``] (iMF's code: power 1 on [1, 8], log ω uniform; TVM's code: 1/ω ~ U(0, 1)
    is power 2 on [1, ∞), and its released configs fix ω: scale_min = scale_max). ``interval="uniform"``
    (iMF's code): t_min ~ U(0, ½), t_max ~ U(½, 1) on the rows with r ≠ t and [0, 1] on the r = t rows;
    ``"full"``: always [0, 1], and the network gets no interval inputs. Rows with the null label get
    ω = 1 (``unconditional_scale="one"``, TVM's code) or keep theirs (``"drawn"``, iMF's code). The target
    (imf, tvm) turns ω into its guided velocity; this plugin only draws and feeds it.

    The network sees 1 − 1/ω (0 at ω = 1, iMF's feature), t_min and t_max as attached inputs;
    ``scale_output`` (TVM's scale parameterisation): u = ω·F_θ. Sampling uses ω = ``scale`` on
    [``t_min``, ``t_max``] unless ``sample()`` is given other values.
    """

    takes_input = True

    def __init__(self, label_dropout: float = 0.1, scale: float = 1.0, t_min: float = 0.0, t_max: float = 1.0,
                 scale_min: float = 1.0, scale_max: float = 8.0, power: float = 1.0,
                 interval: Literal["full", "uniform"] = "full", unconditional_scale: Literal["one", "drawn"] = "one",
                 scale_output: bool = False):
        super().__init__(label_dropout, scale)
        if not 0.0 < scale_min <= scale_max:
            raise ValueError(f"cfg_input needs 0 < scale_min ≤ scale_max, got [{scale_min}, {scale_max}]")
        if math.isinf(scale_max) and power <= 1.0 and scale_min < scale_max:
            raise ValueError(f"cfg_input: ω ∝ ω^(−{power}) on [{scale_min}, ∞) is not normalisable: "
                             "need power > 1")
        if not 0.0 <= t_min <= t_max <= 1.0:
            raise ValueError(f"cfg_input needs 0 ≤ t_min ≤ t_max ≤ 1, got [{t_min}, {t_max}]")
        if interval == "full" and (t_min, t_max) != (0.0, 1.0):
            raise ValueError("cfg_input: a sampling interval needs interval='uniform' (the network learns it)")
        self.t_min, self.t_max, self.scale_min, self.scale_max, self.power = t_min, t_max, scale_min, scale_max, power
        self.interval, self.unconditional_scale, self.scale_output = interval, unconditional_scale, scale_output

    def inputs(self) -> dict[str, float]:
        """The backbone inputs this guidance feeds, with the value of the unguided model (ω = 1 on [0, 1])."""
        extra = {"guidance_t_min": 0.0, "guidance_t_max": 1.0} if self.interval == "uniform" else {}
        return {"guidance_scale": 0.0, **extra}

    def compatible(self, components):
        target, backbone = components.get("target"), components.get("backbone")
        problems = []
        if not getattr(target, "guidance_input", False):
            problems.append(f"guidance 'cfg_input' feeds the scale to the network, but target {type(target).__name__} "
                            "does not draw it: use a target that does (imf, tvm) or guidance 'cfg'")
        if not callable(getattr(backbone, "add_input", None)):
            problems.append(f"guidance 'cfg_input' needs a backbone with extra inputs (add_input); "
                            f"{type(backbone).__name__} has none")
        if not problems:  # the inputs exist before the optimizer and the EMAs are made
            for name, default in self.inputs().items():
                backbone.add_input(name, default)
        return problems

    def draw(self, pb) -> GuidanceCondition:
        g, t = pb.generator, pb.t
        scale = power_law(torch.rand(t.shape, generator=g, device=t.device, dtype=t.dtype),
                          self.scale_min, self.scale_max, self.power)
        if self.unconditional_scale == "one":
            scale = torch.where(pb.y == pb.null_label, torch.ones_like(scale), scale)
        lo, hi = torch.zeros_like(t), torch.ones_like(t)
        if self.interval == "uniform":
            pair = t > pb.r
            lo = torch.where(pair, 0.5 * torch.rand(t.shape, generator=g, device=t.device, dtype=t.dtype), lo)
            hi = torch.where(pair, 0.5 + 0.5 * torch.rand(t.shape, generator=g, device=t.device, dtype=t.dtype), hi)
        return GuidanceCondition(scale, lo, hi)

    def features(self, cond: GuidanceCondition) -> dict[str, Tensor]:
        feats = {"guidance_scale": 1.0 - 1.0 / cond.scale}
        if self.interval == "uniform":
            feats.update(guidance_t_min=cond.t_min, guidance_t_max=cond.t_max)
        return feats

    def bind(self, net, cond):
        if cond is None:
            return net
        feats = self.features(cond)

        def bound(z, r, t, y):
            u = net(z, r, t, y, cond=feats)
            return _bc(cond.scale.to(u.dtype), u) * u if self.scale_output else u

        return bound

    def sample_velocity(self, net, z, r, t, y, null_label, scale=None, interval=None):
        lo, hi = (self.t_min, self.t_max) if interval is None else interval
        if self.interval == "full" and (lo, hi) != (0.0, 1.0):
            raise ValueError("cfg_input was trained without an interval input (interval='full'): sample on [0, 1]")
        w = torch.full_like(t, float(self.scale if scale is None else scale))
        if self.unconditional_scale == "one":
            w = torch.where(y == null_label, torch.ones_like(w), w)
        cond = GuidanceCondition(w, torch.full_like(t, float(lo)), torch.full_like(t, float(hi)))
        return self.bind(net, cond)(z, r, t, y)
