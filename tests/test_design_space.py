"""The rest of the unified design space (CT, sCT, IMM) against the exact flow of Gaussian data.

Oracle properties (tests/gaussian_oracle.py gives the exact velocity, flow map and average velocity):

- DDIM with the conditional velocity lands on the same noise draw; with the marginal velocity it is
  a second-order step of the probability-flow ODE;
- CT (discrete): with the exact model and velocity, the target → the exact flow map to r = 0 as the
  grid step shrinks (error O(Δ²)); on the grid sampler, s is the previous grid time;
- sCT (continuous): with the exact model and velocity the tangent vanishes, so the target IS the exact
  flow map to r = 0 (normalised or not); in the velocity form, without normalisation and warm-up it
  equals MeanFlow's target and at the start of the tangent warm-up it is flow matching;
- IMM: the two-step pushforward of the exact model matches the one-step one; the MMD between identical
  particle sets is 0, between two samples of one distribution ≈ 0, and grows with a shift;
- multistep consistency sampling with the exact model draws exact samples.
"""
from __future__ import annotations

import pytest
import torch

import components  # noqa: F401
from components.compose import sample
from components.guidance import NoGuidance
from components.registry import SCHEDULE, TIME_SAMPLER, WEIGHTING
from components.targets.base import TargetOutput
from components.targets.consistency import Consistency
from components.targets.imm import IMM, particle_groups
from components.targets.meanflow import MeanFlow
from tests.gaussian_oracle import OracleNet
from tests.test_oracle import D, DT, MU, NULL, S, make_problem, nets_of, times


@pytest.fixture(params=["linear", "cosine"])
def schedule(request):
    return SCHEDULE.build(request.param)


@pytest.fixture
def oracle(schedule):
    return OracleNet(schedule, MU, S)


def exact_velocity(oracle):
    return lambda nets, pb: oracle.velocity(pb.z, pb.t)


# --------------------------------------------------------------------------- DDIM step
def test_ddim_with_conditional_velocity_lands_on_the_same_noise(schedule):
    t, s = times(12, seed=1)
    pb = make_problem(schedule, t, s, seed=2)
    v = schedule.velocity(pb.x, pb.eps, t)
    torch.testing.assert_close(schedule.ddim_step(pb.z, v, t, s), schedule.noise(pb.x, pb.eps, s), rtol=0, atol=1e-12)
    torch.testing.assert_close(schedule.ddim_step(pb.z, v, t, t), pb.z, rtol=0, atol=1e-12)


def test_ddim_with_marginal_velocity_is_second_order(schedule, oracle):
    t, _ = times(12, seed=3, lo=0.2, hi=0.9)
    z = torch.randn(12, D, dtype=DT, generator=torch.Generator().manual_seed(4))
    errs = []
    for h in (1e-2, 1e-3):
        s = t - h
        step = schedule.ddim_step(z, oracle.velocity(z, t), t, s)
        errs.append((step - oracle.flow_map(z, t, s)).abs().max())
    assert errs[1] < errs[0] / 30  # O(h²) local error: 100× for a 10× smaller step


# --------------------------------------------------------------------------- CT (discrete)
def _ct_target_error(schedule, oracle, delta, seed=5):
    t, _ = times(16, seed=seed, lo=0.2, hi=0.9)
    pb = make_problem(schedule, t, torch.zeros_like(t), seed=seed + 1)
    target = Consistency(mode="discrete", delta=delta, space="data")
    target.velocity = exact_velocity(oracle)
    out = target(nets_of(oracle), pb)
    exact = oracle.flow_map(pb.z, t, torch.zeros_like(t))
    torch.testing.assert_close(out.pred, exact, rtol=0, atol=1e-12)  # the exact model's own f
    return (out.target - exact).abs().max()


def test_ct_target_converges_to_the_exact_flow_map(schedule, oracle):
    coarse, fine = _ct_target_error(schedule, oracle, 1e-2), _ct_target_error(schedule, oracle, 1e-3)
    assert fine < coarse / 30 and fine < 1e-4


