"""A real study end to end: local Ray Tune, MLflow in a SQLite file, resume without duplicates."""
from __future__ import annotations

import json

import pytest

from ablate.run import main

STUDY = """
name: tiny
data: {name: gaussian_mixture, modes: 2, n: 4000}
design:
  preset: flow_matching
  guidance: none
  time_sampler: {fraction_r_neq_t: 0.25}
  backbone: {name: mlp, width: 32, depth: 1}
train: {steps: 40, batch_size: 64, log_every: 10, ckpt_every: 20, grad_clip: 0.0}
eval: {every: 20, nfe: [1, 2], num_samples: 200}
sample: {nfe: [1], num: 100}
search:
  grid:
    design.target: [flow_matching, meanflow]
    train.lr: [0.001, 1.0e+30]
  seeds: 1
  max_failures: 0
resources: {cpus_per_trial: 1}
"""


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    path = root / "tiny.yaml"
    path.write_text(STUDY)
    argv = [str(path), f"tracking.uri=sqlite:///{root}/mlflow.db", f"resources.storage={root}/ray"]
    rc = main(argv)
    return root, argv, rc


def _runs(root):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = c.get_experiment_by_name("tiny")
    return c, c.search_runs([exp.experiment_id])


@pytest.mark.slow
def test_study_records_parent_and_children(study):
    root, _, rc = study
    assert rc == 1  # the diverging trials failed; the study itself completed
    c, runs = _runs(root)
    parents = [r for r in runs if r.data.tags.get("ablate_role") == "study"]
    children = [r for r in runs if r.data.tags.get("ablate_role") == "trial"]
    assert len(parents) == 1 and len(children) == 4
    pid = parents[0].info.run_id
    assert all(r.data.tags["mlflow.parentRunId"] == pid for r in children)
    ok = [r for r in children if r.data.params["train.lr"] == "0.001"]
    bad = [r for r in children if r.data.params["train.lr"] != "0.001"]
    assert {r.info.status for r in ok} == {"FINISHED"}
    assert {r.info.status for r in bad} == {"FAILED"}
    assert all("DivergenceError" in r.data.tags["error"] for r in bad)
    for r in ok:
        assert {"design.target.name", "design.schedule.name", "design.backbone.width", "fid.extractor",
                "fid.num_samples", "fid.reference"} <= set(r.data.params)
        assert r.data.tags["design_id"] and r.data.tags["slug"] and r.data.tags["seed"] == "0"
        hist = c.get_metric_history(r.info.run_id, "fid/nfe_1")
        assert [m.step for m in hist] == [20, 40]
        assert all(m.value >= 0 for m in hist)
        assert [m.step for m in c.get_metric_history(r.info.run_id, "train/loss")] == [10, 20, 30, 40]


@pytest.mark.slow
def test_rerun_restores_without_retraining_or_duplicates(study):
    root, argv, _ = study
    trials = sorted((root / "ray" / "tiny" / "trials").iterdir())
    before = {p.name: (p / "metrics.jsonl").read_text() for p in trials if (p / "final.json").exists()}
    assert len(before) == 2
    main(argv)  # same command: restores the Tune experiment, retries the errored trials
    c, runs = _runs(root)
    children = [r for r in runs if r.data.tags.get("ablate_role") == "trial"]
    keys = [r.data.tags["trial_key"] for r in children]
    assert len(keys) == len(set(keys)) == 4  # exactly one child run per (design, seed)
    assert len([r for r in runs if r.data.tags.get("ablate_role") == "study"]) == 1
    after = {p: (root / "ray" / "tiny" / "trials" / p / "metrics.jsonl").read_text() for p in before}
    assert after == before  # finished trials were not trained again
    for r in children:
        if r.info.status == "FINISHED":
            assert len(c.get_metric_history(r.info.run_id, "fid/nfe_1")) == 2


def test_dry_run_lists_trials_and_bad_grid_is_refused(tmp_path, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text(STUDY)
    assert main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count(" seed 0 ") == 4 and "design.target=meanflow" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text(STUDY.replace("design.target: [flow_matching, meanflow]", "design.target: [flow_matchin]")
                   .replace("seeds: 1", "seeds: 0"))
    assert main([str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "search.seeds" in err
    bad.write_text(STUDY.replace("design.target: [flow_matching, meanflow]", "design.target: [flow_matchin]"))
    assert main([str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "flow_matchin" in err and "Did you mean 'flow_matching'" in err
    assert not (tmp_path / "mlflow.db").exists()
    json.dumps(err)  # printable
