"""What ``python -m ablate.run`` shows while a study runs: one table of its trials.

    study design_space: 3 done, 2 running, 13 pending, 0 failed · 4m12s elapsed · ETA ~14m
    trial                 design         seed  step      FID@1  FID@2  FID@4  FID@16  status   ETA
    3f9c0a5e12b4-s0       meanflow       0     800/800   9.91   9.02   8.77   8.60    done
    51d2b7c0e6aa-s0       sct            0     350/800   31.2   28.4   27.9   —       running  ~2m40s
    …

On a terminal the table is redrawn in place (about once a second); otherwise (a CI log, a pipe) it prints a
line when a trial starts, finishes or fails, the running trials every minute, and the whole table when a
round of the study ends. Step and FID come from each trial's ``metrics.jsonl`` (the study's trial folders,
read as they grow) and from the results Tune receives.

Ray's own output — its log records, the Tune reporter's tables, the hints it prints — goes to ``ray.log`` in
the study folder unless ``--verbose``. Tune calls :class:`Relay` (a ``ray.tune.Callback`` without state, so it
survives in the experiment's ``tuner.pkl`` and a restored study reports to the console of the command that
restores it); a console error never reaches Tune: it is written to ``ray.log`` and the table goes quiet.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

#: the console Tune's callbacks report to (one study at a time per process)
_ACTIVE: "Console | None" = None

STATUS_WORDS = {"PENDING": "pending", "RUNNING": "running", "PAUSED": "paused", "TERMINATED": "done",
                "ERROR": "failed"}
_ORDER = {"running": 0, "paused": 1, "failed": 2, "stopped": 3, "done": 4, "recorded": 4, "pending": 5}


def duration(seconds: float | None) -> str:
    """``45s``, ``3m05s``, ``2h04m``; '' for unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return ""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _fid(v) -> str:
    if v is None:
        return "—"
    try:
        v = float(v)
    except (TypeError, ValueError):
        return "—"
    return f"{v:.4g}" if math.isfinite(v) else str(v)


@dataclass
class Row:
    """One trial as the table shows it."""

    key: str
    label: str
    seed: int
    total: int
    status: str = "pending"
    step: int = 0
    fids: dict = field(default_factory=dict)  # NFE -> latest FID
    speed: float | None = None  # train/steps_per_s, the trial's own measure (training only)
    seen: list = field(default_factory=list)  # (driver time, step) when a new step was first seen
    error: str = ""
    offset: int = 0  # bytes of metrics.jsonl read so far

    def observe(self, now: float, step: int) -> None:
        if step != self.step or not self.seen:
            if self.seen and step < self.seen[-1][1]:  # a resumed trial starts again from its checkpoint
                self.seen = []
            self.seen.append((now, step))
            del self.seen[1:-1]  # the first and the latest observation are all the rate needs
        self.step = step

    def rate(self) -> float | None:
        """Steps per second of wall time (evaluation included) since it was first seen, else its own speed."""
        if len(self.seen) == 2:
            (t0, s0), (t1, s1) = self.seen
            if t1 > t0 and s1 > s0:
                return (s1 - s0) / (t1 - t0)
        return self.speed if self.speed and self.speed > 0 else None

    def eta(self) -> float | None:
        if self.status != "running":
            return None
        r = self.rate()
        return max(0, self.total - self.step) / r if r else None

    @property
    def finished(self) -> bool:
        return self.status in ("done", "recorded", "stopped", "failed")


