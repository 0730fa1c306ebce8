"""Time samplers follow the reference code of the method each preset names (DESIGN §3, fidelity).

- ESC's r = 0 warm start moves only the r ≠ t rows (its r = t mask is applied after the r = 0 mask);
  ``r_zero_warmup_rows="all"`` keeps the law that moves every row.
- Warm-ups a paper gives in steps are fractions of our run; an absolute one longer than the run warns.
- MeanFlow's r = t rows have t = max of two draws (it sorts two draws, then sets r = t on a share);
  ``r_eq_t_time="single"`` keeps one draw, which the SD3-style ``flow_matching`` preset uses.
"""
from __future__ import annotations

import math
import warnings
from statistics import NormalDist

import pytest
import torch

import components  # noqa: F401  (registers the built-ins)
from ablate.design import PRESETS
from components.registry import SCHEDULE, TIME_SAMPLER

N = 200_000  # proportions to ±0.001 (1 s.d.), medians to ±0.002
TOL = 0.01
K = 1000


def build(name, kwargs=None, train_steps=None):
    return TIME_SAMPLER.build(name, kwargs or {}, schedule=SCHEDULE.build("linear"), train_steps=train_steps)


def preset_sampler(preset, train_steps=None):
    kw = {k: v for k, v in PRESETS[preset]["time_sampler"].items() if k != "name"}
    return build(PRESETS[preset]["time_sampler"]["name"], kw, train_steps)


def shares(t, r):
    """P(r = t), P(r = 0), P(0 < r < t)."""
    eq, zero = (r == t), (r == 0)
    return eq.double().mean().item(), zero.double().mean().item(), (~eq & ~zero).double().mean().item()


