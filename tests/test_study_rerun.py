"""A study knows its trial set (``trials.json``): a rerun keeps unchanged trials, runs new ones in a new Tune
experiment, and refuses changed ones (exit 2, nothing started). Also: what an unfinished trial is tagged, one
stored copy of each checkpoint, the dry run's disk estimate, and a report when every trial failed.

The fast tests write the record with the platform's own code and never start Ray (``ray.init`` is a tripwire);
one slow test runs a real tiny study three times.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from ablate.run import main, prepare_study_folder

STUDY = """\
name: again
data: {name: gaussian_mixture, modes: 2, n: 400}
design:
  preset: flow_matching
  guidance: none
  backbone: {name: mlp, width: 8, depth: 1}
train: {steps: 4, batch_size: 16, log_every: 2, ckpt_every: 0}
eval: {every: 0, nfe: [1], num_samples: 50}
sample: {nfe: [1], num: 8}
search:
  grid:
    design.target: [flow_matching, meanflow]
  seeds: 1
resources: {cpus_per_trial: 1}
"""


@pytest.fixture
def no_ray(monkeypatch):
    import ray

    def tripwire(*a, **k):
        raise AssertionError("ray.init reached: a rerun that must be refused got as far as starting Ray")

    monkeypatch.setattr(ray, "init", tripwire)


def _recorded(tmp_path: Path, *overrides: str, text: str = STUDY, k: int = 0):
    """A study folder as a first run leaves it: the marker and the trial record of the study's trials."""
    from ablate.config import compose
    from ablate.run import expand_trials, storage_root
    from ablate.trialset import TrialBook

    study = tmp_path / "again.yaml"
    study.write_text(text)
    storage = tmp_path / "runs"
    cfg, source = compose(str(study), [f"resources.storage={storage}", *overrides])
    trials = expand_trials(cfg, source)
    prepare_study_folder(storage_root(cfg), "again", fresh=False)
    book = TrialBook(storage_root(cfg), "again", str(cfg.search.mode))
    groups = book.experiments(cfg, k, trials, restorable=False)
    return study, storage, trials, groups


def _argv(study, tmp_path, *extra):
    return [str(study), f"resources.storage={tmp_path}/runs", f"tracking.uri=sqlite:///{tmp_path}/m.db", *extra]


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("dry_run", [True, False])
def test_a_changed_setting_under_the_same_keys_is_refused_naming_the_trials(dry_run, tmp_path, capsys, no_ray):
    study, storage, trials, _ = _recorded(tmp_path)
    before = _listing(tmp_path)
    rc = main(_argv(study, tmp_path, "search.seeds=2", "train.steps=8", *(["--dry-run"] if dry_run else [])))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and sum(ln.startswith("error:") for ln in err.splitlines()) == 1
    assert str(study) in err and "train.steps: 4 → 8" in err and "2 recorded trials" in err
    assert all(t["key"] in err for t in trials)  # names every trial that changed
    assert "--fresh" in err and "silently" in err
    assert _listing(tmp_path) == before, "nothing started, nothing written"


def test_eval_settings_count_too_and_logging_ones_do_not(tmp_path, capsys, no_ray):
    study, _, _, _ = _recorded(tmp_path)
    assert main(_argv(study, tmp_path, "eval.num_samples=60", "--dry-run")) == 2
    assert "eval.num_samples: 50 → 60" in capsys.readouterr().err
    assert main(_argv(study, tmp_path, "train.log_every=1", "train.ckpt_every=2", "eval.grids=false",
                      "--dry-run")) == 0, capsys.readouterr().err


def test_more_seeds_keep_the_recorded_trials_and_run_only_the_new_ones(tmp_path, capsys, no_ray):
    from ablate.config import compose
    from ablate.run import expand_trials, storage_root
    from ablate.trialset import TrialBook

    study, storage, first, groups = _recorded(tmp_path)
    assert [(name, [t["key"] for t in group], restore) for _, name, group, restore in groups] == [
        ("again", [t["key"] for t in first], False)]  # the first run: the study's own experiment
    assert main(_argv(study, tmp_path, "search.seeds=2", "--dry-run")) == 0
    out = capsys.readouterr().out
    assert out.count("[kept]") == 2 and out.count("[new]") == 2
    assert "2 recorded trials kept as they are, 2 new" in out
    # launch: the recorded trials restore their experiment; the new ones get one of their own, recorded first
    cfg, source = compose(str(study), [f"resources.storage={storage}", "search.seeds=2"])
    trials = expand_trials(cfg, source)
    book = TrialBook.load(storage_root(cfg), "again")
    plan = book.experiments(cfg, 0, trials, restorable=True)
    assert [(s, n, restore) for s, n, _, restore in plan] == [
        (str(storage), "again", True), (f"{storage}/again", "extend1", False)]
    new = plan[1][2]
    assert sorted(t["seed"] for t in new) == [1, 1] and all(t["reason"] == "added by a rerun (extend1)" for t in new)
    record = json.loads((storage / "again" / "trials.json").read_text())
    assert {k: v["experiment"] for k, v in record["trials"].items()} == {
        **{t["key"]: "." for t in first}, **{t["key"]: "extend1" for t in new}}
    assert record["trials"][first[0]["key"]]["settings"]["train"]["steps"] == 4
    # a third run, with a third seed: a second extension, the first two restored
    cfg3, _ = compose(str(study), [f"resources.storage={storage}", "search.seeds=3"])
    plan3 = TrialBook.load(storage_root(cfg3), "again").experiments(cfg3, 0, expand_trials(cfg3, source), True)
    assert [n for _, n, _, _ in plan3] == ["again", "extend1", "extend2"]


