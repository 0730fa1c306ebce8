"""The cheap exact JVP of the MeanFlow / ESC / sCT targets (components/targets/jvp.py) gives today's numbers.

Reference: the implementation before it (commit 49da1f2), one ``torch.func.jvp`` over the whole batch
whose primal output is the prediction. Every model here has non-zero adaLN-Zero and output layers (a
fresh DiT's residual branches are closed, and its output is 0).
"""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import components.targets.consistency as consistency
import components.targets.meanflow as meanflow
from components.backbones.dit import DiT
from components.compose import Streams, training_loss
from components.schedules import _bc
from components.targets.base import Nets
from components.targets.jvp import derivative_rows, exact_total_derivative, tangent_forward

SHAPE, CLASSES = (1, 8, 8), 10
TINY_DIT = {"name": "dit", "size": "T", "patch": 2, "depth": 2, "hidden": 32, "heads": 2}
TINY_MLP = {"name": "mlp", "width": 32, "depth": 2}


def head_total_derivative(model, z, r, t, y, v, jvp="exact", fd_step=1e-3):
    """The exact branch of ``total_derivative`` at 49da1f2: a full-batch JVP, its primal the prediction."""
    assert jvp == "exact"
    with sdpa_kernel([SDPBackend.MATH]):
        u, dudt = torch.func.jvp(lambda z_, r_, t_: model(z_, r_, t_, y), (z, r, t),
                                 (v.to(z.dtype), torch.zeros_like(r), torch.ones_like(t)))
    return u, dudt.detach()


