"""Run a study: ``python -m ablate.run STUDY.yaml [key=value ...] [--dry-run] [--fresh]``.

Every trial (design × seed) trains with the foundation loop and evaluates FID;
Ray Tune schedules the trials (a local Ray instance, or ``RAY_ADDRESS``),
MLflow records them (a parent run per study, a child run per trial). The
study's Ray experiment lives at a fixed path (``resources.storage``/<study>),
so running the same command again restores it: finished trials are kept,
unfinished and errored ones continue from their last checkpoint. ``--fresh``
starts over. Only a folder that carries this study's marker (``.ablate-study.json``,
written when the study starts) is restored or removed: restoring unpickles Tune's
state, so a folder the platform did not create is refused.

Search: ``grid`` (full factorial, seeds as repeats) or ``optuna`` (Ray Tune's
OptunaSearch over a define-by-run space with conditional keys), optionally
with ASHA early stopping.
"""
from __future__ import annotations

import argparse
import contextlib
import getpass
import hashlib
import itertools
import json
import math
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ablate.config import ConfigError
from ablate.race import round_dir
from ablate.tracking import mlflow_literal  # noqa: F401  (filters; re-exported for callers)


def make_parser(prog: str) -> argparse.ArgumentParser:
    from ablate.cli import help_parser

    p = help_parser(prog, __doc__)  # the docstring, its markup rendered plainly
    p.add_argument("target", help="a study file (.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides (Hydra syntax), e.g. search.seeds=3")
    p.add_argument("--dry-run", action="store_true", help="validate, print every trial and the resources, exit")
    p.add_argument("--fresh", action="store_true", help="discard the study's previous state and start over")
    p.add_argument("--verbose", action="store_true", help="show Ray's own output (by default it goes to the study "
                                                          "folder's ray.log, and one live table shows the trials)")
    return p


# -- trials ------------------------------------------------------------------------------
def expand_trials(cfg: DictConfig, source: str, dry_run: bool = False) -> list[dict]:
    """Full factorial of ``search.grid`` × seeds (grid mode) or a validated space (optuna mode).

    Every problem is collected and reported at once, before anything starts.
    """
    problems = validate_search(cfg)  # reported together with the designs' problems below
    data_cache: dict = {}
    if cfg.search.mode == "optuna":
        trials = []
        try:
            corners = optuna_corners(cfg)  # every choice of every categorical, each once
        except (KeyError, TypeError, AttributeError, IndexError, ValueError):
            corners = []  # a malformed space: already reported by validate_search
        if problems:
            corners = []  # described only once the space is sound
        for over in corners:
            try:
                trials.append(describe_trial(cfg, over, 0, data_cache, dry_run))
            except ConfigError as exc:
                problems += exc.problems
        if problems:
            raise ConfigError(source, _unique(problems))
        return trials
    grid = OmegaConf.to_container(cfg.search.grid, resolve=True) or {}
    grid = {k: v for k, v in grid.items() if isinstance(v, list) and v}
    if problems and not grid:
        raise ConfigError(source, problems)
    try:
        first_seeds = seed_plan(cfg).min  # racing adds seeds later (ablate/race.py)
    except ValueError:
        raise ConfigError(source, _unique(problems)) from None  # reported by validate_search
    keys = list(grid)
    trials, seen = [], set()
    for combo in itertools.product(*(grid[k] for k in keys)) if keys else [()]:
        over = dict(zip(keys, combo))
        for seed in range(first_seeds):
            try:
                t = describe_trial(cfg, over, seed, data_cache, dry_run)
            except ConfigError as exc:
                problems += exc.problems
                break
            if t["key"] not in seen:  # two grid points may resolve to the same design
                seen.add(t["key"])
                trials.append(t)
    if problems:
        raise ConfigError(source, _unique(problems))
    return trials


def seed_plan(cfg: DictConfig):
    """``search.seeds`` as a :class:`ablate.race.SeedPlan` (an int, or {min, max, step} for racing)."""
    from ablate.race import SeedPlan

    seeds = cfg.search.seeds
    return SeedPlan.parse(OmegaConf.to_container(seeds) if isinstance(seeds, DictConfig) else seeds)


def _unique(problems):
    return list(dict.fromkeys(problems))


