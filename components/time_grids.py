"""Time samplers on a grid or in particle groups: ``dyadic`` (shortcut), ``discrete`` (CT), ``imm``.

Same call as every sampler: ``sampler(n, step=, generator=, device=) -> (t, r)``,
0 ≤ r ≤ t ≤ 1, t = 1 noise. Grid samplers also expose ``previous(t)``: the grid
point below t, which a discrete consistency target uses as its intermediate time s.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from components.registry import TIME_SAMPLER
from components.time_samplers import T_MIN

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

    def bootstrap_rows(self, n: int) -> int:
        """The rows of a batch of n with a bootstrap step d ≥ 2/N: always the first ones, this many (a
        host-side count, so a target can slice them without looking at the times)."""
        return int(round(self.bootstrap_fraction * n))

    def smallest_step_rows(self, n: int) -> tuple[int, int]:
        """Bounds (lo, hi) on how many bootstrap rows of a batch of n have the smallest bootstrap step 2/N:
        the levels take the bootstrap rows in turn from a random first level."""
        k = self.bootstrap_rows(n)
        return k // self.levels, -(-k // self.levels)

    def __call__(self, n: int, *, step: int = 0, generator=None, device="cpu") -> tuple[Tensor, Tensor]:
        n_boot = self.bootstrap_rows(n)
        offset = torch.randint(self.levels, (1,), generator=generator, device=device)  # stays on the device
        level = (torch.arange(n_boot, device=device) + offset) % self.levels + 1  # 1..k ⇒ d = 2^level / N
        exponent = torch.cat([level, torch.zeros(n - n_boot, dtype=level.dtype, device=device)])
        sections = self.base_steps // (2 ** exponent)  # number of steps of size d in [0, 1]
        d = 1.0 / sections.float()
        u = torch.rand(n, generator=generator, device=device)
        k = (u * sections).floor().clamp(max=sections - 1) + 1  # 1..sections
        t = k * d
        return t, (t - d).clamp_min(0.0)


def sigma_grid(steps: int, grid: str, rho: float, sigma_min: float, sigma_max: float) -> Tensor:
    """N increasing EDM noise levels: Karras et al. 2022 (eq. 5) with ρ, or uniform in σ^{1/ρ} with ρ = 1."""
    i = torch.arange(steps, dtype=torch.float64) / (steps - 1)
    p = 1.0 / rho if grid == "karras" else 1.0
    return (sigma_min ** p + i * (sigma_max ** p - sigma_min ** p)) ** (1.0 / p)


def _discrete_slug(kw: dict) -> str:
    return "discrete_ict" if kw.get("curriculum") == "doubling" else f"discrete{kw['steps']}"


@TIME_SAMPLER.register("discrete", slug=_discrete_slug)
class Discrete:
    """Consistency training's discrete times (Song et al. 2023; iCT, Song & Dhariwal 2024), r = 0.

    ``steps`` = N noise levels σ_0 < … < σ_{N−1} (``grid="karras"``: spaced in σ^{1/ρ};
    ``"uniform"``: spaced in σ), mapped onto the path by σ(t)/α(t) = σ/σ_data. A row
    draws an index i ∈ [0, N − 2] (``index="uniform"``, or iCT's ``"lognormal"``:
    p(i) ∝ erf((ln σ_{i+1} − P_mean)/√2 P_std) − erf((ln σ_i − P_mean)/√2 P_std)) and gets
    t = t_{i+1}; ``previous(t, step)`` = t_i is the consistency target's adjacent time.

    ``curriculum="doubling"``: iCT's discretisation curriculum over the run (Song & Dhariwal 2024,
    eq. 8) instead of a fixed ``steps``: at training step k the grid has
    N(k) = min(s0·2^⌊k/K′⌋, s1) + 1 levels, K′ = ⌊K/(log₂⌊s1/s0⌋ + 1)⌋, K = the run's
    ``train.steps`` (iCT: s0 = 10, s1 = 1280), so the curriculum always spans the whole run.
    ``previous`` then uses the grid of the step it is given. Off by default: the CT code of ESC's
    code base (EDAPINENUT/ExplicitShortCut, ``loss/consistency_loss.py``) takes its number of scales
    from the caller, and its training script wires no CT at all.
    """

    always_r_zero = True

    def __init__(self, steps: int = 64, grid: Literal["karras", "uniform"] = "karras", rho: float = 7.0,
                 sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5,
                 index: Literal["uniform", "lognormal"] = "uniform", p_mean: float = -1.1, p_std: float = 2.0,
                 curriculum: Literal["none", "doubling"] = "none", s0: int = 10, s1: int = 1280,
                 *, schedule=None, train_steps: int | None = None):
        if steps < 2:
            raise ValueError(f"discrete steps must be ≥ 2, got {steps}")
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        if schedule is None:
            raise ValueError("discrete needs the design's schedule")
        if curriculum == "doubling":
            if not 1 <= s0 <= s1:
                raise ValueError(f"the doubling curriculum needs 1 ≤ s0 ≤ s1, got s0={s0}, s1={s1}")
            if not train_steps:
                raise ValueError("the doubling curriculum spans the run: train.steps is unknown here")
        self.schedule, self.grid_kind, self.rho = schedule, grid, rho
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data
        self.index, self.p_mean, self.p_std = index, p_mean, p_std
        self.curriculum, self.s0, self.s1 = curriculum, s0, s1
        self.stage_steps = max(1, int(train_steps // (math.log2(s1 // s0) + 1))) if curriculum == "doubling" else 0
        self._grids: dict[int, tuple[Tensor, Tensor]] = {}
        self._on_device: dict[tuple, tuple[Tensor, Tensor]] = {}  # (steps, device, dtype) -> copies made once
        self.steps = steps
        self.grid, self.probs = self.levels(steps)

    def steps_at(self, step: int) -> int:
        """The number of noise levels N at training ``step`` (``steps`` without a curriculum)."""
        if self.curriculum != "doubling":
            return self.steps
        return min(self.s0 * 2 ** (int(step) // self.stage_steps), self.s1) + 1

    def levels(self, steps: int) -> tuple[Tensor, Tensor]:
        """(grid (N,) increasing in (0, 1), index probabilities (N − 1,)) for N = ``steps`` levels."""
        if steps not in self._grids:
            sig = sigma_grid(steps, self.grid_kind, self.rho, self.sigma_min, self.sigma_max)
            grid = self.schedule.t_from_ratio(sig / self.sigma_data).float()
            if self.index == "lognormal":
                cdf = torch.erf((sig.log() - self.p_mean) / (math.sqrt(2) * self.p_std))
                probs = (cdf[1:] - cdf[:-1]).float()
            else:
                probs = torch.ones(steps - 1)
            self._grids[steps] = (grid, probs)
        return self._grids[steps]

    def on_device(self, steps: int, device, dtype=None) -> tuple[Tensor, Tensor]:
        """(grid, probabilities) of ``steps`` levels on ``device`` (grid in ``dtype``), copied there once."""
        device = torch.device(device)
        key = (steps, device, dtype)
        if key not in self._on_device:
            grid, probs = self.levels(steps)
            self._on_device[key] = (grid.to(device=device, dtype=dtype or grid.dtype), probs.to(device))
        return self._on_device[key]

    def __call__(self, n: int, *, step: int = 0, generator=None, device="cpu") -> tuple[Tensor, Tensor]:
        grid, probs = self.on_device(self.steps_at(step), device)
        i = torch.multinomial(probs, n, replacement=True, generator=generator)
        t = grid[i + 1]
        return t, torch.zeros_like(t)

    def previous(self, t: Tensor, step: int = 0) -> Tensor:
        """The largest grid time below t on the grid of training ``step`` (0 below its first point: the data end)."""
        grid = self.on_device(self.steps_at(step), t.device, t.dtype)[0]
        idx = torch.searchsorted(grid, t.contiguous(), right=False) - 1
        return torch.where(idx >= 0, grid[idx.clamp_min(0)], torch.zeros_like(t))


@TIME_SAMPLER.register("imm", slug=lambda kw: f"imm{kw['group_size']}")
class IMMTimes:
    """Inductive Moment Matching's times (Zhou, Ermon, Song 2025, §4): one (t, r) per particle group.

    Groups of ``group_size`` consecutive rows share t ~ U(T_MIN, ``t_max``) and
    r ~ U(0, t) (IMM's s < t in its notation), so a target can compare the groups'
    empirical distributions (the ``mmd`` weighting). A batch that does not divide
    evenly ends with one smaller group.
    """

    def __init__(self, group_size: int = 4, t_max: float = 0.994):
        if group_size < 1:
            raise ValueError(f"group_size must be ≥ 1, got {group_size}")
        if not T_MIN < t_max <= 1.0:
            raise ValueError(f"t_max must be in ({T_MIN}, 1], got {t_max}")
        self.group_size, self.t_max = group_size, t_max

    def __call__(self, n: int, *, step: int = 0, generator=None, device="cpu") -> tuple[Tensor, Tensor]:
        groups = -(-n // self.group_size)
        t = T_MIN + (self.t_max - T_MIN) * torch.rand(groups, generator=generator, device=device)
        r = t * torch.rand(groups, generator=generator, device=device)
        return (t.repeat_interleave(self.group_size)[:n], r.repeat_interleave(self.group_size)[:n])
