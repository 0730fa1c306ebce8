"""Target estimators against the exact flow of Gaussian data (tests/gaussian_oracle.py).

With x ~ N(μ, s²·I) the marginal velocity, flow map and average velocity are
known in closed form, so each target's defining identity can be checked to
float64 precision:

- flow matching regresses u_θ(z, t, t) on the conditional velocity;
- MeanFlow: ṽ − (t − r)·d/dt u(z_t, r, t) = u(z_t, r, t) when ṽ is the marginal velocity;
- shortcut: two exact half steps compose into the exact average velocity;
- limits: shortcut step d → 0 gives v(z, t); MeanFlow r = t gives ṽ;
  the plug-in velocity of a single image (or of identical images) is the conditional velocity.
"""
from __future__ import annotations

import math

import pytest
import torch

import components  # noqa: F401  (registers the built-ins)
from components.compose import sample
from components.guidance import NoGuidance
from components.registry import SCHEDULE, TARGET
from components.targets.base import Nets, Problem
from components.targets.flow_matching import FlowMatching
from components.targets.meanflow import MeanFlow
from components.targets.shortcut import Shortcut
from components.velocity import conditional_velocity, plugin_velocity
from tests.gaussian_oracle import OracleNet, _bc

DT = torch.float64
D = 3
MU = torch.tensor([0.5, -1.0, 2.0], dtype=DT)
S = 0.7
NULL = 10
SCHEDULES = ["linear", "cosine"]


@pytest.fixture(params=SCHEDULES)
def schedule(request):
    return SCHEDULE.build(request.param)


@pytest.fixture
def oracle(schedule):
    return OracleNet(schedule, MU, S)


def make_problem(schedule, t, r, seed=0, labels=None, x=None):
    g = torch.Generator().manual_seed(seed)
    b = t.shape[0]
    if x is None:
        x = MU + S * torch.randn(b, D, generator=g, dtype=DT)
    eps = torch.randn(x.shape, generator=g, dtype=DT)
    z = schedule.noise(x, eps, t)
    labels = torch.zeros(b, dtype=torch.long) if labels is None else labels
    return Problem(x=x, eps=eps, t=t, r=r, z=z, labels=labels, y=labels.clone(), null_label=NULL,
                   schedule=schedule, generator=torch.Generator().manual_seed(seed + 1), step=0)


def times(b, seed=0, lo=0.05, hi=0.95):
    g = torch.Generator().manual_seed(seed)
    t = lo + (hi - lo) * torch.rand(b, generator=g, dtype=DT)
    r = lo + (t - lo) * torch.rand(b, generator=g, dtype=DT)
    return t, r


def nets_of(model, teacher=None):
    return Nets(model=model, teacher=model if teacher is None else teacher, guidance=NoGuidance())