def validate_search(cfg: DictConfig) -> list[tuple[str, str]]:
    s, problems = cfg.search, []
    if s.mode not in ("grid", "optuna"):
        problems.append(("search.mode", f"must be grid or optuna, got {s.mode!r}"))
    for key, values in (OmegaConf.to_container(s.grid, resolve=True) or {}).items():
        if not isinstance(values, list) or not values:
            problems.append((f"search.grid.{key}", "must be a non-empty list of values"))
        elif key.split(".")[0] not in ("design", "train", "data"):
            problems.append((f"search.grid.{key}", "only design.*, train.* and data.* keys can be searched"))
    for key, spec in (OmegaConf.to_container(s.space, resolve=True) or {}).items():
        where = f"search.space.{key}"
        if key.split(".")[0] not in ("design", "train"):
            problems.append((where, "only design.* and train.* keys can be searched"))
        if not isinstance(spec, dict) or not ({"choices"} <= set(spec) or {"low", "high"} <= set(spec)):
            problems.append((where, "must be {choices: [...]} or {low: ..., high: ..., log: bool, int: bool}"))
            continue
        extra = set(spec) - {"choices", "low", "high", "log", "int", "when"}
        if extra:
            problems.append((where, f"unknown key(s) {sorted(extra)}; valid: choices, low, high, log, int, when"))
        if "choices" in spec and (not isinstance(spec["choices"], list) or not spec["choices"]):
            problems.append((f"{where}.choices", f"must be a non-empty list of values, got {spec['choices']!r}"))
        if "low" in spec and not (_number(spec["low"]) and _number(spec.get("high"))):
            problems.append((where, f"low and high must be numbers, got {spec['low']!r} and {spec.get('high')!r}"))
        elif "low" in spec and not spec["low"] < spec["high"]:
            problems.append((where, f"low must be < high, got {spec['low']} and {spec['high']}"))
        elif "low" in spec and spec.get("log") and not spec["low"] > 0:
            problems.append((where, f"a log scale needs low > 0, got {spec['low']}"))
        if "when" in spec and not isinstance(spec["when"], dict):
            problems.append((f"{where}.when", "must map a searched key to the value(s) that enable this one"))
        elif "when" in spec:
            space = OmegaConf.to_container(s.space, resolve=True)
            for ck, cv in spec["when"].items():
                other = space.get(ck)
                if ck == key or not isinstance(other, dict):
                    valid = ", ".join(k for k in space if k != key) or "(none)"
                    problems.append((f"{where}.when", f"{ck!r} is not a key of search.space (a condition names another "
                                                      f"searched key); valid: {valid}"))
                elif isinstance(other.get("choices"), list):
                    bad = [v for v in (cv if isinstance(cv, list) else [cv]) if v not in other["choices"]]
                    if bad:
                        problems.append((f"{where}.when", f"{ck}={bad[0]!r} is never sampled: search.space.{ck} "
                                                          f"chooses from {other['choices']}"))
    if s.mode == "optuna":
        if not s.space:
            problems.append(("search.space", "an optuna search needs a space"))
        if int(s.num_samples) < 1:
            problems.append(("search.num_samples", f"must be ≥ 1, got {s.num_samples}"))
        if s.sampler not in SAMPLERS:
            problems.append(("search.sampler", f"unknown sampler {s.sampler!r}; valid: {', '.join(SAMPLERS)}"))
    try:
        plan = seed_plan(cfg)
        if plan.racing and s.mode != "grid":
            problems.append(("search.seeds", "seeds by racing ({min, max}) need search.mode: grid; optuna repeats "
                                             "each design a fixed number of times"))
    except ValueError as exc:
        problems.append(("search.seeds", str(exc)))
    if not list(s.objective):
        problems.append(("search.objective", "name at least one metric, e.g. fid/nfe_1"))
    from ablate.config import logged_metrics

    logged = logged_metrics(cfg)
    for obj in s.objective:
        nfe = str(obj).rsplit("_", 1)[-1]
        if str(obj).startswith(("fid/", "kid/")) and (not nfe.isdigit() or int(nfe) not in list(cfg.eval.nfe)):
            problems.append(("search.objective", f"{obj} is not evaluated: eval.nfe is {list(cfg.eval.nfe)}"))
        elif str(obj) not in logged:
            problems.append(("search.objective", f"no trial logs {obj} (eval.metrics is {list(cfg.eval.metrics)}, "
                                                 f"eval.nfe {list(cfg.eval.nfe)}, evaluation "
                                                 f"{'on' if int(cfg.eval.every) or cfg.eval.at_end else 'off'}); "
                                                 f"valid: {', '.join(logged)}"))
    if not list(cfg.eval.nfe):
        problems.append(("eval.nfe", "the NFE list is empty"))
    if s.scheduler not in ("none", "asha"):
        problems.append(("search.scheduler", f"must be none or asha, got {s.scheduler!r}"))
    if s.scheduler == "asha" and not int(cfg.eval.every):
        problems.append(("search.scheduler", "asha stops trials on the FID curve: set eval.every > 0"))
    return problems


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def describe_trial(cfg: DictConfig, over: dict, seed: int, data_cache: dict | None = None,
                   dry_run: bool = False) -> dict:
    """The trial for overrides ``over`` and ``seed``: resolved design, stable key, flat params."""
    from ablate.config import check_values
    from ablate.data import DataError, load_data
    from ablate.design import DesignError, build_components, resolve_design
    from components.registry import RegistryError

    data_cache = {} if data_cache is None else data_cache
    tc = trial_config(cfg, over, seed)
    where = ", ".join(f"{k}={v}" for k, v in over.items()) or "the base design"
    if over:  # a searched train.* value is checked like one written in the file
        bad = check_values(tc)
        if bad:
            raise ConfigError("", [(k, f"{m} (in trial {where})") for k, m in bad])
    data_spec = OmegaConf.to_container(tc.data, resolve=True)
    dkey = json.dumps(data_spec, sort_keys=True)
    if dkey not in data_cache:
        try:
            data_cache[dkey] = load_data(data_spec)
        except (DataError, RegistryError) as exc:
            if not dry_run or isinstance(exc, RegistryError):
                raise ConfigError("", [("data", str(exc))]) from exc
            print(f"note: data not loaded ({exc}); validating the designs without it")
            data_cache[dkey] = None
        except (ValueError, TypeError) as exc:  # a value the dataset's own code cannot use (e.g. modes: 0)
            opts = ", ".join(f"{k}={v}" for k, v in data_spec.items() if k != "name")
            raise ConfigError("", [("data", f"{data_spec.get('name')} cannot be made with {opts or 'its defaults'}: "
                                            f"{exc or type(exc).__name__}")]) from exc
    data = data_cache[dkey]
    try:
        design = resolve_design(OmegaConf.to_container(tc.design, resolve=True),
                                data.default_backbone() if data is not None else {"name": "dit"})
        if data is not None:  # its size from the spec, before anything allocates it (ablate/footprint.py)
            from ablate.footprint import check_backbone

            check_backbone(design, data.shape, data.num_classes, int(tc.train.steps), float(tc.train.ema))
        if data is not None and math.prod(data.shape) <= 4096:  # small: building is cheap, checks combinations
            build_components(design, data.shape, data.num_classes, train_steps=int(tc.train.steps))
    except DesignError as exc:
        raise ConfigError("", [(k, f"{m} (in trial {where})") for k, m in exc.problems]) from exc
    other = {k: v for k, v in over.items() if k != "design" and not k.startswith("design.")}  # train/data settings
    tag = f"-{hashlib.sha256(json.dumps(other, sort_keys=True).encode()).hexdigest()[:6]}" if other else ""
    variant = ", ".join(f"{k}={v}" for k, v in sorted(other.items()))  # what else tells this design's trials apart
    return {"key": f"{design.design_id}{tag}-s{seed}", "overrides": over, "seed": seed, "slug": design.slug,
            "preset": _pure_preset(design),
            "design_id": design.design_id, "params": design.flat_params(), "variant": variant}