def test_ct_uses_the_previous_grid_time(schedule, oracle):
    sampler = TIME_SAMPLER.build("discrete", {"steps": 16}, schedule=schedule)
    t, r = sampler(32, generator=torch.Generator().manual_seed(7))
    t, r = t.to(DT), r.to(DT)
    pb = make_problem(schedule, t, r, seed=8)
    pb.time_sampler = sampler
    target = Consistency(mode="discrete", space="data")
    out = target(nets_of(oracle), pb)
    s = sampler.previous(t)
    assert (s < t).all() and torch.isin(s.float(), sampler.grid).all()
    z_s = schedule.noise(pb.x, pb.eps, s)  # the conditional velocity's DDIM step
    torch.testing.assert_close(out.target, oracle.flow_map(z_s, s, torch.zeros_like(s)), rtol=0, atol=1e-10)


def test_discrete_grid_facts(schedule):
    sampler = TIME_SAMPLER.build("discrete", {"steps": 10, "sigma_min": 0.002, "sigma_max": 80.0,
                                              "sigma_data": 0.5}, schedule=schedule)
    g = sampler.grid.double()
    assert (g[1:] > g[:-1]).all()
    ratio = schedule.sigma(g) / schedule.alpha(g)
    torch.testing.assert_close(ratio[[0, -1]], torch.tensor([0.004, 160.0], dtype=DT), rtol=1e-4, atol=0)
    assert sampler.previous(g[:1].float()).item() == 0.0  # below the grid: the data end
    lognormal = TIME_SAMPLER.build("discrete", {"steps": 10, "index": "lognormal"}, schedule=schedule)
    assert torch.isclose(lognormal.probs.sum() / lognormal.probs.sum(), torch.tensor(1.0))
    assert lognormal.probs.argmax() not in (0, 8)  # iCT's log-normal puts its mass in the middle


def test_ct_without_an_adjacent_time_fails_at_build():
    from ablate.design import DesignError, build_components, resolve_design

    design = resolve_design({"preset": "ct", "time_sampler": {"name": "uniform", "r_mode": "zero"},
                             "backbone": {"name": "mlp", "width": 8, "depth": 1}})
    with pytest.raises(DesignError, match="adjacent time"):
        build_components(design, (2,), 0)


# --------------------------------------------------------------------------- sCT (continuous)
@pytest.mark.parametrize("norm", [0.0, 0.1])
def test_sct_target_is_the_exact_flow_map(schedule, oracle, norm):
    t, _ = times(16, seed=9, lo=0.1, hi=0.9)
    r = torch.zeros_like(t)
    pb = make_problem(schedule, t, r, seed=10)
    target = Consistency(mode="continuous", space="data", tangent_norm=norm)
    target.velocity = exact_velocity(oracle)
    out = target(nets_of(oracle), pb)
    torch.testing.assert_close(out.target, oracle.flow_map(pb.z, t, r), rtol=0, atol=1e-9)


def test_sct_without_normalisation_is_meanflow(schedule):
    t, r = times(16, seed=11)
    pb = make_problem(schedule, t, r, seed=12)
    model = OracleNet(schedule, MU + 0.3, S * 1.5)  # a wrong model: the tangent is not zero
    # the velocity form (u-space tangent); the reference's ddim form is pinned in tests/test_fidelity_targets.py
    a = Consistency(mode="continuous", tangent_norm=0.0, tangent_form="velocity")(nets_of(model), pb)
    b = MeanFlow()(nets_of(model), make_problem(schedule, t, r, seed=12))
    torch.testing.assert_close(a.target, b.target, rtol=0, atol=1e-10)
    normed = Consistency(mode="continuous", tangent_norm=0.1, tangent_form="velocity")(
        nets_of(model), make_problem(schedule, t, r, seed=12))
    step = (normed.target - normed.pred.detach()).flatten(1).norm(dim=1) / D ** 0.5  # per-entry RMS
    assert (step <= 1 + 1e-9).all() and (step > 0.5).all()  # g/(rms(g) + c): below 1, and g is far from 0


