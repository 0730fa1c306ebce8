"""MLflow records of a study (DESIGN §5): an experiment per study, a parent run per study,
one child run per (design, seed).

Writes go through :func:`retry` because several trial processes share one
SQLite file, which answers "database is locked" under contention; nothing is
dropped, a write waits and tries again.
"""
from __future__ import annotations

import os
import random
import subprocess
import time
from pathlib import Path

from ablate.reporting import Reporter

DEFAULT_URI = "sqlite:///mlflow.db"


def tracking_uri(cfg_uri: str | None) -> str:
    """``tracking.uri``, else $MLFLOW_TRACKING_URI, else a SQLite file in the working directory."""
    uri = cfg_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())  # trials run in other folders
    return uri


def retry(fn, *args, attempts: int = 12, **kwargs):
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - only lock errors are retried
            if "locked" not in str(exc).lower() or i == attempts - 1:
                raise
            time.sleep(min(5.0, 0.05 * 2 ** i) * (0.5 + random.random()))


def mlflow_literal(value) -> str:
    """``value`` as a string literal of an MLflow filter string (``'...'``, or ``"..."`` when it holds a ``'``).

    MLflow's filter grammar has no escape inside a literal: a value holding both quote characters is refused
    rather than put into a filter whose meaning it could change.
    """
    value = str(value)
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"{value!r} cannot be written in an MLflow filter (it holds both ' and \")")


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def experiment_id(cl, name: str, artifact_location: str | None) -> str:
    exp = retry(cl.get_experiment_by_name, name)
    if exp is not None:
        return exp.experiment_id
    return retry(cl.create_experiment, name, artifact_location=artifact_location)


def parent_run(cl, exp_id: str, study: str, fresh: bool = False) -> str:
    """The study's parent run: reused on resume, a new one with ``fresh`` (the old one is kept, tagged)."""
    runs = retry(cl.search_runs, [exp_id],
                 filter_string=f"tags.ablate_role = 'study' and tags.study = {mlflow_literal(study)} "
                               "and tags.superseded = 'false'")
    if runs and not fresh:
        run_id = runs[0].info.run_id
        retry(cl.update_run, run_id, status="RUNNING")
        return run_id
    for r in runs:
        retry(cl.set_tag, r.info.run_id, "superseded", "true")
    run = retry(cl.create_run, exp_id, run_name=study,
                tags={"ablate_role": "study", "study": study, "superseded": "false", "git_commit": git_commit()})
    return run.info.run_id


def child_run(cl, exp_id: str, parent_id: str, key: str, name: str, tags: dict) -> tuple[str, str]:
    """(run id, status) of the child run for trial ``key``, created if absent: exactly one per (design, seed)."""
    runs = retry(cl.search_runs, [exp_id], filter_string=f"tags.`mlflow.parentRunId` = {mlflow_literal(parent_id)} "
                                                        f"and tags.trial_key = '{key}'")
    if runs:
        return runs[0].info.run_id, runs[0].info.status
    run = retry(cl.create_run, exp_id, run_name=name,
                tags={"mlflow.parentRunId": parent_id, "trial_key": key, "ablate_role": "trial", **tags})
    return run.info.run_id, "RUNNING"


class MlflowReporter(Reporter):
    """Metrics (step-indexed), params and artifacts of one trial into its child run.

    Metrics are held back until the checkpoint that covers their step is on
    disk (or the run ends): a run killed between checkpoints resumes from the
    last one and re-reports those steps, so nothing is ever recorded twice.
    """

    def __init__(self, uri: str, run_id: str):
        self.cl, self.run_id = client(uri), run_id
        self.pending: list = []

    def metrics(self, step, values, kind="train"):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, int(step)) for k, v in values.items()
                         if isinstance(v, (int, float))]

    def checkpoint(self, path, step):
        self.flush()

    def flush(self):
        for i in range(0, len(self.pending), 500):
            retry(self.cl.log_batch, self.run_id, metrics=self.pending[i:i + 500])
        self.pending = []

    def close(self):
        self.flush()

    def params(self, values):
        from mlflow.entities import Param

        existing = retry(self.cl.get_run, self.run_id).data.params
        ps = [Param(k, str(v)[:6000]) for k, v in values.items() if k not in existing]
        for i in range(0, len(ps), 100):
            retry(self.cl.log_batch, self.run_id, params=ps[i:i + 100])

    def artifact(self, path, kind="file"):
        retry(self.cl.log_artifact, self.run_id, str(path), kind)


def flat(prefix: str, mapping) -> dict:
    """``{prefix.key: value}`` for a nested mapping (e.g. the ``data`` section, logged as params ``data.*``)."""
    out = {}
    for key, value in (mapping or {}).items():
        if isinstance(value, dict) and value:
            out.update(flat(f"{prefix}.{key}", value))
        else:
            out[f"{prefix}.{key}"] = value
    return out
