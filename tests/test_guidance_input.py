"""Guidance as a network input (``cfg_input``): the scale and interval are drawn in training and fed to the
backbone through attached embeddings, so one trained model is sampled at any scale; backbones and
designs without it are unchanged."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import components  # noqa: F401  (registers the built-ins)
from ablate.design import DesignError, build_components, resolve_design
from components.compose import sample
from components.guidance import CFG, CFGInput, GuidanceCondition, power_law
from components.registry import BACKBONE, REGISTRIES, SCHEDULE
from components.targets.imf import ImprovedMeanFlow
from components.targets.tvm import TerminalVelocityMatching
from components.targets.base import Nets
from tests.gaussian_oracle import OracleNet, _bc
from tests.test_new_targets import WithHeads, pair_times
from tests.test_oracle import MU, NULL, S, make_problem

TINY_MLP = {"name": "mlp", "width": 32, "depth": 1}
TINY_DIT = {"name": "dit", "size": "T", "depth": 1, "hidden": 32, "heads": 2, "patch": 2}


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


# --------------------------------------------------------------------------- the scale's law
def test_power_law_scales():
    u = torch.linspace(0.0005, 0.9995, 1000, dtype=torch.float64)
    w = power_law(u, 1.0, 8.0, 1.0)  # iMF: log ω uniform on [1, 8]
    torch.testing.assert_close(torch.log(w) / math.log(8.0), u)
    w = power_law(u, 1.0, math.inf, 2.0)  # TVM: 1/ω ~ U(0, 1)
    torch.testing.assert_close(1.0 / w, 1.0 - u)
    w = power_law(u, 2.0, 6.0, 0.0)  # power 0: uniform
    torch.testing.assert_close(w, 2.0 + 4.0 * u)
    assert torch.equal(power_law(u, 2.0, 2.0, 1.0), torch.full_like(u, 2.0))  # fixed (TVM's configs)
    with pytest.raises(ValueError, match="normalisable"):
        CFGInput(scale_max=math.inf, power=1.0)


def test_draw_scale_and_interval_per_row():
    sched = SCHEDULE.build("linear")
    t, r = pair_times(4000, seed=1)
    r[:1000] = t[:1000]
    pb = make_problem(sched, t, r, seed=2, labels=torch.arange(4000) % 3)
    pb.y[::7] = NULL
    gd = CFGInput(interval="uniform", scale_min=1.0, scale_max=8.0)
    c = gd.draw(pb)
    assert c.scale.shape == t.shape and (c.scale >= 1).all() and (c.scale <= 8).all()
    assert (c.scale[pb.y == NULL] == 1).all()  # unconditional_scale="one"
    pair = t > r
    assert (c.t_min[~pair] == 0).all() and (c.t_max[~pair] == 1).all()  # r = t rows: the full interval
    assert (c.t_min[pair] <= 0.5).all() and (c.t_max[pair] >= 0.5).all() and c.t_min[pair].std() > 0.1
    cond_rows = pb.y != NULL
    assert abs(float(torch.log(c.scale[cond_rows]).mean()) - math.log(8) / 2) < 0.05
    drawn = CFGInput(unconditional_scale="drawn").draw(pb)
    assert (drawn.scale[pb.y == NULL] > 1).any()
    a, b = (gd.draw(make_problem(sched, t, r, seed=2)) for _ in range(2))  # from the problem's generator
    assert torch.equal(a.scale, b.scale) and torch.equal(a.t_min, b.t_min)


# --------------------------------------------------------------------------- backbones and designs
def test_backbone_options_are_unchanged():
    """New backbone options would change every existing design_id: inputs and heads are attached instead."""
    assert list(REGISTRIES["backbone"].options("dit")) == ["size", "patch", "step_embedding", "depth", "hidden",
                                                           "heads", "mlp_ratio", "time_scale"]
    assert list(REGISTRIES["backbone"].options("mlp")) == ["width", "depth", "step_embedding", "time_scale"]


@pytest.mark.parametrize("backbone,shape", [(TINY_MLP, (2,)), (TINY_DIT, (1, 8, 8))], ids=["mlp", "dit"])
def test_attached_input_leaves_the_rest_of_the_network_alone(backbone, shape):
    """Same seed: the cfg_input design's network holds every parameter of the plain one, equal, plus the
    input's embedding, which starts as a no-op (same output at any ω)."""
    plain = build_components(resolve_design({"preset": "tvm", "guidance": "cfg", "backbone": backbone}),
                             shape, 3, train_steps=100, seed=0).backbone
    fed = build_components(resolve_design({"preset": "tvm", "backbone": backbone}), shape, 3, train_steps=100,
                           seed=0).backbone
    a, b = plain.state_dict(), fed.state_dict()
    assert set(a) < set(b) and all(k.startswith("cond.extra.guidance_scale.") for k in set(b) - set(a))
    assert all(torch.equal(a[k], b[k]) for k in a)
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(4, *shape, generator=g), torch.rand(4, generator=g)
    y, r = torch.tensor([0, 1, 2, 3]), 0.5 * t
    with torch.no_grad():
        for w in (1.0, 4.0):
            out = fed(z, r, t, y, cond={"guidance_scale": torch.full_like(t, 1 - 1 / w)})
            torch.testing.assert_close(out, plain(z, r, t, y), rtol=0, atol=0)
        torch.testing.assert_close(fed(z, r, t, y), plain(z, r, t, y), rtol=0, atol=0)  # the default: ω = 1
        torch.testing.assert_close(plain(z, r, t, y, cond={"guidance_scale": t}), plain(z, r, t, y))  # not attached


