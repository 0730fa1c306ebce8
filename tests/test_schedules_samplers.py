"""Schedules (α, σ and derivatives) and time samplers ((t, r) pairs) against their definitions."""
from __future__ import annotations

import math

import pytest
import torch

import components  # noqa: F401  (registers the built-ins)
from components.registry import SCHEDULE, TIME_SAMPLER
from components.time_samplers import T_MIN

DT = torch.float64
TS = torch.tensor([0.0, 1e-3, 0.1, 0.25, 0.5, 0.75, 0.9, 0.999, 1.0], dtype=DT)


# --------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("name", SCHEDULE.names())
def test_derivatives_match_autograd(name):
    sch = SCHEDULE.build(name)
    t = TS.clone().requires_grad_(True)
    (da,) = torch.autograd.grad(sch.alpha(t).sum(), t)
    (ds,) = torch.autograd.grad(sch.sigma(t).sum(), t)
    torch.testing.assert_close(sch.d_alpha(TS), da, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sch.d_sigma(TS), ds, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", SCHEDULE.names())
def test_boundary_values(name):
    sch = SCHEDULE.build(name)
    zero, one = torch.zeros(1, dtype=DT), torch.ones(1, dtype=DT)
    torch.testing.assert_close(sch.alpha(zero), one, rtol=0, atol=1e-12)
    torch.testing.assert_close(sch.sigma(zero), zero, rtol=0, atol=1e-12)
    torch.testing.assert_close(sch.alpha(one), zero, rtol=0, atol=1e-12)
    torch.testing.assert_close(sch.sigma(one), one, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", SCHEDULE.names())
def test_t_from_ratio_inverts_sigma_over_alpha(name):
    sch = SCHEDULE.build(name)
    t = torch.linspace(0.0, 0.99, 34, dtype=DT)
    ratio = sch.sigma(t) / sch.alpha(t)
    torch.testing.assert_close(sch.t_from_ratio(ratio), t, rtol=0, atol=1e-10)
    # and the other way round
    back = sch.t_from_ratio(torch.tensor([0.0, 0.3, 1.0, 7.0], dtype=DT))
    torch.testing.assert_close(sch.sigma(back) / sch.alpha(back), torch.tensor([0.0, 0.3, 1.0, 7.0], dtype=DT),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", SCHEDULE.names())
def test_velocity_is_time_derivative_of_noise(name):
    sch = SCHEDULE.build(name)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(5, 2, 3, generator=g, dtype=DT), torch.randn(5, 2, 3, generator=g, dtype=DT)
    t = torch.rand(5, generator=g, dtype=DT)
    _, dz = torch.func.jvp(lambda t_: sch.noise(x, eps, t_), (t,), (torch.ones_like(t),))
    torch.testing.assert_close(sch.velocity(x, eps, t), dz, rtol=1e-12, atol=1e-12)


def test_linear_and_cosine_formulas():
    t = TS
    lin, cos = SCHEDULE.build("linear"), SCHEDULE.build("cosine")
    torch.testing.assert_close(lin.alpha(t), 1 - t)
    torch.testing.assert_close(lin.sigma(t), t)
    torch.testing.assert_close(cos.alpha(t), torch.cos(math.pi * t / 2))
    torch.testing.assert_close(cos.sigma(t), torch.sin(math.pi * t / 2))


# --------------------------------------------------------------------------- all samplers: the contract
def build_sampler(name, kwargs=None):
    return TIME_SAMPLER.build(name, kwargs or {}, schedule=SCHEDULE.build("linear"))


@pytest.mark.parametrize("name", TIME_SAMPLER.names())
@pytest.mark.parametrize("step", [0, 1000])
def test_sampler_contract(name, step):
    sampler = build_sampler(name)
    n = 257
    t, r = sampler(n, step=step, generator=torch.Generator().manual_seed(1))
    assert t.shape == (n,) and r.shape == (n,)
    assert torch.isfinite(t).all() and torch.isfinite(r).all()
    assert (r >= 0).all() and (r <= t).all() and (t <= 1).all() and (t > 0).all()


@pytest.mark.parametrize("name", TIME_SAMPLER.names())
def test_sampler_deterministic_given_seed(name):
    sampler = build_sampler(name)
    a = sampler(100, step=3, generator=torch.Generator().manual_seed(7))
    b = sampler(100, step=3, generator=torch.Generator().manual_seed(7))
    c = sampler(100, step=3, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not (torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]))


# --------------------------------------------------------------------------- continuous samplers' options
@pytest.mark.parametrize("name", ["uniform", "logit_normal"])
def test_fraction_zero_gives_r_equals_t(name):
    t, r = build_sampler(name, {"fraction_r_neq_t": 0.0})(1000, generator=torch.Generator().manual_seed(2))
    assert torch.equal(r, t)


@pytest.mark.parametrize("name", ["uniform", "logit_normal"])
def test_fraction_quarter_gives_a_quarter_of_pairs(name):
    n = 20000
    t, r = build_sampler(name, {"fraction_r_neq_t": 0.25})(n, generator=torch.Generator().manual_seed(3))
    share = (r != t).double().mean().item()
    assert abs(share - 0.25) < 0.02
    assert (r[r != t] < t[r != t]).all()


@pytest.mark.parametrize("name", ["uniform", "logit_normal", "lognormal_sigma"])
def test_r_mode_zero(name):
    t, r = build_sampler(name, {"r_mode": "zero"})(500, generator=torch.Generator().manual_seed(4))
    assert (r == 0).all() and (t >= T_MIN).all()


def test_fraction_out_of_range_rejected():
    with pytest.raises(ValueError):
        build_sampler("logit_normal", {"fraction_r_neq_t": 1.5})


@pytest.mark.parametrize("name,stat,expect", [
    ("logit_normal", "median", 1 / (1 + math.exp(0.4))),  # sigmoid(mean) for mean = -0.4
    ("uniform", "mean", 0.5),
], ids=["logit_normal", "uniform"])
def test_r_equals_t_rows_have_the_single_draw_distribution(name, stat, expect):
    """r_eq_t_time="single": the r = t rows are flow matching with t ~ the sampler's law; only pairs are sorted.

    The default (MeanFlow's code, max of two draws) is tested in tests/test_fidelity_samplers.py.
    """
    kw = {"fraction_r_neq_t": 0.0, "r_eq_t_time": "single"}
    t, r = build_sampler(name, kw)(20000, generator=torch.Generator().manual_seed(5))
    value = getattr(t.double(), stat)().item()
    assert abs(value - expect) < 0.01


def test_lognormal_sigma_on_cosine_is_arctan():
    """On the cosine path t = (2/π)·arctan(σ_edm/σ_data) (sCM); check via the distribution of log σ_edm."""
    sampler = TIME_SAMPLER.build("lognormal_sigma", {"p_mean": -1.0, "p_std": 1.4, "sigma_data": 0.5},
                                 schedule=SCHEDULE.build("cosine"))
    t, r = sampler(20000, generator=torch.Generator().manual_seed(6))
    log_sigma = torch.log(torch.tan(t.double() * math.pi / 2) * 0.5)
    assert abs(log_sigma.mean().item() + 1.0) < 0.05
    assert abs(log_sigma.std().item() - 1.4) < 0.05
    assert (r == 0).all()


# --------------------------------------------------------------------------- gradual r = 0 warm start
K = 1000


def warm(n, step, seed=9, **kw):
    """The "all" rows law (every row may be pulled to r = 0); ESC's "pairs" default: test_fidelity_samplers.py."""
    sampler = build_sampler("logit_normal", {"fraction_r_neq_t": 0.0, "r_zero_warmup": K,
                                             "r_zero_warmup_rows": "all", **kw})
    return sampler(n, step=step, generator=torch.Generator().manual_seed(seed))


def test_warm_start_step_zero_all_r_zero():
    t, r = warm(2000, 0)
    assert (r == 0).all() and (t > 0).all()


@pytest.mark.parametrize("step", [K, K + 1, 10 * K])
def test_warm_start_after_warmup_no_forced_zero(step):
    t, r = warm(2000, step)
    assert torch.equal(r, t)


def test_warm_start_half_way_share():
    n = 20000
    t, r = warm(n, K // 2)
    share = (r == 0).double().mean().item()
    expect = (2 / math.pi) * math.acos(0.5)
    assert abs(expect - 2 / 3) < 1e-12
    assert abs(share - expect) < 0.02
    assert torch.equal(r[r != 0], t[r != 0])


def test_warm_start_share_decreases():
    shares = [(warm(4000, s)[1] == 0).double().mean().item() for s in (0, 250, 500, 750, 999)]
    assert all(a > b for a, b in zip(shares, shares[1:]))


def test_warm_start_negative_rejected():
    with pytest.raises(ValueError):
        build_sampler("uniform", {"r_zero_warmup": -1})


# --------------------------------------------------------------------------- dyadic grid
def is_int(v, tol=1e-6):
    return ((v - v.round()).abs() < tol).all()


@pytest.mark.parametrize("base_steps,fraction,n", [(128, 0.125, 1000), (8, 0.25, 333), (2, 0.5, 64), (64, 1.0, 100),
                                                   (16, 0.0, 50)])
def test_dyadic_grid(base_steps, fraction, n):
    sampler = build_sampler("dyadic", {"base_steps": base_steps, "bootstrap_fraction": fraction})
    t, r = sampler(n, generator=torch.Generator().manual_seed(10))
    t64, r64 = t.double(), r.double()
    assert (0 <= r64).all() and (r64 < t64).all() and (t64 <= 1).all()
    # t and r on the N-step grid
    assert is_int(t64 * base_steps) and is_int(r64 * base_steps)
    # d = 2^j / N
    steps = ((t64 - r64) * base_steps).round().long()
    assert is_int((t64 - r64) * base_steps)
    assert ((steps & (steps - 1)) == 0).all() and (steps >= 1).all() and (steps <= base_steps).all()
    # t is a multiple of d
    assert (((t64 * base_steps).round().long() % steps) == 0).all()
    # bootstrap rows: round(fraction·n), equal counts per level (±1)
    boot = steps > 1
    assert int(boot.sum()) == int(round(fraction * n))
    levels = int(math.log2(base_steps))
    if boot.any():
        counts = torch.bincount(torch.log2(steps[boot].double()).round().long(), minlength=levels + 1)[1:]
        assert counts.numel() == levels
        assert int(counts.max() - counts.min()) <= 1


def test_dyadic_t_uniform_over_multiples():
    """Flow-matching rows (d = 1/N) cover all N grid points."""
    n_steps = 8
    sampler = build_sampler("dyadic", {"base_steps": n_steps, "bootstrap_fraction": 0.0})
    t, r = sampler(4000, generator=torch.Generator().manual_seed(11))
    k = (t.double() * n_steps).round().long()
    counts = torch.bincount(k, minlength=n_steps + 1)
    assert counts[0] == 0
    assert (counts[1:] > 4000 / n_steps * 0.8).all()


@pytest.mark.parametrize("bad", [{"base_steps": 12}, {"base_steps": 1}, {"bootstrap_fraction": 1.5}])
def test_dyadic_rejects_bad_options(bad):
    with pytest.raises(ValueError):
        build_sampler("dyadic", bad)
