"""A study knows its trial set: ``trials.json`` in the study's folder.

For every trial the record holds the settings that define its results (the resolved design's id, the data, every
``train.*`` and ``eval.*`` setting but the logging-only ones, :data:`TRAIN_LOGGING` and :data:`EVAL_LOGGING`), the
trial itself (overrides, seed, …) and the Tune experiment it runs in: ``.`` for the study's own experiment,
``race<k>`` for a racing round, ``extend<j>`` for trials a rerun added. Tune restores an experiment with the
parameter space it was started with, so a rerun that changes the study is checked against the record before
anything starts (:func:`check_rerun`, also in ``--dry-run``):

- a trial whose settings are unchanged is kept (its experiment is restored: finished trials stay as they are,
  unfinished ones continue);
- a new trial (more seeds, more designs, a new grid value: a key the record lacks) runs in a new experiment
  ``extend<j>`` inside the study's folder (:meth:`TrialBook.experiments`);
- a recorded trial whose settings changed under the same key (``train.steps=800`` on a study run with 400) is
  refused, naming the trials and the settings, with ``--fresh`` as the way out: exit 2, nothing started.

An Optuna study records its search (space, sampler, samples, seeds) and base settings the same way: an Optuna
search cannot be extended in place, so any change is refused.

Also here: the outcome of a trial that did not finish (:func:`close_unfinished`): failed (its error, also a
worker that died past ``search.max_failures``), stopped early by the scheduler, or interrupted — and the tag goes
once a rerun finishes the trial (:func:`clear_outcome`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ablate.config import ConfigError

RECORD = "trials.json"
VERSION = 1
#: train.* settings that change what is logged or where, not the results
TRAIN_LOGGING = ("out_dir", "log_every", "ckpt_every", "ckpt_every_s", "compile", "device")
#: eval.* settings that change what is written, not the metrics
EVAL_LOGGING = ("grids", "cache_dir")
ROUND0 = "."
EXTEND = "extend"


# -- what defines a trial's results -------------------------------------------------------------------
def settings(cfg: DictConfig, trial: dict) -> dict:
    """The settings that define ``trial``'s results under the study config ``cfg``."""
    from ablate.run import trial_config

    tc = trial_config(cfg, trial["overrides"], int(trial["seed"]))
    c = OmegaConf.to_container(tc, resolve=True)
    train = {k: v for k, v in c["train"].items() if k not in TRAIN_LOGGING}
    if float(cfg.resources.gpus_per_trial) > 1:  # run_trial trains data parallel, one rank per GPU
        train["world_size"] = int(cfg.resources.gpus_per_trial)
    return {"design_id": trial["design_id"], "data": c["data"], "train": train,
            "eval": {k: v for k, v in c["eval"].items() if k not in EVAL_LOGGING}}


def optuna_settings(cfg: DictConfig) -> dict:
    """What an Optuna study is: its search and the settings every sampled trial starts from."""
    s = OmegaConf.to_container(cfg.search, resolve=True)
    c = OmegaConf.to_container(cfg, resolve=True)
    return {"search": {k: s.get(k) for k in ("space", "num_samples", "sampler", "sampler_seed", "seeds", "objective")},
            "design": c["design"], "data": c["data"],
            "train": {k: v for k, v in c["train"].items() if k not in TRAIN_LOGGING + ("seed",)},
            "eval": {k: v for k, v in c["eval"].items() if k not in EVAL_LOGGING}}


NOT_SET = "(not set)"


def diff(old, new, prefix: str = "", defaults: dict | None = None) -> list[tuple[str, object, object]]:
    """(dotted key, old value, new value) for every leaf that differs between two nested mappings. A key only one
    side has (a setting added to the platform since the record was written) differs only when its value is not
    its default in ``defaults`` (base.yaml's values, by the same dotted keys)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in list(dict.fromkeys([*old, *new])):
            a, b = old.get(k, NOT_SET), new.get(k, NOT_SET)
            if (a is NOT_SET) != (b is NOT_SET) and defaults is not None:
                default = _lookup(defaults, f"{prefix}{k}")
                if default is not NOT_SET and _same(b if a is NOT_SET else a, default):
                    continue
            out += diff(a, b, f"{prefix}{k}.", defaults)
        return out
    return [] if _same(old, new) else [(prefix.rstrip("."), old, new)]


def _lookup(tree: dict, dotted: str):
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return NOT_SET
        node = node[part]
    return node


def _defaults() -> dict:
    from ablate.config import base_config

    return OmegaConf.to_container(base_config(), resolve=False)


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


# -- the record ------------------------------------------------------------------------------------------
def _remote(root: str) -> bool:
    return "://" in root


def _read(root: str, name: str, filename: str) -> str | None:
    if _remote(root):
        from pyarrow import fs as pafs

        from ablate.run import _fs

        filesystem, path = _fs(root, name)
        if filesystem.get_file_info(f"{path}/{filename}").type != pafs.FileType.File:
            return None
        with filesystem.open_input_stream(f"{path}/{filename}") as fh:
            return fh.read().decode("utf-8", "replace")
    f = Path(root) / name / filename
    if f.is_symlink():
        from ablate.run import StudyStateError

        raise StudyStateError(f"{f} is a symbolic link: refusing to read the study's trial record from it")
    return f.read_text(errors="replace") if f.is_file() else None


def tune_state_exists(root: str, name: str) -> bool:
    """Whether the study's folder holds a Tune experiment (its ``tuner.pkl``)."""
    if _remote(root):
        from pyarrow import fs as pafs

        from ablate.run import _fs

        filesystem, path = _fs(root, name)
        return filesystem.get_file_info(f"{path}/tuner.pkl").type == pafs.FileType.File
    return (Path(root) / name / "tuner.pkl").exists()