def draw(sampler, step=0, n=N, seed=0):
    return sampler(n, step=step, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- 1. ESC's warm start: which rows
def p_zero(step):
    return (2 / math.pi) * math.acos(step / K)


@pytest.mark.parametrize("step", [0, K // 2], ids=["step0", "half"])
def test_warm_start_pulls_only_the_pairs_to_r_zero(step):
    """ESC code: the 75 % r = t rows stay r = t; a pair row has r = 0 with probability (2/π)·arccos(k/K)."""
    t, r = draw(build("logit_normal", {"fraction_r_neq_t": 0.25, "r_zero_warmup": K}), step)
    eq, zero, free = shares(t, r)
    assert abs(eq - 0.75) < TOL
    assert abs(zero - 0.25 * p_zero(step)) < TOL
    assert abs(free - 0.25 * (1 - p_zero(step))) < TOL
    if step == 0:
        assert free == 0.0  # every pair row is pulled to r = 0 at the first step


@pytest.mark.parametrize("step", [0, K // 2], ids=["step0", "half"])
def test_warm_start_all_rows_option_keeps_the_old_law(step):
    """r_zero_warmup_rows="all": every row has r = 0 with probability (2/π)·arccos(k/K)."""
    t, r = draw(build("logit_normal", {"fraction_r_neq_t": 0.25, "r_zero_warmup": K,
                                       "r_zero_warmup_rows": "all"}), step)
    eq, zero, _ = shares(t, r)
    assert abs(zero - p_zero(step)) < TOL
    assert abs(eq - 0.75 * (1 - p_zero(step))) < TOL


def test_warm_start_changes_r_only_and_ends_at_K():
    sampler = build("logit_normal", {"fraction_r_neq_t": 0.25, "r_zero_warmup": K})
    (t0, r0), (t1, r1) = draw(sampler, 0, n=5000), draw(sampler, K, n=5000)
    assert torch.equal(t0, t1)  # same generator: the warm start draws after (t, r)
    keep = r0 != 0
    assert torch.equal(r0[keep], r1[keep])
    assert (r1 > 0).all() and abs(shares(t1, r1)[0] - 0.75) < 0.03


def test_warm_start_without_pairs_is_a_no_op():
    """fraction_r_neq_t = 0: no r ≠ t rows, so the reference's warm start moves nothing."""
    t, r = draw(build("logit_normal", {"fraction_r_neq_t": 0.0, "r_zero_warmup": K}), 0, n=5000)
    assert torch.equal(r, t)


# --------------------------------------------------------------------------- 2. warm-ups are fractions of our run
def test_esc_preset_warmup_is_a_fraction_of_the_run():
    """ESC's 20k steps of a 1.2M-step run = 1/60 of ours."""
    assert PRESETS["esc"]["time_sampler"]["r_zero_warmup"] == pytest.approx(1 / 60)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert preset_sampler("esc", train_steps=120_000).r_zero_warmup == 2000
        assert preset_sampler("esc", train_steps=6000).r_zero_warmup == 100


def test_absolute_warmup_longer_than_the_run_warns():
    with pytest.warns(UserWarning) as rec:
        build("logit_normal", {"r_zero_warmup": 20000}, train_steps=1000)
    msg = str(rec[0].message)
    assert "design.time_sampler.r_zero_warmup" in msg and "20000" in msg and "1000" in msg
    assert "fraction" in msg


@pytest.mark.parametrize("kw,steps", [({"r_zero_warmup": 1000}, 1000), ({"r_zero_warmup": 0.5}, 10),
                                      ({"r_zero_warmup": 20000}, None), ({}, 10)])
def test_no_warning_when_the_warmup_fits(kw, steps):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build("logit_normal", kw, train_steps=steps)


# --------------------------------------------------------------------------- 3. MeanFlow's r = t rows
def quantile(name, q):
    """The single draw's q-quantile (each sampler is a monotone map of one U(0,1) or N(0,1) draw)."""
    z = NormalDist().inv_cdf(q)
    if name == "uniform":
        return q
    if name == "logit_normal":
        return 1 / (1 + math.exp(-(-0.4 + z)))
    ratio = math.exp(-1.0 + 1.4 * z) / 0.5  # lognormal_sigma defaults on the linear path: t/(1−t) = ratio
    return ratio / (1 + ratio)


@pytest.mark.parametrize("name", ["uniform", "logit_normal", "lognormal_sigma"])
@pytest.mark.parametrize("law", ["max_of_two", "single"])
def test_r_equals_t_rows_time_law(name, law):
    """max of two: P(t ≤ x) = F(x)², median F⁻¹(1/√2); single: median F⁻¹(1/2). Pairs: always max of two."""
    kw = {"fraction_r_neq_t": 0.25, "r_mode": "pair", **({} if law == "max_of_two" else {"r_eq_t_time": law})}
    t, r = draw(build(name, kw))
    eq = r == t
    expect = quantile(name, math.sqrt(0.5) if law == "max_of_two" else 0.5)
    assert abs(t[eq].double().median().item() - expect) < TOL
    assert abs(t[~eq].double().median().item() - quantile(name, math.sqrt(0.5))) < TOL
    assert (r[~eq] < t[~eq]).all()


def test_meanflow_reference_numbers():
    """logit-normal(−0.4, 1): median t on r = t rows 0.536 (reference, default) vs 0.401 (single draw)."""
    medians = {}
    for law in ("max_of_two", "single"):
        t, r = draw(build("logit_normal", {"mean": -0.4, "std": 1.0, "fraction_r_neq_t": 0.25, "r_eq_t_time": law}))
        medians[law] = t[r == t].double().median().item()
    assert abs(medians["max_of_two"] - 0.536) < TOL and abs(medians["single"] - 0.401) < TOL
    t, r = draw(preset_sampler("meanflow"))
    assert abs(t[r == t].double().median().item() - 0.536) < TOL


def test_flow_matching_preset_keeps_the_single_draw():
    """SD3-style flow matching: t = sigmoid(N(0, 1)), median 0.5 (max of two would give 0.633)."""
    t, r = draw(preset_sampler("flow_matching"))
    assert torch.equal(r, t)
    assert abs(t.double().median().item() - 0.5) < TOL


def test_r_mode_zero_is_unaffected_by_the_r_equals_t_law():
    a = draw(build("logit_normal", {"r_mode": "zero"}), n=5000)
    b = draw(build("logit_normal", {"r_mode": "zero", "r_eq_t_time": "single"}), n=5000)
    assert torch.equal(a[0], b[0]) and (a[1] == 0).all() and (b[1] == 0).all()
    assert abs(a[0].double().median().item() - quantile("logit_normal", 0.5)) < 0.03


@pytest.mark.parametrize("bad", [{"r_eq_t_time": "max"}, {"r_zero_warmup_rows": "some"}])
def test_bad_option_values_rejected(bad):
    with pytest.raises(ValueError):
        build("logit_normal", bad)