# --------------------------------------------------------------------------- the oracle itself
class TestOracle:
    def test_flow_map_identity_and_composition(self, oracle):
        t, r = times(16, seed=1)
        z = torch.randn(16, D, dtype=DT, generator=torch.Generator().manual_seed(2))
        s = 0.5 * (t + r)
        torch.testing.assert_close(oracle.flow_map(z, t, t), z, rtol=0, atol=1e-12)
        torch.testing.assert_close(oracle.flow_map(oracle.flow_map(z, t, s), s, r), oracle.flow_map(z, t, r),
                                   rtol=0, atol=1e-12)

    def test_flow_map_solves_the_ode(self, oracle):
        """RK4 on dz/dt = v(z, t) from t to r reproduces X(t→r)."""
        z0 = torch.randn(4, D, dtype=DT, generator=torch.Generator().manual_seed(3))
        t0, r0, n = 0.9, 0.1, 100
        z, h = z0.clone(), (r0 - t0) / n
        for i in range(n):
            tc = torch.full((4,), t0 + i * h, dtype=DT)
            k1 = oracle.velocity(z, tc)
            k2 = oracle.velocity(z + 0.5 * h * k1, tc + 0.5 * h)
            k3 = oracle.velocity(z + 0.5 * h * k2, tc + 0.5 * h)
            k4 = oracle.velocity(z + h * k3, tc + h)
            z = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        expect = oracle.flow_map(z0, torch.full((4,), t0, dtype=DT), torch.full((4,), r0, dtype=DT))
        torch.testing.assert_close(z, expect, rtol=0, atol=1e-8)

    def test_average_velocity_continuous_at_r_equals_t(self, oracle):
        t = torch.tensor([0.3, 0.6, 0.9], dtype=DT)
        z = torch.randn(3, D, dtype=DT, generator=torch.Generator().manual_seed(4))
        near = oracle(z, t - 1e-6, t)
        torch.testing.assert_close(near, oracle(z, t, t), rtol=0, atol=1e-5)
        torch.testing.assert_close(oracle(z, t, t), oracle.velocity(z, t), rtol=0, atol=0)

    def test_velocity_is_posterior_mean_of_conditional_velocity(self, oracle, schedule):
        """Monte Carlo over the posterior x | z_t (Gaussian, variance s²σ²/m²)."""
        g = torch.Generator().manual_seed(5)
        n = 20000
        t = torch.full((1,), 0.4, dtype=DT)
        z = torch.tensor([[0.3, -0.2, 1.0]], dtype=DT)
        a, sig, m = schedule.alpha(t), schedule.sigma(t), oracle.m(t)
        x = oracle.posterior_x(z, t) + (S * sig / m) * torch.randn(n, D, generator=g, dtype=DT)
        eps = (z - a * x) / sig
        mc = schedule.velocity(x, eps, t.expand(n)).mean(0, keepdim=True)
        torch.testing.assert_close(mc, oracle.velocity(z, t), rtol=0, atol=0.05)


# --------------------------------------------------------------------------- flow matching
def test_flow_matching_pred_and_target(schedule, oracle):
    t, r = times(8, seed=10)
    pb = make_problem(schedule, t, r, seed=11)
    out = FlowMatching()(nets_of(oracle), pb)
    torch.testing.assert_close(out.pred, oracle(pb.z, t, t), rtol=0, atol=0)
    torch.testing.assert_close(out.target, schedule.velocity(pb.x, pb.eps, t), rtol=0, atol=0)
    assert torch.equal(out.r, t) and torch.equal(out.t, t)
    assert not out.target.requires_grad


def test_flow_matching_built_from_registry(schedule, oracle):
    target = TARGET.build("flow_matching")
    t, r = times(4, seed=12)
    pb = make_problem(schedule, t, r, seed=13)
    out = target(nets_of(oracle), pb)
    torch.testing.assert_close(out.target, conditional_velocity(schedule, pb.x, pb.eps, t), rtol=0, atol=0)


# --------------------------------------------------------------------------- MeanFlow
@pytest.mark.parametrize("jvp,tol", [("exact", 1e-9), ("finite_difference", 1e-5)])
def test_meanflow_total_derivative_gives_exact_average_velocity(schedule, oracle, jvp, tol):
    t, r = times(8, seed=20, lo=0.1, hi=0.9)
    r = torch.minimum(r, t - 0.05)  # keep t − h > r for the central difference
    z = MU * schedule.alpha(t)[:, None] + torch.randn(8, D, dtype=DT, generator=torch.Generator().manual_seed(21))
    y = torch.zeros(8, dtype=torch.long)
    v = oracle.velocity(z, t)
    target = MeanFlow(jvp=jvp)
    u, dudt = target.total_derivative(oracle, z, r, t, y, v)
    torch.testing.assert_close(u, oracle(z, r, t), rtol=0, atol=0)
    u_tgt = v - _bc(t - r, v) * dudt
    torch.testing.assert_close(u_tgt, oracle(z, r, t), rtol=0, atol=tol)


