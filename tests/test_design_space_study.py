"""The design-space study (studies/design_space.yaml), shrunk to seconds per trial, end to end:
real local Ray Tune, MLflow in a SQLite file, and the report with every method ranked."""
from __future__ import annotations

from pathlib import Path

import pytest

from ablate.run import main

STUDY = Path(__file__).resolve().parents[1] / "studies" / "design_space.yaml"
SHRINK = ["train.steps=20", "train.log_every=10", "train.ckpt_every=0", "eval.every=0", "eval.num_samples=100",
          "sample.nfe=[1]", "sample.num=16", "search.seeds=1",
          "design.backbone={name: dit, size: T, patch: 2, depth: 1, hidden: 32, heads: 2}"]


@pytest.mark.slow
def test_design_space_study_runs_every_method_to_a_report(tmp_path):
    from mlflow.tracking import MlflowClient

    from dashboards.tables import load_trials, rank

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    rc = main([str(STUDY), *SHRINK, f"tracking.uri={uri}", f"resources.storage={tmp_path}/ray"])
    assert rc == 0
    trials = load_trials("design_space", uri)
    # the study is the ESC paper's design space (nine presets); the 2026 presets are trained by their own tests
    assert len(trials) == 9 and set(trials["status"]) == {"FINISHED"}
    assert trials["design_id"].nunique() == 9  # nine distinct compositions, one loop
    assert set(trials["design.target.name"]) == {"flow_matching", "shortcut", "meanflow", "consistency", "imm"}
    for nfe in (1, 2, 4):
        assert trials[f"final/fid/nfe_{nfe}"].notna().all()
    ranking = rank(trials, "final/fid/nfe_1")
    assert len(ranking) == 9
    report = tmp_path / "ray" / "design_space" / "report.html"
    assert report.exists() and report.stat().st_size > 100_000
    cl = MlflowClient(uri)
    exp = cl.get_experiment_by_name("design_space")
    parent = [r for r in cl.search_runs([exp.experiment_id]) if r.data.tags.get("ablate_role") == "study"][0]
    assert "report/report.html" in [a.path for a in cl.list_artifacts(parent.info.run_id, "report")]
