"""Checkpoints are written in the background, by steps or by wall clock, and a crash loses none.

ablate/checkpointing.py; the loop's use of it in ablate/train.py.
"""
from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from ablate import train as train_mod
from ablate.checkpointing import Checkpointer, snapshot
from ablate.config import compose
from ablate.reporting import Reporter


def _slow_writer(gate: threading.Event, log: list):
    active = [0]

    def write(path, state):
        active[0] += 1
        log.append(("start", state["step"], active[0]))
        gate.wait(10)
        train_mod.save_checkpoint(path, state)
        log.append(("done", state["step"]))
        active[0] -= 1

    return write


def test_save_returns_while_the_write_goes_on_and_one_write_is_in_flight(tmp_path):
    gate, log, reported = threading.Event(), [], []
    ck = Checkpointer(tmp_path / "c.pt", _slow_writer(gate, log),
                      lambda p, s: reported.append((s, threading.current_thread().name, torch.load(p)["step"])))
    w = torch.zeros(3)
    ck.save({"step": 1, "w": w}, 1)
    assert ck.in_flight and not (tmp_path / "c.pt").exists()  # training goes on meanwhile
    w += 5  # the optimizer changes the weights in place: the checkpoint keeps the values it was given
    second = threading.Thread(target=ck.save, args=({"step": 2, "w": w}, 2))
    second.start()
    time.sleep(0.2)
    assert [e for e in log if e[0] == "start"] == [("start", 1, 1)]  # the second waits for the first
    gate.set()
    second.join(10)
    ck.wait()
    assert [e[:2] for e in log] == [("start", 1), ("done", 1), ("start", 2), ("done", 2)]
    assert max(e[2] for e in log if e[0] == "start") == 1  # never two writes at once
    assert [r[0] for r in reported] == [1, 2] and all(r[0] == r[2] for r in reported)  # reported once on disk
    assert torch.load(tmp_path / "c.pt")["w"].tolist() == [5.0, 5.0, 5.0]
    assert ck.written == [1, 2]


def test_the_snapshot_does_not_change_with_training():
    m = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(m.parameters())
    m(torch.ones(1, 2)).sum().backward()
    opt.step()
    state = snapshot({"model": m.state_dict(), "optimizer": opt.state_dict(), "n": 3, "betas": (0.9, 0.99)})
    before = {k: v.clone() for k, v in state["model"].items()}
    m(torch.ones(1, 2)).sum().backward()
    opt.step()
    assert all(torch.equal(before[k], state["model"][k]) for k in before)
    assert not torch.equal(state["model"]["weight"], m.weight)
    assert state["n"] == 3 and state["betas"] == (0.9, 0.99)
    assert state["optimizer"]["state"][0]["exp_avg"].data_ptr() != opt.state_dict()["state"][0]["exp_avg"].data_ptr()


def test_a_failed_write_is_raised_in_the_training_thread(tmp_path):
    def broken(path, state):
        raise OSError("disk full")

    ck = Checkpointer(tmp_path / "c.pt", broken)
    ck.save({"step": 1}, 1)
    with pytest.raises(OSError, match="disk full"):
        ck.wait()
    ck.save({"step": 2}, 2)
    with pytest.raises(OSError, match="disk full"):
        ck.save({"step": 3}, 3)  # the next checkpoint notices the one before failed


def test_checkpoints_are_due_by_steps_and_by_wall_clock():
    now = [0.0]
    ck = Checkpointer("unused.pt", lambda p, s: None, every_steps=5, every_s=60, total_steps=20, clock=lambda: now[0])
    assert [s for s in range(1, 21) if ck.due(s)] == [5, 10, 15]  # never at the last step: the loop's final one
    now[0] = 61.0
    assert ck.due(7)  # a minute since the last one
    ck.save({"step": 7}, 7)
    ck.wait()
    assert not ck.due(8)  # the clock restarts at every checkpoint
    now[0] = 122.0
    assert ck.due(8)
    off = Checkpointer("unused.pt", lambda p, s: None, every_steps=0, every_s=0, total_steps=20, clock=lambda: 1e9)
    assert not any(off.due(s) for s in range(1, 21))


def test_close_lets_the_write_in_flight_finish_without_reporting_it(tmp_path):
    gate, log, reported = threading.Event(), [], []
    ck = Checkpointer(tmp_path / "c.pt", _slow_writer(gate, log), lambda p, s: reported.append(s))
    ck.save({"step": 4}, 4)
    threading.Timer(0.2, gate.set).start()
    ck.close()
    assert torch.load(tmp_path / "c.pt")["step"] == 4 and reported == [] and ck.written == [4]


