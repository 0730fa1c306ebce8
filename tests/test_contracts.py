"""Contracts every registered plugin must meet (shapes, finiteness, gradients), every preset and
every study file builds. Parametrized over the registries at collection time, so a new plugin
gets these tests for free (STYLE: "tests parametrized over every registered entry")."""
from __future__ import annotations

import copy
import inspect
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import ablate.data  # noqa: F401  (registers the datasets)
from ablate.config import compose
from ablate.data import Data, DataError, load_data
from ablate.design import PRESETS, DesignError, build_components, resolve_design
from components.compose import sample, training_loss
from components.registry import REGISTRIES
from components.targets.base import Nets, TargetOutput

ROOT = Path(__file__).resolve().parents[1]
B = 16
NUM_CLASSES = 3
TINY_MLP = {"name": "mlp", "width": 32, "depth": 1}
TINY_DIT = {"name": "dit", "size": "T", "depth": 1, "hidden": 32, "heads": 2, "patch": 2}
IMAGE_SHAPE = (1, 8, 8)


def names(kind: str) -> list[str]:
    return REGISTRIES[kind].names()


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Open the zero-initialised (adaLN-Zero, output) layers so every parameter gets a gradient."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _labels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(NUM_CLASSES, (n,), generator=torch.Generator().manual_seed(seed))


# -- time_sampler -------------------------------------------------------------------
@pytest.mark.parametrize("schedule", names("schedule"))
@pytest.mark.parametrize("name", names("time_sampler"))
def test_time_sampler_contract(name, schedule):
    sched = REGISTRIES["schedule"].build(schedule)
    sampler = REGISTRIES["time_sampler"].build(name, schedule=sched)
    for step in (0, 7, 10_000):
        t, r = sampler(64, step=step, generator=torch.Generator().manual_seed(step), device="cpu")
        assert t.shape == (64,) and r.shape == (64,)
        assert t.is_floating_point() and r.is_floating_point()
        assert torch.isfinite(t).all() and torch.isfinite(r).all()
        assert (r >= 0).all() and (r <= t).all() and (t <= 1).all(), (t, r)
        assert (t > 0).all(), "t = 0 is pure data: nothing to learn"
    # an explicit generator makes the draw reproducible
    a = sampler(32, step=3, generator=torch.Generator().manual_seed(1))
    b = sampler(32, step=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# -- target (through the one loss function) ---------------------------------------------
def _vector_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 2, generator=g), _labels(B, seed)


# Options a target needs to run on the base design (a logit-normal sampler with r != t pairs), and the
# modes worth covering; a new target without an entry is tried with its defaults.
TARGET_CASES = {
    "consistency": [{"delta": 0.02}, {"mode": "continuous"}, {"mode": "discrete", "space": "data", "delta": 0.02}],
}


def target_cases() -> list:
    return [pytest.param(n, extra, id=f"{n}-{'-'.join(map(str, extra.values()))}" if extra else n)
            for n in names("target") for extra in TARGET_CASES.get(n, [{}])]


def _target_design(name: str, **extra):
    extra = {**TARGET_CASES.get(name, [{}])[0], **extra}
    spec = {"preset": "flow_matching", "target": {"name": name, **extra}, "backbone": dict(TINY_MLP),
            # pairs with r != t, so average-velocity targets (and shortcut bootstraps) are exercised
            "time_sampler": {"fraction_r_neq_t": 0.5}}
    return resolve_design(spec)


def _loss_and_grads(design, x, labels, *, randomize: bool):
    comps = build_components(design, tuple(x.shape[1:]), NUM_CLASSES, train_steps=100)
    torch.manual_seed(0)
    model = comps.backbone
    if randomize:
        _randomize(model)
    teacher = copy.deepcopy(model).requires_grad_(False)
    nets = Nets(model=model, teacher=teacher, guidance=comps.guidance)
    loss, per_sample, out = training_loss(comps, nets, x, labels, null_label=NUM_CLASSES,
                                          generator=torch.Generator().manual_seed(0), step=0)
    loss.backward()
    return comps, loss, per_sample, out


