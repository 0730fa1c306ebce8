"""One reporting interface for metrics and artifacts of a run.

The training loop and the evaluation only talk to a :class:`Reporter`. The
local one writes ``metrics.jsonl`` (a line per report) and ``metrics.csv`` into
the run folder; the sweep layer adds reporters for Tune and MLflow.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path


class Reporter:
    def metrics(self, step: int, values: dict[str, float], kind: str = "train") -> None: ...
    def params(self, values: dict) -> None: ...  # run-level facts (e.g. the provenance of every FID)
    def checkpoint(self, path: Path, step: int) -> None: ...  # a checkpoint was written (atomically) at step
    def artifact(self, path: Path, kind: str = "file") -> None: ...
    def close(self) -> None: ...


class LocalReporter(Reporter):
    """JSON lines + a long-format CSV (step, kind, key, value) in ``run_dir``.

    On resume, lines past the checkpoint's step are dropped first, so a crash
    between a checkpoint and the next one never duplicates records.
    """

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl, self.csv = self.dir / "metrics.jsonl", self.dir / "metrics.csv"
        if resume_step is not None:
            self._truncate(resume_step)
        elif self.jsonl.exists():
            self.jsonl.unlink()
            self.csv.unlink(missing_ok=True)
            (self.dir / "params.json").unlink(missing_ok=True)
        new_csv = not self.csv.exists()
        self._csv_fh = open(self.csv, "a", newline="")
        self._csv = csv.writer(self._csv_fh)
        if new_csv:
            self._csv.writerow(["step", "kind", "key", "value"])
        self._fh = open(self.jsonl, "a")

    def _truncate(self, step: int) -> None:
        if not self.jsonl.exists():
            return
        keep = [ln for ln in self.jsonl.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        self.jsonl.write_text("".join(k + "\n" for k in keep))
        rows = [["step", "kind", "key", "value"]]
        for ln in keep:
            rec = json.loads(ln)
            rows += [[rec["step"], rec["kind"], k, v] for k, v in rec["values"].items()]
        with open(self.csv, "w", newline="") as fh:
            csv.writer(fh).writerows(rows)

    def params(self, values):
        path = self.dir / "params.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**old, **values}, indent=2, sort_keys=True, default=str))

    def metrics(self, step, values, kind="train"):
        clean = {k: (float(v) if isinstance(v, (int, float)) and math.isfinite(v) else v) for k, v in values.items()}
        self._fh.write(json.dumps({"step": step, "kind": kind, "values": clean}) + "\n")
        self._fh.flush()
        for k, v in clean.items():
            self._csv.writerow([step, kind, k, v])
        self._csv_fh.flush()

    def close(self):
        self._fh.close()
        self._csv_fh.close()


class MultiReporter(Reporter):
    def __init__(self, *reporters: Reporter):
        self.reporters = [r for r in reporters if r is not None]

    def metrics(self, step, values, kind="train"):
        for r in self.reporters:
            r.metrics(step, values, kind)

    def artifact(self, path, kind="file"):
        for r in self.reporters:
            r.artifact(path, kind)

    def params(self, values):
        for r in self.reporters:
            r.params(values)

    def checkpoint(self, path, step):
        for r in self.reporters:
            r.checkpoint(path, step)

    def close(self):
        for r in self.reporters:
            r.close()
