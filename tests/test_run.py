"""A real study end to end: local Ray Tune, MLflow in a SQLite file, resume without duplicates."""
from __future__ import annotations

import json

import pytest

from ablate.run import main

from tests.study_fixture import STUDY  # noqa: E402  (the fixture `study` comes from conftest)


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
    # the searched train setting tells the trials of one design apart (the report never pools them as seeds)
    assert {r.data.tags["variant"] for r in children} == {"train.lr=0.001", "train.lr=1e+30"}
    from dashboards.tables import load_trials

    assert load_trials("tiny", f"sqlite:///{root}/mlflow.db")["design"].nunique() == 4
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


OPTUNA = """
name: tiny_optuna
data: {name: gaussian_mixture, modes: 2, n: 4000}
design:
  preset: flow_matching
  guidance: none
  time_sampler: {fraction_r_neq_t: 0.25}
  backbone: {name: mlp, width: 32, depth: 1}
train: {steps: 20, batch_size: 64, log_every: 10, ckpt_every: 20}
eval: {every: 0, nfe: [1], num_samples: 200}
sample: {nfe: [1], num: 50}
search:
  mode: optuna
  space:
    design.target: {choices: [flow_matching, meanflow]}
    design.target.jvp: {choices: [exact, finite_difference], when: {design.target: meanflow}}
    train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}
  num_samples: 4
  sampler: random
  objective: [fid/nfe_1]
resources: {cpus_per_trial: 1}
"""


@pytest.mark.slow
def test_optuna_search_runs_and_honours_a_conditional_kwarg(tmp_path):
    path = tmp_path / "opt.yaml"
    path.write_text(OPTUNA)
    rc = main([str(path), f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"resources.storage={tmp_path}/ray"])
    assert rc == 0
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = c.get_experiment_by_name("tiny_optuna")
    children = [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("ablate_role") == "trial"]
    assert len(children) == 4 and {r.info.status for r in children} == {"FINISHED"}
    for r in children:
        p = r.data.params
        assert 1e-4 <= float(p["train.lr"]) <= 1e-2
        if p["design.target.name"] == "meanflow":
            assert p["design.target.jvp"] in ("exact", "finite_difference")
        else:  # the conditional kwarg is never sampled for the target that has no such option
            assert "design.target.jvp" not in p
        assert len(c.get_metric_history(r.info.run_id, "fid/nfe_1")) == 1


def test_optuna_space_problems_are_all_reported(tmp_path, capsys):
    path = tmp_path / "opt.yaml"
    path.write_text(OPTUNA.replace("sampler: random", "sampler: annealing")
                    .replace("{low: 1.0e-4, high: 1.0e-2, log: true}", "{low: 1.0e-2, high: 1.0e-4}")
                    .replace("choices: [flow_matching, meanflow]}", "choices: [flow_matching, meanflo]}"))
    assert main([str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "search.sampler" in err and "annealing" in err
    assert "search.space.train.lr" in err and "low must be < high" in err
    assert "meanflo" in err


@pytest.mark.slow
def test_sigkill_mid_study_then_rerun_loses_and_duplicates_nothing(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from mlflow.tracking import MlflowClient

    path = tmp_path / "kill.yaml"
    path.write_text(STUDY.replace("train.lr: [0.001, 1.0e+30]", "train.lr: [0.001]").replace("seeds: 1", "seeds: 2")
                    .replace("steps: 40", "steps: 120").replace("name: tiny", "name: killme"))
    argv = [str(path), f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"resources.storage={tmp_path}/ray"]
    proc = subprocess.Popen([sys.executable, "-m", "ablate.run", *argv], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    deadline = time.time() + 300
    finished = []
    while time.time() < deadline and proc.poll() is None:
        time.sleep(1)
        exp = c.get_experiment_by_name("killme") if (tmp_path / "mlflow.db").exists() else None
        if exp is not None:
            finished = [r for r in c.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'")
                        if r.data.tags.get("ablate_role") == "trial"]
            if finished:
                break
    assert finished and proc.poll() is None, "the study ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started, mid-study
    proc.wait()
    trials_dir = tmp_path / "ray" / "killme" / "trials"
    done_before = {p.name: (p / "metrics.jsonl").read_text() for p in trials_dir.iterdir()
                   if (p / "final.json").exists()}
    assert done_before
    assert main(argv) == 0  # the same command continues the study
    exp = c.get_experiment_by_name("killme")
    children = [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("ablate_role") == "trial"]
    keys = sorted(r.data.tags["trial_key"] for r in children)
    assert len(keys) == 4 and len(set(keys)) == 4  # exactly one child run per (design, seed)
    assert {r.info.status for r in children} == {"FINISHED"}
    for name, text in done_before.items():  # finished trials were not trained again
        assert (trials_dir / name / "metrics.jsonl").read_text() == text
    for r in children:  # nothing lost, nothing recorded twice
        steps = [m.step for m in c.get_metric_history(r.info.run_id, "train/loss")]
        assert sorted(steps) == list(range(10, 121, 10)), (r.data.tags["trial_key"], steps)
        assert sorted(m.step for m in c.get_metric_history(r.info.run_id, "fid/nfe_1")) == [20, 40, 60, 80, 100, 120]


@pytest.mark.slow
def test_ray_address_spreads_trials_over_two_nodes(tmp_path):
    """A real two-node Ray cluster on this machine (ray.cluster_utils), shared storage in tmp_path."""
    import ray
    from mlflow.tracking import MlflowClient
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        path = tmp_path / "cluster.yaml"
        path.write_text(STUDY.replace("train.lr: [0.001, 1.0e+30]", "train.lr: [0.001]").replace("seeds: 1", "seeds: 2")
                        .replace("name: tiny", "name: on_cluster"))
        rc = main([str(path), f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"resources.storage={tmp_path}/shared",
                   f"resources.address={cluster.address}"])
        assert rc == 0
        c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
        exp = c.get_experiment_by_name("on_cluster")
        children = [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("ablate_role") == "trial"]
        assert len(children) == 4 and {r.info.status for r in children} == {"FINISHED"}
        nodes = {r.data.tags["node"] for r in children}
        assert len(nodes) == 2, f"all trials ran on one node: {nodes}"
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_asha_stops_weak_trials_early(tmp_path):
    from mlflow.tracking import MlflowClient

    path = tmp_path / "asha.yaml"
    path.write_text(STUDY.replace("train.lr: [0.001, 1.0e+30]", "train.lr: [1.0e-5, 1.0e-4, 0.001, 0.003]")
                    .replace("steps: 40", "steps: 80").replace("name: tiny", "name: asha")
                    .replace("  max_failures: 0\n", "  max_failures: 0\n  scheduler: asha\n  grace_period: 20\n"
                                                    "  reduction_factor: 2\n"))
    rc = main([str(path), f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"resources.storage={tmp_path}/ray",
               "resources.max_concurrent=2"])
    assert rc == 0
    c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = c.get_experiment_by_name("asha")
    children = [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("ablate_role") == "trial"]
    assert len(children) == 8
    stopped = [r for r in children if r.info.status == "KILLED"]
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert stopped and finished, [(r.data.tags["trial_key"], r.info.status) for r in children]
    assert all(r.data.tags.get("stopped") for r in stopped)
    for r in stopped:  # stopped before the end of training
        assert max(m.step for m in c.get_metric_history(r.info.run_id, "fid/nfe_1")) < 80
