"""The 2026 targets (imf, alphaflow, tvm, split_meanflow) against the exact Gaussian flow (tests/gaussian_oracle.py).

- AlphaFlow: α = 1 is trajectory flow matching (u_tgt = ṽ); as α → 0 its normalised target tends to
  MeanFlow's (linearly in α), the raw one to the model itself; below the clamp it *is* MeanFlow's.
- SplitMeanFlow: the interval-splitting identity holds for the exact average velocity, so its target
  is the exact u(z_t, r, t) for any split.
- iMF: with the exact u and the predicted (exact) velocity as tangent, V = u + (t − r)·du/dt is the
  exact velocity v(z_t, t); with ṽ as tangent its residual is MeanFlow's.
- TVM: the exact flow map meets its terminal condition d/dr X(t→r)(z) = v(X(t→r)(z), r).
"""
from __future__ import annotations

import math

import pytest
import torch

import components  # noqa: F401  (registers the built-ins)
from components.registry import SCHEDULE
from components.targets.alphaflow import AlphaFlow
from components.targets.imf import ImprovedMeanFlow
from components.targets.meanflow import MeanFlow, total_derivative
from components.targets.split_meanflow import SplitMeanFlow
from components.targets.tvm import TerminalVelocityMatching
from tests.gaussian_oracle import OracleNet, _bc
from tests.test_oracle import MU, S, make_problem, nets_of, times

DT = torch.float64


@pytest.fixture(params=["linear", "cosine"])
def schedule(request):
    return SCHEDULE.build(request.param)


@pytest.fixture
def oracle(schedule):
    return OracleNet(schedule, MU, S)


@pytest.fixture
def wrong(schedule):
    """A smooth model that is not the flow of the data: the exact flow of other Gaussian data."""
    return OracleNet(schedule, MU + 0.3, 1.4 * S)


class WithHeads:
    """An oracle that accepts a backbone's extra keywords: ``head`` (any head is the exact velocity at r = t)."""

    def __init__(self, net):
        self.net = net

    def __call__(self, z, r, t, y, cond=None, head=None):
        return self.net(z, r, t, y)


def pair_times(b, seed):
    t, r = times(b, seed=seed, lo=0.1, hi=0.9)
    return t, torch.minimum(r, t - 0.05)


# --------------------------------------------------------------------------- AlphaFlow
def constant_alpha(a, **kw):
    return AlphaFlow(alpha_start=a, anneal="constant", **kw)


def test_alphaflow_alpha_one_is_trajectory_flow_matching(schedule, wrong):
    t, r = pair_times(8, seed=60)
    pb = make_problem(schedule, t, r, seed=61)
    for normalise in (True, False):
        out = constant_alpha(1.0, normalise=normalise)(nets_of(wrong), pb)
        torch.testing.assert_close(out.target, schedule.velocity(pb.x, pb.eps, t), rtol=0, atol=0)
        torch.testing.assert_close(out.pred, wrong(pb.z, r, t), rtol=0, atol=0)


def meanflow_target(model, pb):
    v = pb.schedule.velocity(pb.x, pb.eps, pb.t)
    _, dudt = total_derivative(model, pb.z, pb.r, pb.t, pb.y, v)
    return v - _bc(pb.t - pb.r, v) * dudt


def test_alphaflow_tends_to_meanflow_as_alpha_goes_to_zero(schedule, wrong):
    """Any smooth model and the conditional ṽ: normalised target − MeanFlow's = O(α); raw → u_θ with
    (raw − u)/α → MF − u."""
    t, r = pair_times(8, seed=62)
    pb = make_problem(schedule, t, r, seed=63)
    mf, u = meanflow_target(wrong, pb), wrong(pb.z, r, t)
    errs = []
    for a in (1e-2, 1e-3, 1e-4):
        errs.append(float((constant_alpha(a, clamp=0.0)(nets_of(wrong), pb).target - mf).abs().max()))
        raw = constant_alpha(a, clamp=0.0, normalise=False)(nets_of(wrong), pb).target
        torch.testing.assert_close((raw - u) / a, mf - u, rtol=0, atol=30 * a)
    assert errs[2] < 1e-3 and errs[0] / errs[1] > 5 and errs[1] / errs[2] > 5, errs  # linear in α


def test_alphaflow_below_the_clamp_is_meanflow(schedule, wrong):
    t, r = pair_times(8, seed=64)
    r[:2] = t[:2]
    pb = make_problem(schedule, t, r, seed=65)
    out = constant_alpha(0.001)(nets_of(wrong), pb)  # < clamp 0.005: MeanFlow's JVP target
    torch.testing.assert_close(out.target, MeanFlow()(nets_of(wrong), pb).target, rtol=0, atol=1e-12)