def _pure_preset(design) -> str:
    """The preset a design is, unchanged but for its backbone ('' when components were swapped or retuned)."""
    from ablate.design import resolve_design

    if not design.preset:
        return ""
    backbone = design.components["backbone"]
    pure = resolve_design({"preset": design.preset, "backbone": {"name": backbone["name"], **backbone["kwargs"]}})
    return design.preset if pure.design_id == design.design_id else ""


SAMPLERS = ("tpe", "gp", "nsga2", "random")


def optuna_corners(cfg: DictConfig) -> list[dict]:
    """One override set per categorical choice (others at their first choice/low end), for validation."""
    space = OmegaConf.to_container(cfg.search.space, resolve=True)
    base = {k: (v["choices"][0] if "choices" in v else v["low"]) for k, v in space.items()}
    out = [base]
    for k, v in space.items():
        for c in v.get("choices", [])[1:]:
            out.append({**base, k: c})
    return [active(o, space) for o in out]


def active(values: dict, space: dict) -> dict:
    """Drop keys whose ``when`` condition does not hold (conditional kwargs)."""
    def ok(spec):
        for ck, cv in (spec.get("when") or {}).items():
            allowed = cv if isinstance(cv, list) else [cv]
            if values.get(ck) not in allowed:
                return False
        return True

    return {k: v for k, v in values.items() if ok(space[k])}


class OptunaSpace:
    """Define-by-run search space for OptunaSearch (picklable): conditional keys are suggested only when enabled."""

    def __init__(self, space: dict):
        self.space = space

    def __call__(self, trial):
        chosen = {}
        for key, spec in self.space.items():
            cond = spec.get("when") or {}
            if any(chosen.get(ck) not in (cv if isinstance(cv, list) else [cv]) for ck, cv in cond.items()):
                continue
            if "choices" in spec:
                chosen[key] = trial.suggest_categorical(key, spec["choices"])
            elif spec.get("int"):
                chosen[key] = trial.suggest_int(key, int(spec["low"]), int(spec["high"]), log=bool(spec.get("log")))
            else:
                chosen[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]),
                                                  log=bool(spec.get("log")))
        return None


def trial_config(cfg: DictConfig, overrides: dict, seed: int) -> DictConfig:
    tc = cfg.copy()
    for k, v in overrides.items():
        if k.startswith("design.") and k != "design.preset" and isinstance(v, str) and k.count(".") == 1:
            OmegaConf.update(tc, k, {"name": v}, merge=False)  # design.<kind>=<name>: a fresh component
        else:
            OmegaConf.update(tc, k, v, merge=True, force_add=True)
    tc.train.seed = seed
    return tc


def storage_root(cfg: DictConfig) -> str:
    """Where Tune keeps the study: a local/shared path (resolved) or a URI (s3://, gs://, ...) kept as is."""
    storage = str(cfg.resources.storage or Path("runs") / "studies")
    return storage if "://" in storage else str(Path(storage).expanduser().resolve())