@pytest.mark.parametrize("name,extra", target_cases())
def test_target_contract(name, extra):
    x, labels = _vector_batch()
    design = _target_design(name, **extra)
    comps, loss, per_sample, out = _loss_and_grads(design, x, labels, randomize=False)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert per_sample.shape == (B,) and torch.isfinite(per_sample).all()
    assert isinstance(out, TargetOutput)
    assert out.pred.shape == x.shape and out.target.shape == x.shape
    assert not out.target.requires_grad, "the target must be stop-gradient"
    assert out.t.shape == (B,) and out.r.shape == (B,)
    # zero-initialised output layer: it (and only it) gets a gradient at initialisation
    head = comps.backbone.out[-1] if hasattr(comps.backbone, "out") else None
    params = [p for p in comps.backbone.parameters() if p.requires_grad]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    if head is not None:
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    assert isinstance(comps.target.average_velocity, bool)
    assert comps.target.teacher_ema is None or 0.0 <= comps.target.teacher_ema < 1.0


@pytest.mark.parametrize("name,extra", target_cases())
def test_target_gradients_reach_every_parameter(name, extra):
    x, labels = _vector_batch(1)
    comps, loss, _, _ = _loss_and_grads(_target_design(name, **extra), x, labels, randomize=True)
    assert torch.isfinite(loss)
    for pname, p in comps.backbone.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{name}: no gradient reaches {pname}"


@pytest.mark.parametrize("name", [n for n in names("target") if "velocity" in REGISTRIES["target"].options(n)])
def test_target_with_plugin_velocity(name):
    x, labels = _vector_batch(2)
    _, loss, per_sample, out = _loss_and_grads(_target_design(name, velocity="plugin", plugin_prob=1.0), x, labels,
                                               randomize=True)
    assert torch.isfinite(loss) and per_sample.shape == (B,)
    assert torch.isfinite(out.target).all()


def test_shortcut_refuses_a_mismatched_dyadic_grid():
    design = resolve_design({"preset": "scd", "time_sampler": {"base_steps": 64}, "backbone": dict(TINY_MLP)})
    with pytest.raises(DesignError) as exc:
        build_components(design, (2,), NUM_CLASSES)
    assert "base_steps" in str(exc.value)


# -- weighting -----------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2,), IMAGE_SHAPE], ids=["vector", "image"])
@pytest.mark.parametrize("name", names("weighting"))
def test_weighting_contract(name, shape):
    w = REGISTRIES["weighting"].build(name, data_shape=shape, schedule=REGISTRIES["schedule"].build("linear"))
    assert isinstance(w, torch.nn.Module)
    g = torch.Generator().manual_seed(0)
    target = torch.randn(B, *shape, generator=g)
    pred = torch.randn(B, *shape, generator=g).requires_grad_(True)
    t = torch.rand(B, generator=g).clamp_min(1e-3)
    r = t * torch.rand(B, generator=g)
    loss = w(TargetOutput(pred, target, t, r))
    assert loss.shape == (B,) and torch.isfinite(loss).all()
    loss.sum().backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    # an exact prediction is never worse than a wrong one
    with torch.no_grad():
        exact = w(TargetOutput(target.clone(), target, t, r))
        assert torch.isfinite(exact).all()
        assert (exact <= loss.detach() + 1e-6).all()
    if not list(w.parameters()):  # a pure distance: non-negative
        assert (loss >= 0).all()


# -- backbone ------------------------------------------------------------------------
# Tiny options and a suitable data shape per backbone; a new backbone without an entry here is
# tried with its defaults on vectors, then on images.
BACKBONE_CASES = {
    "mlp": ({"width": 32, "depth": 1}, (2,)),
    "dit": ({"size": "T", "depth": 1, "hidden": 32, "heads": 2, "patch": 2}, IMAGE_SHAPE),
}


def _build_backbone(name):
    reg = REGISTRIES["backbone"]
    if name in BACKBONE_CASES:
        kwargs, shape = BACKBONE_CASES[name]
        return reg.build(name, kwargs, data_shape=shape, num_classes=NUM_CLASSES), shape
    for shape in ((2,), IMAGE_SHAPE):
        try:
            return reg.build(name, {}, data_shape=shape, num_classes=NUM_CLASSES), shape
        except ValueError:
            continue
    pytest.fail(f"backbone {name}: add a tiny case to BACKBONE_CASES")