def test_more_designs_are_new_trials(tmp_path, capsys, no_ray):
    study, _, _, _ = _recorded(tmp_path)
    assert main(_argv(study, tmp_path, "search.grid.design.target=[flow_matching,meanflow,shortcut]",
                      "--dry-run")) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert out.count("[kept]") == 2 and out.count("[new]") == 1


def test_fewer_seeds_leave_the_records_and_say_so(tmp_path, capsys, no_ray):
    study, _, _, _ = _recorded(tmp_path, "search.seeds=2")
    assert main(_argv(study, tmp_path, "--dry-run")) == 0
    out = capsys.readouterr().out
    assert "2 recorded trials are no longer in the study's set" in out


def test_fresh_ignores_the_record(tmp_path, capsys, no_ray):
    study, _, _, _ = _recorded(tmp_path)
    assert main(_argv(study, tmp_path, "train.steps=8", "--fresh", "--dry-run")) == 0, capsys.readouterr().err


def test_a_raced_trial_with_changed_settings_is_refused(tmp_path, capsys, no_ray):
    from ablate.config import compose
    from ablate.run import describe_trial, storage_root
    from ablate.trialset import TrialBook

    study, storage, trials, _ = _recorded(tmp_path)
    cfg, _ = compose(str(study), [f"resources.storage={storage}"])
    raced = describe_trial(cfg, trials[0]["overrides"], 1)
    book = TrialBook.load(storage_root(cfg), "again")
    book.experiments(cfg, 1, [raced], restorable=True)  # round 1 of a race: its own experiment, race1
    assert json.loads((storage / "again" / "trials.json").read_text())["trials"][raced["key"]]["experiment"] == "race1"
    rc = main(_argv(study, tmp_path, "eval.num_samples=60", "--dry-run"))
    err = capsys.readouterr().err
    assert rc == 2 and raced["key"] in err and "3 recorded trials" in err, err


def test_a_study_folder_from_before_trial_records_is_refused(tmp_path, capsys, no_ray):
    storage = tmp_path / "runs"
    prepare_study_folder(str(storage), "again", fresh=False)
    (storage / "again" / "tuner.pkl").write_bytes(b"never unpickled")
    study = tmp_path / "again.yaml"
    study.write_text(STUDY)
    for extra in ([], ["--dry-run"]):
        assert main(_argv(study, tmp_path, *extra)) == 2
        err = capsys.readouterr().err
        assert "trials.json" in err and "--fresh" in err, err
    assert not (tmp_path / "m.db").exists()


def test_a_changed_optuna_search_is_refused(tmp_path, capsys, no_ray):
    text = STUDY.replace("  grid:\n    design.target: [flow_matching, meanflow]\n",
                         "  mode: optuna\n  num_samples: 2\n  space:\n    design.target: {choices: [flow_matching, meanflow]}\n")
    study, _, _, _ = _recorded(tmp_path, text=text)
    assert main(_argv(study, tmp_path, "--dry-run")) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(_argv(study, tmp_path, "search.num_samples=4", "--dry-run")) == 2
    err = capsys.readouterr().err
    assert "search.num_samples: 2 → 4" in err and "cannot be extended in place" in err and "--fresh" in err


# -- what an unfinished trial is tagged, and the tag going when a rerun finishes it ---------------------------
def _mlflow(tmp_path, n=4):
    from mlflow.tracking import MlflowClient

    cl = MlflowClient(f"sqlite:///{tmp_path}/tags.db")
    exp = cl.create_experiment("tags")
    parent = cl.create_run(exp, tags={"ablate_role": "study"}).info.run_id
    runs = {f"k{i}": cl.create_run(exp, tags={"mlflow.parentRunId": parent, "trial_key": f"k{i}",
                                              "ablate_role": "trial"}).info.run_id for i in range(n)}
    return cl, exp, parent, runs


