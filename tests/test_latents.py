"""The latent pipeline: ``python -m ablate.encode`` on a few generated images with a tiny random VAE,
the ``latents`` dataset in both shard formats, and the streaming loader for shards larger than memory."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ablate.data import DataError, load_data, make_loader
from ablate.latents import LatentShards, ShardStream
from ablate.encode import load_image, main

CLASSES = ("ant", "bee", "cat")
SIZES = [(32, 32), (40, 48), (64, 36), (100, 80)]  # (h, w): exact, crop only, resize and crop, box-halving


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """12 PNGs of several sizes in 3 class folders and a tiny random AutoencoderKL (downsampling ×2)."""
    diffusers = pytest.importorskip("diffusers")
    root = tmp_path_factory.mktemp("latents")
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (root / "images" / c).mkdir(parents=True)
        for i, (h, w) in enumerate(SIZES):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / c / f"{i}.png")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                                  layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32).eval()
    vae.save_pretrained(root / "vae", safe_serialization=True)
    return root, vae


def _encode(root: Path, out: Path, *extra: str) -> int:
    return main([str(root / "images"), str(out), "--vae", str(root / "vae"), "--resolution", "32",
                 "--shard-size", "5", "--batch-size", "3", "--workers", "2", *extra])


def _shards(out: Path) -> list[dict]:
    return [torch.load(f, weights_only=True) for f in sorted(out.glob("shard_*.pt"))]


def test_encode_writes_shards_meta_and_labels(setup, tmp_path):
    root, _ = setup
    out = tmp_path / "enc"
    assert _encode(root, out) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["complete"] and meta["format"] == "moments" and meta["count"] == 12 and meta["images"] == 12
    assert meta["classes"] == list(CLASSES) and meta["num_classes"] == 3 and meta["shape"] == [4, 16, 16]
    assert meta["scaling_factor"] == pytest.approx(0.18215) and meta["shift_factor"] == 0.0
    assert [s["rows"] for s in meta["shards"]] == [5, 5, 2]
    shards = _shards(out)
    assert len(shards) == 3 and sorted(p.name for p in out.iterdir()) == [
        "files.txt", "meta.json", "shard_00000.pt", "shard_00001.pt", "shard_00002.pt"]
    files = (out / "files.txt").read_text().splitlines()
    assert files == [f"{c}/{i}.png" for c in CLASSES for i in range(4)]
    index = torch.cat([s["index"] for s in shards])
    labels = torch.cat([s["labels"] for s in shards])
    assert sorted(index.tolist()) == list(range(12))  # every image once
    assert labels.tolist() == [CLASSES.index(files[i].split("/")[0]) for i in index.tolist()]
    assert index.tolist() != sorted(index.tolist())  # shuffled over shards: each shard mixes classes
    for s in shards:
        assert s["mean"].shape == s["logvar"].shape == (len(s["labels"]), 4, 16, 16)
        assert s["mean"].dtype == torch.float32 and not s["flipped"].any()


def test_preprocessing_crops_the_centre_at_the_resolution(setup):
    root, _ = setup
    exact = root / "images" / "ant" / "0.png"  # already 32×32: unchanged
    x = load_image(exact, 32)
    ref = torch.from_numpy(np.asarray(Image.open(exact).convert("RGB")).copy()).permute(2, 0, 1).float()
    torch.testing.assert_close(x, ref / 127.5 - 1)
    for i in range(1, 4):
        y = load_image(root / "images" / "bee" / f"{i}.png", 32)
        assert y.shape == (3, 32, 32) and y.min() >= -1 and y.max() <= 1


def test_both_formats_load_through_the_latents_dataset(setup, tmp_path):
    root, _ = setup
    for store in ("samples", "moments"):
        assert _encode(root, tmp_path / store, "--store", store) == 0
    samples = load_data({"name": "latents", "path": str(tmp_path / "samples")})
    moments = load_data({"name": "latents", "path": str(tmp_path / "moments")})
    for data in (samples, moments):
        assert data.kind == "latent" and data.shape == (4, 16, 16) and len(data.x) == 12
        assert data.num_classes == 3 and data.meta["scale"] == pytest.approx(0.18215)  # from meta.json
        assert not data.meta["streamed"]
    raw = torch.cat([s["latents"] for s in _shards(tmp_path / "samples")])
    torch.testing.assert_close(samples.x, raw * 0.18215)
    assert samples.loader is None  # plain resident rows
    mean = torch.cat([s["mean"] for s in _shards(tmp_path / "moments")])
    torch.testing.assert_close(moments.x, mean * 0.18215)  # x: the posterior means (for evaluation)
    loader = make_loader(moments, 6, torch.Generator().manual_seed(0))
    x, y = loader.next()
    assert x.shape == (6, 4, 16, 16) and y.shape == (6,) and y.dtype == torch.long
    # a sample is not a mean: the rows are drawn from the posterior
    assert not any(torch.allclose(row, m) for row in x for m in moments.x)
    explicit = load_data({"name": "latents", "path": str(tmp_path / "samples"), "scale": 1.0, "num_classes": 5})
    torch.testing.assert_close(explicit.x, raw)
    assert explicit.num_classes == 5


def test_moments_are_sampled_with_the_reparameterisation(tmp_path):
    """mean = row id, logvar = log 0.01: every served row is id + 0.1·ε, fresh each time."""
    n = 40
    ids = torch.arange(n, dtype=torch.float32)
    torch.save({"mean": ids[:, None, None, None].expand(n, 4, 2, 2).clone(),
                "logvar": torch.full((n, 4, 2, 2), float(np.log(0.01))), "labels": torch.zeros(n, dtype=torch.long)},
               tmp_path / "m.pt")
    data = load_data({"name": "latents", "path": str(tmp_path), "scale": 2.0})
    loader = make_loader(data, 4000, torch.Generator().manual_seed(0))
    x, _ = loader.next()
    row = (x.mean(dim=(1, 2, 3)) / 2).round()
    noise = x / 2 - row[:, None, None, None]
    assert noise.abs().max() < 0.5 and noise.std().item() == pytest.approx(0.1, rel=0.05)
    assert noise.mean().abs() < 0.01
    x2, _ = loader.next()
    assert not torch.equal(x, x2)


def test_flip_doubles_the_rows_and_encodes_the_mirror_image(setup, tmp_path):
    root, vae = setup
    out = tmp_path / "flip"
    assert _encode(root, out, "--flip") == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["count"] == 24 and meta["flip"] and [s["rows"] for s in meta["shards"]] == [10, 10, 4]
    files = (out / "files.txt").read_text().splitlines()
    for s in _shards(out)[:1]:
        assert s["flipped"].tolist() == [False, True] * 5
        assert torch.equal(s["index"][0::2], s["index"][1::2]) and torch.equal(s["labels"][0::2], s["labels"][1::2])
        for row in range(4):
            x = load_image(root / "images" / files[int(s["index"][row])], 32)
            if s["flipped"][row]:
                x = x.flip(-1)
            with torch.no_grad():
                expect = vae.encode(x[None]).latent_dist
            torch.testing.assert_close(s["mean"][row], expect.mean[0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(s["logvar"][row], expect.logvar[0], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(s["mean"][0], s["mean"][1])
    assert len(load_data({"name": "latents", "path": str(out)}).x) == 24


def test_an_interrupted_encode_resumes_without_redoing_finished_shards(setup, tmp_path):
    root, _ = setup
    out = tmp_path / "resume"
    assert _encode(root, out, "--store", "samples") == 0
    before = {f.name: f.stat().st_mtime_ns for f in out.glob("shard_*.pt")}
    last = torch.load(out / "shard_00002.pt", weights_only=True)
    (out / "shard_00002.pt").unlink()
    (out / ".shard_00002.pt.tmp").write_bytes(b"half a shard")  # what a kill during the write leaves
    with pytest.raises(DataError, match="missing"):
        load_data({"name": "latents", "path": str(out)})
    assert _encode(root, out, "--store", "samples") == 0
    after = {f.name: f.stat().st_mtime_ns for f in out.glob("shard_*.pt")}
    assert after["shard_00000.pt"] == before["shard_00000.pt"] and after["shard_00001.pt"] == before["shard_00001.pt"]
    again = torch.load(out / "shard_00002.pt", weights_only=True)
    assert again.keys() == last.keys() and all(torch.equal(again[k], last[k]) for k in last)  # seeded per shard
    assert not list(out.glob(".*.tmp"))
    assert len(load_data({"name": "latents", "path": str(out)}).x) == 12
    # the same folder with other settings is refused, and left as it is
    assert _encode(root, out, "--store", "moments") == 2
    assert {f.name: f.stat().st_mtime_ns for f in out.glob("shard_*.pt")} == after


def test_bad_input_is_exit_2_with_a_message_and_writes_nothing(setup, tmp_path, capsys):
    root, _ = setup
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    cases = [
        ([str(tmp_path / "nowhere"), str(out), "--vae", str(root / "vae")], str(tmp_path / "nowhere")),
        ([str(tmp_path / "empty"), str(out), "--vae", str(root / "vae")], "no images"),
        ([str(root / "images"), str(out), "--vae", str(tmp_path / "no_vae")], str(tmp_path / "no_vae")),
    ]
    for argv, words in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and words in err
        assert not out.exists()


def _id_shards(root: Path, rows: list[int]) -> int:
    """Sample shards whose rows are constant tensors equal to their global row id; returns the row count."""
    root.mkdir()
    start = 0
    for k, n in enumerate(rows):
        ids = torch.arange(start, start + n, dtype=torch.float32)
        torch.save({"latents": ids[:, None, None, None].expand(n, 4, 2, 2).clone(),
                    "labels": torch.arange(start, start + n) % 3}, root / f"s{k}.pt")
        start += n
    return start


def test_streaming_serves_every_row_once_per_pass_without_holding_all_shards(tmp_path):
    total = _id_shards(tmp_path / "ids", [5, 3, 8, 1, 6, 4, 7])
    shards, _ = LatentShards.open(tmp_path / "ids", 1.0)
    stream = ShardStream(shards, 4, torch.Generator().manual_seed(0), group=1)
    served = torch.cat([stream.next()[0][:, 0, 0, 0] for _ in range(3 * total // 4 + 1)]).long()
    passes = [served[k * total:(k + 1) * total].tolist() for k in range(3)]
    for p in passes:
        assert sorted(p) == list(range(total))  # every row exactly once per pass
    assert passes[0] != passes[1] != passes[2]  # a fresh order each pass
    assert passes[0] != sorted(passes[0])  # rows are shuffled, not served shard by shard in file order
    # in memory at once: the group being served, the one being read (≤ 8 rows each) and < 1 batch left over
    assert stream.peak_rows <= 8 + 8 + 3 < total
    stream.close()


def test_latents_dataset_streams_when_asked_or_larger_than_memory(tmp_path):
    total = _id_shards(tmp_path / "ids", [5, 3, 8, 1, 6, 4, 7])
    data = load_data({"name": "latents", "path": str(tmp_path / "ids"), "num_classes": 3, "stream": True,
                      "eval_rows": 10, "stream_group": 1})
    assert data.meta["streamed"] and data.meta["rows"] == total
    assert len(data.x) == 10 and data.x[:, 0, 0, 0].tolist() == list(range(10))  # the first rows, for evaluation
    loader = make_loader(data, 6, torch.Generator().manual_seed(1))
    assert isinstance(loader, ShardStream)
    x, y = loader.next()
    assert x.shape == (6, 4, 2, 2) and y.tolist() == (x[:, 0, 0, 0].long() % 3).tolist()
    grouped = make_loader(data, 6, torch.Generator().manual_seed(2), classes_per_batch=3)  # 3 groups of 2 rows
    for _ in range(8):  # several refills: groups still whole and of distinct classes
        x, y = grouped.next()
        assert y.tolist() == (x[:, 0, 0, 0].long() % 3).tolist()
        assert all(len(set(g)) == 1 for g in y.view(3, 2).tolist()) and len(set(y.tolist())) == 3
    with pytest.raises(DataError, match="classes_per_batch=4 must divide"):
        make_loader(data, 6, torch.Generator(), classes_per_batch=4)
    with pytest.raises(DataError, match="distinct classes"):
        make_loader(data, 8, torch.Generator(), classes_per_batch=4)  # 4 distinct classes of 3
    auto = load_data({"name": "latents", "path": str(tmp_path / "ids"), "memory_gb": 1e-9})
    assert auto.meta["streamed"]
    assert not load_data({"name": "latents", "path": str(tmp_path / "ids")}).meta["streamed"]


def test_training_runs_on_streamed_latents(tmp_path):
    from ablate.config import compose
    from ablate.train import train

    _id_shards(tmp_path / "ids", [16, 16, 16])
    cfg, _ = compose("flow_matching", [
        "data.name=latents", f"data.path={tmp_path / 'ids'}", "data.num_classes=3", "data.stream=true",
        "data.scale=0.01", "design.backbone.depth=1", "design.backbone.hidden=32", "design.backbone.heads=2",
        f"train.out_dir={tmp_path / 'run'}", "train.steps=3", "train.batch_size=8", "train.log_every=1",
        "eval.every=0", "eval.at_end=false", "sample.nfe=[]", "train.device=cpu"])
    run = train(cfg, progress=False)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert run.step == 3 and sum('"train/loss"' in ln for ln in lines) == 3  # (the run's cost is a line of its own)