# -- the trial function (runs in a Ray worker) ------------------------------------------
def run_trial(config: dict, study_yaml: str, uri: str, exp_id: str, parent_id: str, trials_dir: str) -> None:
    import ray
    from ray import tune

    from ablate import tracking
    from ablate.reporting import Reporter
    from ablate.train import train

    study = OmegaConf.create(study_yaml)
    if "trial" in config:  # grid: the trial was described (and validated) by the driver
        t = config["trial"]
    else:  # optuna: the sampled keys, plus Repeater's index as the seed
        over = {k: v for k, v in config.items() if not k.startswith("__")}
        t = describe_trial(study, over, int(config.get("__trial_index__", 0)))
    cfg = trial_config(study, t["overrides"], t["seed"])
    out = Path(trials_dir) / t["key"]
    cfg.train.out_dir = str(out)
    if float(cfg.resources.gpus_per_trial) > 1:  # DDP: one rank per GPU of the trial (ablate/distributed.py)
        cfg.train.world_size = int(cfg.resources.gpus_per_trial)
    from ablate.gpu import prepare_trial

    prepare_trial(cfg)  # before CUDA initialises: the GPUs Ray assigned (or none: CPU), a fraction's memory share
    cl = tracking.client(uri)
    tags = {"design_id": t["design_id"], "slug": t["slug"], "seed": str(t["seed"]), "study": str(cfg.name),
            "variant": t.get("variant", ""), "seed_reason": t.get("reason", "initial"),
            "preset": t.get("preset", ""),  # the design is exactly this preset ('' when it changes one)
            "base_preset": str(OmegaConf.select(cfg, "design.preset") or ""),  # the preset it starts from
            "git_commit": tracking.git_commit()}
    run_id, status = tracking.child_run(cl, exp_id, parent_id, t["key"], f"{t['slug']}-s{t['seed']}", tags)
    if status == "FINISHED":  # recorded complete before an interruption: never train it again
        final = json.loads((out / "final.json").read_text()) if (out / "final.json").exists() else {}
        tune.report({**final, "already_finished": 1})
        return
    ckpt = tune.get_checkpoint()
    if ckpt is not None:  # Tune's copy is newer when the trial moved to another node
        with ckpt.as_directory() as d:
            src = Path(d) / "checkpoint.pt"
            if src.exists() and not (out / "checkpoint.pt").exists():
                out.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, out / "checkpoint.pt")
    retry = tracking.retry
    retry(cl.update_run, run_id, status="RUNNING")
    mlrep = tracking.MlflowReporter(uri, run_id)
    mlrep.params({**t["params"], **{f"train.{k}": v for k, v in OmegaConf.to_container(cfg.train).items()
                                    if k != "out_dir"},
                  **tracking.flat("data", OmegaConf.to_container(cfg.data, resolve=True))})  # data.* settings

    class TuneReporter(Reporter):
        """MLflow records and Tune results of the trial. It runs before the local reporter (MultiReporter order), and
        ``tune.report`` may block until the driver takes the result: an evaluation's result is therefore held and
        sent with the next call, once ``metrics.jsonl`` has the evaluation too. A driver killed while it waits then
        finds the evaluation recorded both in MLflow and locally, and the resumed trial does not repeat it."""

        def __init__(self):
            self.last: dict = {}
            self.held: dict | None = None

        def send_held(self):
            if self.held is not None:
                result, self.held = self.held, None
                tune.report(result)

        def metrics(self, step, values, kind="train"):
            self.send_held()
            mlrep.metrics(step, values, kind)
            self.last.update(values)
            if kind == "eval":  # evaluations follow a checkpoint at their step: safe to write now
                mlrep.flush()
                if step < total:  # the final result is reported once the trial is complete (below)
                    self.held = {**self.last, "step": step}

        def params(self, values):
            mlrep.params(values)

        def artifact(self, path, kind="file"):
            mlrep.artifact(path, kind)

        def checkpoint(self, path, step):
            self.send_held()
            mlrep.checkpoint(path, step)
            # Tune's searchers and schedulers read the objective from every result: until the first evaluation
            # the checkpoint stays local (the trial folder, which a resume on this node reads first)
            if step < total and all(o in self.last for o in objectives):
                with tune_checkpoint(path.parent, step, remote) as d:  # a pointer, or the file alone (footprint.py)
                    tune.report({**self.last, "step": step}, checkpoint=tune.Checkpoint.from_directory(str(d)))

        def close(self):
            self.send_held()
            mlrep.close()

    objectives = [str(o) for o in cfg.search.objective]
    total = int(cfg.train.steps)
    from ablate.footprint import tune_checkpoint

    remote = "://" in str(cfg.resources.storage or "")  # URI storage: trial folders are node-local
    rep = TuneReporter()
    retry(cl.set_tag, run_id, "node", ray.get_runtime_context().get_node_id())
    try:
        train(cfg, reporter=rep, progress=False)
    except SystemExit:  # Tune stopped the trial (early stopping): not a failure
        mlrep.close()
        retry(cl.set_tag, run_id, "stopped", "early stopping by the scheduler")
        retry(cl.set_terminated, run_id, status="KILLED")
        raise
    except BaseException as exc:
        retry(cl.set_tag, run_id, "error", f"{type(exc).__name__}: {exc}"[:5000])
        retry(cl.set_terminated, run_id, status="FAILED")
        raise
    mlrep.close()
    (out / "final.json").write_text(json.dumps(rep.last))
    from ablate.trialset import clear_outcome

    clear_outcome(cl, run_id)  # an earlier attempt's 'stopped'/'interrupted'/'failed' no longer holds
    retry(cl.set_terminated, run_id, status="FINISHED")
    with tune_checkpoint(out, total, remote, final=True) as d:
        tune.report({**rep.last, "step": total}, checkpoint=tune.Checkpoint.from_directory(str(d)))