# -- in the training loop ---------------------------------------------------------------------------------
def _cfg(tmp_path, *overrides, name="run"):
    cfg, _ = compose("studies/toy_2d.yaml", [f"train.out_dir={tmp_path / name}", "sample.nfe=[]",
                                             "train.log_every=1", "eval.every=0", "eval.at_end=false",
                                             "design.preset=meanflow", "design.guidance=none", "train.seed=1",
                                             "design.backbone.width=32", "design.backbone.depth=1", *overrides])
    return cfg


class _Watch(Reporter):
    """Records, at every train record, which checkpoint is on disk, and every reported checkpoint; releases
    ``gate`` at step ``release_at`` and fails at step ``fail_at`` (releasing ``gate`` a moment later)."""

    def __init__(self, path, gate=None, release_at=None, fail_at=None):
        self.path, self.gate, self.release_at, self.fail_at = path, gate, release_at, fail_at
        self.on_disk: dict[int, int | None] = {}
        self.reported: list[tuple[int, int]] = []

    def metrics(self, step, values, kind="train"):
        self.on_disk[step] = torch.load(self.path)["step"] if self.path.exists() else None
        if step == self.release_at:
            self.gate.set()
        if step == self.fail_at:
            threading.Timer(0.3, self.gate.set).start()
            raise RuntimeError("the node went away")

    def checkpoint(self, path, step):
        self.reported.append((step, torch.load(path)["step"]))


def _held_saves(monkeypatch, steps: set, gate: threading.Event):
    """The checkpoint of each step in ``steps`` is written only once ``gate`` is set (at most 10 s later)."""
    real = train_mod.save_checkpoint

    def held(path, state):
        if state["step"] in steps:
            gate.wait(10)
        real(path, state)

    monkeypatch.setattr(train_mod, "save_checkpoint", held)


def test_training_goes_on_while_a_checkpoint_is_written(tmp_path, monkeypatch):
    gate = threading.Event()
    _held_saves(monkeypatch, {3}, gate)
    cfg = _cfg(tmp_path, "train.steps=8", "train.ckpt_every=3")
    watch = _Watch(tmp_path / "run" / "checkpoint.pt", gate, release_at=5)
    t0 = time.monotonic()
    run = train_mod.train(cfg, reporter=watch, progress=False)
    assert run.step == 8 and time.monotonic() - t0 < 60
    assert watch.on_disk[4] is None and watch.on_disk[5] is None  # steps 4, 5 trained while step 3 was written
    assert [s for s, _ in watch.reported] == [3, 6, 8]  # each reported once complete, in order
    assert all(s == on_disk for s, on_disk in watch.reported)
    assert torch.load(tmp_path / "run" / "checkpoint.pt")["step"] == 8


def test_a_wall_clock_interval_checkpoints_without_a_step_interval(tmp_path):
    cfg = _cfg(tmp_path, "train.steps=5", "train.ckpt_every=0", "train.ckpt_every_s=1e-9")
    watch = _Watch(tmp_path / "run" / "checkpoint.pt")
    train_mod.train(cfg, reporter=watch, progress=False)
    assert [s for s, _ in watch.reported] == [1, 2, 3, 4, 5]  # due after every step, and the final one


def test_a_crash_keeps_the_checkpoint_being_written_and_resumes_from_it(tmp_path, monkeypatch):
    full = _cfg(tmp_path, "train.steps=10", "train.ckpt_every=0", name="full")
    train_mod.train(full, progress=False)
    gate = threading.Event()
    _held_saves(monkeypatch, {6}, gate)
    cfg = _cfg(tmp_path, "train.steps=10", "train.ckpt_every=3")
    watch = _Watch(tmp_path / "run" / "checkpoint.pt", gate, fail_at=7)  # step 6's write is in flight
    with pytest.raises(RuntimeError, match="went away"):
        train_mod.train(cfg, reporter=watch, progress=False)
    assert watch.on_disk[7] == 3  # at the crash step 6 was still being written ...
    assert torch.load(tmp_path / "run" / "checkpoint.pt")["step"] == 6  # ... and finished on the way out
    assert not (tmp_path / "run" / "checkpoint.tmp").exists()
    monkeypatch.undo()
    run = train_mod.train(cfg, progress=False)  # the same command resumes
    assert run.step == 10

    def losses(d):
        rows = [json.loads(ln)["values"] for ln in (d / "metrics.jsonl").read_text().splitlines()]
        return [v["train/loss"] for v in rows if "train/loss" in v]  # (the run's cost is a line of its own)

    assert losses(tmp_path / "run") == losses(tmp_path / "full")
