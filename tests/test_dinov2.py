"""FD-DINOv2 (Stein et al. 2023): the ``dinov2`` feature extractor (ablate/features.py) and ``eval.fd_dinov2``.

The real network is timm's ViT-L/14 ``vit_large_patch14_dinov2.lvd142m`` (1.2 GB of weights); here the test
writes a random-weights file of a one-block ViT-S/14 DINOv2 (the extractor's ``model`` / ``model_kwargs``
options), so the loading, preprocessing and feature path are those of the real one, on the CPU in seconds.
"""
from __future__ import annotations

import math

import pytest
import torch

from ablate.config import compose
from ablate.evaluation import Evaluator
from ablate.features import DINOV2_MODEL, FeatureError, build_extractor

SMALL = "vit_small_patch14_dinov2.lvd142m"
KW = {"depth": 1}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    import timm

    torch.manual_seed(0)
    net = timm.create_model(SMALL, pretrained=False, num_classes=0, **KW)
    path = tmp_path_factory.mktemp("dinov2") / "tiny_dinov2.pth"
    torch.save(net.state_dict(), path)
    return path, net.eval()


def _spec(path):
    return {"name": "dinov2", "weights": str(path), "model": SMALL, "model_kwargs": KW}


def test_missing_file_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    with pytest.raises(FeatureError, match=r"th/hub/checkpoints/vit_large_patch14_dinov2\.lvd142m\.pth"):
        build_extractor("dinov2", None)
    with pytest.raises(FeatureError, match="not found at .*nope.pth.*eval.extractor.weights=PATH"):
        build_extractor({"name": "dinov2", "weights": str(tmp_path / "nope.pth")}, None)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a state dict")
    with pytest.raises(FeatureError, match="not a plain tensor state dict"):
        build_extractor({"name": "dinov2", "weights": str(bad)}, None)
    assert DINOV2_MODEL == "vit_large_patch14_dinov2.lvd142m"


def test_features_are_the_cls_token_of_the_preprocessed_images(weights):
    path, net = weights
    ex = build_extractor(_spec(path), None)
    assert ex.input == "uint8" and ex.provenance["model"] == SMALL and len(ex.provenance["sha"]) == 16
    assert "224×224 bicubic" in ex.resize
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    feats = ex(x)
    assert feats.shape == (3, net.embed_dim)
    # by hand: the uint8 image a PNG would hold → [0, 1] → RGB → 224² bicubic → ImageNet normalisation → CLS
    u8 = ((x.clamp(-1, 1) + 1) * 127.5).round() / 255.0
    img = torch.nn.functional.interpolate(u8.expand(-1, 3, -1, -1), size=(224, 224), mode="bicubic",
                                          antialias=True).clamp(0, 1)
    img = (img - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1)
    net.set_input_size(img_size=224)  # the file keeps the 518² position grid; the extractor interpolates it
    with torch.no_grad():
        want = net.forward_features(img)[:, 0]
    torch.testing.assert_close(feats.float(), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(FeatureError, match="does not fit"):  # a file of another architecture
        build_extractor({**_spec(path), "model_kwargs": {"depth": 2}}, None)(x)


def test_fd_dinov2_is_logged_beside_fid_with_its_pipeline(weights, tmp_path):
    from ablate.train import setup

    path, _ = weights
    cfg, _ = compose("meanflow", [f"train.out_dir={tmp_path / 'run'}", "design.backbone.name=mlp",
                                  "eval.extractor=raw", "eval.nfe=[1]", "eval.num_samples=40",
                                  "eval.reference_samples=60", "eval.fid_se=bootstrap", "eval.fid_se_reps=2",
                                  f"eval.cache_dir={tmp_path / 'cache'}"])
    cfg.eval.fd_dinov2 = _spec(path)
    run = setup(cfg)
    ev = Evaluator(run, cfg.eval)
    vals = ev(0)
    assert set(vals) == {"fid/nfe_1", "fid_se/nfe_1", "fd_dinov2/nfe_1", "fd_dinov2_se/nfe_1", "time/eval_s"}
    assert all(math.isfinite(v) and v >= 0 for v in vals.values())
    p = ev.provenance
    assert p["extractor"] == "raw" and p["fd_dinov2_extractor"] == "dinov2"  # FID stays on eval.extractor
    assert p["fd_dinov2_extractor_weights_sha"] == ev.dinov2.provenance["sha"]
    assert p["fd_dinov2_reference_count"] == 60 and len(p["fd_dinov2_reference_stats_sha"]) == 16
    assert p["fd_dinov2_uint8"].startswith("round(") and "bicubic" in p["fd_dinov2_resize"]
    assert p["uint8"] == "none" and p["resize"] == "none"  # raw features: no quantisation, no resize