# -- the driver ---------------------------------------------------------------------------
def _main(args) -> int:
    from ablate.config import compose, validate

    cfg, source = compose(args.target, args.overrides)  # refuses a name that is not a plain name
    name = str(cfg.name or Path(args.target).stem)
    cfg.name = name
    from ablate.config import shadowed_overrides

    shadowed = shadowed_overrides(cfg, args.overrides)  # an override the search overwrites would be ignored
    if shadowed:
        raise ConfigError(f"{source}, command line", shadowed)
    validate(cfg, source)
    trials = expand_trials(cfg, source, dry_run=args.dry_run)
    res = cfg.resources
    from ablate.footprint import gpu_problems

    problems = gpu_problems(cfg)  # GPUs asked for on a local Ray without any: every trial would wait forever
    if problems:
        raise ConfigError(source, problems)
    root = storage_root(cfg)
    try:
        state = study_state(root, name, fresh=args.fresh)  # refuses a folder this platform did not create
    except StorageUnreachable as exc:
        if not args.dry_run:
            raise
        print(f"note: {exc}; the study's folder was not checked")
        state = "unchecked"
    from ablate.trialset import check_rerun

    cache: dict = {}
    rerun = check_rerun(cfg, trials, root, name, "fresh" if args.fresh else state, source,  # the recorded trial set
                        lambda over, seed: describe_trial(cfg, over, seed, cache, args.dry_run))
    if cfg.search.mode == "optuna":
        print(f"study {name}: optuna ({cfg.search.sampler}) over {list(cfg.search.space)}, "
              f"{cfg.search.num_samples} designs × {seed_plan(cfg).min} seeds, objective {list(cfg.search.objective)}"
              f" ({source}); the space was validated on these designs:")
    else:
        print(f"study {name}: {len(trials)} trials ({source})")
    for t in trials:
        mark = f"[{rerun.status(t['key'])}] " if rerun.recorded and cfg.search.mode == "grid" else ""
        print(f"  {mark}{t['key']}  {t['slug']}  seed {t['seed']}  "
              + " ".join(f"{k}={v}" for k, v in t["overrides"].items()))
    print(f"resources: {res.cpus_per_trial} CPU, {res.gpus_per_trial} GPU per trial; at most "
          f"{res.max_concurrent or 'as many as Ray has room for'} at once; Ray at {res.address or os.environ.get('RAY_ADDRESS') or 'local'}")
    from ablate.gpu import resource_lines

    for line in resource_lines(cfg, trials):  # CPU or GPU trials (on purpose), what fits in a GPU share
        print(f"  {line}")
    print(f"storage: {root}/{name} ({'started over' if args.fresh and state == 'ours' else STATE_WORDS[state]})")
    from ablate.footprint import disk_estimate

    for line in (rerun.line(), disk_estimate(cfg, trials, _remote(root)) if cfg.search.mode == "grid" else None):
        if line:
            print(line)
    if args.dry_run:
        if cfg.search.mode == "grid":  # optuna's validation corners are not the design it will sample
            from dashboards.tables import design_frame, separability_lines

            print("\n".join(separability_lines(design_frame(trials))))
        return 0
    return launch(cfg, trials, root, fresh=args.fresh, verbose=getattr(args, "verbose", False))


# -- the study's folder: only what this platform created is restored or removed ---------------
MARKER = ".ablate-study.json"
STATE_WORDS = {"absent": "new", "empty": "new", "ours": "this study's: resumed", "unchecked": "not checked"}


class StudyStateError(ValueError):
    """The study's storage folder cannot be used (not created by this platform, or not for this study)."""


class StorageUnreachable(StudyStateError):
    """A URI storage that cannot be opened or read from here (scheme, credentials, network)."""


def _remote(root: str) -> bool:
    return "://" in root


def _fs(root: str, name: str):
    """(pyarrow filesystem, path of the study folder) for a URI root (s3://, gs://, file://, ...)."""
    from pyarrow import fs as pafs

    try:
        filesystem, base = pafs.FileSystem.from_uri(root.rstrip("/"))
    except Exception as exc:  # noqa: BLE001 - an unknown scheme, missing credentials
        raise StorageUnreachable(f"resources.storage {root!r}: cannot open it: {exc}") from exc
    return filesystem, f"{base.rstrip('/')}/{name}"


def _read_marker(text: str, where: str, name: str) -> dict:
    try:
        marker = json.loads(text)
    except ValueError:
        marker = None
    if not isinstance(marker, dict) or marker.get("platform") != "ablate":
        raise StudyStateError(f"{where} is not a study marker of this platform: refusing to use its folder")
    if marker.get("study") != name:
        raise StudyStateError(f"{where} belongs to study {marker.get('study')!r}, not {name!r}: refusing to use "
                              f"its folder (pick another name or resources.storage)")
    return marker