def _inputs(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(4, *shape, generator=g, dtype=dtype)
    t = torch.rand(4, generator=g, dtype=dtype).clamp_min(0.05)
    r = t * torch.rand(4, generator=g, dtype=dtype)
    y = torch.tensor([0, 1, 2, NUM_CLASSES])  # the last row is the null label
    return z, r, t, y


@pytest.mark.parametrize("name", names("backbone"))
def test_backbone_contract(name):
    torch.manual_seed(0)
    model, shape = _build_backbone(name)
    z, r, t, y = _inputs(shape)
    u = model(z, r, t, y)
    assert u.shape == z.shape and u.dtype == z.dtype and torch.isfinite(u).all()
    _randomize(model)
    u = model(z, r, t, y)
    assert torch.isfinite(u).all() and u.abs().sum() > 0
    u.square().sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{name}: no gradient reaches {pname}"
    # the conditioning matters: other times or labels change the output
    with torch.no_grad():
        assert not torch.allclose(model(z, r, t * 0.5, y), u)
        assert not torch.allclose(model(z, r, t, torch.roll(y, 1)), u)


@pytest.mark.parametrize("name", names("backbone"))
def test_backbone_forward_mode_jvp(name):
    """MeanFlow's total derivative: torch.func.jvp works (SDPA on its math path) and matches the
    reverse-mode (double-backward) Jacobian-vector product. (A finite difference is too noisy here:
    the time embedding is computed in float32 by design.)"""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model, shape = _build_backbone(name)
    _randomize(model)
    model = model.double()
    z, r, t, y = _inputs(shape, seed=3, dtype=torch.float64)
    v = torch.randn_like(z)

    def f(z_, r_, t_):
        return model(z_, r_, t_, y)

    with sdpa_kernel([SDPBackend.MATH]):
        u, dudt = torch.func.jvp(f, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
        _, ref = torch.autograd.functional.jvp(f, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
        with torch.no_grad():
            plain = f(z, r, t)
    assert u.shape == z.shape and dudt.shape == z.shape
    assert torch.isfinite(dudt).all()
    torch.testing.assert_close(u, plain)
    torch.testing.assert_close(dudt, ref, rtol=1e-5, atol=1e-6)


# -- guidance ------------------------------------------------------------------------
@pytest.mark.parametrize("name", names("guidance"))
def test_guidance_contract(name):
    gd = REGISTRIES["guidance"].build(name)
    labels = _labels(1000, seed=4)
    y = gd.drop_labels(labels, NUM_CLASSES, torch.Generator().manual_seed(0))
    assert y.shape == labels.shape and y.dtype == labels.dtype
    assert ((y == labels) | (y == NUM_CLASSES)).all(), "only the null label may replace a label"
    dropout = getattr(gd, "label_dropout", 0.0)
    if dropout > 0:
        assert 0 < (y == NUM_CLASSES).float().mean() < min(1.0, 3 * dropout)
    elif dropout == 0:
        assert torch.equal(y, labels)

    torch.manual_seed(0)
    net = REGISTRIES["backbone"].build("mlp", {"width": 32, "depth": 1}, data_shape=(2,), num_classes=NUM_CLASSES)
    _randomize(net)
    z, r, t, yy = _inputs((2,))
    with torch.no_grad():
        for scale in (None, 1.0, 2.0):
            u = gd.sample_velocity(net, z, r, t, yy, NUM_CLASSES, scale)
            assert u.shape == z.shape and torch.isfinite(u).all()
        v = torch.randn_like(z)
        folded = gd.fold(v, net, z, t, yy, NUM_CLASSES)
        assert folded.shape == v.shape and torch.isfinite(folded).all()
        # unconditional rows keep the plain velocity
        assert torch.equal(folded[yy == NUM_CLASSES], v[yy == NUM_CLASSES])
        x = sample(net, gd, z, 2, yy, null_label=NUM_CLASSES)
        assert x.shape == z.shape and torch.isfinite(x).all()


# -- dataset -------------------------------------------------------------------------
def _write_pngs(root: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def _write_latents(root: Path) -> Path:
    root.mkdir(parents=True)
    for i in range(2):
        torch.save({"latents": torch.randn(5, 4, 4, 4), "labels": torch.randint(7, (5,))}, root / f"shard{i}.pt")
    return root


def _write_cifar(root: Path) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, 4))}
        with open(root / name, "wb") as fh:
            pickle.dump(d, fh)
    return root


DATASET_SPECS = {
    "digits": lambda tmp: {},
    "image_folder": lambda tmp: {"path": str(_write_pngs(tmp / "imgs")), "size": 8},
    "latents": lambda tmp: {"path": str(_write_latents(tmp / "lat")), "num_classes": 7, "scale": 0.5},
    "cifar10": lambda tmp: {"path": str(_write_cifar(tmp / "cifar"))},
}
EXPECTED = {
    "digits": dict(shape=(1, 8, 8), num_classes=10, kind="image"),
    "image_folder": dict(shape=(3, 8, 8), num_classes=2, kind="image", n=6),
    "latents": dict(shape=(4, 4, 4), num_classes=7, kind="latent", n=10),
    "cifar10": dict(shape=(3, 32, 32), num_classes=10, kind="image", n=24),
}


@pytest.mark.parametrize("name", names("dataset"))
def test_dataset_contract(name, tmp_path):
    reg = REGISTRIES["dataset"]
    if name in DATASET_SPECS:
        spec = DATASET_SPECS[name](tmp_path)
    else:  # toys and new plugins: defaults, made small where there is an ``n``
        spec = {"n": 500} if "n" in reg.options(name) else {}
    data = load_data({"name": name, **spec})
    assert isinstance(data, Data)
    assert data.kind in ("vector", "image", "latent")
    assert data.x.dim() >= 2 and data.x.dtype == torch.float32 and torch.isfinite(data.x).all()
    assert data.labels.shape == (len(data.x),) and data.labels.dtype == torch.long
    if data.num_classes:
        assert int(data.labels.min()) >= 0 and int(data.labels.max()) < data.num_classes
    else:
        assert (data.labels == 0).all()
    assert data.null_label == data.num_classes
    if data.kind == "image":
        assert data.x.min() >= -1 and data.x.max() <= 1
    if data.x_test is not None:
        assert data.x_test.shape[1:] == data.x.shape[1:]
        assert data.labels_test is not None and len(data.labels_test) == len(data.x_test)
    # the default backbone resolves and builds for the data
    back = data.default_backbone()
    kwargs = {k: v for k, v in back.items() if k != "name"}
    if back["name"] == "dit":
        kwargs.update(depth=1, hidden=32, heads=2)
    if back["name"] == "mlp":
        kwargs.update(width=32, depth=1)
    net = REGISTRIES["backbone"].build(back["name"], kwargs, data_shape=data.shape, num_classes=data.num_classes)
    n = 2
    out = net(data.x[:n], torch.zeros(n), torch.full((n,), 0.5), data.labels[:n])
    assert out.shape == data.x[:n].shape
    if name in EXPECTED:
        exp = EXPECTED[name]
        assert data.shape == exp["shape"] and data.num_classes == exp["num_classes"] and data.kind == exp["kind"]
        if "n" in exp:
            total = len(data.x) + (0 if data.x_test is None else len(data.x_test))
            assert total == exp["n"]
    if "n" in spec:
        assert len(data.x) + len(data.x_test if data.x_test is not None else []) == spec["n"]


def test_digits_facts():
    data = load_data({"name": "digits"})
    assert data.shape == (1, 8, 8) and data.num_classes == 10
    assert set(data.labels.tolist()) == set(range(10))
    assert data.x.min() >= -1 and data.x.max() <= 1
    assert data.x.min() == -1 and data.x.max() == 1  # the full range is used


def test_image_folder_classes_follow_sorted_folders(tmp_path):
    data = load_data({"name": "image_folder", "path": str(_write_pngs(tmp_path / "imgs")), "size": 8})
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_latents_scale_is_applied(tmp_path):
    root = _write_latents(tmp_path / "lat")
    a = load_data({"name": "latents", "path": str(root), "scale": 1.0})
    b = load_data({"name": "latents", "path": str(root), "scale": 0.5})
    torch.testing.assert_close(b.x, 0.5 * a.x)
    assert a.meta["path"] == str(root)


@pytest.mark.parametrize("name", ["image_folder", "latents", "cifar10"])
def test_missing_data_path_is_a_data_error(name, tmp_path):
    missing = tmp_path / "does_not_exist"
    with pytest.raises(DataError) as exc:
        load_data({"name": name, "path": str(missing)})
    assert str(missing) in str(exc.value)


@pytest.mark.parametrize("name", ["image_folder", "latents"])
def test_empty_data_folder_is_a_data_error(name, tmp_path):
    with pytest.raises(DataError, match=str(tmp_path)):
        load_data({"name": name, "path": str(tmp_path)})


def test_bad_latent_shard_is_a_data_error(tmp_path):
    torch.save({"x": torch.zeros(2)}, tmp_path / "bad.pt")
    with pytest.raises(DataError, match="bad.pt"):
        load_data({"name": "latents", "path": str(tmp_path)})


# -- presets -------------------------------------------------------------------------
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_resolves_builds_and_trains_one_step(preset):
    design = resolve_design({"preset": preset, "backbone": dict(TINY_MLP)})
    assert design.preset == preset
    again = resolve_design({"preset": preset, "backbone": dict(TINY_MLP)})
    assert again.design_id == design.design_id and again.slug == design.slug
    other = resolve_design({"preset": preset, "backbone": {**TINY_MLP, "width": 64}})
    assert other.design_id != design.design_id
    assert len(design.design_id) == 12 and int(design.design_id, 16) >= 0
    parts = design.slug.split("-")
    assert len(parts) == len(design.components) and all(parts) and "mlp1x32" in parts
    from ablate.design import Design

    assert Design.from_json(design.to_json()).design_id == design.design_id
    # a key the preset sets explicitly keeps its value; everything else is the plugin default
    for kind, choice in PRESETS[preset].items():
        if kind.startswith("_"):
            continue
        assert design.name(kind) == choice["name"]
        for k, v in choice.items():
            if k != "name":
                assert design.kwargs(kind)[k] == v, (kind, k)
    x, labels = _vector_batch(5)
    comps, loss, per_sample, _ = _loss_and_grads(design, x, labels, randomize=True)
    assert torch.isfinite(loss) and per_sample.shape == (B,)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_builds_with_a_tiny_dit(preset):
    design = resolve_design({"preset": preset}, default_backbone=dict(TINY_DIT))
    comps = build_components(design, IMAGE_SHAPE, 10, train_steps=100)
    assert comps.backbone(torch.zeros(2, *IMAGE_SHAPE), torch.zeros(2), torch.ones(2),
                          torch.zeros(2, dtype=torch.long)).shape == (2, *IMAGE_SHAPE)


def test_design_id_depends_on_options_not_spelling():
    a = resolve_design({"preset": "meanflow", "backbone": dict(TINY_MLP)})
    b = resolve_design({"preset": "meanflow", "backbone": dict(TINY_MLP), "target": {"jvp": "exact"}})
    c = resolve_design({"preset": "meanflow", "backbone": dict(TINY_MLP), "target": {"jvp": "finite_difference"}})
    assert a.design_id == b.design_id
    assert a.design_id != c.design_id


def test_design_errors_are_all_reported_at_once():
    with pytest.raises(DesignError) as exc:
        resolve_design({"preset": "meanflow", "target": "meanflw", "weighting": {"pp": 1}, "bogus": 1})
    keys = [k for k, _ in exc.value.problems]
    assert "design.target" in keys and "design.weighting" in keys and "design.bogus" in keys
    assert "Did you mean 'meanflow'?" in str(exc.value)


# -- study files -----------------------------------------------------------------------
STUDIES = sorted(p for pat in ("*.yaml", "*.yml") for p in (ROOT / "studies").rglob(pat))


@pytest.mark.parametrize("path", STUDIES or [pytest.param(None, id="no-study-files")],
                         ids=lambda p: str(p.relative_to(ROOT)) if isinstance(p, Path) else str(p))
def test_study_file_builds(path):
    if path is None:
        assert not STUDIES
        return
    from omegaconf import OmegaConf

    cfg, source = compose(str(path))
    assert source == str(path)
    data_spec = OmegaConf.to_container(cfg.data, resolve=True)
    design_spec = OmegaConf.to_container(cfg.design, resolve=True)
    data_opts = {k: v for k, v in data_spec.items() if k != "name"}
    REGISTRIES["dataset"].resolve(data_spec["name"], data_opts)  # options valid even without the files
    from ablate.run import expand_trials

    trials = expand_trials(cfg, source, dry_run=True)  # every trial's design, even without the data
    assert trials and len({t["key"] for t in trials}) == len(trials)
    try:
        data = load_data(data_spec)
    except DataError:
        return  # the data is not on this machine: the designs were validated without it above
    design = resolve_design(design_spec, data.default_backbone())
    comps = build_components(design, data.shape, data.num_classes, train_steps=100)
    assert comps.backbone is not None
    assert design.slug and len(design.design_id) == 12
