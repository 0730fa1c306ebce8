"""Guidance scale at sampling as a study setting: ``eval.cfg_scale`` / ``sample.cfg_scale`` null, a number or a
list, ``eval.cfg_interval`` / ``sample.cfg_interval`` null or [t_min, t_max] (ablate/evaluation.py).

A tiny ``cfg_input`` design (preset imf, a one-layer MLP on a labelled 2-D toy), trained for a few steps on the
CPU: two scales give two metric sets, the first under today's keys.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from ablate.config import compose
from ablate.evaluation import EvalError, cfg_interval, cfg_scales, scale_tag

TOY = ["data.name=gaussian_mixture", "data.modes=2", "design.backbone.name=mlp", "design.backbone.width=32",
       "design.backbone.depth=1"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_parsing():
    assert cfg_scales(None) == [None] and cfg_scales(2) == [2.0] and cfg_scales([1, 2.5]) == [1.0, 2.5]
    assert cfg_interval(None) is None and cfg_interval([0.1, 0.9]) == (0.1, 0.9)
    assert scale_tag(2.5) == "@cfg2.5" and scale_tag(2.0) == "@cfg2"
    for bad in ("x", [], [1, 1], [True]):
        with pytest.raises(EvalError):
            cfg_scales(bad)
    for bad in ([0.5], [0.9, 0.1], [0, 2], "ab"):
        with pytest.raises(EvalError):
            cfg_interval(bad)


def _cfg(out, *extra):
    cfg, _ = compose("imf", [*TOY, "train.steps=20", f"train.out_dir={out}", "train.batch_size=64",
                             "train.log_every=10", "train.ckpt_every=0", "eval.every=0", "eval.at_end=true",
                             "eval.nfe=[1,2]", "eval.num_samples=200", "eval.fid_se=none", "eval.grids=false",
                             "sample.nfe=[1]", "sample.num=16", *extra])
    return cfg


def test_two_scales_give_two_metric_sets(tmp_path):
    from ablate.train import train

    out = tmp_path / "run"
    train(_cfg(out, "eval.cfg_scale=[1.0,4.0]", "sample.cfg_scale=[1.0,4.0]"), progress=False)
    evals = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()
             if ln and json.loads(ln)["kind"] == "eval"]
    vals = evals[-1]["values"]
    assert set(vals) == {"fid/nfe_1", "fid/nfe_2", "fid@cfg4/nfe_1", "fid@cfg4/nfe_2", "time/eval_s"}
    assert all(math.isfinite(v) for v in vals.values())
    for n in (1, 2):  # the scale is an input of the network: another scale, other samples, another FID
        assert vals[f"fid/nfe_{n}"] != pytest.approx(vals[f"fid@cfg4/nfe_{n}"], rel=1e-6)
    params = json.loads((out / "params.json").read_text())
    assert params["fid.cfg_scale"] == "[1.0, 4.0]" and params["fid.cfg_interval"] == "null"
    assert (out / "samples" / "nfe_1.png").is_file() and (out / "samples" / "nfe_1@cfg4.png").is_file()


def test_cfg_interval_reaches_the_sampler(tmp_path, monkeypatch):
    import ablate.train as T
    from ablate.evaluation import Evaluator

    cfg = _cfg(tmp_path / "run", "design.guidance.interval=uniform", "eval.cfg_scale=2.0",
               "eval.cfg_interval=[0.2,0.8]", "eval.nfe=[1]", "eval.num_samples=8")
    run = T.setup(cfg)
    seen = []
    real = T.sample

    def spy(*a, **kw):
        seen.append((kw.get("cfg_scale"), kw.get("cfg_interval")))
        return real(*a, **kw)

    monkeypatch.setattr(T, "sample", spy)
    ev = Evaluator(run, cfg.eval)
    ev.samples(1)
    assert seen and all(s == (2.0, (0.2, 0.8)) for s in seen)
    assert ev.provenance["cfg_interval"] == "[0.2, 0.8]"
