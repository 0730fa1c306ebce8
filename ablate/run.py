"""Run a study: ``python -m ablate.run STUDY.yaml [key=value ...] [--dry-run] [--fresh]``.

Every trial (design × seed) trains with the foundation loop and evaluates FID;
Ray Tune schedules the trials (a local Ray instance, or ``RAY_ADDRESS``),
MLflow records them (a parent run per study, a child run per trial). The
study's Ray experiment lives at a fixed path (``resources.storage``/<study>),
so running the same command again restores it: finished trials are kept,
unfinished and errored ones continue from their last checkpoint. ``--fresh``
starts over.

Status: grid search over any design/train key with seeds as repeats. The
Optuna search, ASHA early stopping and the cluster test of issue 4 are not
built yet.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import shutil
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ablate.config import ConfigError


def make_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("target", help="a study file (.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides (Hydra syntax), e.g. search.seeds=3")
    p.add_argument("--dry-run", action="store_true", help="validate, print every trial and the resources, exit")
    p.add_argument("--fresh", action="store_true", help="discard the study's previous state and start over")
    return p


# -- trials ------------------------------------------------------------------------------
def expand_trials(cfg: DictConfig, source: str) -> list[dict]:
    """Full factorial of ``search.grid`` × seeds; every trial validated (design resolved) before anything runs."""
    from ablate.data import load_data
    from ablate.design import DesignError, resolve_design

    grid = OmegaConf.to_container(cfg.search.grid, resolve=True) or {}
    problems = []
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            problems.append((f"search.grid.{key}", "must be a non-empty list of values"))
        elif key.split(".")[0] not in ("design", "train", "data"):
            problems.append((f"search.grid.{key}", "only design.*, train.* and data.* keys can be searched"))
    seeds = int(cfg.search.seeds)
    if seeds < 1:
        problems.append(("search.seeds", f"must be ≥ 1, got {seeds}"))
    if not list(cfg.eval.nfe):
        problems.append(("eval.nfe", "the NFE list is empty"))
    if problems:
        raise ConfigError(source, problems)
    keys = list(grid)
    data_cache = {}
    trials, seen = [], set()
    for combo in itertools.product(*(grid[k] for k in keys)) if keys else [()]:
        over = dict(zip(keys, combo))
        tc = trial_config(cfg, over, 0)
        data_spec = OmegaConf.to_container(tc.data, resolve=True)
        dkey = json.dumps(data_spec, sort_keys=True)
        if dkey not in data_cache:
            data_cache[dkey] = load_data(data_spec)
        try:
            design = resolve_design(OmegaConf.to_container(tc.design, resolve=True),
                                    data_cache[dkey].default_backbone())
        except DesignError as exc:
            where = ", ".join(f"{k}={v}" for k, v in over.items()) or "the base design"
            raise ConfigError(source, [(k, f"{m} (in trial {where})") for k, m in exc.problems]) from exc
        other = {k: v for k, v in over.items() if not k.startswith("design.")}  # train/data settings
        tag = f"-{hashlib.sha256(json.dumps(other, sort_keys=True).encode()).hexdigest()[:6]}" if other else ""
        for seed in range(seeds):
            key = f"{design.design_id}{tag}-s{seed}"
            if key in seen:
                continue  # two grid points that resolve to the same design
            seen.add(key)
            trials.append({"key": key, "overrides": over, "seed": seed, "slug": design.slug,
                           "design_id": design.design_id, "params": design.flat_params()})
    return trials


def trial_config(cfg: DictConfig, overrides: dict, seed: int) -> DictConfig:
    tc = cfg.copy()
    for k, v in overrides.items():
        if k.startswith("design.") and isinstance(v, str) and k.count(".") == 1:
            OmegaConf.update(tc, k, {"name": v}, merge=False)  # design.<kind>=<name>: a fresh component
        else:
            OmegaConf.update(tc, k, v, merge=True, force_add=True)
    tc.train.seed = seed
    return tc


def storage_root(cfg: DictConfig) -> Path:
    return Path(cfg.resources.storage or Path("runs") / "studies").expanduser().resolve()


# -- the trial function (runs in a Ray worker) ------------------------------------------
def run_trial(config: dict, study_yaml: str, uri: str, exp_id: str, parent_id: str, trials_dir: str) -> None:
    from ray import tune

    from ablate import tracking
    from ablate.reporting import Reporter
    from ablate.train import train

    t = config["trial"]
    cfg = trial_config(OmegaConf.create(study_yaml), t["overrides"], t["seed"])
    out = Path(trials_dir) / t["key"]
    cfg.train.out_dir = str(out)
    cl = tracking.client(uri)
    tags = {"design_id": t["design_id"], "slug": t["slug"], "seed": str(t["seed"]), "study": str(cfg.name),
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
                                    if k != "out_dir"}})

    class TuneReporter(Reporter):
        def __init__(self):
            self.last: dict = {}

        def metrics(self, step, values, kind="train"):
            mlrep.metrics(step, values, kind)
            self.last.update(values)
            if kind == "eval":
                tune.report({**self.last, "step": step})

        def params(self, values):
            mlrep.params(values)

        def artifact(self, path, kind="file"):
            mlrep.artifact(path, kind)

        def checkpoint(self, path, step):
            tune.report({**self.last, "step": step}, checkpoint=tune.Checkpoint.from_directory(str(path.parent)))

    rep = TuneReporter()
    try:
        train(cfg, reporter=rep, progress=False)
    except BaseException as exc:
        retry(cl.set_tag, run_id, "error", f"{type(exc).__name__}: {exc}"[:5000])
        retry(cl.set_terminated, run_id, status="FAILED")
        raise
    (out / "final.json").write_text(json.dumps(rep.last))
    retry(cl.set_terminated, run_id, status="FINISHED")


# -- the driver ---------------------------------------------------------------------------
def _main(args) -> int:
    from ablate.config import compose

    cfg, source = compose(args.target, args.overrides)
    name = str(cfg.name or Path(args.target).stem)
    cfg.name = name
    trials = expand_trials(cfg, source)
    res = cfg.resources
    root = storage_root(cfg)
    print(f"study {name}: {len(trials)} trials ({source})")
    for t in trials:
        print(f"  {t['key']}  {t['slug']}  seed {t['seed']}  " + " ".join(f"{k}={v}" for k, v in t["overrides"].items()))
    print(f"resources: {res.cpus_per_trial} CPU, {res.gpus_per_trial} GPU per trial; at most "
          f"{res.max_concurrent or 'unlimited'} at once; Ray at {res.address or os.environ.get('RAY_ADDRESS') or 'local'}")
    print(f"storage: {root / name}")
    if args.dry_run:
        return 0
    return launch(cfg, trials, root, fresh=args.fresh)


def launch(cfg: DictConfig, trials: list[dict], root: Path, fresh: bool = False) -> int:
    import ray
    from ray import tune

    from ablate import tracking

    name, res = str(cfg.name), cfg.resources
    uri = tracking.tracking_uri(cfg.tracking.uri)
    cl = tracking.client(uri)
    exp_id = tracking.experiment_id(cl, str(cfg.tracking.experiment or name), cfg.tracking.artifact_location)
    exp_dir = root / name
    if fresh and exp_dir.exists():
        shutil.rmtree(exp_dir)
    parent_id = tracking.parent_run(cl, exp_id, name, fresh=fresh)
    trials_dir = exp_dir / "trials"
    trials_dir.mkdir(parents=True, exist_ok=True)
    study_yaml = OmegaConf.to_yaml(cfg)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, study_yaml=study_yaml, uri=uri, exp_id=exp_id, parent_id=parent_id,
                             trials_dir=str(trials_dir)),
        {"cpu": float(res.cpus_per_trial), "gpu": float(res.gpus_per_trial)})
    address = res.address or os.environ.get("RAY_ADDRESS")
    ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
             **({} if address else {"num_cpus": max(1, os.cpu_count() or 1)}))
    objective = list(cfg.search.objective)[0]
    tune_cfg = tune.TuneConfig(max_concurrent_trials=int(res.max_concurrent) or None, metric=objective, mode="min")
    run_cfg = tune.RunConfig(name=name, storage_path=str(root), verbose=1,
                             failure_config=tune.FailureConfig(max_failures=int(cfg.search.max_failures)),
                             checkpoint_config=tune.CheckpointConfig(num_to_keep=1))
    path = str(exp_dir)
    if not fresh and tune.Tuner.can_restore(path):
        print(f"resuming study {name} from {path}")
        tuner = tune.Tuner.restore(path, trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(trainable, param_space={"trial": tune.grid_search(trials)}, tune_config=tune_cfg,
                           run_config=run_cfg)
    results = tuner.fit()
    errors = [r for r in results if r.error is not None]
    tracking.retry(cl.set_terminated, parent_id, status="FAILED" if len(errors) == len(results) else "FINISHED")
    df = results.get_dataframe()
    cols = [c for c in df.columns if c.startswith("fid/")]
    slug_col = next((c for c in ("config/trial/slug", "config/trial") if c in df), None)
    if cols and slug_col:
        df["design"] = df[slug_col].map(lambda t: t["slug"] if isinstance(t, dict) else t)
        print(df.groupby("design")[cols].agg(["mean", "std", "count"]).sort_values((objective, "mean")).to_string())
    print(f"{len(results) - len(errors)} trials finished, {len(errors)} failed; "
          f"mlflow ui --backend-store-uri {uri}")
    ray.shutdown()
    return 0 if not errors else 1


def main(argv: list[str] | None = None) -> int:
    from ablate.cli import run_cli

    return run_cli(_main, argv, prog="python -m ablate.run", make_parser=make_parser)


if __name__ == "__main__":
    raise SystemExit(main())