class TrialBook:
    """The study's trial record (``trials.json``) and the Tune experiments its trials run in."""

    def __init__(self, root: str, name: str, mode: str, data: dict | None = None):
        self.root, self.name, self.mode = str(root), name, mode
        self.data = data or {"platform": "ablate", "study": name, "version": VERSION, "mode": mode, "trials": {}}
        self.opened: set[str] = set()  # experiments fitted by this run of the study

    @property
    def trials(self) -> dict:
        return self.data["trials"]

    @classmethod
    def load(cls, root: str, name: str) -> "TrialBook | None":
        """The record of study ``name`` under ``root``, None when there is none; a malformed one is refused."""
        from ablate.run import StudyStateError

        text = _read(str(root), name, RECORD)
        if text is None:
            return None
        where = f"{root}/{name}/{RECORD}"
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise StudyStateError(f"{where} is not valid JSON ({exc}): the study's trial record is damaged; rerun "
                                  f"with --fresh to start over") from None
        if (not isinstance(data, dict) or data.get("platform") != "ablate" or data.get("study") != name
                or not isinstance(data.get("trials"), dict) or data.get("mode") not in ("grid", "optuna")):
            raise StudyStateError(f"{where} is not the trial record of study {name!r}: rerun with --fresh to start "
                                  f"over, or choose another name")
        return cls(root, name, data["mode"], data)

    def save(self) -> None:
        text = json.dumps(self.data, indent=1, sort_keys=True, default=str)
        if _remote(self.root):
            from ablate.run import _fs

            filesystem, path = _fs(self.root, self.name)
            filesystem.create_dir(path, recursive=True)
            with filesystem.open_output_stream(f"{path}/{RECORD}") as fh:
                fh.write(text.encode())
            return
        folder = Path(self.root) / self.name
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{RECORD}.tmp{os.getpid()}"
        tmp.write_text(text)
        os.replace(tmp, folder / RECORD)

    # -- where trials run ----------------------------------------------------------------------------
    def locate(self, experiment: str) -> tuple[str, str]:
        """(Tune storage path, experiment name) of a recorded experiment."""
        return (self.root, self.name) if experiment == ROUND0 else (f"{self.root}/{self.name}", experiment)

    def _next_extension(self) -> str:
        used = {r["experiment"] for r in self.trials.values()} | self.opened
        n = [int(e[len(EXTEND):]) for e in used if e.startswith(EXTEND) and e[len(EXTEND):].isdigit()]
        return f"{EXTEND}{max(n, default=0) + 1}"

    def experiments(self, cfg: DictConfig, k: int, round_trials: list[dict], restorable: bool):
        """The Tune experiments that run round ``k`` (0: the study's trials; k ≥ 1: a racing round):
        [(storage path, experiment name, its trials, restore?)]. Recorded trials run in the experiment they
        were recorded in (restored when ``restorable``, each experiment once per run of the study); trials the
        record lacks are recorded in a new experiment (the round's own when it has none yet) before it starts."""
        from ablate.race import round_dir

        own = ROUND0 if k == 0 else round_dir(self.root, self.name, k)[1]
        if self.mode == "optuna":
            if "search" not in self.data:
                self.data["search"] = optuna_settings(cfg)
                self.save()
            self.opened.add(own)
            return [(*self.locate(own), [], restorable)]
        out = []
        kept = [t for t in round_trials if t["key"] in self.trials]
        for exp in dict.fromkeys(self.trials[t["key"]]["experiment"] for t in kept):
            if exp in self.opened:
                continue
            self.opened.add(exp)
            group = [r["trial"] for r in self.trials.values() if r["experiment"] == exp]
            out.append((*self.locate(exp), group, restorable))
        new = [t for t in round_trials if t["key"] not in self.trials]
        if new:
            used = {r["experiment"] for r in self.trials.values()} | self.opened
            exp = own if own not in used else self._next_extension()
            for t in new:
                if exp.startswith(EXTEND):
                    t.setdefault("reason", f"added by a rerun ({exp})")
                self.trials[t["key"]] = {"experiment": exp, "trial": t, "settings": settings(cfg, t)}
            self.save()  # before Tune starts: a study killed now still knows these trials
            self.opened.add(exp)
            out.append((*self.locate(exp), new, False))
        return out


