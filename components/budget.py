"""Budgets given as a share of the run: the one place a warm-up or curriculum length becomes steps.

A paper's warm-up in steps belongs to its run length; a value ``0 < K < 1`` is that share of ours
(``train.steps``, the build fact ``train_steps``). ``K ≥ 1`` is an absolute step count, and one longer
than the run is almost always a copied paper number, so it warns.
"""
from __future__ import annotations

import warnings


def steps_of(value: float, train_steps: int | None, key: str, consequence: str) -> int:
    """``value`` as a step count: a fraction (< 1) of ``train_steps``, or an absolute count (≥ 1; 0: off).

    ``key`` names the option in messages (e.g. ``design.time_sampler.r_zero_warmup``), ``consequence``
    says what an over-long absolute value means (e.g. "the warm start never ends").
    """
    if value < 0:
        raise ValueError(f"{key} must be ≥ 0, got {value}")
    if 0 < value < 1:
        if not train_steps:
            raise ValueError(f"{key}={value} is a fraction of train.steps, which is unknown here")
        return max(1, round(value * train_steps))
    if train_steps and value > train_steps:
        warnings.warn(f"{key}={value:g} steps exceeds train.steps={train_steps}: {consequence}; give a fraction of "
                      f"the run instead (a value < 1, e.g. the paper's warm-up / its run length)", stacklevel=3)
    return int(value)