def test_sct_warmup_starts_as_flow_matching(schedule):
    t, _ = times(8, seed=13)
    pb = make_problem(schedule, t, torch.zeros_like(t), seed=14)
    model = OracleNet(schedule, MU + 0.3, S * 1.5)
    # the velocity form starts as u → ṽ; the reference's ddim form starts as F → ṽ (tests/test_fidelity_targets.py)
    out = Consistency(mode="continuous", tangent_norm=0.0, tangent_warmup=100, tangent_form="velocity")(nets_of(model), pb)
    torch.testing.assert_close(out.target, schedule.velocity(pb.x, pb.eps, t), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- IMM
def test_imm_two_step_pushforward_of_the_exact_model_matches(schedule, oracle):
    """Target → prediction as the decrement 1/2^k shrinks (DDIM's local error, O(Δ²))."""
    t, r = times(16, seed=15, lo=0.2, hi=0.9)
    errs = []
    for k in (8, 11):
        pb = make_problem(schedule, t, r, seed=16)
        target = IMM(k=k, mapping="t")
        target.velocity = exact_velocity(oracle)
        out = target(nets_of(oracle), pb)
        torch.testing.assert_close(out.pred, oracle.flow_map(pb.z, t, r), rtol=0, atol=1e-12)
        errs.append((out.target - out.pred).abs().max())
    assert errs[1] < errs[0] / 20 and errs[1] < 1e-5
    for mapping in ("t", "eta"):
        s = IMM(k=4, mapping=mapping).intermediate(schedule, t, r)
        assert ((s >= r) & (s < t)).all()


def test_imm_groups_follow_the_sampler():
    sampler = TIME_SAMPLER.build("imm", {"group_size": 4})
    t, r = sampler(10, generator=torch.Generator().manual_seed(0))
    assert particle_groups(t, r).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]


def test_mmd_is_zero_for_identical_sets_and_grows_with_a_shift(schedule):
    mmd = WEIGHTING.build("mmd", {"time_weight": "none"}, schedule=schedule)
    g = torch.Generator().manual_seed(0)
    n = 512
    p, q = torch.randn(n, 8, generator=g, dtype=DT), torch.randn(n, 8, generator=g, dtype=DT)
    t, r, group = torch.full((n,), 0.6), torch.full((n,), 0.1), torch.zeros(n, dtype=torch.long)

    def dist(a, b):
        return mmd(TargetOutput(a, b, t, r, group=group)).mean().item()

    assert dist(p, p) == pytest.approx(0.0, abs=1e-6)
    same = dist(p, q)
    shifted = [dist(p + shift, q) for shift in (0.25, 0.5, 1.0, 2.0)]
    assert same < 0.1 * shifted[1]
    assert all(a < b for a, b in zip([same] + shifted, shifted))
    # the groups are separate distributions: a shift in one group only raises that group's rows
    two = torch.arange(n) // (n // 2)
    per_row = mmd(TargetOutput(torch.cat([p[:256] + 1.0, p[256:]]), p, t, r, group=two))
    assert per_row[:256].min() > 10 * per_row[256:].max()


# --------------------------------------------------------------------------- consistency sampling
@pytest.mark.parametrize("nfe", [1, 2, 4])
def test_consistency_sampling_with_the_exact_model_draws_exact_samples(schedule, oracle, nfe):
    n = 20000
    noise = torch.randn(n, D, dtype=DT, generator=torch.Generator().manual_seed(17))
    x = sample(oracle, NoGuidance(), noise, nfe, torch.zeros(n, dtype=torch.long), null_label=NULL,
               mode="consistency", schedule=schedule, generator=torch.Generator().manual_seed(18))
    torch.testing.assert_close(x.mean(0), MU, rtol=0, atol=0.03)
    torch.testing.assert_close(x.std(0), torch.full((D,), S, dtype=DT), rtol=0, atol=0.02)
    if nfe == 1:  # one step is the flow map itself
        one = torch.ones(n, dtype=DT)
        torch.testing.assert_close(x, oracle.flow_map(noise, one, 0 * one), rtol=0, atol=1e-6)  # float32 time grid
