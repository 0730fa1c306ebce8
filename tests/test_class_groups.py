"""ESC's class-consistent mini-batches: ``train.classes_per_batch`` = k same-class groups per batch.

The reference samples one same-label batch per GPU, so a step of its 8-GPU runs sees 8 classes; here the
global batch is k contiguous groups of batch_size/k rows, the classes of one batch distinct, each data-parallel
rank holding whole groups (k/N of them). k = 1 is the old ``class_consistent: true``; k = 0 is i.i.d.
"""
from __future__ import annotations

import pytest
import torch

from ablate import distributed as ddp
from ablate.config import ConfigError, compose
from ablate.data import Data, DataError, ResidentLoader, make_loader
from components.schedules import Linear
from components.velocity import plugin_velocity

# 10 classes of unequal sizes (class c has 10 + 6c rows), rows shuffled; x holds the row's own index
COUNTS = [10 + 6 * c for c in range(10)]


def _data(counts=COUNTS, num_classes=None) -> Data:
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    x = torch.arange(len(labels), dtype=torch.float32)[:, None]
    return Data("synthetic", x, labels, num_classes or len(counts), "vector")


def _blocks(y: torch.Tensor, k: int) -> list[list[int]]:
    return y.view(k, -1).tolist()


def _check_grouped(data, x, y, k):
    assert y.tolist() == data.labels[x[:, 0].long()].tolist()  # labels are the rows' own labels
    blocks = _blocks(y, k)
    assert all(len(set(b)) == 1 for b in blocks), blocks  # k contiguous blocks, each one class
    return [b[0] for b in blocks]


@pytest.mark.parametrize("k", [2, 4, 8, 10])
def test_k_groups_are_contiguous_single_class_blocks_of_distinct_classes(k):
    data = _data()
    loader = make_loader(data, 8 * k, torch.Generator().manual_seed(1), classes_per_batch=k)
    seen = set()
    for _ in range(200):
        x, y = loader.next()
        assert x.shape == (8 * k, 1)
        classes = _check_grouped(data, x, y, k)
        assert len(set(classes)) == k  # distinct within the batch (k ≤ 10 classes)
        seen.update(classes)
    assert seen == set(range(10))


def test_classes_are_drawn_in_proportion_to_frequency():
    data = _data()
    loader = ResidentLoader(data, 4, torch.Generator().manual_seed(2), classes_per_batch=1)
    n = 4000
    hits = torch.bincount(torch.tensor([int(loader.next()[1][0]) for _ in range(n)]), minlength=10).float()
    expected = torch.tensor(COUNTS, dtype=torch.float) / sum(COUNTS) * n
    assert ((hits - expected).abs() < 4 * expected.sqrt() + 5).all(), (hits, expected)


def test_k1_is_one_class_per_batch_and_k0_is_iid():
    data = _data()
    one = make_loader(data, 32, torch.Generator().manual_seed(3), classes_per_batch=1)
    classes = []
    for _ in range(50):
        x, y = one.next()
        classes += _check_grouped(data, x, y, 1)  # the whole batch is one class
    assert len(set(classes)) > 3  # ... a different one from batch to batch
    iid = make_loader(data, 32, torch.Generator().manual_seed(3), classes_per_batch=0)
    mixed = [len(set(iid.next()[1].tolist())) for _ in range(50)]
    assert min(mixed) >= 4  # i.i.d. rows: many classes in every batch of 32 from 10 classes
    rows = torch.cat([iid.next()[0][:, 0] for _ in range(200)]).long()
    assert len(set(rows.tolist())) > 0.9 * len(data.x)  # rows from the whole set


def test_more_groups_than_classes_repeat_classes_but_blocks_stay_whole():
    data = _data([30, 0, 20])  # class 1 has no rows: never drawn
    loader = make_loader(data, 16, torch.Generator().manual_seed(4), classes_per_batch=4)
    for _ in range(50):
        x, y = loader.next()
        assert 1 not in _check_grouped(data, x, y, 4)
    two = make_loader(data, 16, torch.Generator().manual_seed(4), classes_per_batch=2)
    assert all(sorted(_check_grouped(data, *two.next(), 2)) == [0, 2] for _ in range(20))