def test_imf_design_attaches_interval_inputs_and_the_velocity_head():
    comps = build_components(resolve_design({"preset": "imf", "backbone": TINY_DIT}), (1, 8, 8), 10,
                             train_steps=100, seed=0)
    net = comps.backbone
    assert sorted(net.cond.extra) == ["guidance_scale", "guidance_t_max", "guidance_t_min"]
    assert list(net.heads) == ["velocity"]
    z, r, t, y = torch.zeros(2, 1, 8, 8), torch.zeros(2), torch.ones(2), torch.zeros(2, dtype=torch.long)
    assert torch.count_nonzero(net(z, r, t, y, head="velocity")) == 0  # zero-initialised
    assert "heads.velocity.head.weight" in copy.deepcopy(net).state_dict()  # EMAs are deep copies
    with pytest.raises(ValueError, match="no output head 'nope'"):
        net(z, r, t, y, head="nope")


def test_cfg_input_needs_a_target_that_feeds_it():
    design = resolve_design({"preset": "meanflow", "guidance": "cfg_input", "backbone": TINY_MLP})
    with pytest.raises(DesignError, match="imf, tvm"):
        build_components(design, (2,), 3, train_steps=100)


# --------------------------------------------------------------------------- sampling at any scale
class Spy(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, z, r, t, y, cond=None, head=None):
        self.calls.append(cond)
        return self.net(z, r, t, y, cond=cond, head=head)


def test_one_model_is_sampled_at_any_scale_with_one_evaluation_per_step():
    comps = build_components(resolve_design({"preset": "imf", "backbone": TINY_MLP}), (2,), 3, train_steps=100, seed=0)
    net = Spy(comps.backbone)
    _randomize(net.net)
    noise = torch.randn(6, 2, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 0, 1, 3])  # the last row unconditional
    out = {w: sample(net, comps.guidance, noise, 2, y, null_label=3, cfg_scale=w) for w in (1.0, 4.0)}
    assert len(net.calls) == 4  # 2 steps × 2 scales, one evaluation each
    assert not torch.allclose(out[1.0], out[4.0])
    fed = net.calls[-1]
    torch.testing.assert_close(fed["guidance_scale"][:5], torch.full((5,), 0.75))  # 1 − 1/ω
    assert set(fed) == {"guidance_scale", "guidance_t_min", "guidance_t_max"}
    torch.testing.assert_close(fed["guidance_t_min"], torch.full((6,), 0.4))  # the preset's sampling interval
    wide = sample(net, comps.guidance, noise, 2, y, null_label=3, cfg_scale=4.0, cfg_interval=(0.0, 1.0))
    assert not torch.allclose(wide, out[4.0]) and net.calls[-1]["guidance_t_max"].eq(1.0).all()