def test_failed_stopped_and_interrupted_trials_are_told_apart(tmp_path):
    from ablate.run import close_unfinished
    from ablate.trialset import outcomes

    cl, exp, parent, runs = _mlflow(tmp_path)

    def trial(key, status, step, error=None, failures=0):
        return SimpleNamespace(config={"trial": {"key": key}}, status=status, last_result={"step": step},
                               num_failures=failures, get_error=lambda: error)

    grid = SimpleNamespace(_experiment_analysis=SimpleNamespace(trials=[
        trial("k0", "ERROR", 20, "Traceback (most recent call last):\n  File ...\n"
                                 "ray.exceptions.ActorDiedError: worker died (OOM)\n", failures=2),  # past max_failures
        trial("k1", "TERMINATED", 20),  # stopped early by the scheduler
        trial("k2", "PENDING", None), trial("k3", "RUNNING", 40)]))  # the study was cut off
    close_unfinished(cl, exp, parent, tmp_path, outcomes(grid, lambda c: c["trial"]["key"]), 1, 80)
    got = {k: cl.get_run(r) for k, r in runs.items()}
    assert got["k0"].info.status == "FAILED" and got["k0"].data.tags["outcome"] == "failed"
    assert "worker died (OOM)" in got["k0"].data.tags["error"] and "search.max_failures=1" in got["k0"].data.tags["error"]
    assert "stopped" not in got["k0"].data.tags
    assert got["k1"].info.status == "KILLED" and got["k1"].data.tags["outcome"] == "stopped"
    assert got["k1"].data.tags["stopped"] == "early stopping by the scheduler at step 20 of 80"
    for k in ("k2", "k3"):
        assert got[k].info.status == "KILLED" and got[k].data.tags["outcome"] == "interrupted"
        assert got[k].data.tags["stopped"].startswith("interrupted")
    assert "at step 40 of 80" in got["k3"].data.tags["stopped"]


def test_a_trial_finished_on_a_rerun_loses_its_stale_tags(tmp_path):
    from ablate.trialset import clear_outcome

    cl, _, _, runs = _mlflow(tmp_path, n=2)
    cl.set_tag(runs["k0"], "stopped", "interrupted at step 20 of 80")
    cl.set_tag(runs["k0"], "outcome", "interrupted")
    cl.set_tag(runs["k1"], "error", "the trial failed: worker died")
    cl.set_tag(runs["k1"], "outcome", "failed")
    for r in runs.values():
        clear_outcome(cl, r)
    t0, t1 = cl.get_run(runs["k0"]).data.tags, cl.get_run(runs["k1"]).data.tags
    assert "stopped" not in t0 and "outcome" not in t0
    assert "error" not in t1 and "outcome" not in t1 and t1["earlier_error"] == "the trial failed: worker died"


# -- disk: one stored copy of a checkpoint, and the dry run says what a study writes -------------------------------
def test_tune_gets_a_pointer_on_shared_storage_and_the_file_alone_under_a_uri(tmp_path):
    from ablate.footprint import pointer, tune_checkpoint

    out = tmp_path / "trial"
    (out / "samples").mkdir(parents=True)
    (out / "checkpoint.pt").write_bytes(b"x" * 100_000)
    (out / "samples" / "nfe_1.png").write_bytes(b"p" * 50_000)
    (out / "final.json").write_text("{}")
    with tune_checkpoint(out, 20, remote=False) as d:
        files = sorted(p.name for p in Path(d).rglob("*"))
        assert files == ["pointer.json"] and sum(p.stat().st_size for p in Path(d).rglob("*")) < 1000
        assert pointer(d) == {"trial_dir": str(out.resolve()), "step": 20, "checkpoint": "checkpoint.pt",
                              "final": False}
    assert not Path(d).exists()  # removed once Tune has its copy
    with tune_checkpoint(out, 40, remote=True, final=True) as d:
        assert sorted(p.name for p in Path(d).rglob("*")) == ["checkpoint.pt", "final.json"]  # no sample grids
        assert (Path(d) / "checkpoint.pt").stat().st_ino == (out / "checkpoint.pt").stat().st_ino  # a hard link
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "final.json", "samples"]


def test_the_dry_run_says_roughly_what_the_study_writes(tmp_path, capsys, no_ray):
    from ablate.footprint import count_parameters

    study = tmp_path / "again.yaml"
    study.write_text(STUDY)
    assert main(_argv(study, tmp_path, "search.seeds=3", "--dry-run")) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("disk (roughly):"))
    assert "for 6 trials" in line and "× 1 copy" in line and "sample grids" in line
    n = count_parameters("mlp", {"width": 8, "depth": 1}, (2,), 0)
    assert f"{n / 1e6:.3g}M parameters" in line