def _foreign(folder: str, fresh: bool) -> StudyStateError:
    act = ("delete it" if fresh else
           "restore it (restoring unpickles its tuner.pkl, which runs whatever code the file holds) or write into it")
    return StudyStateError(
        f"{folder} exists but was not created by ablate.run for this study (no {MARKER} marker): refusing to {act}. "
        f"If the folder is yours and you want it gone, remove it yourself; otherwise choose another name or "
        f"resources.storage")


def study_state(root: str, name: str, fresh: bool = False) -> str:
    """What the study's folder ``root/name`` is: ``absent``, ``empty`` or ``ours`` (it carries this study's marker).

    Anything else raises :class:`StudyStateError`: a folder without the marker, a marker of another study, a
    symbolic link, a path that leaves ``root``, or (on a local/shared path) a marker or Tune state owned by another
    user. Checked before anything is written, also in --dry-run.
    """
    if _remote(root):
        try:
            return _remote_state(root, name, fresh)
        except OSError as exc:
            raise StorageUnreachable(f"resources.storage {root!r}: cannot read it: {exc}") from exc
    base = Path(root)
    folder = base / name
    if folder.is_symlink():
        raise StudyStateError(f"{folder} is a symbolic link: refusing to use it as the study's folder")
    if not folder.exists():
        return "absent"
    if not folder.is_dir():
        raise StudyStateError(f"{folder} exists and is not a folder")
    if folder.resolve().parent != base.resolve():
        raise StudyStateError(f"{folder} resolves outside {base}: refusing to use it")
    marker = folder / MARKER
    if marker.is_file() and not marker.is_symlink():
        _read_marker(marker.read_text(errors="replace"), str(marker), name)
        if hasattr(os, "getuid"):
            for f in (folder, marker, folder / "tuner.pkl"):
                if f.exists() and f.stat().st_uid != os.getuid():
                    raise StudyStateError(f"{f} belongs to another user (uid {f.stat().st_uid}): refusing to "
                                          f"restore or delete a study another user can have written")
        return "ours"
    if not any(folder.iterdir()):
        return "empty"
    raise _foreign(str(folder), fresh)


def _remote_state(root: str, name: str, fresh: bool) -> str:
    from pyarrow import fs as pafs

    filesystem, path = _fs(root, name)
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return "absent"
    if info.type != pafs.FileType.Directory:
        raise StudyStateError(f"{root}/{name} exists and is not a folder")
    minfo = filesystem.get_file_info(f"{path}/{MARKER}")
    if minfo.type == pafs.FileType.File:
        with filesystem.open_input_stream(f"{path}/{MARKER}") as fh:
            _read_marker(fh.read().decode("utf-8", "replace"), f"{root}/{name}/{MARKER}", name)
        return "ours"
    if not filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        return "empty"
    raise _foreign(f"{root}/{name}", fresh)


def prepare_study_folder(root: str, name: str, fresh: bool) -> str:
    """Check the study's folder, remove it when ``fresh`` (only if it is ours), create it with its marker.

    Returns the state found (see :func:`study_state`); ``ours`` and not ``fresh`` means: restore it.
    """
    state = study_state(root, name, fresh)
    if fresh and state == "ours" and not _remote(root):
        folder = Path(root) / name
        if folder.is_symlink() or folder.resolve().parent != Path(root).resolve() or not (folder / MARKER).is_file():
            raise StudyStateError(f"{folder} changed while it was checked: refusing to delete it")
        shutil.rmtree(folder)
    if state != "ours" or fresh:
        _write_marker(root, name)
    return state


def _write_marker(root: str, name: str) -> None:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        user = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    text = json.dumps({"platform": "ablate", "study": name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       "user": user, "host": socket.gethostname(), "pid": os.getpid()}, indent=1)
    if _remote(root):
        filesystem, path = _fs(root, name)
        filesystem.create_dir(path, recursive=True)
        with filesystem.open_output_stream(f"{path}/{MARKER}") as fh:
            fh.write(text.encode())
        return
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{MARKER}.tmp"
    tmp.write_text(text)
    os.replace(tmp, folder / MARKER)


