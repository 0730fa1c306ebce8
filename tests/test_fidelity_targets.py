"""Targets and weightings against the details of their reference code.

- sCT (ESC's ``loss/scm_cos_loss.py`` / ``loss/scm_linear_loss.py``, EDAPINENUT/ExplicitShortCut): the tangent is
  normalised by its per-entry RMS (its step's per-entry scale does not depend on the data size), the cosine
  reference warms up its time-derivative part in TrigFlow's parameterisation, the linear reference is MeanFlow's
  target with the warm-up on (t − r)·du/dt and no normalisation; warm-ups given as a fraction of the run;
- shortcut (kvfrans/shortcut-models ``targets_shortcut.py``): z_s is clipped to [−4, 4] before the second half
  step, bootstrap CFG only on the rows of the smallest bootstrap step, real labels on the bootstrap rows;
- IMM's kernel distance: exact for equal vectors in float32 and under bfloat16 autocast, and the MMD equals a
  per-group float64 reference (uneven last group included).
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import components  # noqa: F401
from ablate.design import PRESETS
from components.registry import SCHEDULE, WEIGHTING
from components.targets.base import TargetOutput
from components.targets.consistency import Consistency
from components.targets.shortcut import Shortcut
from components.weightings import group_layout, group_pairwise_dist
from tests.test_oracle import DT, NULL, make_problem, nets_of, shortcut_times, times


def elementwise_model(z, r, t, y):
    """A wrong, elementwise model: its tangent is far from 0 and has the same per-entry law at any D."""
    tb = t.reshape(t.shape + (1,) * (z.dim() - 1))
    return 0.3 * z * torch.cos(tb) + 0.2 * tb - 0.1 * torch.sin(3 * z)


def problem(schedule, t, r, dims, seed, tile=1, step=0):
    g = torch.Generator().manual_seed(seed)
    x = 0.5 + 0.8 * torch.randn(t.shape[0], dims, generator=g, dtype=DT)
    pb = make_problem(schedule, t, r, seed=seed, x=x.repeat(1, tile))
    eps = torch.randn(t.shape[0], dims, generator=g, dtype=DT).repeat(1, tile)
    pb.eps, pb.z, pb.step = eps, schedule.noise(pb.x, eps, t), step
    return pb


# --------------------------------------------------------------------------- sCT: tangent normalisation
@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_rms_normalised_tangent_does_not_depend_on_the_data_size(path):
    """D = 1024 is the D = 64 problem tiled 16 times: the per-entry tangent is the same, so is its normalised step."""
    schedule = SCHEDULE.build(path)
    t, _ = times(12, seed=1, lo=0.1, hi=0.9)
    r = torch.zeros_like(t)
    steps = {}
    for kind, kw in (("rms", {}), ("l2", {"tangent_norm_kind": "l2"})):  # rms is the default
        target = Consistency(mode="continuous", tangent_norm=0.1, **kw)
        out = {dims: target(nets_of(elementwise_model), problem(schedule, t, r, 64, seed=2, tile=dims // 64))
               for dims in (64, 1024)}
        steps[kind] = {dims: o.target - o.pred.detach() for dims, o in out.items()}
    small, large = steps["rms"][64], steps["rms"][1024]
    rms = small.square().mean(1).sqrt()
    assert (rms > 0.5).all() and (rms < 1).all()  # g/(rms(g) + c) with g far from 0
    torch.testing.assert_close(large, small.repeat(1, 16), rtol=1e-10, atol=1e-12)
    # the full L2 norm shrinks the step by √D: 4× smaller at 1024 than at 64 (the old behaviour)
    ratio = steps["l2"][64].square().mean(1).sqrt() / steps["l2"][1024].square().mean(1).sqrt()
    assert (ratio > 3.5).all()


# --------------------------------------------------------------------------- sCT: the reference's warm-up
def total_derivative_fd(fn, pb, v, h=1e-6):
    """d/dt fn(z_t, t) along (ṽ, 1) by a central difference (float64)."""
    return (fn(pb.z + h * v, pb.t + h) - fn(pb.z - h * v, pb.t - h)) / (2 * h)


def rms_normalise(g, c):
    return g / (g.square().mean(1, keepdim=True).sqrt() + c)


@pytest.mark.parametrize("w_step", [0, 40, 100])
def test_cosine_tangent_is_the_references_trigflow_warmup(w_step):
    """ESC's scm_cos_loss.py, term by term in its F parameterisation (f = cos τ·z − (2/π)·sin τ·F, τ = πt/2):

        g = cos τ·(−cos τ·F + cos τ·ṽ) + w·(−(π/2)·sin τ·cos τ·z − (2/π)·sin τ·cos τ·dF/dt),
        F_tgt = F + g/(rms(g) + 0.1),

    and our target is the u whose flow map is that F_tgt's: u = ((1 − cos τ)·z + (2/π)·sin τ·F)/t.
    """
    schedule = SCHEDULE.build("cosine")
    t, _ = times(16, seed=3, lo=0.05, hi=0.95)
    r = torch.zeros_like(t)
    pb = problem(schedule, t, r, 5, seed=4, step=w_step)
    out = Consistency(mode="continuous", tangent_norm=0.1, tangent_warmup=100)(nets_of(elementwise_model), pb)
    w = min(1.0, w_step / 100)

    tau = (0.5 * math.pi * t)[:, None]
    v = schedule.velocity(pb.x, pb.eps, t)

    def net_f(z, t_):  # the network's F at (z, t) for r = 0
        ta = (0.5 * math.pi * t_)[:, None]
        u = elementwise_model(z, torch.zeros_like(t_), t_, None)
        return (0.5 * math.pi) * (t_[:, None] * u - (1 - torch.cos(ta)) * z) / torch.sin(ta)

    big_f = net_f(pb.z, t)
    dfdt = total_derivative_fd(net_f, pb, v)
    cos, sin = torch.cos(tau), torch.sin(tau)
    g = cos * (-cos * big_f + cos * v) + w * (-(0.5 * math.pi) * sin * cos * pb.z - (2 / math.pi) * sin * cos * dfdt)
    f_tgt = big_f + rms_normalise(g, 0.1)
    u_tgt = ((1 - cos) * pb.z + (2 / math.pi) * sin * f_tgt) / t[:, None]
    torch.testing.assert_close(out.target, u_tgt, rtol=0, atol=1e-7)
    torch.testing.assert_close(out.pred, elementwise_model(pb.z, r, t, None), rtol=0, atol=0)
    # our former u-space warm-up (kept as tangent_form="velocity") is a different target on this path
    other = Consistency(mode="continuous", tangent_norm=0.1, tangent_warmup=100, tangent_form="velocity")(
        nets_of(elementwise_model), problem(schedule, t, r, 5, seed=4, step=w_step))
    assert (other.target - u_tgt).abs().max() > 1e-2


@pytest.mark.parametrize("w_step", [0, 50, 100])
def test_linear_tangent_is_the_references_meanflow_warmup(w_step):
    """ESC's scm_linear_loss.py: u_tgt = ṽ − w·(t − r)·du/dt, no normalisation (the sct_linear preset); the
    ddim and velocity forms coincide on the linear path."""
    schedule = SCHEDULE.build("linear")
    t, r = times(16, seed=5)
    r = torch.where(torch.arange(16) % 2 == 0, torch.zeros_like(r), r)
    for form in ("ddim", "velocity"):
        pb = problem(schedule, t, r, 5, seed=6, step=w_step)
        v = schedule.velocity(pb.x, pb.eps, t)
        out = Consistency(mode="continuous", tangent_norm=0.0, tangent_warmup=100, tangent_form=form)(
            nets_of(elementwise_model), pb)
        dudt = total_derivative_fd(lambda z, t_: elementwise_model(z, r, t_, None), pb, v)
        expected = v - min(1.0, w_step / 100) * (t - r)[:, None] * dudt
        torch.testing.assert_close(out.target, expected, rtol=0, atol=1e-7)


def test_ddim_warmup_starts_as_a_ddim_step_with_the_velocity():
    """At w = 0 (no normalisation) the cosine reference relaxes F towards ṽ: F_tgt − F = cos²τ·(ṽ − F)."""
    schedule = SCHEDULE.build("cosine")
    t, _ = times(8, seed=7, lo=0.1, hi=0.9)
    pb = problem(schedule, t, torch.zeros_like(t), 4, seed=8)
    out = Consistency(mode="continuous", tangent_norm=0.0, tangent_warmup=100)(nets_of(elementwise_model), pb)
    tau = (0.5 * math.pi * t)[:, None]

    def to_f(u):
        return (0.5 * math.pi) * (t[:, None] * u - (1 - torch.cos(tau)) * pb.z) / torch.sin(tau)

    v = schedule.velocity(pb.x, pb.eps, t)
    big_f = to_f(out.pred.detach())
    torch.testing.assert_close(to_f(out.target) - big_f, torch.cos(tau) ** 2 * (v - big_f), rtol=0, atol=1e-10)


def test_tangent_warmup_as_a_fraction_of_the_run():
    assert Consistency(mode="continuous", tangent_warmup=0.25, train_steps=400).tangent_warmup == 100
    assert Consistency(mode="continuous", tangent_warmup=300, train_steps=400).tangent_warmup == 300
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Consistency(mode="continuous", tangent_warmup=0.5, train_steps=400)  # a fraction never warns
    with pytest.warns(UserWarning, match="tangent_warmup=10000 steps exceeds train.steps=400"):
        Consistency(mode="continuous", tangent_warmup=10_000, train_steps=400)
    with pytest.raises(ValueError, match="fraction of train.steps"):
        Consistency(mode="continuous", tangent_warmup=0.1)
    target = Consistency(mode="continuous", tangent_warmup=0.25, train_steps=400)
    assert target.warmup_weight(0) == 0 and target.warmup_weight(50) == 0.5 and target.warmup_weight(400) == 1


def test_sct_presets_follow_the_reference():
    sct, lin = PRESETS["sct"]["target"], PRESETS["sct_linear"]["target"]
    assert sct["tangent_norm"] == 0.1 and sct.get("tangent_norm_kind", "rms") == "rms"
    assert lin["tangent_norm"] == 0.0  # scm_linear_loss.py normalises nothing
    for kw in (sct, lin):
        assert kw["tangent_warmup"] == pytest.approx(10_000 / 1_200_000)  # 10k steps of the reference's 1.2M
        built = Consistency(**{k: v for k, v in kw.items() if k != "name"}, train_steps=1_200_000)
        assert built.tangent_warmup == 10_000 and built.tangent_form == "ddim"


# --------------------------------------------------------------------------- shortcut
class Recorder:
    """A teacher that records its inputs: u = −z (the half step z_s = (1 + d/2)·z grows)."""

    def __init__(self):
        self.calls = []

    def __call__(self, z, r, t, y):
        self.calls.append((z.clone(), r.clone(), t.clone(), y.clone()))
        return -z


def shortcut_problem(n, b, seed, scale=3.0, dims=32):
    t, r, d = shortcut_times(n, b, seed)
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(b, dims, generator=g, dtype=DT)
    return make_problem(SCHEDULE.build("linear"), t, r, seed=seed, x=x), d


def test_shortcut_clips_the_midpoint_before_the_second_half_step():
    n = 8
    pb, d = shortcut_problem(n, 48, seed=40)
    rec = Recorder()
    out = Shortcut(base_steps=n, teacher="ema")(nets_of(lambda *a: torch.zeros_like(a[0]), teacher=rec), pb)
    assert len(rec.calls) == 2
    z_first, z_second = rec.calls[0][0], rec.calls[1][0]
    assert z_second.abs().max() <= 4.0  # the second half step is evaluated inside [−4, 4]
    d_boot = d[d > 1.0 / n][:, None]
    unclipped = z_first * (1 + d_boot / 2)
    assert (unclipped.abs() > 4).sum() > 50  # x ~ 3·N: many entries leave [−4, 4]
    torch.testing.assert_close(z_second, unclipped.clamp(-4, 4), rtol=0, atol=1e-12)
    # off: the released code's clip is what changes the target
    rec_off = Recorder()
    off = Shortcut(base_steps=n, teacher="ema", midpoint_clip=0.0)(
        nets_of(lambda *a: torch.zeros_like(a[0]), teacher=rec_off), pb)
    torch.testing.assert_close(rec_off.calls[1][0], unclipped, rtol=0, atol=1e-12)
    assert (off.target - out.target).abs().max() > 0.1


def label_teacher(z, r, t, y):
    """u = 1 for a class label, 0 for the null label: CFG at scale w gives exactly w."""
    return (y != NULL).to(z.dtype)[:, None].expand_as(z).clone()


def test_shortcut_bootstrap_cfg_only_on_the_smallest_bootstrap_step():
    n = 16
    pb, d = shortcut_problem(n, 40, seed=41, scale=0.5, dims=3)
    boot = d > 1.0 / n
    smallest = boot & ((d * n - 2).abs() < 1e-9)
    assert smallest.any() and (boot & ~smallest).any()
    out = Shortcut(base_steps=n, teacher="online", bootstrap_cfg=3.0)(nets_of(label_teacher), pb)
    assert torch.all(out.target[smallest] == 3.0)  # guided: 0 + 3·(1 − 0)
    assert torch.all(out.target[boot & ~smallest] == 1.0)  # the larger steps query the teacher unguided
    every = Shortcut(base_steps=n, teacher="online", bootstrap_cfg=3.0, bootstrap_cfg_rows="all")(
        nets_of(label_teacher), pb)
    assert torch.all(every.target[boot] == 3.0)


def test_shortcut_bootstrap_rows_keep_the_real_labels():
    n = 8
    pb, d = shortcut_problem(n, 32, seed=42, scale=0.5, dims=3)
    pb.labels = torch.arange(32) % 5
    dropped = torch.arange(32) % 3 == 0
    pb.y = torch.where(dropped, torch.full_like(pb.labels, NULL), pb.labels)
    boot = d > 1.0 / n
    assert (boot & dropped).any() and (~boot & dropped).any()

    def per_label(z, r, t, y):
        return torch.where(y == NULL, -1.0, 0.1 * (y + 1)).to(z.dtype)[:, None].expand_as(z).clone()

    real = Shortcut(base_steps=n, teacher="online")(nets_of(per_label), pb)
    want = (0.1 * (pb.labels + 1)).to(DT)[:, None].expand_as(pb.z)
    torch.testing.assert_close(real.target[boot], want[boot], rtol=0, atol=1e-12)  # the teacher saw real labels
    torch.testing.assert_close(real.pred[boot], want[boot], rtol=0, atol=1e-12)  # and so did the student
    torch.testing.assert_close(real.pred[~boot], per_label(pb.z, pb.r, pb.t, pb.y)[~boot], rtol=0, atol=0)
    old = Shortcut(base_steps=n, teacher="online", bootstrap_labels="dropped")(nets_of(per_label), pb)
    assert torch.all(old.target[boot & dropped] == -1.0) and torch.all(old.pred[dropped] == -1.0)


# --------------------------------------------------------------------------- IMM's kernel distance
def grouped(b, dims, group_size, seed, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    p = scale * torch.randn(b, dims, generator=g, dtype=torch.float64)
    q = p + 0.05 * torch.randn(b, dims, generator=g, dtype=torch.float64)  # near the particles: a fine MMD
    group = torch.arange(b) // group_size
    return p.to(dtype), q.to(dtype), group


@pytest.mark.parametrize("autocast", [False, True])
def test_kernel_distance_of_a_vector_to_itself_is_zero(autocast):
    p, _, group = grouped(12, 4096, 4, seed=50)
    index, mask, _ = group_layout(group)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        dist = group_pairwise_dist(p[index], p[index])
    assert dist.dtype == torch.float32
    self_dist = torch.diagonal(dist, dim1=1, dim2=2)
    assert self_dist.max() <= 1e-6  # the ε floor (1e-8); the Gram expansion gave 0.18 here (14.7 under autocast)
    ref = (p[index].double()[:, :, None] - p[index].double()[:, None]).norm(dim=-1)
    torch.testing.assert_close(dist.double(), ref.clamp_min(1e-8), rtol=1e-5, atol=1e-6)


def reference_mmd(p, q, group, t, r, bandwidth=0.5):
    """Per group, in float64: mean k(p, p') + mean k(q, q') − 2·mean k(p, q), Laplace kernel exp(−w̃‖·‖/D)."""
    p, q = p.double(), q.double()
    dims = p.shape[1]
    out = torch.empty(p.shape[0], dtype=torch.float64)
    for k in group.unique():
        rows = (group == k).nonzero().squeeze(1)
        w = 1.0 / (bandwidth * float(t[rows[0]] - r[rows[0]]))

        def kern(a, b):
            return torch.exp(-w * torch.cdist(a, b).clamp_min(1e-8) / dims).mean()

        out[rows] = kern(p[rows], p[rows]) + kern(q[rows], q[rows]) - 2 * kern(p[rows], q[rows])
    return out


@pytest.mark.parametrize("autocast", [False, True])
def test_mmd_matches_a_per_group_float64_reference(autocast):
    p, q, group = grouped(10, 4096, 4, seed=51)  # groups of 4, 4 and an uneven last group of 2
    t = torch.tensor([0.7] * 4 + [0.4] * 4 + [0.9] * 2)
    r = t - torch.tensor([0.01] * 4 + [0.02] * 4 + [0.015] * 2)  # small t − r: a sharp kernel
    mmd = WEIGHTING.build("mmd", {"time_weight": "none"}, schedule=SCHEDULE.build("linear"))
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        got = mmd(TargetOutput(p, q, t, r, group=group))
    want = reference_mmd(p, q, group, t, r)
    assert (want > 1e-3).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-7)
    # a finite gradient at identical particles (the ε floor)
    pred = p.clone().requires_grad_(True)
    mmd(TargetOutput(pred, p, t, r, group=group)).sum().backward()
    assert torch.isfinite(pred.grad).all()


# --------------------------------------------------------------------------- iCT's doubling curriculum
def test_ict_doubling_curriculum_spans_the_run():
    """N(k) = min(s0·2^⌊k/K′⌋, s1) + 1, K′ = ⌊K/(log₂⌊s1/s0⌋ + 1)⌋ (iCT eq. 8), K = train.steps."""
    from components.registry import TIME_SAMPLER

    schedule = SCHEDULE.build("cosine")
    k_total = 80_000
    sampler = TIME_SAMPLER.build("discrete", {"curriculum": "doubling", "index": "lognormal"}, schedule=schedule,
                                 train_steps=k_total)
    stage = k_total // 8  # log2(1280/10) + 1 = 8 stages
    assert [sampler.steps_at(k) for k in (0, stage - 1, stage, 3 * stage, 7 * stage, k_total - 1, 10 * k_total)] \
        == [11, 11, 21, 81, 1281, 1281, 1281]
    half = TIME_SAMPLER.build("discrete", {"curriculum": "doubling"}, schedule=schedule, train_steps=k_total // 2)
    assert half.steps_at(k_total // 2 - 1) == 1281  # a shorter run reaches s1 in proportion
    # draws and previous(t) use the grid of the step
    for k in (0, 3 * stage):
        grid = sampler.levels(sampler.steps_at(k))[0]
        t, r = sampler(256, step=k, generator=torch.Generator().manual_seed(k))
        assert torch.isin(t, grid[1:]).all() and (r == 0).all()
        idx = torch.searchsorted(grid, t)
        torch.testing.assert_close(sampler.previous(t, step=k), grid[idx - 1], rtol=0, atol=0)
    coarse, fine = sampler.previous(torch.tensor([0.5]), step=0), sampler.previous(torch.tensor([0.5]), step=7 * stage)
    assert coarse < fine < 0.5
    with pytest.raises(ValueError, match="train.steps"):
        TIME_SAMPLER.build("discrete", {"curriculum": "doubling"}, schedule=schedule)
    fixed = TIME_SAMPLER.build("discrete", {"steps": 16}, schedule=schedule)  # the default: no curriculum
    assert fixed.steps_at(0) == fixed.steps_at(10 ** 9) == 16


def test_ct_target_takes_the_adjacent_time_on_the_steps_grid():
    from components.registry import TIME_SAMPLER

    schedule = SCHEDULE.build("linear")
    sampler = TIME_SAMPLER.build("discrete", {"curriculum": "doubling"}, schedule=schedule, train_steps=800)
    seen = []

    def model(z, r, t, y):
        seen.append(t.clone())
        return torch.zeros_like(z)

    target = Consistency(mode="discrete", space="data")
    for step in (0, 700):
        t, r = sampler(16, step=step, generator=torch.Generator().manual_seed(step))
        pb = make_problem(schedule, t.to(DT), r.to(DT), seed=step)
        pb.step, pb.time_sampler = step, sampler
        seen.clear()
        target(nets_of(model), pb)
        s = seen[-1]  # the teacher's query time: the adjacent grid time of this step's grid
        torch.testing.assert_close(s, sampler.previous(pb.t, step=step), rtol=0, atol=0)
