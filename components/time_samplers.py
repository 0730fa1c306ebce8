"""Time samplers: per-sample pairs (t, r) with 0 ≤ r ≤ t ≤ 1 (t = 1 noise).

Every sampler is called as ``sampler(n, step=, generator=, device=) -> (t, r)``.
Shared options of the continuous samplers (base class):

- ``fraction_r_neq_t``: share of rows with r ≠ t; the other rows have r = t
  (instantaneous velocity, flow matching). For the pairs, two times are drawn
  and sorted, t = max, r = min (MeanFlow, Geng et al. 2025, §4.3).
- ``r_mode="zero"``: r = 0 for every row (consistency training, CT / sCT).
- ``r_zero_warmup`` = K: ESC's gradual r = 0 warm start. At training step
  k < K a row has r = 0 with probability (2/π)·arccos(k/K) (1 at k = 0,
  0 at k = K); afterwards the sampler behaves as configured.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from components.registry import TIME_SAMPLER

T_MIN = 1e-5  # keep σ(t) > 0 so posteriors and ratios stay finite


class TimeSampler:
    def __init__(self, fraction_r_neq_t: float, r_mode: str, r_zero_warmup: int):
        if not 0.0 <= fraction_r_neq_t <= 1.0:
            raise ValueError(f"fraction_r_neq_t must be in [0, 1], got {fraction_r_neq_t}")
        if r_zero_warmup < 0:
            raise ValueError(f"r_zero_warmup must be ≥ 0, got {r_zero_warmup}")
        self.fraction_r_neq_t = fraction_r_neq_t
        self.r_mode = r_mode
        self.r_zero_warmup = r_zero_warmup

    def draw(self, n: int, generator: torch.Generator | None, device) -> Tensor:
        """n i.i.d. times in (0, 1]."""
        raise NotImplementedError

    def __call__(self, n: int, *, step: int = 0, generator=None, device="cpu") -> tuple[Tensor, Tensor]:
        a = self.draw(n, generator, device).clamp(T_MIN, 1.0)
        if self.r_mode == "zero":
            t, r = a, torch.zeros_like(a)
        else:
            b = self.draw(n, generator, device).clamp(T_MIN, 1.0)
            pair = torch.rand(n, generator=generator, device=device) < self.fraction_r_neq_t
            # r = t rows keep the single draw's law; only pairs are sorted (t = max, r = min)
            t = torch.where(pair, torch.maximum(a, b), a)
            r = torch.where(pair, torch.minimum(a, b), a)
        return t, self._warm_start(r, step, generator)

    def _warm_start(self, r: Tensor, step: int, generator) -> Tensor:
        if step >= self.r_zero_warmup:
            return r
        p_zero = (2 / math.pi) * math.acos(step / self.r_zero_warmup)
        zero = torch.rand(r.shape, generator=generator, device=r.device) < p_zero
        return torch.where(zero, torch.zeros_like(r), r)


@TIME_SAMPLER.register("uniform")
class Uniform(TimeSampler):
    """t, r ~ U(0, 1), sorted; a fraction of rows has r ≠ t."""

    def __init__(self, fraction_r_neq_t: float = 0.25, r_mode: Literal["pair", "zero"] = "pair",
                 r_zero_warmup: int = 0):
        super().__init__(fraction_r_neq_t, r_mode, r_zero_warmup)

    def draw(self, n, generator, device):
        return torch.rand(n, generator=generator, device=device)


@TIME_SAMPLER.register("logit_normal")
class LogitNormal(TimeSampler):
    """t = sigmoid(N(mean, std²)) (SD3, Esser et al. 2024; MeanFlow uses mean −0.4, std 1)."""

    def __init__(self, mean: float = -0.4, std: float = 1.0, fraction_r_neq_t: float = 0.25,
                 r_mode: Literal["pair", "zero"] = "pair", r_zero_warmup: int = 0):
        super().__init__(fraction_r_neq_t, r_mode, r_zero_warmup)
        self.mean, self.std = mean, std

    def draw(self, n, generator, device):
        return torch.sigmoid(self.mean + self.std * torch.randn(n, generator=generator, device=device))


@TIME_SAMPLER.register("lognormal_sigma")
class LogNormalSigma(TimeSampler):
    """sCT-style: σ_edm ~ LogNormal(p_mean, p_std²), t solves σ(t)/α(t) = σ_edm/σ_data on the path.

    On the cosine path this is t = (2/π)·arctan(σ_edm/σ_data) (sCM, Lu & Song 2025, §4.2).
    """

    def __init__(self, p_mean: float = -1.0, p_std: float = 1.4, sigma_data: float = 0.5,
                 fraction_r_neq_t: float = 0.0, r_mode: Literal["pair", "zero"] = "zero",
                 r_zero_warmup: int = 0, *, schedule=None):
        super().__init__(fraction_r_neq_t, r_mode, r_zero_warmup)
        if schedule is None:
            raise ValueError("lognormal_sigma needs the design's schedule")
        self.p_mean, self.p_std, self.sigma_data, self.schedule = p_mean, p_std, sigma_data, schedule

    def draw(self, n, generator, device):
        log_sigma = self.p_mean + self.p_std * torch.randn(n, generator=generator, device=device)
        return self.schedule.t_from_ratio(torch.exp(log_sigma) / self.sigma_data)


@TIME_SAMPLER.register("dyadic")
class Dyadic:
    """The shortcut model's grid (Frans et al. 2025, §3.2 and released code).

    ``base_steps`` = N = 2^k. A share ``bootstrap_fraction`` of rows gets a step
    d ∈ {2/N, 4/N, …, 1} (equal counts per level) for self-consistency; the
    other rows get the smallest step d = 1/N (flow-matching rows). The start
    time t is a uniform multiple of d in [d, 1] and r = t − d, so every pair
    lies on the N-step sampling grid. Default 1/8: the released code's
    ``bootstrap_every=8``, which produced the paper's numbers (the text says 1/4).
    """

    def __init__(self, base_steps: int = 128, bootstrap_fraction: float = 0.125):
        levels = math.log2(base_steps)
        if base_steps < 2 or levels != int(levels):
            raise ValueError(f"dyadic base_steps must be a power of two ≥ 2, got {base_steps}")
        if not 0.0 <= bootstrap_fraction <= 1.0:
            raise ValueError(f"bootstrap_fraction must be in [0, 1], got {bootstrap_fraction}")
        self.base_steps, self.levels, self.bootstrap_fraction = base_steps, int(levels), bootstrap_fraction

    def __call__(self, n: int, *, step: int = 0, generator=None, device="cpu") -> tuple[Tensor, Tensor]:
        n_boot = int(round(self.bootstrap_fraction * n))
        offset = int(torch.randint(self.levels, (1,), generator=generator, device=device))
        level = (torch.arange(n_boot, device=device) + offset) % self.levels + 1  # 1..k ⇒ d = 2^level / N
        exponent = torch.cat([level, torch.zeros(n - n_boot, dtype=level.dtype, device=device)])
        sections = self.base_steps // (2 ** exponent)  # number of steps of size d in [0, 1]
        d = 1.0 / sections.float()
        u = torch.rand(n, generator=generator, device=device)
        k = (u * sections).floor().clamp(max=sections - 1) + 1  # 1..sections
        t = k * d
        return t, (t - d).clamp_min(0.0)
