"""A study's MLflow records as tidy pandas tables, and the statistics a report shows.

    from dashboards.tables import load_trials, load_histories, rank
    trials = load_trials("schedule_vs_target")           # a row per trial
    hist = load_histories("schedule_vs_target")          # step-indexed metrics, long format
    rank(trials, "fid/nfe_1")                            # designs ranked with 95 % intervals

A "design" is the component slug plus any train/data settings the study searched beside it (its
seeds are the repeats). Only FINISHED trials enter the statistics; failed and stopped ones are
counted per design (``failed`` / ``stopped`` columns), never dropped silently.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

DESIGN_KINDS = ("schedule", "time_sampler", "target", "weighting", "backbone", "guidance")


def _client(uri: str | None):
    from ablate.tracking import client, tracking_uri

    return client(tracking_uri(uri))


def _parent(cl, study: str):
    from ablate.tracking import retry

    exp = retry(cl.get_experiment_by_name, study)
    if exp is None:
        raise ValueError(f"no MLflow experiment named '{study}' at this tracking URI")
    runs = retry(cl.search_runs, [exp.experiment_id],
                 filter_string=f"tags.ablate_role = 'study' and tags.study = '{study}' and tags.superseded = 'false'")
    if not runs:
        raise ValueError(f"experiment '{study}' has no study (parent) run")
    return exp, runs[0]


def load_trials(study: str, uri: str | None = None) -> pd.DataFrame:
    """A row per trial (child run): design components and kwargs, seed, status, final and best metrics, cost."""
    from ablate.tracking import retry

    cl = _client(uri)
    exp, parent = _parent(cl, study)
    runs = retry(cl.search_runs, [exp.experiment_id],
                 filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", max_results=50000)
    rows = []
    for r in runs:
        tags, params, metrics = r.data.tags, r.data.params, r.data.metrics
        variant = tags.get("variant", "")  # train/data settings searched beside the design (e.g. train.lr=0.001)
        row = {"run_id": r.info.run_id, "trial_key": tags.get("trial_key"), "design_id": tags.get("design_id"),
               "design": f"{tags.get('slug')} [{variant}]" if variant else tags.get("slug"), "seed": int(tags.get("seed", 0)), "status": r.info.status,
               "error": tags.get("error", ""), "stopped": tags.get("stopped", ""),
               "wall_s": ((r.info.end_time or r.info.start_time) - r.info.start_time) / 1000.0}
        row.update({k: _num(v) for k, v in params.items() if k.startswith(("design.", "train.", "fid."))})
        for key, val in metrics.items():
            row[f"final/{key}"] = val
        for key in [k for k in metrics if k.startswith(("fid/", "kid/"))]:
            hist = retry(cl.get_metric_history, r.info.run_id, key)
            row[f"best/{key}"] = min(m.value for m in hist) if hist else math.nan
        hist = retry(cl.get_metric_history, r.info.run_id, "train/loss") if "train/loss" in metrics else []
        row["steps"] = max((m.step for m in hist), default=0)
        rows.append(row)
    df = pd.DataFrame(rows)
    return df.sort_values(["design", "seed"]).reset_index(drop=True) if len(df) else df


def load_histories(study: str, uri: str | None = None, prefixes=("fid/", "train/loss")) -> pd.DataFrame:
    """Long table: run_id, design, seed, metric, step, value (every logged point)."""
    from ablate.tracking import retry

    cl = _client(uri)
    trials = load_trials(study, uri)
    rows = []
    for t in trials.itertuples():
        run = retry(cl.get_run, t.run_id)
        for key in run.data.metrics:
            if key.startswith(tuple(prefixes)):
                for m in retry(cl.get_metric_history, t.run_id, key):
                    rows.append({"run_id": t.run_id, "design": t.design, "seed": t.seed, "metric": key,
                                 "step": m.step, "value": m.value})
    return pd.DataFrame(rows, columns=["run_id", "design", "seed", "metric", "step", "value"])


def _num(v: str):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return int(f) if f.is_integer() and "." not in str(v) and "e" not in str(v).lower() else f


def ci95(values) -> tuple[float, float, int, float]:
    """(mean, std, n, half-width of the 95 % t interval); half-width is inf for n < 2."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    n = len(x)
    if n == 0:
        return math.nan, math.nan, 0, math.nan
    mean = float(x.mean())
    if n < 2:
        return mean, math.nan, 1, math.inf
    sd = float(x.std(ddof=1))
    return mean, sd, n, float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n))


