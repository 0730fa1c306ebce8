"""Asynchronous checkpoints: training goes on while the last checkpoint is written.

:class:`Checkpointer` snapshots the state on the CPU (the only part that waits: a device-to-host copy,
or a copy of the CPU tensors the optimizer will change next), then writes it in a background thread,
atomically (``ablate.train.save_checkpoint``: temporary file, fsync, rename). At most one write is in
flight: a new checkpoint, an evaluation and the end of training wait for the one before. A finished
write is reported (``on_written``) from the training thread, never from the writer.

A crash loses no finished checkpoint: the previous file is replaced only by a complete one, and the
loop joins a write in flight on its way out, also on an error.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable

import torch


def snapshot(obj):
    """``obj`` (a state dict, nested dicts/lists of tensors and plain values) with every tensor copied to the
    CPU, so the copy no longer changes with training. CUDA tensors go through one blocking copy each."""
    if torch.is_tensor(obj):
        t = obj.detach()
        return t.to("cpu", copy=True) if t.device.type != "cpu" else t.clone()
    if isinstance(obj, dict):
        return type(obj)((k, snapshot(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj


class Checkpointer:
    """When to checkpoint (every ``every_steps`` steps and/or every ``every_s`` seconds of wall clock) and
    the background write with at most one in flight.

    ``write(path, state)`` does the writing (``ablate.train.save_checkpoint``); ``on_written(path, step)`` runs
    in the training thread once a write is complete (the reporters: MLflow, Tune).
    """

    def __init__(self, path: Path, write: Callable, on_written: Callable | None = None, *, every_steps: int = 0,
                 every_s: float = 0.0, total_steps: int | None = None, clock: Callable[[], float] = time.monotonic,
                 background: bool = True):
        self.path, self._write, self.on_written = Path(path), write, on_written
        self.every_steps, self.every_s, self.total_steps = int(every_steps or 0), float(every_s or 0.0), total_steps
        self.clock, self.background = clock, background
        self.last_time = clock()
        self._thread: threading.Thread | None = None
        self._step: int | None = None  # the step of the write in flight (or finished, not yet reported)
        self._error: BaseException | None = None
        self.written: list[int] = []  # steps whose checkpoint is complete on disk, in order

    # -- when ----------------------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        """A checkpoint is due after ``step`` by steps or wall clock (never at the last step: the loop's own
        final checkpoint follows). Also reports a write that finished meanwhile (no waiting)."""
        self.poll()
        if self.total_steps is not None and step >= self.total_steps:
            return False
        by_steps = self.every_steps and step % self.every_steps == 0
        by_clock = self.every_s and self.clock() - self.last_time >= self.every_s
        return bool(by_steps or by_clock)

    # -- writing -------------------------------------------------------------------------------------
    def save(self, state: dict, step: int, wait: bool = False) -> None:
        """Checkpoint ``state`` (taken at ``step``): waits for the write before, snapshots, writes in the
        background (``wait``: and waits for this one too, e.g. before an evaluation or at the end)."""
        self.wait()
        cpu_state = snapshot(state)
        self.last_time = self.clock()
        self._step = int(step)
        if self.background:
            self._thread = threading.Thread(target=self._run, args=(cpu_state,), name="ablate-checkpoint",
                                            daemon=False)
            self._thread.start()
        else:
            self._run(cpu_state)
        if wait:
            self.wait()

    def _run(self, state: dict) -> None:
        try:
            self._write(self.path, state)
        except BaseException as exc:  # noqa: BLE001 - raised in the training thread by wait()
            self._error = exc

    @property
    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def poll(self) -> None:
        """Report a write that has finished (raise its error); never waits."""
        if self._step is not None and not self.in_flight:
            self.wait()

    def wait(self) -> None:
        """Wait for the write in flight; raise its error, else report it (``on_written``)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            exc, self._error, self._step = self._error, None, None
            raise exc
        if self._step is not None:
            step, self._step = self._step, None
            self.written.append(step)
            if self.on_written is not None:
                self.on_written(self.path, step)

    def close(self) -> None:
        """On the way out after an error: let the write in flight complete (the file on disk is then whole and
        the newest), without reporting it or raising its own error over the one under way."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is None and self._step is not None:
            self.written.append(self._step)
        self._error, self._step = None, None