# -- a rerun -----------------------------------------------------------------------------------------------
class TrialSetChanged(ValueError):
    """A rerun whose trials do not match the study's record: one message (exit 2), nothing started."""

    def __init__(self, head: str, lines: list[tuple[str, str]] = (), advice: str = ""):
        self.head, self.lines, self.advice = head, list(lines), advice
        body = "".join(f"\n  - {k}: {m}" for k, m in self.lines)
        super().__init__(f"{head}{body}" + (f"\n  {advice}" if advice else ""))


class RerunPlan:
    """What a rerun does with the recorded trials: ``kept`` (unchanged), ``new`` (to run), ``dropped`` (recorded,
    no longer in the study's set: their records stay)."""

    def __init__(self, kept=(), new=(), dropped=(), recorded: bool = False):
        self.kept, self.new, self.dropped, self.recorded = list(kept), list(new), list(dropped), recorded

    def status(self, key: str) -> str:
        return "kept" if key in self.kept else "new"

    def line(self) -> str | None:
        if not self.recorded:
            return None
        s = f"rerun: {len(self.kept)} recorded trials kept as they are, {len(self.new)} new"
        if self.new:
            s += " (run in a new Tune experiment inside the study's folder)"
        if self.dropped:
            s += (f"; {len(self.dropped)} recorded trials are no longer in the study's set "
                  f"({', '.join(self.dropped[:3])}{', …' if len(self.dropped) > 3 else ''}): their records stay")
        return s


def check_rerun(cfg: DictConfig, trials: list[dict], root: str, name: str, state: str, source: str,
                describe) -> RerunPlan:
    """Compare the study's trials with its record (a study folder this platform marked: ``state == 'ours'``).

    Raises :class:`TrialSetChanged` (exit 2, before anything starts) for recorded trials whose settings changed, for
    a changed Optuna search, and for a study folder with Tune state but no record. ``describe(overrides, seed)``
    describes a trial under ``cfg`` (for the trials racing added, which are not in ``trials``)."""
    keys = [t["key"] for t in trials]
    if state != "ours":
        return RerunPlan(new=keys)
    book = TrialBook.load(root, name)
    fresh = "rerun with --fresh to start the study over (its MLflow runs are kept, superseded), or give it another name"
    if book is None:
        if tune_state_exists(root, name):
            raise TrialSetChanged(f"{root}/{name} holds a study started before studies recorded their trial set "
                                  f"({RECORD}): which settings its trials ran with is unknown, so it is not "
                                  f"restored; {fresh}")
        return RerunPlan(new=keys)
    mode = str(cfg.search.mode)
    if book.mode != mode:
        raise TrialSetChanged(f"study {name} ran as a {book.mode} search, now search.mode is {mode}: {fresh}")
    if mode == "optuna":
        changes = diff(book.data.get("search", optuna_settings(cfg)), optuna_settings(cfg), defaults=_defaults())
        if changes:
            raise TrialSetChanged(f"the Optuna search of study {name} changed since it started:",
                                  [(k, f"{_show(a)} → {_show(b)}") for k, a, b in changes],
                                  f"an Optuna search restores as it was started and cannot be extended in place: "
                                  f"{fresh}")
        return RerunPlan(kept=keys, recorded=True)
    changed: dict[tuple, list[str]] = {}
    kept, new, defaults = [], [], _defaults()
    for t in trials:
        rec = book.trials.get(t["key"])
        if rec is None:
            new.append(t["key"])
            continue
        d = diff(rec["settings"], settings(cfg, t), defaults=defaults)
        for k, a, b in d:
            changed.setdefault((k, _show(a), _show(b)), []).append(t["key"])
        if not d:
            kept.append(t["key"])
    current, dropped = set(keys), []
    for key, rec in book.trials.items():
        if key in current:
            continue
        if not str(rec.get("experiment", "")).startswith("race"):
            dropped.append(key)
            continue
        rt = rec["trial"]
        try:  # a raced trial: still this key under the new settings? then its settings must match too
            again = describe(rt["overrides"], int(rt["seed"]))
        except (ConfigError, KeyError, TypeError, ValueError):
            dropped.append(key)
            continue
        if again["key"] != key:
            dropped.append(key)
            continue
        for k, a, b in diff(rec["settings"], settings(cfg, again), defaults=defaults):
            changed.setdefault((k, _show(a), _show(b)), []).append(key)
    if changed:
        lines = []
        for (k, a, b), ks in changed.items():
            shown = ", ".join(ks[:4]) + (f", … ({len(ks)} in all)" if len(ks) > 4 else "")
            lines.append((k, f"{a} → {b} for {len(ks)} recorded trial{'s' * (len(ks) != 1)} ({shown})"))
        raise TrialSetChanged(f"study {name} ran these trials with other settings under the same trial keys:", lines,
                              f"a rerun keeps recorded trials as they are, so the change would be silently ignored: "
                              f"{fresh}")
    return RerunPlan(kept, new, dropped, recorded=True)