def test_a_backbone_too_large_is_refused_from_its_spec_without_allocating(tmp_path):
    from ablate.design import DesignError, resolve_design
    from ablate.footprint import MAX_PARAMS, check_backbone, count_parameters

    assert count_parameters("mlp", {"width": 10 ** 9, "depth": 3}, (2,), 0) > MAX_PARAMS  # meta device: instant
    design = resolve_design({"preset": "flow_matching", "backbone": {"name": "mlp", "width": 10 ** 9}})
    with pytest.raises(DesignError, match="parameters"):
        check_backbone(design, (2,), 0)


# -- the report when every trial failed --------------------------------------------------------------------
def test_the_report_of_a_study_whose_every_trial_failed_is_a_table_of_failures(tmp_path):
    from mlflow.tracking import MlflowClient

    from dashboards.report import terminal_summary, write

    uri = f"sqlite:///{tmp_path}/m.db"
    cl = MlflowClient(uri)
    exp = cl.create_experiment("allfail")
    parent = cl.create_run(exp, run_name="allfail", tags={"ablate_role": "study", "study": "allfail",
                                                          "superseded": "false"})
    for seed in range(2):
        for slug in ("a", "b"):
            r = cl.create_run(exp, tags={"mlflow.parentRunId": parent.info.run_id, "ablate_role": "trial",
                                         "slug": slug, "seed": str(seed), "design_id": slug,
                                         "trial_key": f"{slug}-s{seed}", "error": f"DivergenceError: nan ({slug})"})
            cl.log_metric(r.info.run_id, "train/loss", float("nan"), step=10)
            cl.set_terminated(r.info.run_id, "FAILED")
    out, summary = write("allfail", uri, tmp_path / "report.html", "fid/nfe_1", attach=False)
    page = out.read_text()
    assert "no trial finished" in page and "DivergenceError: nan (a)" in page and "FAILED" in page
    text = terminal_summary(summary)
    assert "4 failed" in text and "DivergenceError" in text


# -- a real study, three runs: first, more seeds, changed settings -----------------------------------------------
REAL = """\
name: grows
data: {name: gaussian_mixture, modes: 2, n: 2000}
design:
  preset: flow_matching
  guidance: none
  backbone: {name: mlp, width: 16, depth: 1}
train: {steps: 20, batch_size: 64, log_every: 10, ckpt_every: 10}
eval: {every: 10, nfe: [1], num_samples: 200}
sample: {nfe: [1], num: 50}
search:
  seeds: 1
resources: {cpus_per_trial: 1}
"""


@pytest.mark.slow
def test_a_real_rerun_adds_seeds_keeps_one_checkpoint_copy_and_refuses_a_change(tmp_path, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    path = tmp_path / "grows.yaml"
    path.write_text(REAL)
    argv = [str(path), f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"resources.storage={tmp_path}/ray"]
    assert main(argv) == 0
    folder = tmp_path / "ray" / "grows"
    first = {p.name: (p / "metrics.jsonl").read_text() for p in (folder / "trials").iterdir()}
    assert len(first) == 1
    # one copy of each checkpoint: the trial folder's; Tune's checkpoints hold a pointer
    ckpts = [p for p in folder.rglob("checkpoint.pt")]
    assert [p.parent.parent.name for p in ckpts] == ["trials"], ckpts
    pointers = list(folder.rglob("pointer.json"))
    assert pointers and all(p.stat().st_size < 1000 for p in pointers)
    capsys.readouterr()
    rc = main([*argv, "search.seeds=2"])  # one new trial, in a new experiment; the first one untouched
    out, err = capsys.readouterr()
    assert rc == 0, err[-3000:]
    assert "1 new trials in" in out
    assert (folder / "extend1").is_dir()
    c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = c.get_experiment_by_name("grows")
    children = [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("ablate_role") == "trial"]
    assert sorted(r.data.tags["seed"] for r in children) == ["0", "1"]
    assert {r.info.status for r in children} == {"FINISHED"}
    assert all((folder / "trials" / k / "metrics.jsonl").read_text() == v for k, v in first.items())
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ray.init reached")))
    assert main([*argv, "search.seeds=2", "train.steps=40"]) == 2
    err = capsys.readouterr().err
    assert "train.steps: 20 → 40" in err and "2 recorded trials" in err and "--fresh" in err
    assert not (folder / "extend2").exists()


def test_a_setting_the_platform_added_since_is_a_change_only_off_its_default(tmp_path, capsys, no_ray):
    study, storage, _, _ = _recorded(tmp_path)
    path = storage / "again" / "trials.json"
    record = json.loads(path.read_text())
    for rec in record["trials"].values():  # as a record written before eval.use_ema existed
        del rec["settings"]["eval"]["use_ema"]
    path.write_text(json.dumps(record))
    assert main(_argv(study, tmp_path, "--dry-run")) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(_argv(study, tmp_path, "eval.use_ema=false", "--dry-run")) == 2
    assert "eval.use_ema: (not set) → false" in capsys.readouterr().err