def test_each_rank_holds_whole_groups_of_its_own():
    """train(): rank r gets batch_size/N rows in k/N groups and its own data stream (seed offset)."""
    data, batch, k, ws = _data(), 48, 6, 2
    assert ddp.local_classes_per_batch(k, ws) == 3 and ddp.local_batch_size(batch, ws) == 24
    loaders = [make_loader(data, ddp.local_batch_size(batch, ws), torch.Generator().manual_seed(2 + ddp.seed_offset(r)),
                           ddp.local_classes_per_batch(k, ws)) for r in range(ws)]
    differ = 0
    for _ in range(30):
        parts = [ld.next() for ld in loaders]
        per_rank = [_check_grouped(data, x, y, 3) for x, y in parts]  # 3 whole groups of 8 rows on each rank
        assert all(len(set(c)) == 3 for c in per_rank)
        global_y = torch.cat([y for _, y in parts])
        assert all(len(set(b)) == 1 for b in _blocks(global_y, k))  # the global batch: k groups of batch/k
        differ += per_rank[0] != per_rank[1]
    assert differ > 20  # each rank draws its own groups
    with pytest.raises(ValueError, match=r"train.classes_per_batch=3 is not a multiple of train.world_size=2"):
        ddp.local_classes_per_batch(3, 2)
    assert ddp.local_classes_per_batch(0, 4) == 0


def test_plugin_velocity_mixes_within_each_group():
    """Distinct classes per batch: the plug-in velocity of the batch equals that of each group on its own."""
    data = _data()
    x, y = make_loader(data, 24, torch.Generator().manual_seed(5), classes_per_batch=4).next()
    g = torch.Generator().manual_seed(6)
    x = torch.randn(24, 3, generator=g)
    z, t = torch.randn(24, 3, generator=g), torch.rand(24, generator=g)
    whole = plugin_velocity(Linear(), z, x, t, y)
    alone = torch.cat([plugin_velocity(Linear(), z[s], x[s], t[s], y[s]) for s in torch.arange(24).split(6)])
    torch.testing.assert_close(whole, alone)


TINY_DIT = "design.backbone={name: dit, size: T, patch: 2, depth: 1, hidden: 32, heads: 2}"
MOONS = ("data.name=moons", "design.backbone={name: mlp, width: 16, depth: 1}")


def _setup(preset, *overrides):
    from ablate.train import setup

    backbone = [] if any(o.startswith("design.backbone") for o in overrides) else [TINY_DIT]
    cfg, _ = compose(preset, ["train.device=cpu", *backbone, *overrides])
    return setup(cfg).cfg.train.classes_per_batch


def test_presets_resolve_classes_per_batch():
    assert _setup("esc") == 8  # ESC's reference layout: a same-class batch on each of 8 GPUs
    assert _setup("esc", "train.classes_per_batch=1") == 1  # the old one-class batches stay available
    assert _setup("esc", "train.classes_per_batch=0") == 0
    assert _setup("meanflow") == 0
    assert _setup("esc", *MOONS) == 0  # no labels: i.i.d.


def test_train_builds_the_loader_with_the_ranks_share_of_groups(monkeypatch, tmp_path):
    import ablate.train as train_mod

    seen = {}

    class Stop(Exception):
        pass

    def fake(data, batch_size, generator, classes_per_batch=0):
        seen.update(batch=batch_size, k=classes_per_batch)
        raise Stop

    monkeypatch.setattr(train_mod, "make_loader", fake)
    cfg, _ = compose("esc", ["train.device=cpu", f"train.out_dir={tmp_path}", TINY_DIT])
    with pytest.raises(Stop):
        train_mod.train(cfg, progress=False)
    assert seen == {"batch": 64, "k": 8}


@pytest.mark.parametrize("overrides, match", [
    (["train.classes_per_batch=3"], r"train.classes_per_batch=3 must divide the batch of 64"),
    (["train.classes_per_batch=-1"], r"train.classes_per_batch must be an integer ≥ 0"),
    (["train.classes_per_batch=two"], r"train.classes_per_batch must be an integer ≥ 0"),
    (["train.classes_per_batch=4", *MOONS], r"needs a labelled dataset"),
    (["train.batch_size=60", "train.world_size=2"], r"classes_per_batch=8 must divide the batch of 60"),
    (["train.classes_per_batch=4", "train.world_size=8"], r"classes_per_batch=4 is not a multiple of "
                                                           r"train.world_size=8"),
])
def test_bad_classes_per_batch_is_a_clear_error(overrides, match):
    with pytest.raises(ValueError, match=match):
        _setup("esc", *overrides)


def test_removed_class_consistent_key_says_what_replaces_it(tmp_path):
    with pytest.raises(ConfigError, match=r"train.class_consistent: removed: use train.classes_per_batch"):
        compose("esc", ["train.class_consistent=true"])
    study = tmp_path / "old.yaml"
    study.write_text("design:\n  preset: esc\ntrain:\n  class_consistent: true\n")
    with pytest.raises(ConfigError, match=r"train.class_consistent: removed: use train.classes_per_batch"):
        compose(str(study))


def test_loader_rejects_a_batch_its_groups_do_not_divide():
    with pytest.raises(DataError, match="classes_per_batch=5 must divide"):
        ResidentLoader(_data(), 12, torch.Generator(), classes_per_batch=5)
