"""The study's parent run carries a summary to chart (ablate/summary.py); children carry data.* params."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from ablate.summary import metric_label, nfe_name, summary_metrics

FIDS = {"meanflow": [10.0, 11.0, 12.5], "flow_matching": [80.0, 82.0, 85.0]}


def _trials() -> pd.DataFrame:
    rows = []
    for target, fids in FIDS.items():
        for seed, f in enumerate(fids):
            rows.append({"design": f"linear-logit_normal-{target}-l2-mlp-none", "slug": f"linear-{target}",
                         "seed": seed, "status": "FINISHED", "preset": target, "seed_reason": "initial",
                         "error": "", "stopped": "", "design.target.name": target, "design.schedule.name": "linear",
                         "final/fid/nfe_1": f, "final/fid/nfe_16": f / 4})
    return pd.DataFrame(rows)


def test_nfe_names_sort_numerically():
    nfes = [1, 2, 4, 16, 128]
    assert sorted(nfe_name(n) for n in reversed(nfes)) == [nfe_name(n) for n in nfes] == \
        ["nfe_001", "nfe_002", "nfe_004", "nfe_016", "nfe_128"]


@pytest.mark.parametrize("label", ["meanflow · cosine", "flow_matching · lr=0.001", "a/b", "naïve #2", "..", "x" * 300])
def test_design_labels_become_valid_metric_names(label):
    from mlflow.utils.validation import _validate_metric_name

    name = metric_label(label)
    _validate_metric_name(f"summary/{name}/fid/{nfe_name(1)}")
    assert "/" not in name and len(name) <= 120
    assert metric_label("meanflow · cosine") == "meanflow cosine"


def test_summary_per_design_and_nfe():
    metrics, tags = summary_metrics(_trials(), [1, 16], "fid/nfe_1", step=0)
    got = {k: (v, s) for k, v, s in metrics}
    gm = math.exp(np.mean(np.log(FIDS["meanflow"])))
    assert got["summary/meanflow/fid/nfe_001"] == (pytest.approx(gm), 0)
    assert got["summary/meanflow/fid/nfe_016"][0] == pytest.approx(gm / 4)
    lo, hi = got["summary/meanflow/fid_lo/nfe_001"][0], got["summary/meanflow/fid_hi/nfe_001"][0]
    assert lo < gm < hi
    assert got["summary/meanflow/seeds"] == (3, 0) and got["summary/meanflow/rank"] == (1, 0)
    assert got["summary/flow_matching/rank"] == (2, 0)
    assert tags["summary.design.meanflow"] == "linear-logit_normal-meanflow-l2-mlp-none"
    names = [k for k in got if k.startswith("summary/meanflow/fid/")]
    assert sorted(names) == ["summary/meanflow/fid/nfe_001", "summary/meanflow/fid/nfe_016"]  # text order = NFE order
    final, _ = summary_metrics(_trials(), [1, 16], "fid/nfe_1", step=0, final=True)
    assert sorted((k, s) for k, _, s in final if k.startswith("summary/meanflow/")) == [
        ("summary/meanflow/fid_vs_nfe", 1), ("summary/meanflow/fid_vs_nfe", 16)]  # step = NFE


def test_fewer_than_three_seeds_log_no_interval():
    metrics, _ = summary_metrics(_trials().groupby("design").head(2), [1], "fid/nfe_1", step=2)
    keys = {k for k, _, _ in metrics}
    assert "summary/meanflow/fid/nfe_001" in keys and not any("fid_lo" in k for k in keys)
    assert all(s == 2 for _, _, s in metrics)  # the round


def test_the_parent_run_gets_the_summary_once_per_round(tmp_path):
    from mlflow.entities import Metric

    from ablate import tracking
    from ablate.summary import log

    uri = f"sqlite:///{tmp_path}/m.db"
    cl = tracking.client(uri)
    exp = tracking.experiment_id(cl, "demo", None)
    parent = tracking.parent_run(cl, exp, "demo")
    for i, r in _trials().iterrows():
        run_id, _ = tracking.child_run(cl, exp, parent, f"k{i}", f"k{i}", {
            "design_id": r["design"][:12], "slug": r["design"], "seed": str(r["seed"]), "study": "demo",
            "preset": r["preset"]})
        cl.log_batch(run_id, metrics=[Metric("fid/nfe_1", r["final/fid/nfe_1"], 0, 10),
                                      Metric("fid/nfe_16", r["final/fid/nfe_16"], 0, 10)])
        cl.log_param(run_id, "design.target.name", r["design.target.name"])
        cl.set_terminated(run_id, "FINISHED")
    cfg = OmegaConf.create({"name": "demo", "eval": {"nfe": [1, 16]}, "search": {"objective": ["fid/nfe_1"]}})
    assert log(cl, parent, cfg, uri, 0) is None
    assert log(cl, parent, cfg, uri, 0) is None  # a resumed study: the same round is not logged twice
    assert log(cl, parent, cfg, uri, 0, final=True) is None
    run = cl.get_run(parent)
    assert run.data.metrics["summary/meanflow/fid/nfe_001"] == pytest.approx(math.exp(np.mean(np.log(FIDS["meanflow"]))))
    assert len(cl.get_metric_history(parent, "summary/meanflow/fid/nfe_001")) == 1
    assert [m.step for m in cl.get_metric_history(parent, "summary/flow_matching/fid_vs_nfe")] == [1, 16]
    assert run.data.tags["summary.design.flow_matching"] == "linear-logit_normal-flow_matching-l2-mlp-none"


def test_a_summary_error_never_fails_the_study(capsys):
    from ablate.summary import log

    cfg = OmegaConf.create({"name": "demo", "eval": {"nfe": [1]}, "search": {"objective": ["fid/nfe_1"]}})
    assert "no summary" in log(None, "x", cfg, "sqlite:////nonexistent/dir/m.db", 0)
    assert "no summary" in capsys.readouterr().out


def test_data_settings_flatten_into_params():
    from ablate.tracking import flat

    assert flat("data", {"name": "gaussian_mixture", "modes": 2, "aug": {"flip": True}, "extra": {}}) == {
        "data.name": "gaussian_mixture", "data.modes": 2, "data.aug.flip": True, "data.extra": {}}