def test_cfg_input_without_interval_inputs_refuses_an_interval():
    net = BACKBONE.build("mlp", {"width": 8, "depth": 1}, data_shape=(2,), num_classes=3)
    with pytest.raises(ValueError, match="interval"):
        sample(net, CFGInput(), torch.zeros(2, 2), 1, torch.zeros(2, dtype=torch.long), null_label=3,
               cfg_interval=(0.2, 0.8))


def test_cfg_interval_for_classifier_free_guidance():
    """Plain CFG on an interval: the steps outside it are the conditional model (Kynkäänniemi et al. 2024)."""
    torch.manual_seed(0)
    net = BACKBONE.build("mlp", {"width": 16, "depth": 1}, data_shape=(2,), num_classes=3)
    _randomize(net)
    z, y = torch.randn(4, 2), torch.tensor([0, 1, 2, 3])
    t, r = torch.tensor([0.9, 0.9, 0.3, 0.3]), torch.zeros(4)
    with torch.no_grad():
        u = CFG(scale=3.0).sample_velocity(net, z, r, t, y, 3, interval=(0.5, 1.0))
        guided = CFG(scale=3.0).sample_velocity(net, z, r, t, y, 3)
        plain = net(z, r, t, y)
    torch.testing.assert_close(u[2:], plain[2:])
    torch.testing.assert_close(u[:2], guided[:2])


# --------------------------------------------------------------------------- the guided targets
class Fake(torch.nn.Module):
    """u = (y + 1)·(1 + 2·feature) + head offset, everywhere: enough to read the guided-target formula."""

    def forward(self, z, r, t, y, cond=None, head=None):
        f = cond["guidance_scale"] if cond is not None else torch.zeros_like(t)
        base = (y.to(z.dtype) + 1) * (1 + 2 * f) + (10.0 if head == "velocity" else 0.0)
        return _bc(base, z).expand_as(z).clone()


def test_imf_guided_velocity():
    sched = SCHEDULE.build("linear")
    t, r = pair_times(6, seed=5)
    pb = make_problem(sched, t, r, seed=6, labels=torch.tensor([0, 1, 2, 0, 1, 2]))
    pb.y[5] = NULL
    gd = CFGInput(interval="uniform")
    cond = GuidanceCondition(torch.tensor([2.0, 4.0, 4.0, 1.0, 3.0, 5.0], dtype=torch.float64),
                             torch.tensor([0.0, 0.0, 0.99, 0.0, 0.0, 0.0], dtype=torch.float64),
                             torch.ones(6, dtype=torch.float64))
    v = sched.velocity(pb.x, pb.eps, t)
    nets = Nets(model=Fake(), teacher=Fake(), guidance=gd)
    target, v_c = ImprovedMeanFlow(velocity_head="aux").guided(nets, pb, v, cond)
    w = torch.where((t >= cond.t_min) & (t <= cond.t_max), cond.scale, torch.ones_like(cond.scale))  # row 2: off
    vc = (pb.labels.double() + 1) * (1 + 2 * (1 - 1 / w)) + 10  # the velocity head, real labels, ω'
    vu = torch.full_like(t, NULL + 1.0) + 10  # the velocity head, ∅, ω = 1 (feature 0)
    expect = v + _bc(1 - 1 / w, v) * _bc(vc - vu, v)
    expect[5] = v[5]  # a dropped label: ṽ
    torch.testing.assert_close(target, expect)
    torch.testing.assert_close(v_c, _bc(vc, v).expand_as(v))


def test_tvm_guided_flow_matching_target():
    sched = SCHEDULE.build("linear")
    oracle = WithHeads(OracleNet(sched, MU, S))
    t, _ = pair_times(6, seed=7)
    pb = make_problem(sched, t, t.clone(), seed=8)
    gd = CFGInput(scale_min=2.0, scale_max=2.0, scale_output=True)
    nets = Nets(model=oracle, teacher=oracle, guidance=gd)
    out = TerminalVelocityMatching(teacher="online")(nets, pb)
    v, v_marg = sched.velocity(pb.x, pb.eps, t), oracle.net.velocity(pb.z, t)
    torch.testing.assert_close(out.target, (2 * v - v_marg) / 2)  # (ω·ṽ + (1 − ω)·u(∅, ω = 1))/ω
    torch.testing.assert_close(out.pred, v_marg)  # (ω·F)/ω