class Console:
    """The live table of one study (see the module docstring); ``with console:`` keeps Ray's output in ray.log."""

    def __init__(self, cfg, trials: list[dict], trials_dir=None, log_path=None, verbose: bool = False,
                 describe=None, stream=None, tty: bool | None = None, clock=time.monotonic, every: float = 60.0,
                 redraw: float = 1.0):
        self.name = str(cfg.name)
        self.nfes = [int(n) for n in cfg.eval.nfe]
        self.total = int(cfg.train.steps)
        self.res = cfg.resources
        self.trials_dir = Path(trials_dir) if trials_dir is not None else None
        self.log_path = Path(log_path) if log_path is not None else None
        self.verbose = verbose
        self.describe = describe  # (overrides, seed) -> trial dict, for trials Tune samples (optuna)
        self.stream = stream if stream is not None else sys.stdout
        if tty is None:
            tty = bool(getattr(self.stream, "isatty", lambda: False)()) and os.environ.get("TERM") != "dumb"
        self.tty = tty and not verbose  # with --verbose, Ray prints too: plain lines, never redrawn in place
        self.clock, self.every, self.redraw = clock, every, redraw
        self.rows: dict[str, Row] = {}
        from omegaconf import OmegaConf

        if str(OmegaConf.select(cfg, "search.mode", default="grid")) != "grid":
            trials = []  # optuna: the designs are sampled as it goes (the list holds the space's validation corners)
        self.labels = _labels(trials)
        for t in trials:
            self._row(t)
        self._ids: dict[str, str] = {}  # Tune trial id -> trial key
        self._t0 = clock()
        self._last_draw = self._last_plain = -math.inf
        self._drawn = 0  # lines of the table on screen (in place)
        self._failures = 0
        self._lock = threading.RLock()
        self._saved: dict = {}
        self._log = None

    # -- rows ----------------------------------------------------------------------------------------
    def _row(self, t: dict) -> Row:
        key = str(t["key"])
        if key not in self.rows:
            over = t.get("overrides") or {}
            design = f"{t.get('slug')} [{t['variant']}]" if t.get("variant") else str(t.get("slug"))
            label = self.labels.get(design) or t.get("preset") or str(t.get("slug") or key)
            self.rows[key] = Row(key, label, int(t.get("seed", 0)), int(over.get("train.steps", self.total)))
        return self.rows[key]

    def _trial_row(self, trial) -> Row | None:
        tid = getattr(trial, "trial_id", None)
        if tid in self._ids:
            return self.rows.get(self._ids[tid])
        config = getattr(trial, "config", None) or {}
        if isinstance(config.get("trial"), dict):
            t = config["trial"]
        elif self.describe is not None:  # a sampled design (optuna): described once per Tune trial
            over = {k: v for k, v in config.items() if not str(k).startswith("__")}
            t = self.describe(over, int(config.get("__trial_index__", 0)))
        else:
            return None
        row = self._row(t)
        self._ids[tid] = row.key
        return row

    def _sync(self, trial, row: Row | None = None, result: dict | None = None) -> Row | None:
        row = row or self._trial_row(trial)
        if row is None:
            return None
        status = STATUS_WORDS.get(str(getattr(trial, "status", "")), row.status)
        result = result if result is not None else (getattr(trial, "last_result", None) or {})
        if result:
            self._take(row, result)
        if status == "done" and result.get("already_finished"):
            status = "recorded"
        elif status == "done" and row.step < row.total:
            status = "stopped"  # early stopping (ASHA)
        row.status = status
        return row

    def _take(self, row: Row, values: dict) -> None:
        for n in self.nfes:
            if f"fid/nfe_{n}" in values:
                row.fids[n] = values[f"fid/nfe_{n}"]
        if isinstance(values.get("train/steps_per_s"), (int, float)):
            row.speed = float(values["train/steps_per_s"])
        if isinstance(values.get("step"), (int, float)) and int(values["step"]) >= row.step:
            row.observe(self.clock(), int(values["step"]))

    def _poll(self, row: Row) -> None:
        """New lines of the trial's metrics.jsonl (its step, FIDs and speed as soon as they are written)."""
        if self.trials_dir is None:
            return
        path = self.trials_dir / row.key / "metrics.jsonl"
        try:
            size = path.stat().st_size
            if size < row.offset:  # truncated: the trial resumed from a checkpoint
                row.offset = 0
            if size == row.offset:
                return
            with open(path, "rb") as fh:
                fh.seek(row.offset)
                chunk = fh.read(size - row.offset)
        except OSError:
            return
        end = chunk.rfind(b"\n") + 1  # whole lines only; a line being written is read next time
        row.offset += end
        for line in chunk[:end].splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            values = rec.get("values") or {}
            self._take(row, {**values, "step": rec.get("step", row.step)} if rec.get("kind") == "train"
                       else {k: v for k, v in values.items() if k.startswith("fid/")})
            if rec.get("kind") != "train" and isinstance(rec.get("step"), int):
                row.observe(self.clock(), max(row.step, rec["step"]))

    # -- Tune's events (through Relay) ----------------------------------------------------------------
    def trial_start(self, trial) -> None:
        row = self._sync(trial)
        if row is not None:
            row.status = "running"
            row.observe(self.clock(), row.step)
            self._event(row, "started")

    def trial_result(self, trial, result: dict) -> None:
        row = self._trial_row(trial)
        if row is not None:
            self._take(row, result)
            if result.get("already_finished"):
                row.status = "recorded"

    def trial_complete(self, trial) -> None:
        row = self._sync(trial)
        if row is not None:
            if row.status not in ("recorded", "stopped"):
                row.status = "done" if row.step >= row.total else "stopped"
            self._poll(row)
            self._event(row, {"done": "finished", "recorded": "finished before (kept)",
                              "stopped": "stopped early"}.get(row.status, row.status))

    def trial_error(self, trial) -> None:
        row = self._sync(trial)
        if row is not None:
            row.status = "failed"
            row.error = _last_line(getattr(trial, "error_file", None))
            self._event(row, "failed")

    def step_end(self, trials) -> None:
        now = self.clock()
        if now - self._last_draw < (self.redraw if self.tty else min(self.redraw, self.every)):
            return
        for trial in trials or []:
            self._sync(trial)
        for row in self.rows.values():
            if row.status == "running":
                self._poll(row)
        self.refresh()

    def experiment_end(self, trials) -> None:
        for trial in trials or []:
            self._sync(trial)
        for row in self.rows.values():
            self._poll(row)
        if self.tty:
            self.refresh(force=True)
            self._drawn = 0  # the table stays as it is; whatever is printed next goes below it
        else:
            self._write(self.table(all_rows=True))
        self._last_plain = self.clock()

    # -- output -------------------------------------------------------------------------------------
    def started(self, concurrency: int, slots: int, n_trials: int | None = None) -> None:
        """The study's concurrency, as launch computed it (Ray's free slots and resources.max_concurrent)."""
        limit = int(self.res.max_concurrent or 0)
        n = n_trials if n_trials is not None else len(self.rows)
        why = (f"resources.max_concurrent is {limit}" if limit and limit <= slots else
               f"Ray has room for {slots}: {self.res.cpus_per_trial} CPU"
               + (f", {self.res.gpus_per_trial} GPU" if float(self.res.gpus_per_trial) else "") + " per trial")
        lines = [f"running {n} trials, {concurrency} at a time ({why})"]
        if self.log_path is not None and not self.verbose:
            lines.append(f"Ray's own output: {self.log_path} (--verbose shows it here)")
        self._write(lines)

    def _event(self, row: Row, what: str) -> None:
        if self.tty:
            self.refresh(force=True)
            return
        fids = "  ".join(f"FID@{n} {_fid(row.fids.get(n))}" for n in self.nfes if n in row.fids)
        extra = f"  {fids}" if fids and what not in ("started",) else ""
        err = f": {row.error}" if row.error else ""
        self._write([f"[{duration(self.clock() - self._t0):>6}] {what} {row.key}  {row.label}  seed {row.seed}"
                     f"{extra}{err}"])

    def counts(self) -> dict:
        out = {"done": 0, "running": 0, "pending": 0, "failed": 0}
        for r in self.rows.values():
            key = "done" if r.status in ("done", "recorded", "stopped") else r.status
            out[key] = out.get(key, 0) + 1
        return out

    def study_eta(self) -> float | None:
        running = [r for r in self.rows.values() if r.status == "running"]
        speed = sum(r.rate() or 0 for r in running)
        left = sum(max(0, r.total - r.step) for r in self.rows.values() if r.status in ("running", "pending", "paused"))
        if not left:
            return 0.0 if self.rows and all(r.finished for r in self.rows.values()) else None
        return left / speed if speed > 0 else None

    def header(self) -> str:
        c = self.counts()
        eta = self.study_eta()
        words = ", ".join(f"{v} {k}" for k, v in c.items() if v or k in ("done", "running", "pending"))
        eta_text = f" · ETA ~{duration(eta)}" if eta else ""
        return f"study {self.name}: {words} · {duration(self.clock() - self._t0) or '0s'} elapsed{eta_text}"

    def table(self, all_rows: bool = False, only_running: bool = False, height: int | None = None) -> list[str]:
        cols = ["trial", "design", "seed", "step", *[f"FID@{n}" for n in self.nfes], "status", "ETA"]
        rows = list(self.rows.values())
        if only_running:
            rows = [r for r in rows if r.status == "running"]
        hidden = 0
        if not all_rows and height is not None and len(rows) > max(1, height - 3):
            keep = max(1, height - 4)
            shown = sorted(rows, key=lambda r: _ORDER.get(r.status, 9))[:keep]  # running first, pending last
            hidden, rows = len(rows) - len(shown), shown
        body = [[r.key, _clip(r.label, 36), str(r.seed), f"{r.step}/{r.total}",
                 *[_fid(r.fids.get(n)) for n in self.nfes], r.status,
                 ("~" + duration(r.eta())) if r.eta() is not None else ""] for r in rows]
        widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(cols)]
        fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        lines = [self.header(), fmt(cols), *(fmt(b) for b in body)]
        if hidden:
            lines.append(f"… {hidden} more ({', '.join(f'{v} {k}' for k, v in self.counts().items() if v)})")
        return lines

    def refresh(self, force: bool = False) -> None:
        now = self.clock()
        if self.tty:
            if force or now - self._last_draw >= self.redraw:
                size = shutil.get_terminal_size((120, 40))
                self._draw([ln[:size.columns - 1] for ln in self.table(height=size.lines)])
                self._last_draw = now
        elif force or now - self._last_plain >= self.every:
            if any(r.status == "running" for r in self.rows.values()):
                self._write(self.table(only_running=True))
            self._last_plain = self._last_draw = now
        else:
            self._last_draw = now

    def _draw(self, lines: list[str]) -> None:
        with self._lock:
            up = f"\x1b[{self._drawn}F" if self._drawn else ""
            self.stream.write(up + "\x1b[J" + "".join(ln + "\n" for ln in lines))
            self.stream.flush()
            self._drawn = len(lines)

    def _write(self, lines: list[str]) -> None:
        with self._lock:
            if self.tty and self._drawn:  # below the table drawn in place: redraw it under the new lines
                self.stream.write(f"\x1b[{self._drawn}F\x1b[J")
                self._drawn = 0
            self.stream.write("".join(ln + "\n" for ln in lines))
            self.stream.flush()

    def failed(self, where: str, exc: BaseException) -> None:
        """A console error: logged, never raised into Tune; after three the table goes quiet."""
        self._failures += 1
        logging.getLogger("ablate.console").warning("console %s failed: %r", where, exc, exc_info=exc)
        if self._failures >= 3:
            self._detach()

    # -- Ray's output into ray.log ---------------------------------------------------------------------
    @property
    def ray_verbosity(self) -> int:
        """Tune's own verbosity: 0 (its reporter prints nothing) unless --verbose (1: today's Tune output)."""
        return 1 if self.verbose else 0

    def callbacks(self) -> list:
        return [__getattr__("Relay")()]

    def __enter__(self) -> "Console":
        global _ACTIVE
        _ACTIVE = self
        if self.verbose or self.log_path is None:
            return self
        import ray  # noqa: F401  (configures the "ray" logger, whose handlers are replaced below)

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "a", buffering=1, encoding="utf-8", errors="replace")
        self._log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} python -m ablate.run: study {self.name} ===\n")
        handler = logging.StreamHandler(self._log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self._saved["env"] = {k: os.environ.get(k) for k in ("RAY_AIR_NEW_OUTPUT",)}
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # Tune's older reporter: at verbosity 0 it prints nothing at all
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # the report's downloads
        self._saved["loggers"] = []
        names = ["ray", "ablate.console"] + [n for n, lg in logging.root.manager.loggerDict.items()
                                             if n.startswith("ray.") and isinstance(lg, logging.Logger)
                                             and lg.handlers]
        for name in names:
            lg = logging.getLogger(name)
            self._saved["loggers"].append((lg, list(lg.handlers), lg.propagate, lg.level))
            lg.handlers = [handler]
            lg.propagate = False
            if name == "ablate.console":
                lg.setLevel(logging.INFO)
        self._saved["streams"] = (sys.stdout, sys.stderr)
        sys.stdout = _RayFilter(sys.stdout, self._log)
        sys.stderr = _RayFilter(sys.stderr, self._log)
        return self

    def __exit__(self, *exc) -> None:
        self._detach()
        if self.tty and self._drawn:
            self._drawn = 0

    def _detach(self) -> None:
        global _ACTIVE
        if _ACTIVE is self:
            _ACTIVE = None
        if "streams" in self._saved:
            out, err = self._saved.pop("streams")
            if isinstance(sys.stdout, _RayFilter):
                sys.stdout = out
            if isinstance(sys.stderr, _RayFilter):
                sys.stderr = err
        for lg, handlers, propagate, level in self._saved.pop("loggers", []):
            lg.handlers, lg.propagate = handlers, propagate
            lg.setLevel(level)
        for k, v in self._saved.pop("env", {}).items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if self._log is not None:
            self._log.flush()
            self._log.close()
            self._log = None


class _RayFilter:
    """sys.stdout/sys.stderr while a study runs: what Ray's own modules print goes to ray.log, the rest through."""

    def __init__(self, stream, log):
        self._stream, self._log = stream, log

    def write(self, text):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if (caller == "ray" or caller.startswith("ray.")) and self._log is not None and not self._log.closed:
            return self._log.write(text)
        return self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _last_line(path) -> str:
    try:
        lines = [ln.strip() for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
    except (OSError, TypeError):
        return ""
    return _clip(lines[-1], 120) if lines else ""


def _clip(text: str, n: int) -> str:
    text = str(text)
    return text if len(text) <= n else text[:n - 1] + "…"


def _labels(trials: list[dict]) -> dict:
    """design (slug [variant]) -> the short label the report uses (dashboards.tables.design_labels)."""
    try:
        from dashboards.tables import design_frame, design_labels

        return {str(k): str(v) for k, v in design_labels(design_frame(trials)).items()} if trials else {}
    except Exception:  # noqa: BLE001 - labels are a nicety: the slug stands in
        return {}


def _dispatch(method: str, **kwargs) -> None:
    console = _ACTIVE
    if console is None:
        return
    try:
        with console._lock:
            getattr(console, method)(**kwargs)
    except Exception as exc:  # noqa: BLE001 - never into Tune's loop
        console.failed(method, exc)


def _relay_class():
    from ray.tune import Callback

    class Relay(Callback):
        """Tune's events to the active :class:`Console` (no state of its own: it pickles into tuner.pkl)."""

        def on_trial_start(self, iteration, trials, trial, **info):
            _dispatch("trial_start", trial=trial)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            _dispatch("trial_result", trial=trial, result=result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            _dispatch("trial_complete", trial=trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            _dispatch("trial_error", trial=trial)

        def on_step_end(self, iteration, trials, **info):
            _dispatch("step_end", trials=trials)

        def on_experiment_end(self, trials, **info):
            _dispatch("experiment_end", trials=trials)

    Relay.__module__, Relay.__qualname__ = __name__, "Relay"
    return Relay


def __getattr__(name: str):
    if name == "Relay":  # defined on first use: importing this module does not import Ray
        if "Relay" not in globals():
            globals()["Relay"] = _relay_class()
        return globals()["Relay"]
    raise AttributeError(name)