def launch(cfg: DictConfig, trials: list[dict], root: str, fresh: bool = False, verbose: bool = False) -> int:
    from ray import tune

    from ablate import tracking

    name, res = str(cfg.name), cfg.resources
    remote = _remote(root)
    exp_dir = f"{root}/{name}"
    # before anything is written: the folder must be absent, empty or this study's own (it carries the marker);
    # --fresh removes only such a folder. Only a marked folder is restored (restoring unpickles Tune's tuner.pkl).
    state = prepare_study_folder(root, name, fresh)
    uri = tracking.tracking_uri(cfg.tracking.uri)
    cl = tracking.client(uri)
    artifacts = cfg.tracking.artifact_location
    if artifacts is None and uri.startswith("sqlite:") and not remote:
        artifacts = Path(root, name, "mlartifacts").as_uri()  # explicit, next to the study (not ./mlruns)
    exp_id = tracking.experiment_id(cl, str(cfg.tracking.experiment or name), artifacts)
    parent_id = tracking.parent_run(cl, exp_id, name, fresh=fresh)
    # trial run folders: beside the Tune state on a local/shared path; node-local under a URI (a trial that
    # moves to another node continues from the Tune checkpoint in the URI storage)
    trials_dir = Path(exp_dir) / "trials" if not remote else Path("~/.cache/ablate/trials").expanduser() / name
    trials_dir.mkdir(parents=True, exist_ok=True)
    study_yaml = OmegaConf.to_yaml(cfg)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, study_yaml=study_yaml, uri=uri, exp_id=exp_id, parent_id=parent_id,
                             trials_dir=str(trials_dir)),
        {"cpu": float(res.cpus_per_trial), "gpu": float(res.gpus_per_trial)})
    address = res.address or os.environ.get("RAY_ADDRESS")
    from ablate.console import Console
    from ablate.summary import log as log_summary

    # one live table of the trials; Ray's own output goes to ray.log in the study folder unless --verbose
    live = Console(cfg, trials, trials_dir, (trials_dir if remote else Path(exp_dir)) / "ray.log", verbose,
                   describe=lambda over, seed: describe_trial(cfg, over, seed, {}))
    objective = list(cfg.search.objective)[0]
    restorable = state == "ours" and not fresh
    from ablate.footprint import KEEP_CHECKPOINTS
    from ablate.trialset import TrialBook, outcomes

    # the study's trial record (ablate/trialset.py; checked against this run's trials by _main before anything)
    book = (TrialBook.load(str(root), name) if restorable else None) or TrialBook(str(root), name, str(cfg.search.mode))

    key_cache: dict = {}

    def key_of(config: dict) -> str:
        if "trial" in config:
            return config["trial"]["key"]
        over = {k: v for k, v in config.items() if not k.startswith("__")}
        return describe_trial(cfg, over, int(config.get("__trial_index__", 0)), key_cache)["key"]

    def fit(k: int, round_trials: list[dict]) -> list:
        """Round k of the study (k ≥ 1: a racing round, ablate/race.py): the Tune experiments holding its trials,
        restored where the record has them; trials it lacks run in a new experiment inside the study folder."""
        out = []
        for storage, rname, group, restore in book.experiments(cfg, k, round_trials, restorable):
            run_cfg = tune.RunConfig(name=rname, storage_path=storage, verbose=live.ray_verbosity,
                                     callbacks=live.callbacks(),  # the live table (ablate/console.py)
                                     failure_config=tune.FailureConfig(max_failures=int(cfg.search.max_failures)),
                                     checkpoint_config=tune.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS))
            path = f"{storage}/{rname}"
            if restore and tune.Tuner.can_restore(path):  # every experiment lives inside the marked study folder
                print(f"resuming study {name} from {path}")
                tuner = tune.Tuner.restore(path, trainable, resume_errored=True)
            else:
                if restorable:
                    print(f"study {name}: {len(group)} new trials in {path}")
                space = {"trial": tune.grid_search(group)} if cfg.search.mode == "grid" else {}
                tuner = tune.Tuner(trainable, param_space=space, tune_config=tune_cfg, run_config=run_cfg)
            grid = tuner.fit()
            out += list(grid)
            close_unfinished(cl, exp_id, parent_id, trials_dir, outcomes(grid, key_of), int(cfg.search.max_failures),
                             int(cfg.train.steps))
        log_summary(cl, parent_id, cfg, uri, k)  # the parent run's chartable summary (ablate/summary.py)
        return out

    with live, ray_session(address) as ray:  # a local Ray started here is shut down on the way out, whatever happens
        slots = int(ray.cluster_resources().get("CPU", 1) // max(float(res.cpus_per_trial), 1e-9))
        if float(res.gpus_per_trial) > 0:
            slots = min(slots, int(ray.cluster_resources().get("GPU", 0) // float(res.gpus_per_trial)))
        n_trials = len(trials) if cfg.search.mode == "grid" else int(cfg.search.num_samples) * seed_plan(cfg).min
        concurrency = max(1, min(n_trials, int(res.max_concurrent) or slots, slots))
        tracking.retry(cl.set_tag, parent_id, "concurrency", str(concurrency))  # for the overhead benchmark
        live.started(concurrency, slots, n_trials)  # the real concurrency, not resources.max_concurrent's 0
        tune_cfg = tune_config(cfg)
        results = fit(0, trials)
        plan = seed_plan(cfg)
        if cfg.search.mode == "grid" and plan.racing:
            results += race(cfg, trials, plan, fit, cl, parent_id, uri, objective)
    log_summary(cl, parent_id, cfg, uri, 0, final=True)  # FID against NFE per design, on the parent run
    errors = [r for r in results if r.error is not None]
    tracking.retry(cl.set_terminated, parent_id, status="FAILED" if len(errors) == len(results) else "FINISHED")
    try:  # the report never decides the study's outcome
        from dashboards.report import terminal_summary, write

        out, summary = write(name, uri, Path(exp_dir) / "report.html" if not remote else None, objective)
        print(terminal_summary(summary))
        print(f"report: {out}")
    except Exception as exc:  # noqa: BLE001
        print(f"(no report: {type(exc).__name__}: {exc}; rebuild it with python -m dashboards.report {name})")
    print(f"{len(results) - len(errors)} trials finished, {len(errors)} failed; browse with:\n"
          f"  mlflow ui --backend-store-uri {uri}")
    return 0 if not errors else 1


def race(cfg: DictConfig, trials: list[dict], plan, fit, cl, parent_id: str, uri: str, objective: str) -> list:
    """Seeds by racing (ablate/race.py): more seeds for the designs not yet separable from the leader."""
    from ablate import tracking
    from ablate.race import run_race
    from dashboards.tables import load_trials, rank

    name, data_cache = str(cfg.name), {}
    tracking.retry(cl.set_tag, parent_id, "racing", f"min={plan.min}, max={plan.max}, step={plan.step}")

    def note(k, leader, contenders, new):
        said = (f"racing round {k}: leader {leader}; not yet separable: {', '.join(contenders) or 'none'}; "
                + (f"{len(new)} more trials" if new else "race over"))
        print(said)
        tracking.retry(cl.set_tag, parent_id, f"race.round{k}", said[:5000])

    return run_race(trials, plan, fit, lambda over, seed: describe_trial(cfg, over, seed, data_cache),
                    lambda: rank(load_trials(name, uri), objective), note)


#: Ray reads this at import (ray._private.ray_constants): False makes a local Ray take the loopback address as
#: its node address, so the GCS, the raylet, the object manager and the workers listen on 127.0.0.1 only.
_RAY_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def ray_session(address: str | None):
    """Ray for one study: connect to ``address``, or start a local instance bound to loopback.

    On the way out (normally, on an error, on SIGTERM or Ctrl-C) the instance started here is shut down, so its
    GCS, raylet and agents do not outlive the driver; a Ray that was already initialised is left as it was.
    """
    import ray

    owned = not ray.is_initialized()
    if address:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    else:
        with _loopback_ray():
            ray.init(include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
                     num_cpus=max(1, os.cpu_count() or 1), _node_ip_address="127.0.0.1")
    try:
        yield ray
    finally:
        if owned:
            ray.shutdown()


@contextlib.contextmanager
def _loopback_ray():
    from ray._private import ray_constants

    old_env, old_const = os.environ.get(_RAY_CLUSTER_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_RAY_CLUSTER_ENV] = "0"  # the processes ray.init starts read it too
    ray_constants.ENABLE_RAY_CLUSTER = False  # this process imported Ray already
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old_const
        if old_env is None:
            os.environ.pop(_RAY_CLUSTER_ENV, None)
        else:
            os.environ[_RAY_CLUSTER_ENV] = old_env


def tune_config(cfg: DictConfig):
    """TuneConfig with the Optuna searcher (optuna mode) and ASHA (scheduler: asha)."""
    from ray import tune

    s = cfg.search
    objectives = [str(o) for o in s.objective]
    limit = int(cfg.resources.max_concurrent) or None
    scheduler = None
    if s.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="step", metric=objectives[0], mode="min", max_t=int(cfg.train.steps),
                                  grace_period=int(s.grace_period) or int(cfg.eval.every),
                                  reduction_factor=float(s.reduction_factor))
    if s.mode == "grid":
        if scheduler is not None:
            return tune.TuneConfig(max_concurrent_trials=limit, scheduler=scheduler)
        return tune.TuneConfig(max_concurrent_trials=limit, metric=objectives[0], mode="min")
    import optuna
    from ray.tune.search import ConcurrencyLimiter, Repeater
    from ray.tune.search.optuna import OptunaSearch

    seed = int(s.sampler_seed)
    sampler = {"tpe": lambda: optuna.samplers.TPESampler(seed=seed),
               "gp": lambda: optuna.samplers.GPSampler(seed=seed),
               "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed),
               "random": lambda: optuna.samplers.RandomSampler(seed=seed)}[s.sampler]()
    multi = len(objectives) > 1
    searcher = OptunaSearch(space=OptunaSpace(OmegaConf.to_container(s.space, resolve=True)),
                            metric=objectives if multi else objectives[0],
                            mode=["min"] * len(objectives) if multi else "min", sampler=sampler)
    seeds = seed_plan(cfg).min  # validated: no racing with optuna
    if seeds > 1:
        searcher = Repeater(searcher, repeat=seeds)
    if limit:
        searcher = ConcurrencyLimiter(searcher, max_concurrent=limit)
    return tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=int(s.num_samples) * seeds)


def close_unfinished(cl, exp_id: str, parent_id: str, trials_dir: Path, found: dict | None = None,
                     max_failures: int = 0, total: int = 0) -> None:
    """Child runs left RUNNING: FAILED with the error (a worker crash past max_failures too), or KILLED and tagged
    stopped by the scheduler or interrupted (``found``: Tune's outcome per trial key, ablate/trialset.py)."""
    from ablate.trialset import close_unfinished as close

    close(cl, exp_id, parent_id, found, max_failures, total)


def main(argv: list[str] | None = None) -> int:
    from ablate.cli import run_cli

    return run_cli(_main, argv, prog="python -m ablate.run", make_parser=make_parser)


if __name__ == "__main__":
    raise SystemExit(main())
