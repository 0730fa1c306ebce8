"""Compute cost in the ranking: every trial logs ``cost/device_hours``, ``cost/step_tflops`` and
``cost/train_tflops`` at the end of training (ablate.evaluation.training_cost), and the report reads them:
cost columns, FID at equal compute, the Pareto view's marker size and the FID-vs-guidance-scale figure."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from ablate.config import compose
from dashboards import report
from dashboards.tables import add_cost_columns, fid_at_compute, rank

TOY = ["data.name=gaussian_mixture", "design.backbone.name=mlp", "design.backbone.width=32",
       "design.backbone.depth=1"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_step_flops_is_linear_in_the_batch_and_leaves_the_run_alone(tmp_path):
    from ablate.evaluation import step_flops
    from ablate.train import setup

    cfg, _ = compose("meanflow", [*TOY, f"train.out_dir={tmp_path / 'r'}"])  # a JVP target: counted too
    run = setup(cfg)
    before = [p.detach().clone() for p in run.model.parameters()]
    rng = torch.random.get_rng_state()
    f16, f32 = step_flops(run, 16), step_flops(run, 32)
    assert f16 > 0 and f32 == pytest.approx(2 * f16)
    assert all(torch.equal(a, b) for a, b in zip(before, run.model.parameters()))
    assert all(p.grad is None for p in run.model.parameters())
    assert torch.equal(rng, torch.random.get_rng_state())


def test_training_logs_its_cost_at_the_end(tmp_path):
    from ablate.train import train

    out = tmp_path / "run"
    cfg, _ = compose("flow_matching", [*TOY, "design.guidance=none", "train.steps=12", f"train.out_dir={out}",
                                       "train.batch_size=32", "train.log_every=6", "train.ckpt_every=0",
                                       "eval.every=0", "eval.at_end=false", "sample.nfe=[1]", "sample.num=8"])
    train(cfg, progress=False)
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln]
    cost = [r for r in recs if r["kind"] == "cost"]
    assert len(cost) == 1 and cost[0]["step"] == 12
    v = cost[0]["values"]
    assert v["cost/step_tflops"] > 0 and v["cost/train_tflops"] == pytest.approx(12 * v["cost/step_tflops"])
    assert 0 < v["cost/device_hours"] < 1


def _trials():
    rows = []
    for d, (step_tf, steps, fids) in {"a": (1.0, 100, [3.0, 3.3]), "b": (4.0, 100, [2.0, 2.2])}.items():
        for s, f in enumerate(fids):
            rows.append({"design": d, "slug": d, "seed": s, "status": "FINISHED", "run_id": f"{d}{s}",
                         "final/fid/nfe_1": f, "final/fid/nfe_4": f / 2, "wall_s": 1.0, "steps": steps,
                         "final/cost/step_tflops": step_tf, "final/cost/train_tflops": step_tf * steps,
                         "final/cost/device_hours": step_tf / 10, "fid.cfg_scale": "[1.0, 2.0]",
                         "final/fid@cfg2/nfe_1": f * 0.8, "final/fid@cfg2/nfe_4": f * 0.4})
    return pd.DataFrame(rows)


def _hist(trials):
    rows = []
    for t in trials.itertuples():  # FID falls linearly from 10 at step 0 to the final value at step 100
        final = trials.loc[t.Index, "final/fid/nfe_1"]
        for step in (0, 50, 100):
            rows.append({"run_id": t.run_id, "design": t.design, "seed": t.seed, "metric": "fid/nfe_1",
                         "step": step, "value": 10 + (final - 10) * step / 100})
    return pd.DataFrame(rows)


def test_fid_at_equal_compute_reads_each_curve_at_the_smallest_final_compute():
    t = _trials()
    at, budget = fid_at_compute(t, _hist(t))
    assert budget == pytest.approx(100.0)  # design a: 100 steps × 1 TFLOP; b: 100 × 4
    assert at["a"] == pytest.approx(math.sqrt(3.0 * 3.3))  # a's final values (geometric mean over seeds)
    # b at 100 TFLOPs is at step 25: 10 + (f − 10)/4 per seed
    assert at["b"] == pytest.approx(math.sqrt((10 + (2.0 - 10) / 4) * (10 + (2.2 - 10) / 4)))
    r = add_cost_columns(rank(t, "fid/nfe_1"), t, _hist(t))
    assert list(r["design"]) == ["b", "a"]  # b leads at its own (4× larger) compute ...
    assert r.set_index("design")["fid_at_budget"]["b"] > r.set_index("design")["fid_at_budget"]["a"]  # ... not at a's
    assert r.set_index("design")["train_tflops"].to_dict() == {"b": 400.0, "a": 100.0}
    view = report.ranking_view(r)
    assert {"train TFLOPs", "device hours", "FID at equal compute (100 TFLOPs)"} <= set(view.columns)
    # without recorded cost nothing changes
    plain = t.drop(columns=[c for c in t if c.startswith("final/cost/")])
    assert "train_tflops" not in add_cost_columns(rank(plain, "fid/nfe_1"), plain, _hist(plain))


def test_pareto_uses_compute_and_the_cfg_figure_per_nfe():
    t = _trials()
    fig = report.fig_pareto(t)
    assert "training compute" in fig.layout.title.text
    figs = report.figs_cfg_scale(t)
    assert [n for n, _ in figs] == [1, 4]
    nfe1 = figs[0][1]
    a = next(tr for tr in nfe1.data if "a" in tr.name)
    assert list(a.x) == [1.0, 2.0] and list(a.y) == pytest.approx([3.15, 3.15 * 0.8])
    assert report.figs_cfg_scale(t.drop(columns=[c for c in t if "@cfg" in c])) == []


def test_report_build_shows_cost_columns_and_the_cfg_figures(monkeypatch):
    t = _trials()
    t["error"] = ""
    monkeypatch.setattr(report, "load_trials", lambda study, uri=None: t)
    monkeypatch.setattr(report, "load_histories", lambda study, uri=None: _hist(t))
    monkeypatch.setattr(report, "sample_grids", lambda trials, uri: {})
    page, summary = report.build("synthetic")
    assert "FID at equal compute (100 TFLOPs)" in page and "train TFLOPs" in page
    assert {"cfg_scale_nfe_1", "cfg_scale_nfe_4", "pareto"} <= set(summary["figures"])
    assert "FID vs guidance scale at 1 NFE" in page