def _show(v) -> str:
    return json.dumps(v, default=str) if not isinstance(v, str) else v


# -- trials that did not finish ---------------------------------------------------------------------------
OUTCOME_TAGS = ("stopped", "outcome")


def outcomes(grid, key_of) -> dict[str, dict]:
    """trial key -> {"status": Tune's status, "error": text or "", "step": last step} for the trials of a fitted
    Tune experiment (``grid``: its ResultGrid; ``key_of(config)``: the trial key of a trial's config)."""
    out = {}
    analysis = getattr(grid, "_experiment_analysis", None)
    for trial in getattr(analysis, "trials", None) or []:
        try:
            key = key_of(trial.config)
        except Exception:  # noqa: BLE001 - a trial this study cannot name: nothing to tag
            key = None
        if not key:
            continue
        error = ""
        if trial.status == "ERROR":
            try:
                exc = trial.get_error()
            except Exception:  # noqa: BLE001
                exc = None
            if isinstance(exc, str):  # Tune keeps the error as the text of its traceback: its last line says it
                error = next((ln.strip() for ln in reversed(exc.splitlines()) if ln.strip()), "") or exc
            else:
                error = f"{type(exc).__name__}: {exc}" if exc is not None else "the trial's worker failed"
        last = trial.last_result or {}
        out[key] = {"status": str(trial.status), "error": error, "step": last.get("step"),
                    "failures": getattr(trial, "num_failures", 0)}
    return out


def close_unfinished(cl, exp_id: str, parent_id: str, found: dict | None, max_failures: int, total: int) -> None:
    """Child runs still RUNNING after a Tune experiment: FAILED with the error when the trial failed (a crash past
    ``search.max_failures`` included), KILLED and tagged ``stopped`` when the scheduler stopped it early, KILLED and
    tagged interrupted otherwise (the study ended or was interrupted before it finished; a rerun continues it)."""
    from ablate import tracking
    from ablate.tracking import mlflow_literal

    runs = tracking.retry(cl.search_runs, [exp_id], filter_string=f"tags.`mlflow.parentRunId` = "
                                                                 f"{mlflow_literal(parent_id)} "
                                                                 "and attributes.status = 'RUNNING'")
    for r in runs:
        o = (found or {}).get(r.data.tags.get("trial_key", ""))
        rid = r.info.run_id
        if o is not None and o["status"] == "ERROR":
            tries = f" after {o['failures']} attempts (search.max_failures={max_failures})" if o["failures"] else ""
            if not r.data.tags.get("error"):
                tracking.retry(cl.set_tag, rid, "error", f"the trial failed{tries}: {o['error']}"[:5000])
            tracking.retry(cl.set_tag, rid, "outcome", "failed")
            _drop(cl, rid, "stopped")
            tracking.retry(cl.set_terminated, rid, status="FAILED")
            continue
        at = f" at step {o['step']} of {total}" if o is not None and o.get("step") is not None else ""
        if o is not None and o["status"] == "TERMINATED":
            tracking.retry(cl.set_tag, rid, "stopped", f"early stopping by the scheduler{at}")
            tracking.retry(cl.set_tag, rid, "outcome", "stopped")
        else:
            tracking.retry(cl.set_tag, rid, "stopped", f"interrupted{at}: the study ended before this trial "
                                                       f"finished; the same command continues it")
            tracking.retry(cl.set_tag, rid, "outcome", "interrupted")
        tracking.retry(cl.set_terminated, rid, status="KILLED")


def _drop(cl, run_id: str, tag: str) -> None:
    from ablate import tracking

    try:
        tracking.retry(cl.delete_tag, run_id, tag)
    except Exception:  # noqa: BLE001 - a tag that is not there
        pass


def clear_outcome(cl, run_id: str) -> None:
    """A trial that finished (on a rerun): no stale 'stopped'/'interrupted'/'failed' tags; an earlier error is
    kept as ``earlier_error``."""
    from ablate import tracking

    tags = tracking.retry(cl.get_run, run_id).data.tags
    if tags.get("error"):
        tracking.retry(cl.set_tag, run_id, "earlier_error", tags["error"])
        _drop(cl, run_id, "error")
    for tag in OUTCOME_TAGS:
        if tag in tags:
            _drop(cl, run_id, tag)