def _randomize(model, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _dit(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    return _randomize(DiT("T", 2, depth=2, hidden=32, heads=2, data_shape=SHAPE, num_classes=CLASSES, **kw)).to(dtype)


def _batch(b, dtype=torch.float32, seed=1, pairs=0.4):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, *SHAPE, generator=g, dtype=dtype)
    v = torch.randn(b, *SHAPE, generator=g, dtype=dtype)
    t = torch.rand(b, generator=g, dtype=dtype).clamp_min(0.05)
    r = torch.where(torch.rand(b, generator=g) < pairs, t * torch.rand(b, generator=g, dtype=dtype), t)
    y = torch.randint(CLASSES + 1, (b,), generator=g)
    return z, r, t, y, v


# -- the rows ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("b", [16, 40, 64])
def test_derivative_rows_take_every_pair_row_first_in_a_bucketed_count(b):
    for seed in range(20):
        need = torch.rand(b, generator=torch.Generator().manual_seed(seed)) < 0.3
        rows = derivative_rows(need)
        step = -(-b // 16)
        n = int(need.sum())
        if rows is None:
            assert -(-n // step) * step >= b
            continue
        assert len(rows) % step == 0 and n <= len(rows) < n + step
        assert torch.equal(rows[:n], need.nonzero().flatten())  # the pair rows, in order
        assert not need[rows[n:]].any() and len(set(rows.tolist())) == len(rows)
    assert derivative_rows(torch.ones(b, dtype=torch.bool)) is None  # sCT: r = 0 everywhere


# -- the tangent written out ---------------------------------------------------------------------------
@pytest.mark.parametrize("step_embedding", ["difference", "log2"])
@pytest.mark.parametrize("rows", [None, [5, 1, 2]])
def test_dit_forward_with_tangent_is_forward_and_its_jvp(step_embedding, rows):
    model = _dit(torch.float64, step_embedding=step_embedding)
    z, r, t, y, v = _batch(7, torch.float64)
    dr, dt = 0.3 * torch.randn(7, dtype=torch.float64), 1 + torch.rand(7, dtype=torch.float64)  # any tangent
    idx = None if rows is None else torch.tensor(rows)
    pick = (lambda a: a) if idx is None else (lambda a: a[idx])
    with sdpa_kernel([SDPBackend.MATH]):
        ref_u, ref_du = torch.func.jvp(lambda z_, r_, t_: model(z_, r_, t_, y), (z, r, t), (v, dr, dt))
    u, du = model.forward_with_tangent(z, r, t, y, pick(v), pick(dr), pick(dt), idx)
    torch.testing.assert_close(u, model(z, r, t, y), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(du, pick(ref_du), rtol=1e-10, atol=1e-10)
    assert ref_du.abs().max() > 1e-2  # a real derivative, not zeros on both sides
    assert u.requires_grad and not du.requires_grad and du.grad_fn is None


def test_dit_forward_with_tangent_takes_attached_inputs_and_heads():
    """Extra inputs (constants along the tangent) and an attached output head, as ``forward`` takes them."""
    model = _dit(torch.float64)
    model.add_input("w")
    model.add_head("aux")
    _randomize(model.double(), seed=4)
    z, r, t, y, v = _batch(5, torch.float64)
    cond = {"w": torch.linspace(0.0, 1.0, 5, dtype=torch.float64)}
    zeros, ones = torch.zeros_like(t), torch.ones_like(t)
    with sdpa_kernel([SDPBackend.MATH]):
        _, ref = torch.func.jvp(lambda z_, t_: model(z_, r, t_, y, cond=cond, head="aux"), (z, t), (v, ones))
    u, du = model.forward_with_tangent(z, r, t, y, v, zeros, ones, None, cond=cond, head="aux")
    torch.testing.assert_close(u, model(z, r, t, y, cond=cond, head="aux"), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(du, ref, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(u, model(z, r, t, y))  # the input and the head matter


def _mlp(dtype):
    from components.backbones.mlp import MLP

    torch.manual_seed(0)
    return _randomize(MLP(width=32, depth=2, data_shape=SHAPE, num_classes=CLASSES)).to(dtype)


@pytest.mark.parametrize("backbone", ["dit", "mlp"])  # the DiT's written-out tangent; torch.func.jvp for the rest
def test_row_subset_derivative_equals_the_full_jvp(backbone):
    model = _dit(torch.float64) if backbone == "dit" else _mlp(torch.float64)
    z, r, t, y, v = _batch(40, torch.float64)
    need = r < t
    assert 0 < need.sum() < 40
    u_ref, du_ref = head_total_derivative(model, z, r, t, y, v)
    u, du = exact_total_derivative(model, z, r, t, y, v)
    torch.testing.assert_close(u, u_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(du[need], du_ref[need], rtol=1e-10, atol=1e-10)
    assert torch.equal(du[~need], torch.zeros_like(du[~need]))
    assert not du.requires_grad
    # the MeanFlow target: r = t rows are exactly ṽ − 0
    target = v - _bc(t - r, v) * du
    assert torch.equal(target[~need], v[~need])


def test_a_network_given_as_a_function_gets_every_row():
    """A bound network (a guidance plugin's closure over per-row inputs) cannot be called on a row subset."""
    model = _dit(torch.float64)
    z, r, t, y, v = _batch(12, torch.float64)
    w = torch.linspace(0.5, 2.0, 12, dtype=torch.float64)

    def bound(z_, r_, t_, y_):
        return _bc(w, z_) * model(z_, r_, t_, y_)

    u_ref, du_ref = head_total_derivative(bound, z, r, t, y, v)
    u, du = exact_total_derivative(bound, z, r, t, y, v)
    need = r < t
    torch.testing.assert_close(u, u_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(du[need], du_ref[need], rtol=1e-10, atol=1e-10)
    assert torch.equal(du[~need], torch.zeros_like(du[~need]))


# -- whole training steps against the reference ------------------------------------------------------
def _components(preset: str, backbone: dict = TINY_DIT):
    from ablate.design import build_components, resolve_design

    design = resolve_design({"preset": preset, "backbone": dict(backbone)}, dict(backbone))
    torch.manual_seed(0)
    comps = build_components(design, SHAPE, CLASSES, train_steps=1000, seed=0)
    _randomize(comps.backbone)
    return comps


def _loss_and_grads(comps, model, step):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(24, *SHAPE, generator=g)
    labels = torch.randint(CLASSES, (24,), generator=g)
    nets = Nets(model=model, teacher=model, guidance=comps.guidance)
    params = list(comps.backbone.parameters()) + list(comps.weighting.parameters())
    for p in params:
        p.grad = None
    loss, _, out = training_loss(comps, nets, x, labels, null_label=CLASSES, generator=Streams(0), step=step)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in params], out


def _worst_error(grads, ref_grads) -> float:
    """Largest gradient error, each tensor's relative to its largest entry."""
    return max(float((g - rg).abs().max() / rg.abs().max()) for g, rg in zip(grads, ref_grads))


GRAD_TOL = 2e-6  # float32: measured ~3e-7 against the reference; a 0.1 % error in du/dt gives 3e-5 … 2e-4


@pytest.mark.parametrize("preset,step", [("meanflow", 500), ("esc", 5), ("esc", 500), ("sct_linear", 500), ("sct", 5)])
def test_gradients_equal_the_full_batch_jvp(preset, step, monkeypatch):
    """Loss and every gradient equal the reference's, and a 0.1 % error in du/dt would be seen."""
    comps = _components(preset)
    loss, grads, out = _loss_and_grads(comps, comps.backbone, step)
    assert out.r.lt(out.t).any() and (preset.startswith("sct") or out.r.eq(out.t).any())

    for mod in (meanflow, consistency):
        monkeypatch.setattr(mod, "total_derivative", head_total_derivative)
    ref_loss, ref_grads, _ = _loss_and_grads(comps, comps.backbone, step)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
    assert _worst_error(grads, ref_grads) < GRAD_TOL

    def off(model, *a, **k):  # the control: du/dt 0.1 % off
        u, du = head_total_derivative(model, *a, **k)
        return u, 1.001 * du

    for mod in (meanflow, consistency):
        monkeypatch.setattr(mod, "total_derivative", off)
    _, off_grads, _ = _loss_and_grads(comps, comps.backbone, step)
    assert _worst_error(off_grads, ref_grads) > 5 * GRAD_TOL


# -- train.compile ---------------------------------------------------------------------------------------
def _recording(backend: str, graphs: list):
    from torch._dynamo.backends.registry import lookup_backend

    inner = lookup_backend(backend)

    def record(gm, example_inputs):
        graphs.append(gm.code)
        return inner(gm, example_inputs)

    return record


@pytest.mark.parametrize("backend,backbone", [("aot_eager", "dit"), ("aot_eager", "mlp"),
                                              pytest.param("inductor", "dit", marks=pytest.mark.slow)])
def test_compiled_model_compiles_the_tangent_and_gives_the_same_step(backend, backbone):
    """train.compile: the DiT's tangent pass is traced and compiled; the MLP's tangent (torch.func.jvp,
    which Dynamo cannot trace through its affine LayerNorm) stays eager. Same loss and gradients."""
    comps = _components("meanflow", TINY_DIT if backbone == "dit" else TINY_MLP)
    loss, grads, _ = _loss_and_grads(comps, comps.backbone, 500)
    torch._dynamo.reset()
    graphs: list[str] = []
    compiled = torch.compile(comps.backbone, backend=_recording(backend, graphs))
    assert tangent_forward(compiled) is tangent_forward(compiled) or backbone == "mlp"  # compiled once
    c_loss, c_grads, _ = _loss_and_grads(comps, compiled, 500)
    assert graphs, "nothing was compiled"
    traced = any("gelu_backward" in code for code in graphs)  # an op of the DiT's tangent only
    assert traced == (backbone == "dit")
    torch.testing.assert_close(c_loss, loss, rtol=1e-5, atol=1e-7)
    assert _worst_error(c_grads, grads) < GRAD_TOL
