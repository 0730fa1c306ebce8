"""Time samplers: per-sample pairs (t, r) with 0 ≤ r ≤ t ≤ 1 (t = 1 noise).

Every sampler is called as ``sampler(n, step=, generator=, device=) -> (t, r)``.
Shared options of the continuous samplers (base class):

- ``fraction_r_neq_t``: share of rows with r ≠ t; the other rows have r = t
  (instantaneous velocity, flow matching). Two times are drawn and sorted,
  t = max, r = min (MeanFlow, Geng et al. 2025, §4.3).
- ``r_eq_t_time``: the law of t on the r = t rows. ``"max_of_two"`` (default,
  MeanFlow's reference code: r is set to t after sorting, so these rows keep
  t = max of two draws); ``"single"``: one draw (SD3-style flow matching, the
  ``flow_matching`` preset).
- ``r_mode="zero"``: r = 0 for every row (consistency training, CT / sCT).
- ``r_zero_warmup`` = K: ESC's gradual r = 0 warm start. At training step
  k < K a row has r = 0 with probability (2/π)·arccos(k/K) (1 at k = 0,
  0 at k = K); afterwards the sampler behaves as configured. K < 1 is a
  fraction of the run's ``train.steps`` (ESC's 20k of 1.2M steps is 1/60);
  an absolute K above ``train.steps`` warns.
- ``r_zero_warmup_rows``: which rows the warm start may pull to r = 0.
  ``"pairs"`` (default, ESC's reference code: the r = t mask is applied after
  the r = 0 mask, so only the r ≠ t rows move); ``"all"``: every row.

Samplers on a grid or in particle groups (``dyadic``, ``discrete``, ``imm``) are in
``components/time_grids.py``.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from components.budget import steps_of
from components.registry import TIME_SAMPLER

T_MIN = 1e-5  # keep σ(t) > 0 so posteriors and ratios stay finite
EqT = Literal["max_of_two", "single"]  # law of t on the r = t rows
Rows = Literal["pairs", "all"]  # rows the r = 0 warm start may move


class TimeSampler:
    def __init__(self, fraction_r_neq_t: float, r_mode: str, r_zero_warmup: float, train_steps: int | None = None,
                 r_eq_t_time: str = "max_of_two", r_zero_warmup_rows: str = "pairs"):
        if r_eq_t_time not in ("max_of_two", "single"):
            raise ValueError(f"r_eq_t_time must be 'max_of_two' or 'single', got {r_eq_t_time!r}")
        if r_zero_warmup_rows not in ("pairs", "all"):
            raise ValueError(f"r_zero_warmup_rows must be 'pairs' or 'all', got {r_zero_warmup_rows!r}")
        if not 0.0 <= fraction_r_neq_t <= 1.0:
            raise ValueError(f"fraction_r_neq_t must be in [0, 1], got {fraction_r_neq_t}")
        r_zero_warmup = steps_of(r_zero_warmup, train_steps, "design.time_sampler.r_zero_warmup",
                                 "the warm start never ends")
        self.r_eq_t_time, self.r_zero_warmup_rows = r_eq_t_time, r_zero_warmup_rows
        self.fraction_r_neq_t = fraction_r_neq_t
        self.r_mode = r_mode
        self.r_zero_warmup = int(r_zero_warmup)

    @property
    def always_r_zero(self) -> bool:
        """Every row maps to r = 0 (consistency models): sample by denoise-and-renoise."""
        return self.r_mode == "zero"

    def draw(self, n: int, generator: torch.Generator | None, device) -> Tensor:
        """n i.i.d. times in (0, 1]."""
        raise NotImplementedError

    def __call__(self, n: int, *, step: int = 0, generator=None, device="cpu") -> tuple[Tensor, Tensor]:
        a = self.draw(n, generator, device).clamp(T_MIN, 1.0)
        if self.r_mode == "zero":
            t, r = a, torch.zeros_like(a)
            pair = torch.ones_like(a, dtype=torch.bool)
        else:
            b = self.draw(n, generator, device).clamp(T_MIN, 1.0)
            pair = torch.rand(n, generator=generator, device=device) < self.fraction_r_neq_t
            hi = torch.maximum(a, b)
            # pairs are sorted (t = max, r = min); r = t rows take max-of-two (MeanFlow code) or one draw
            t = hi if self.r_eq_t_time == "max_of_two" else torch.where(pair, hi, a)
            r = torch.where(pair, torch.minimum(a, b), t)
        movable = pair if self.r_zero_warmup_rows == "pairs" else torch.ones_like(pair)
        return t, self._warm_start(r, step, generator, movable)

    def _warm_start(self, r: Tensor, step: int, generator, movable: Tensor) -> Tensor:
        """ESC: r = 0 with probability (2/π)·arccos(step/K) on the ``movable`` rows."""
        if step >= self.r_zero_warmup:
            return r
        p_zero = (2 / math.pi) * math.acos(step / self.r_zero_warmup)
        zero = (torch.rand(r.shape, generator=generator, device=r.device) < p_zero) & movable
        return torch.where(zero, torch.zeros_like(r), r)


@TIME_SAMPLER.register("uniform")
class Uniform(TimeSampler):
    """t, r ~ U(0, 1), sorted; a fraction of rows has r ≠ t."""

    def __init__(self, fraction_r_neq_t: float = 0.25, r_mode: Literal["pair", "zero"] = "pair",
                 r_zero_warmup: float = 0, r_eq_t_time: EqT = "max_of_two", r_zero_warmup_rows: Rows = "pairs",
                 *, train_steps: int | None = None):
        super().__init__(fraction_r_neq_t, r_mode, r_zero_warmup, train_steps, r_eq_t_time, r_zero_warmup_rows)

    def draw(self, n, generator, device):
        return torch.rand(n, generator=generator, device=device)


@TIME_SAMPLER.register("logit_normal")
class LogitNormal(TimeSampler):
    """t = sigmoid(N(mean, std²)) (SD3, Esser et al. 2024; MeanFlow uses mean −0.4, std 1)."""

    def __init__(self, mean: float = -0.4, std: float = 1.0, fraction_r_neq_t: float = 0.25,
                 r_mode: Literal["pair", "zero"] = "pair", r_zero_warmup: float = 0,
                 r_eq_t_time: EqT = "max_of_two", r_zero_warmup_rows: Rows = "pairs", *,
                 train_steps: int | None = None):
        super().__init__(fraction_r_neq_t, r_mode, r_zero_warmup, train_steps, r_eq_t_time, r_zero_warmup_rows)
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
                 r_zero_warmup: float = 0, r_eq_t_time: EqT = "max_of_two", r_zero_warmup_rows: Rows = "pairs",
                 *, schedule=None, train_steps: int | None = None):
        super().__init__(fraction_r_neq_t, r_mode, r_zero_warmup, train_steps, r_eq_t_time, r_zero_warmup_rows)
        if schedule is None:
            raise ValueError("lognormal_sigma needs the design's schedule")
        self.p_mean, self.p_std, self.sigma_data, self.schedule = p_mean, p_std, sigma_data, schedule

    def draw(self, n, generator, device):
        log_sigma = self.p_mean + self.p_std * torch.randn(n, generator=generator, device=device)
        return self.schedule.t_from_ratio(torch.exp(log_sigma) / self.sigma_data)