@pytest.mark.parametrize("jvp,tol", [("exact", 1e-9), ("finite_difference", 1e-5)])
def test_meanflow_call_with_marginal_velocity(schedule, oracle, jvp, tol, monkeypatch):
    """The whole target: with ṽ replaced by the marginal velocity, u_tgt = u(z, r, t); r = t rows included."""
    t, r = times(10, seed=22, lo=0.1, hi=0.9)
    r = torch.minimum(r, t - 0.05)
    r[:3] = t[:3]
    pb = make_problem(schedule, t, r, seed=23)
    target = MeanFlow(jvp=jvp)
    monkeypatch.setattr(target, "velocity", lambda nets, p: oracle.velocity(p.z, p.t))
    out = target(nets_of(oracle), pb)
    expect = oracle(pb.z, r, t)
    torch.testing.assert_close(out.pred, expect, rtol=0, atol=0)
    torch.testing.assert_close(out.target, expect, rtol=0, atol=tol)
    assert not out.target.requires_grad


@pytest.mark.parametrize("jvp", ["exact", "finite_difference"])
def test_meanflow_r_equals_t_gives_v_tilde(schedule, oracle, jvp):
    t, _ = times(6, seed=24)
    pb = make_problem(schedule, t, t.clone(), seed=25)
    out = MeanFlow(jvp=jvp)(nets_of(oracle), pb)
    torch.testing.assert_close(out.target, schedule.velocity(pb.x, pb.eps, t), rtol=0, atol=0)
    torch.testing.assert_close(out.pred, oracle.velocity(pb.z, t), rtol=0, atol=0)