def test_alphaflow_exact_model_and_marginal_velocity(schedule, oracle, monkeypatch):
    """With the exact u and the marginal v the raw target misses u only by the Euler step's O(δ²)."""
    t, r = pair_times(8, seed=66)
    pb = make_problem(schedule, t, r, seed=67)
    errs = []
    for a in (0.2, 0.1):
        target = constant_alpha(a, normalise=False)
        monkeypatch.setattr(target, "velocity", lambda nets, p: oracle.velocity(p.z, p.t))
        errs.append(float((target(nets_of(oracle), pb).target - oracle(pb.z, r, t)).abs().max()))
    assert errs[0] / errs[1] > 3, errs  # quadratic in α


def test_alphaflow_anneal_is_a_fraction_of_the_run():
    for steps in (100, 10_000):
        af = AlphaFlow(anneal="sigmoid", anneal_from=0.2, anneal_to=0.6, train_steps=steps)
        assert af.alpha(0) == 1.0 and af.alpha(int(0.2 * steps)) == 1.0
        assert af.alpha(int(0.4 * steps)) == pytest.approx(0.5)
        assert af.alpha(int(0.6 * steps)) == 0.0 and af.alpha(steps) == 0.0
        lin = AlphaFlow(anneal="linear", anneal_to=0.5, clamp=0.0, train_steps=steps)
        assert lin.alpha(int(0.25 * steps)) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="train.steps"):
        AlphaFlow()


