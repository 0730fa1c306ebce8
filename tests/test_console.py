"""The study's live table (ablate/console.py): what it shows, in place on a terminal and as plain lines in a log,
and Ray's own output kept in ray.log."""
from __future__ import annotations

import io
import json
import logging
import pickle
import re
import sys
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from ablate.console import Console, duration


def _cfg(**res):
    return OmegaConf.create({"name": "demo", "eval": {"nfe": [1, 16]}, "train": {"steps": 600},
                             "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0, "max_concurrent": 0, **res}})


TRIALS = [{"key": f"{d}-s{s}", "slug": slug, "seed": s, "preset": preset, "variant": "", "overrides": {},
           "params": {"design.target.name": target}}
          for d, slug, preset, target in (("aaaa", "linear-logit_normal-meanflow-adaptive-mlp-none", "meanflow",
                                           "meanflow"),
                                          ("bbbb", "linear-logit_normal-flow_matching-l2-mlp-none", "flow_matching",
                                           "flow_matching"))
          for s in (0, 1)]


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def _trial(t, status="RUNNING", result=None):
    return SimpleNamespace(trial_id=t["key"], config={"trial": t}, status=status, last_result=result or {},
                           error_file=None)


def _metrics(tmp_path, key, *records):
    path = tmp_path / key / "metrics.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")


def test_plain_output_is_event_lines_and_an_occasional_status_block(tmp_path):
    out, clock = io.StringIO(), Clock()
    c = Console(_cfg(), TRIALS, trials_dir=tmp_path, stream=out, tty=False, clock=clock, every=60)
    a = _trial(TRIALS[0])
    c.trial_start(a)
    _metrics(tmp_path, TRIALS[0]["key"], {"step": 100, "kind": "train", "values": {"train/loss": 1.0}},
             {"step": 300, "kind": "train", "values": {"train/loss": 0.9}},
             {"step": 300, "kind": "eval", "values": {"fid/nfe_1": 81.234, "fid/nfe_16": 12.5}})
    clock.t += 30
    c.step_end([a])  # polled (the table knows step 300), but not printed yet: once a minute in a log
    assert c.rows[TRIALS[0]["key"]].step == 300 and c.rows[TRIALS[0]["key"]].fids == {1: 81.234, 16: 12.5}
    clock.t += 31
    c.step_end([a])
    text = out.getvalue()
    assert re.search(r"started aaaa-s0  meanflow  seed 0", text), text
    block = text.split("\n", 1)[1]
    assert block.startswith("study demo: 0 done, 1 running, 3 pending"), text
    assert "ETA ~" in block
    row = next(ln for ln in block.splitlines() if ln.startswith("aaaa-s0"))
    cells = row.split()
    assert cells[:4] == ["aaaa-s0", "meanflow", "0", "300/600"] and cells[4:6] == ["81.23", "12.5"], row
    assert cells[6] == "running" and cells[7].startswith("~"), row  # ETA: 300 steps to go at 300 steps / 61 s
    assert "bbbb-s0" not in block  # the block shows the running trials; the others are counted in its header
    a.status, a.last_result = "TERMINATED", {"step": 600, "fid/nfe_1": 40.0, "fid/nfe_16": 9.0}
    c.trial_complete(a)
    assert "finished aaaa-s0  meanflow  seed 0  FID@1 40  FID@16 9" in out.getvalue()
    b = _trial(TRIALS[2], status="ERROR")
    c.trial_error(b)
    assert "failed bbbb-s0  flow_matching  seed 0" in out.getvalue()
    c.experiment_end([a, b])
    table = out.getvalue().rsplit("study demo:", 1)[1].splitlines()
    assert table[0].startswith(" 1 done, 0 running, 2 pending, 1 failed"), table
    assert table[1].split() == ["trial", "design", "seed", "step", "FID@1", "FID@16", "status", "ETA"]
    assert [ln.split()[0] for ln in table[2:]] == [t["key"] for t in TRIALS]  # every trial, in the study's order
    assert "'variant'" not in out.getvalue() and "Current best trial" not in out.getvalue()


def test_on_a_terminal_the_table_is_redrawn_in_place(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "get_terminal_size", lambda *a: __import__("os").terminal_size((60, 40)))
    out, clock = FakeTTY(), Clock()
    c = Console(_cfg(), TRIALS, trials_dir=tmp_path, stream=out, clock=clock)
    assert c.tty
    trials = [_trial(t, status="PENDING") for t in TRIALS]
    for k in range(5):
        clock.t += 1.5
        trials[0].status = "RUNNING"
        trials[0].last_result = {"step": 100 * k}
        c.step_end(trials)
    text = out.getvalue()
    frames = text.split("\x1b[J")[1:]
    assert len(frames) == 5 and all(f.count("\n") == 2 + len(TRIALS) for f in frames)  # header, columns, rows
    assert text.count(f"\x1b[{2 + len(TRIALS)}F") == 4  # each redraw moves back over the previous table
    assert all(len(ln) < 60 for f in frames for ln in f.splitlines())  # never wider than the terminal
    assert "400/600" in frames[-1] and "running" in frames[-1]


def test_a_long_table_on_a_small_terminal_shows_the_running_trials_first(monkeypatch):
    import os
    import shutil

    monkeypatch.setattr(shutil, "get_terminal_size", lambda *a: os.terminal_size((120, 8)))
    many = [{**TRIALS[0], "key": f"k{i:02d}-s0"} for i in range(30)]
    out = FakeTTY()
    c = Console(_cfg(), many, stream=out, clock=Clock())
    c.rows["k17-s0"].status = "running"
    c.refresh(force=True)
    lines = out.getvalue().split("\x1b[J", 1)[1].splitlines()
    assert len(lines) <= 8 and lines[2].startswith("k17-s0") and lines[-1].startswith("… 26 more"), lines


def test_concurrency_line_says_how_many_run_at_once():
    out = io.StringIO()
    Console(_cfg(), TRIALS, stream=out, tty=False, log_path="/x/ray.log").started(2, 2, 12)
    assert out.getvalue().splitlines()[0] == "running 12 trials, 2 at a time (Ray has room for 2: 1 CPU per trial)"
    assert "Ray's own output: /x/ray.log" in out.getvalue()
    out = io.StringIO()
    Console(_cfg(max_concurrent=1), TRIALS, stream=out, tty=False).started(1, 2, 12)
    assert out.getvalue().startswith("running 12 trials, 1 at a time (resources.max_concurrent is 1)")


def test_rays_output_goes_to_ray_log_unless_verbose(tmp_path, capsys):
    log = tmp_path / "study" / "ray.log"
    out = io.StringIO()
    with Console(_cfg(), TRIALS, log_path=log, stream=out, tty=False) as c:
        assert c.ray_verbosity == 0
        logging.getLogger("ray.tune.execution.experiment_state").warning("Experiment state snapshotting has been "
                                                                         "triggered multiple times")
        exec("print('Trial status: 4 PENDING'); import sys; print('hint', file=sys.stderr)",
             {"__name__": "ray.tune.experimental.output"})  # what Tune's reporter prints
        print("ours")
        import os

        assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0"
    captured = capsys.readouterr()
    assert "ours" in captured.out and "Trial status" not in captured.out and "hint" not in captured.err
    assert "snapshotting" not in captured.err
    text = log.read_text()
    assert "snapshotting" in text and "Trial status: 4 PENDING" in text and "hint" in text
    from ablate.console import _RayFilter

    assert not isinstance(sys.stdout, _RayFilter) and not isinstance(sys.stderr, _RayFilter)  # restored
    assert all(not isinstance(h, logging.StreamHandler) or getattr(h, "stream", None) is not c._log
               for h in logging.getLogger("ray").handlers)
    assert __import__("os").environ.get("RAY_AIR_NEW_OUTPUT") != "0"

    with Console(_cfg(), TRIALS, log_path=tmp_path / "v.log", verbose=True, stream=out) as c:
        assert c.ray_verbosity == 1 and not c.tty
        exec("print('Trial status: 4 PENDING')", {"__name__": "ray.tune.experimental.output"})
    assert "Trial status" in capsys.readouterr().out and not (tmp_path / "v.log").exists()


def test_tunes_callback_pickles_and_reaches_the_active_console():
    from ray.tune import Callback

    import ablate.console as console

    out = io.StringIO()
    c = Console(_cfg(), TRIALS, stream=out, tty=False, clock=Clock())
    relay = c.callbacks()[0]
    assert isinstance(relay, Callback)
    again = pickle.loads(pickle.dumps(relay))  # it lives in the experiment's tuner.pkl
    with c:
        again.on_trial_start(iteration=1, trials=[], trial=_trial(TRIALS[1]))
    assert "started aaaa-s1" in out.getvalue()
    again.on_trial_start(iteration=1, trials=[], trial=_trial(TRIALS[2]))  # no active console: nothing happens
    assert "bbbb" not in out.getvalue() and console._ACTIVE is None


def test_a_console_error_never_reaches_tune(tmp_path):
    class Broken:
        trial_id = "x"

        @property
        def config(self):
            raise RuntimeError("unreadable")

    c = Console(_cfg(), TRIALS, stream=io.StringIO(), tty=False, log_path=tmp_path / "ray.log")
    relay = c.callbacks()[0]
    with c:
        relay.on_trial_result(iteration=1, trials=[], trial=Broken(), result={})  # a trial it cannot read
        relay.on_trial_start(iteration=1, trials=[], trial=Broken())
        relay.on_step_end(iteration=1, trials=[Broken()])
        import ablate.console as console

        assert console._ACTIVE is None  # after three errors it goes quiet
    assert "console" in (tmp_path / "ray.log").read_text()


def test_duration():
    assert [duration(s) for s in (5, 65, 3725, None, float("inf"))] == ["5s", "1m05s", "1h02m", "", ""]


@pytest.mark.parametrize("status,result,word", [("TERMINATED", {"step": 600}, "done"),
                                                ("TERMINATED", {"step": 200}, "stopped"),
                                                ("TERMINATED", {"step": 600, "already_finished": 1}, "recorded"),
                                                ("ERROR", {}, "failed"), ("PENDING", {}, "pending")])
def test_status_words(status, result, word):
    c = Console(_cfg(), TRIALS, stream=io.StringIO(), tty=False)
    c._sync(_trial(TRIALS[0], status=status, result=result))
    assert c.rows[TRIALS[0]["key"]].status == word


TINY = """
name: console
data: {name: gaussian_mixture, modes: 2, n: 2000}
design:
  preset: flow_matching
  guidance: none
  backbone: {name: mlp, width: 16, depth: 1}
train: {steps: 40, batch_size: 64, log_every: 10, ckpt_every: 20}
eval: {every: 20, nfe: [1, 2], num_samples: 200}
sample: {nfe: [1], num: 50}
search:
  grid:
    design.target: [flow_matching, meanflow]
  seeds: 1
resources: {cpus_per_trial: 1}
"""


@pytest.mark.slow
def test_a_real_study_shows_one_table_keeps_rays_output_in_ray_log_and_summarises_on_the_parent(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from ablate.run import main

    path = tmp_path / "console.yaml"
    path.write_text(TINY)
    argv = [str(path), f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"resources.storage={tmp_path}/ray"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    for noise in ("Current best trial", "'variant'", "tensorboard", "Trial status", "Configuration for experiment",
                  "View detailed results"):
        assert noise not in out, f"{noise!r} in the study's output:\n{out}"
    assert "snapshotting" not in err and "Started a local Ray instance" not in err, err
    concurrency = re.search(r"^running 2 trials, (\d) at a time \(", out, re.M)
    assert concurrency, out
    folder = tmp_path / "ray" / "console"
    assert "Started a local Ray instance" in (folder / "ray.log").read_text()
    table = out.split("study console: 2 done", 1)[1].splitlines()
    assert table[1].split()[:6] == ["trial", "design", "seed", "step", "FID@1", "FID@2"]
    assert {ln.split()[1] for ln in table[2:4]} == {"flow_matching", "meanflow"}
    assert all("40/40" in ln and "done" in ln for ln in table[2:4]), out
    assert len(out.splitlines()) < 40, out

    c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = c.get_experiment_by_name("console")
    runs = c.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("ablate_role") == "study")
    assert parent.data.tags["concurrency"] == concurrency.group(1)
    keys = set(parent.data.metrics)
    assert {"summary/flow_matching/fid/nfe_001", "summary/meanflow/fid/nfe_002", "summary/meanflow/fid_vs_nfe",
            "summary/meanflow/seeds", "summary/meanflow/rank"} <= keys, keys
    children = [r for r in runs if r.data.tags.get("ablate_role") == "trial"]
    assert len(children) == 2
    for r in children:
        assert r.data.params["data.name"] == "gaussian_mixture" and r.data.params["data.modes"] == "2"
        assert "preset" in r.data.tags and r.data.tags["base_preset"] == "flow_matching"

    assert main(argv) == 0  # restored: Tune unpickles the table's callback from tuner.pkl
    out = capsys.readouterr().out
    assert "study console: 2 done" in out and "Trial status" not in out, out
    assert len(c.get_metric_history(parent.info.run_id, "summary/meanflow/fid/nfe_001")) == 1  # not logged twice


def test_an_optuna_study_shows_the_trials_tune_samples_not_the_validation_corners():
    cfg = _cfg()
    cfg.search = {"mode": "optuna"}
    described = []

    def describe(over, seed):
        described.append((over, seed))
        return {**TRIALS[0], "key": f"sampled-s{seed}", "overrides": over, "seed": seed}

    c = Console(cfg, TRIALS, stream=io.StringIO(), tty=False, describe=describe)
    assert c.rows == {}
    sampled = SimpleNamespace(trial_id="t1", config={"design.target.jvp": "exact", "__trial_index__": 1},
                              status="RUNNING", last_result={}, error_file=None)
    c.trial_start(sampled)
    c.step_end([sampled])
    assert list(c.rows) == ["sampled-s1"] and described == [({"design.target.jvp": "exact"}, 1)]  # described once