def rank(trials: pd.DataFrame, objective: str, by: str = "design") -> pd.DataFrame:
    """Designs ranked by the mean objective (lower is better) with 95 % intervals over seeds.

    ``separable`` is False for designs whose interval overlaps the leader's (and for the leader itself
    when another design overlaps it). Failed/stopped trials are counted, not used.
    """
    col = objective if objective in trials else f"final/{objective}"
    rows = []
    for name, g in trials.groupby(by, sort=False):
        ok = g[g["status"] == "FINISHED"]
        mean, sd, n, hw = ci95(ok[col] if col in ok else [])
        rows.append({by: name, "mean": mean, "std": sd, "n": n, "ci_low": mean - hw, "ci_high": mean + hw,
                     "failed": int((g["status"] == "FAILED").sum()), "stopped": int((g["status"] == "KILLED").sum())})
    out = pd.DataFrame(rows).sort_values("mean", na_position="last").reset_index(drop=True)
    out.insert(0, "rank", range(1, len(out) + 1))
    if len(out):
        lead_hi = out.loc[0, "ci_high"]
        overlap = out["ci_low"] <= lead_hi
        out["separable"] = ~overlap
        out.loc[0, "separable"] = not bool(overlap.iloc[1:].any())
    out.attrs["objective"] = objective
    return out


def main_effects(trials: pd.DataFrame, objective: str) -> pd.DataFrame:
    """Per design kind and choice: mean and 95 % interval of the objective over every finished trial with it."""
    col = objective if objective in trials else f"final/{objective}"
    ok = trials[trials["status"] == "FINISHED"]
    grand = ok[col].mean()
    rows = []
    for kind in DESIGN_KINDS:
        key = f"design.{kind}.name"
        if key not in ok or ok[key].nunique() < 2:
            continue
        for choice, g in ok.groupby(key):
            mean, sd, n, hw = ci95(g[col])
            rows.append({"kind": kind, "choice": choice, "mean": mean, "effect": mean - grand, "n": n,
                         "ci_low": mean - hw, "ci_high": mean + hw})
    out = pd.DataFrame(rows, columns=["kind", "choice", "mean", "effect", "n", "ci_low", "ci_high"])
    if len(out):  # kinds ordered by the spread of their choices: the one that matters most first
        spread = out.groupby("kind")["mean"].agg(lambda m: m.max() - m.min())
        out["spread"] = out["kind"].map(spread)
        out = out.sort_values(["spread", "mean"], ascending=[False, True]).reset_index(drop=True)
    return out


def interaction(trials: pd.DataFrame, a: str, b: str, objective: str) -> pd.DataFrame:
    """Mean objective for every (a choice, b choice) pair; a, b are design kinds (e.g. schedule × target)."""
    col = objective if objective in trials else f"final/{objective}"
    ok = trials[trials["status"] == "FINISHED"]
    return ok.pivot_table(index=f"design.{a}.name", columns=f"design.{b}.name", values=col, aggfunc="mean")


def importance(trials: pd.DataFrame, objective: str, seed: int = 0) -> pd.Series:
    """Parameter importance of the searched design choices with optuna's fANOVA evaluator.

    The finished trials become an in-memory Optuna study (one categorical/float parameter per design
    column that varies), so the same evaluator serves grid and Optuna studies.
    """
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    col = objective if objective in trials else f"final/{objective}"
    ok = trials[(trials["status"] == "FINISHED") & trials[col].notna()]
    cols = [c for c in ok.columns if c.startswith(("design.", "train.")) and ok[c].nunique(dropna=False) > 1
            and c not in ("train.seed", "train.out_dir")]
    if not cols or len(ok) < 2:
        return pd.Series(dtype=float)
    dists = {}
    for c in cols:
        vals = ok[c]
        if pd.api.types.is_numeric_dtype(vals) and vals.nunique() > 2:
            dists[c] = FloatDistribution(float(vals.min()), float(vals.max()))
        else:
            dists[c] = CategoricalDistribution(sorted(map(str, vals.unique())))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize")
    for _, r in ok.iterrows():
        params = {c: (float(r[c]) if isinstance(dists[c], FloatDistribution) else str(r[c])) for c in cols}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=float(r[col])))
    imp = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=seed))
    return pd.Series(imp, name=f"fANOVA importance for {objective}")