# --------------------------------------------------------------------------- SplitMeanFlow
def test_interval_splitting_identity_of_the_exact_average_velocity(schedule, oracle):
    t, r = pair_times(16, seed=70)
    lam = torch.rand(16, generator=torch.Generator().manual_seed(71), dtype=DT)
    s = t - lam * (t - r)
    z = torch.randn(16, 3, dtype=DT, generator=torch.Generator().manual_seed(72))
    z_s = oracle.flow_map(z, t, s)
    lhs = _bc(t - r, z) * oracle(z, r, t)
    rhs = _bc(s - r, z) * oracle(z_s, r, s) + _bc(t - s, z) * oracle(z, s, t)
    torch.testing.assert_close(lhs, rhs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("split", ["uniform", "midpoint"])
def test_split_meanflow_target_is_exact_for_the_exact_teacher(schedule, oracle, split):
    t, r = pair_times(12, seed=73)
    r[:3] = t[:3]
    pb = make_problem(schedule, t, r, seed=74)
    out = SplitMeanFlow(split=split)(nets_of(oracle), pb)
    pair = t > r
    torch.testing.assert_close(out.target[pair], oracle(pb.z, r, t)[pair], rtol=0, atol=1e-9)
    torch.testing.assert_close(out.target[~pair], schedule.velocity(pb.x, pb.eps, t)[~pair], rtol=0, atol=0)
    torch.testing.assert_close(out.pred, oracle(pb.z, r, t), rtol=0, atol=0)


def test_split_meanflow_ema_teacher_is_the_teacher(schedule, oracle):
    t, r = pair_times(6, seed=75)
    pb = make_problem(schedule, t, r, seed=76)
    out = SplitMeanFlow(teacher="ema")(nets_of(lambda z, r_, t_, y: torch.zeros_like(z), teacher=oracle), pb)
    torch.testing.assert_close(out.target, oracle(pb.z, r, t), rtol=0, atol=1e-9)


# --------------------------------------------------------------------------- iMF
@pytest.mark.parametrize("head", ["boundary", "aux"])
def test_imf_compound_velocity_is_the_exact_velocity(schedule, oracle, head):
    t, r = pair_times(10, seed=80)
    r[:3] = t[:3]
    pb = make_problem(schedule, t, r, seed=81)
    out = ImprovedMeanFlow(velocity_head=head)(nets_of(WithHeads(oracle)), pb)
    torch.testing.assert_close(out.pred, oracle.velocity(pb.z, t), rtol=0, atol=1e-9)  # V = v on every row
    torch.testing.assert_close(out.target, schedule.velocity(pb.x, pb.eps, t), rtol=0, atol=0)
    assert not out.target.requires_grad


def test_imf_with_the_target_tangent_has_meanflows_residual(schedule, wrong):
    t, r = pair_times(8, seed=82)
    pb = make_problem(schedule, t, r, seed=83)
    imf = ImprovedMeanFlow(velocity_head="boundary", tangent="target")(nets_of(wrong), pb)
    mf = MeanFlow()(nets_of(wrong), pb)
    torch.testing.assert_close(imf.pred - imf.target, mf.pred - mf.target, rtol=0, atol=1e-12)


def test_imf_jvp_keeps_the_gradient_of_u_only(schedule):
    w = torch.tensor(1.3, dtype=DT, requires_grad=True)
    base = OracleNet(schedule, MU, S)
    t, r = pair_times(5, seed=84)
    pb = make_problem(schedule, t, r, seed=85)
    out = ImprovedMeanFlow(velocity_head="boundary")(nets_of(lambda z, r_, t_, y: w * base(z, r_, t_, y)), pb)
    out.pred.sum().backward()  # V = w·u + (t − r)·sg(d(w·u)/dt): dV/dw = u
    torch.testing.assert_close(w.grad, base(pb.z, r, t).sum(), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- TVM
@pytest.mark.parametrize("jvp,tol", [("exact", 1e-9), ("finite_difference", 1e-5)])
def test_tvm_terminal_condition_of_the_exact_flow_map(schedule, oracle, jvp, tol):
    t, r = pair_times(10, seed=90)
    r[:3] = t[:3]
    pb = make_problem(schedule, t, r, seed=91)
    out = TerminalVelocityMatching(jvp=jvp, teacher="online")(nets_of(oracle), pb)
    pair = t > r
    # d/dr X(t→r)(z) and v(X(t→r)(z), r), both computed independently of the target
    dx = torch.func.jvp(lambda r_: oracle.flow_map(pb.z, t, r_), (r,), (torch.ones_like(r),))[1]
    v_end = oracle.velocity(oracle.flow_map(pb.z, t, r), r)
    torch.testing.assert_close(dx[pair], v_end[pair], rtol=0, atol=1e-9)
    torch.testing.assert_close(out.pred[pair], dx[pair], rtol=0, atol=tol)
    torch.testing.assert_close(out.target[pair], v_end[pair], rtol=0, atol=1e-9)
    torch.testing.assert_close(out.pred[~pair], oracle.velocity(pb.z, t)[~pair], rtol=0, atol=0)
    torch.testing.assert_close(out.target[~pair], schedule.velocity(pb.x, pb.eps, t)[~pair], rtol=0, atol=0)


@pytest.mark.parametrize("jvp_grad", [True, False])
def test_tvm_gradient_through_the_jvp_switch(schedule, jvp_grad):
    w = torch.tensor(1.3, dtype=DT, requires_grad=True)
    base = OracleNet(schedule, MU, S)
    t, r = pair_times(5, seed=92)
    pb = make_problem(schedule, t, r, seed=93)
    out = TerminalVelocityMatching(jvp_grad=jvp_grad, teacher="online")(
        nets_of(lambda z, r_, t_, y: w * base(z, r_, t_, y)), pb)
    out.pred.sum().backward()  # pred = w·u − (t − r)·w·∂_r u, the second term detached without jvp_grad
    du = torch.func.jvp(lambda r_: base(pb.z, r_, t), (r,), (torch.ones_like(r),))[1]
    expect = base(pb.z, r, t) - (_bc(t - r, du) * du if jvp_grad else 0)
    torch.testing.assert_close(w.grad, expect.sum(), rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- the presets train from the same loop
NEW_PRESETS = ["imf", "alphaflow", "tvm", "split_meanflow"]
TINY_DIT = "design.backbone={name: dit, size: T, patch: 2, depth: 2, hidden: 64, heads: 2}"


@pytest.mark.slow
@pytest.mark.parametrize("preset", NEW_PRESETS)
def test_new_preset_trains_on_digits_and_resumes(preset, tmp_path):
    """A few steps of the shared loop on digits, a checkpoint, a resumed run (attached inputs and heads are
    in the state), and, for guidance fed as an input, one model sampled at two scales."""
    import json

    from ablate.config import compose
    from ablate.train import train

    def run(steps):
        cfg, _ = compose(preset, [f"train.steps={steps}", "train.batch_size=32", "train.log_every=5",
                                  "train.ckpt_every=5", "eval.every=0", "eval.at_end=false", "sample.nfe=[]",
                                  f"train.out_dir={tmp_path}", TINY_DIT])
        return train(cfg, progress=False)

    run(10)
    trained = run(15)  # resumes from the step-10 checkpoint
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["values"]["train/loss"] for r in records if r["kind"] == "train"]
    assert trained.step == 15 and len(losses) == 3 and all(math.isfinite(v) for v in losses)
    samples = {w: trained.generate(16, 1, seed=0, cfg_scale=w) for w in (1.0, 3.0)}
    assert all(torch.isfinite(x).all() for x in samples.values())
    if trained.comps.guidance.takes_input:
        assert not torch.allclose(samples[1.0], samples[3.0])