def test_meanflow_exact_jvp_keeps_gradient_on_prediction(schedule):
    """The primal output of the JVP is the prediction: it must carry the model's gradient."""
    w = torch.tensor(1.3, dtype=DT, requires_grad=True)
    base = OracleNet(schedule, MU, S)

    def model(z, r, t, y):
        return w * base(z, r, t, y)

    t, r = times(5, seed=26)
    pb = make_problem(schedule, t, r, seed=27)
    out = MeanFlow(jvp="exact")(nets_of(model), pb)
    assert out.pred.requires_grad and not out.target.requires_grad
    out.pred.sum().backward()
    torch.testing.assert_close(w.grad, base(pb.z, r, t).sum(), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- shortcut
def shortcut_times(n_steps, b, seed):
    """Rows on the N-step grid: d ∈ {1/N, 2/N, …, 1}, t a multiple of d (like the dyadic sampler)."""
    g = torch.Generator().manual_seed(seed)
    levels = int(math.log2(n_steps))
    exp = torch.arange(b) % (levels + 1)
    sections = n_steps // 2 ** exp
    d = 1.0 / sections.to(DT)
    k = torch.floor(torch.rand(b, generator=g, dtype=DT) * sections).clamp(max=sections - 1) + 1
    t = k * d
    return t, t - d, d


def test_shortcut_bootstrap_equals_exact_average_velocity(schedule, oracle):
    n = 8
    t, r, d = shortcut_times(n, 16, seed=30)
    pb = make_problem(schedule, t, r, seed=31)
    target = Shortcut(base_steps=n, teacher="online", clip=0.0)
    out = target(nets_of(oracle), pb)
    boot = d > 1.0 / n
    assert boot.any() and (~boot).any()
    torch.testing.assert_close(out.target[boot], oracle(pb.z, r, t)[boot], rtol=0, atol=1e-9)
    torch.testing.assert_close(out.target[~boot], schedule.velocity(pb.x, pb.eps, t)[~boot], rtol=0, atol=0)
    torch.testing.assert_close(out.pred, oracle(pb.z, r, t), rtol=0, atol=0)
    assert torch.equal(out.r, r) and torch.equal(out.t, t)


def test_shortcut_ema_teacher_is_the_teacher(schedule, oracle):
    """With teacher="ema" the bootstrap queries nets.teacher, not the model."""
    n = 4
    t, r, d = shortcut_times(n, 9, seed=32)
    pb = make_problem(schedule, t, r, seed=33)

    def zero_model(z, r_, t_, y):
        return torch.zeros_like(z)

    out = Shortcut(base_steps=n, teacher="ema", clip=0.0)(nets_of(zero_model, teacher=oracle), pb)
    boot = d > 1.0 / n
    torch.testing.assert_close(out.target[boot], oracle(pb.z, r, t)[boot], rtol=0, atol=1e-9)
    assert torch.count_nonzero(out.pred) == 0


def test_shortcut_clip(schedule, oracle):
    n = 4
    t, r, d = shortcut_times(n, 9, seed=34)
    pb = make_problem(schedule, t, r, seed=35)
    clip = 0.2
    out = Shortcut(base_steps=n, teacher="online", clip=clip)(nets_of(oracle), pb)
    boot = d > 1.0 / n
    torch.testing.assert_close(out.target[boot], oracle(pb.z, r, t)[boot].clamp(-clip, clip), rtol=0, atol=1e-9)
    torch.testing.assert_close(out.target[~boot], schedule.velocity(pb.x, pb.eps, t)[~boot], rtol=0, atol=0)


def test_shortcut_step_to_zero_gives_instantaneous_velocity(schedule, oracle):
    """d → 0 (still a bootstrap row for a huge base_steps): the target tends to v(z, t) = E[conditional velocity | z]."""
    t, _ = times(8, seed=36, lo=0.1, hi=0.9)
    r = t - 1e-6
    pb = make_problem(schedule, t, r, seed=37)
    target = Shortcut(base_steps=2 ** 24, teacher="online", clip=0.0)
    out = target(nets_of(oracle), pb)
    v = oracle.velocity(pb.z, t)
    torch.testing.assert_close(out.target, v, rtol=0, atol=1e-5)
    # it is the bootstrap (not the conditional velocity) that produced it
    assert (out.target - schedule.velocity(pb.x, pb.eps, t)).abs().max() > 1e-2


# --------------------------------------------------------------------------- plug-in velocity
def test_plugin_single_image_is_conditional(schedule):
    t = torch.tensor([0.37], dtype=DT)
    pb = make_problem(schedule, t, t, seed=40)
    plug = plugin_velocity(schedule, pb.z, pb.x, t)
    torch.testing.assert_close(plug, schedule.velocity(pb.x, pb.eps, t), rtol=0, atol=1e-5)


def test_plugin_rows_only_mix_their_label(schedule):
    t = torch.tensor([0.5, 0.8], dtype=DT)
    x = torch.tensor([[1.0, 0.0, -1.0], [1.1, 0.1, -0.9]], dtype=DT)  # close images: they would mix
    pb = make_problem(schedule, t, t, seed=41, x=x)
    cond = schedule.velocity(pb.x, pb.eps, t)
    labels = torch.tensor([0, 1])
    plug = plugin_velocity(schedule, pb.z, pb.x, t, labels)
    torch.testing.assert_close(plug, cond, rtol=0, atol=1e-5)
    # without labels the rows do mix
    assert (plugin_velocity(schedule, pb.z, pb.x, t) - cond).abs().max() > 1e-3


def test_plugin_identical_images_is_conditional(schedule):
    t = torch.linspace(0.05, 0.95, 6, dtype=DT)
    x = (MU + 0.3).expand(6, D).clone()
    pb = make_problem(schedule, t, t, seed=42, x=x)
    plug = plugin_velocity(schedule, pb.z, pb.x, t)
    torch.testing.assert_close(plug, schedule.velocity(pb.x, pb.eps, t), rtol=0, atol=1e-4)


def brute_force_plugin(schedule, z, x, t, allowed):
    out = []
    for i in range(z.shape[0]):
        a, s = schedule.alpha(t[i]), schedule.sigma(t[i])
        logw = torch.stack([-((z[i] - a * x[j]) ** 2).sum() / (2 * s ** 2) if allowed[i, j]
                            else torch.tensor(-math.inf, dtype=DT) for j in range(x.shape[0])])
        w = torch.softmax(logw, 0)
        xb = (w[:, None] * x).sum(0)
        out.append(schedule.d_alpha(t[i]) * xb + schedule.d_sigma(t[i]) * (z[i] - a * xb) / s)
    return torch.stack(out)


def test_plugin_matches_brute_force_posterior_with_unconditional_rows(schedule):
    b = 6
    t = torch.linspace(0.3, 0.9, b, dtype=DT)
    g = torch.Generator().manual_seed(43)
    x = 0.5 * torch.randn(b, D, generator=g, dtype=DT)
    pb = make_problem(schedule, t, t, seed=44, x=x)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    uncond = torch.tensor([False, False, False, True, False, True])
    allowed = (labels[:, None] == labels[None, :]) | uncond[:, None]
    plug = plugin_velocity(schedule, pb.z, pb.x, t, labels, uncond)
    torch.testing.assert_close(plug, brute_force_plugin(schedule, pb.z, pb.x, t, allowed), rtol=0, atol=1e-4)


def test_plugin_large_batch_approaches_marginal_velocity(schedule, oracle):
    """The plug-in velocity is the exact velocity of the empirical distribution → the marginal one."""
    n = 3000
    g = torch.Generator().manual_seed(45)
    x = MU + S * torch.randn(n, D, generator=g, dtype=DT)
    t = torch.full((n,), 0.6, dtype=DT)
    q = 8  # query points, placed among the first rows; the rest are padding queries
    zq = schedule.noise(MU + S * torch.randn(q, D, generator=g, dtype=DT),
                        torch.randn(q, D, generator=g, dtype=DT), t[:q])
    z = torch.cat([zq, schedule.noise(x[q:], torch.randn(n - q, D, generator=g, dtype=DT), t[q:])])
    plug = plugin_velocity(schedule, z, x, t)[:q]
    torch.testing.assert_close(plug, oracle.velocity(zq, t[:q]), rtol=0, atol=0.1)


def test_target_plugin_option_on_identical_images(schedule, oracle):
    """Target.velocity with velocity="plugin", p = 1 on identical images: the conditional velocity."""
    t, r = times(6, seed=46)
    x = (MU - 0.2).expand(6, D).clone()
    pb = make_problem(schedule, t, t.clone(), seed=47, x=x)
    out = FlowMatching(velocity="plugin", plugin_prob=1.0)(nets_of(oracle), pb)
    torch.testing.assert_close(out.target, schedule.velocity(pb.x, pb.eps, t), rtol=0, atol=1e-4)


# --------------------------------------------------------------------------- sampling with the exact map
@pytest.mark.parametrize("nfe", [1, 2, 5])
def test_sampling_with_exact_average_velocity_is_the_flow_map(schedule, oracle, nfe):
    noise = torch.randn(7, D, dtype=DT, generator=torch.Generator().manual_seed(50))
    y = torch.zeros(7, dtype=torch.long)
    out = sample(oracle, NoGuidance(), noise, nfe, y, null_label=NULL)
    one = torch.ones(7, dtype=DT)
    expect = oracle.flow_map(noise, one, 0 * one)
    torch.testing.assert_close(out, expect, rtol=0, atol=1e-5)


def test_euler_sampling_with_instantaneous_velocity_converges(schedule, oracle):
    noise = torch.randn(5, D, dtype=DT, generator=torch.Generator().manual_seed(51))
    y = torch.zeros(5, dtype=torch.long)
    one = torch.ones(5, dtype=DT)
    expect = oracle.flow_map(noise, one, 0 * one)
    errs = [(sample(oracle, NoGuidance(), noise, n, y, null_label=NULL, average_velocity=False) - expect).abs().max()
            for n in (8, 64)]
    assert errs[1] < errs[0] / 4
    assert errs[1] < 0.05
