"""A study's MLflow records as tidy pandas tables, and the statistics a report shows.

    from dashboards.tables import load_trials, load_histories, rank
    trials = load_trials("schedule_vs_target")           # a row per trial
    hist = load_histories("schedule_vs_target")          # step-indexed metrics, long format
    rank(trials, "fid/nfe_1")                            # designs ranked, each paired seed by seed with the leader
    compare(trials, "design A", "design B", "fid/nfe_1") # one paired comparison

A "design" is the component slug plus any train/data settings the study searched beside it (its
seeds are the repeats). Only FINISHED trials enter the statistics; failed and stopped ones are
counted per design (``failed`` / ``stopped`` columns), never dropped silently.

Trials with the same seed share all design-independent randomness, so designs are compared seed by seed:
"better" means the paired difference of log FID (its 95 % t-interval over the shared seeds) excludes 0.
With fewer than 3 shared seeds no interval is given; see ``paired`` for the sampling-SE rule used then.
"""
from __future__ import annotations

import math
import re

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
    """A row per trial (child run): design components and kwargs, seed, status, final and best metrics, cost.

    Also ``slug``, ``preset`` (tag ``preset`` or param ``design.preset`` where a run records one, else "")
    and ``seed_reason`` (the racing tag, else ""); ``attrs["racing"]`` is the parent run's ``racing`` tag.
    """
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
               "error": tags.get("error", ""), "stopped": tags.get("stopped", ""), "slug": tags.get("slug"),
               "preset": tags.get("preset") or params.get("design.preset") or "",  # when the run records it
               "seed_reason": tags.get("seed_reason", ""),  # why this seed exists (racing), if recorded
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
    df = df.sort_values(["design", "seed"]).reset_index(drop=True) if len(df) else df
    df.attrs["racing"] = parent.data.tags.get("racing", "")  # the parent's racing settings, if it raced seeds
    return df


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


# -- the ranking: intervals on log FID, paired differences seed by seed ------------------------------
MIN_SEEDS = 3  # fewer values than this: no t-interval is shown (t(0.975, 1) = 12.7 says nothing useful)
SE_MARGIN = 4.0  # n < 3: separable only where every shared seed's difference exceeds 4 combined sampling SEs
SEEDS_OVER_SE = 2.0  # seed sd >= 2 sampling SE (sampling noise <= 1/4 of the variance): more seeds help most


def too_few(n: int) -> str:
    return f"n={n}: too few seeds for an interval"


def _columns(trials: pd.DataFrame, objective: str) -> tuple[str, str | None]:
    """(objective column, its sampling-SE column ``…fid_se/nfe_N`` or None)."""
    col = objective if objective in trials else f"final/{objective}"
    se = re.sub(r"(^|/)fid/", r"\1fid_se/", col)
    return col, (se if se != col and se in trials else None)


def _log_scale(trials: pd.DataFrame, col: str) -> bool:
    """Log scale when every finished value is > 0 (FID always is); else differences on the raw scale."""
    if col not in trials:
        return True
    x = pd.to_numeric(trials.loc[trials["status"] == "FINISHED", col], errors="coerce")
    x = x[np.isfinite(x)]
    return bool((x > 0).all())


def per_seed(g: pd.DataFrame, col: str, se_col: str | None = None) -> pd.DataFrame:
    """Finished, finite values of one design indexed by seed (a seed recorded twice: the mean): columns value, se."""
    ok = g[g["status"] == "FINISHED"] if "status" in g else g
    if col not in ok:
        return pd.DataFrame({"value": [], "se": []}, index=pd.Index([], name="seed"))
    v = pd.to_numeric(ok[col], errors="coerce")
    se = pd.to_numeric(ok[se_col], errors="coerce") if se_col and se_col in ok else pd.Series(math.nan, index=ok.index)
    d = pd.DataFrame({"seed": ok["seed"].values, "value": v.values, "se": se.values})
    d = d[np.isfinite(d["value"])]
    return d.groupby("seed")[["value", "se"]].mean()


def log_interval(values) -> tuple[float, float, float, int]:
    """(geometric mean, low, high, n): the 95 % t-interval of mean log value, exponentiated (always > 0).

    n < 3 gives (geometric mean, 0, inf, n): no interval is claimed from one or two values.
    """
    x = np.asarray([v for v in values if v is not None and np.isfinite(v) and v > 0], dtype=float)
    n = len(x)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    lx = np.log(x)
    gm = float(np.exp(lx.mean()))
    if n < MIN_SEEDS:
        return gm, 0.0, math.inf, n
    hw = float(stats.t.ppf(0.975, n - 1) * lx.std(ddof=1) / math.sqrt(n))
    return gm, float(np.exp(lx.mean() - hw)), float(np.exp(lx.mean() + hw)), n


def paired(a: pd.DataFrame, b: pd.DataFrame, log: bool = True) -> dict:
    """Design a against design b, seed by seed, over the seeds both have (``per_seed`` tables).

    d_s = log a_s − log b_s (raw a_s − b_s when ``log`` is False). With n ≥ 3 shared seeds: the mean of
    d with its 95 % t-interval; separable = the interval excludes 0 (ratio 1). With n = 1–2: no interval;
    separable only when sampling SEs are known for both at every shared seed, every d_s has the same sign
    and |d_s| > 4·SE_s, with SE_s = sqrt((se_a/a_s)² + (se_b/b_s)²) on the log scale (the delta method;
    sqrt(se_a² + se_b²) raw); otherwise undetermined (None). Only sampling noise is covered then, not the
    seed-to-seed noise of training, which one or two seeds cannot measure.
    """
    shared = a.index.intersection(b.index)
    if log:
        shared = shared[(a.loc[shared, "value"] > 0).values & (b.loc[shared, "value"] > 0).values]
    n = len(shared)
    out = {"n_paired": n, "diff": math.nan, "diff_low": math.nan, "diff_high": math.nan,
           "ratio": math.nan, "ratio_low": math.nan, "ratio_high": math.nan, "separable": None, "rule": ""}
    if n == 0:
        out["text"] = "no seeds in common: undetermined"
        out["estimate"] = "no seeds in common"
        out["rule"] = "no shared seeds"
        return out
    va, vb = a.loc[shared, "value"].to_numpy(float), b.loc[shared, "value"].to_numpy(float)
    d = np.log(va) - np.log(vb) if log else va - vb
    m = float(d.mean())
    out["diff"] = m
    fmt = (lambda x: f"×{math.exp(x):.3g}") if log else (lambda x: f"{x:+.3g}")
    if n >= MIN_SEEDS:
        hw = float(stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n))
        out.update(diff_low=m - hw, diff_high=m + hw, separable=bool(abs(m) > hw), rule="paired t-interval")
        if log:
            out.update(ratio_low=math.exp(m - hw), ratio_high=math.exp(m + hw))
        lo, hi = (f"{math.exp(m - hw):.3g}", f"{math.exp(m + hw):.3g}") if log else (f"{m - hw:+.3g}",
                                                                                    f"{m + hw:+.3g}")
        out["estimate"] = f"{fmt(m)} [{lo}, {hi}] n={n}"
        out["text"] = f"{out['estimate']}: {'separable' if out['separable'] else 'not separable'}"
    else:
        sa, sb = a.loc[shared, "se"].to_numpy(float), b.loc[shared, "se"].to_numpy(float)
        have_se = bool(np.isfinite(sa).all() and np.isfinite(sb).all())
        if have_se:
            se = np.sqrt((sa / va) ** 2 + (sb / vb) ** 2) if log else np.sqrt(sa ** 2 + sb ** 2)
            wide = bool((np.abs(d) > SE_MARGIN * se).all() and (np.sign(d) == np.sign(d[0])).all())
            out["separable"] = True if wide else None
            out["rule"] = f"|d| > {SE_MARGIN:g} sampling SE at every shared seed" if wide else \
                f"within {SE_MARGIN:g} sampling SE at some shared seed"
        else:
            out["rule"] = "no sampling SE (fid_se) to judge by"
        verdict = f"separable (> {SE_MARGIN:g} sampling SE at every seed)" if out["separable"] else \
            ("undetermined" + ("" if have_se else ", no fid_se"))
        out["estimate"] = f"{fmt(m)}, {too_few(n)}"
        out["text"] = f"{out['estimate']}; {verdict}"
    if log:
        out["ratio"] = math.exp(m)
    return out


def noise_hint(sd: float, se: float, n: int) -> str:
    """More seeds or more samples? Seed sd (over seeds, sampling noise included) against the mean sampling SE."""
    if not np.isfinite(se) or se <= 0:
        return ""
    if n < 2 or not np.isfinite(sd):
        return f"n={n}: no seed sd yet"
    r = sd / se
    if r >= SEEDS_OVER_SE:
        return f"more seeds (seed sd {r:.1f}× sampling SE)"
    return f"more samples (seed sd only {r:.1f}× sampling SE)"


def _seed_reasons(g: pd.DataFrame) -> str:
    if "seed_reason" not in g:
        return ""
    reasons = g.sort_values("seed").drop_duplicates("seed")["seed_reason"].fillna("").astype(str)
    counts: dict[str, int] = {}
    for r in reasons:
        if r:
            counts[r] = counts.get(r, 0) + 1
    return "; ".join(f"{c}× {r}" for r, c in counts.items())


def rank(trials: pd.DataFrame, objective: str, by: str = "design") -> pd.DataFrame:
    """Designs ranked (lower is better) by the geometric mean over seeds, each paired with the leader.

    Columns: ``mean``/``std``/``n`` (arithmetic, over finished seeds), ``gmean`` with ``ci_low``/``ci_high``:
    the 95 % t-interval of mean log value, exponentiated (> 0; with n < 3: 0 and inf, and ``interval`` says
    "n=2: too few seeds for an interval"). Against the leader (``paired``): ``n_paired`` shared seeds,
    ``ratio`` = exp(mean of log design − log leader) with ``ratio_low``/``ratio_high`` (n_paired ≥ 3),
    ``diff*`` the same on the log scale, ``vs_leader`` in words, ``verdict`` (leader / separable / not
    separable / undetermined) and ``separable`` (True / False / None = undetermined). The leader is
    separable when every other design is; False when one is not. ``fid_se`` is the mean sampling SE of
    the FID (from ``fid_se/nfe_N``) beside the seed ``std``, ``noise`` the hint "more seeds or more
    samples?". ``seeds``: the seeds the design got (any status), ``seed_reason`` why (racing tags).
    Failed/stopped trials are counted, not used. Objectives with values <= 0 are compared on the raw
    scale (``diff``; no ratios; ``ci_*`` then the plain t-interval of the mean).
    """
    col, se_col = _columns(trials, objective)
    log = _log_scale(trials, col)
    rows, seeds = [], {}
    for name, g in trials.groupby(by, sort=False):
        ps = per_seed(g, col, se_col)
        seeds[name] = ps
        ok = g[g["status"] == "FINISHED"]
        mean, sd, n, hw = ci95(ok[col] if col in ok else [])
        if log:
            gm, lo, hi, _ = log_interval(ok[col] if col in ok else [])
        else:
            gm, lo, hi = mean, mean - hw, mean + hw
            lo, hi = (-math.inf, math.inf) if n < MIN_SEEDS and n else (lo, hi)
        se = float(ps["se"].mean()) if ps["se"].notna().any() else math.nan
        rows.append({by: name, "mean": mean, "std": sd, "n": n, "ci_low": lo, "ci_high": hi,
                     "failed": int((g["status"] == "FAILED").sum()), "stopped": int((g["status"] == "KILLED").sum()),
                     "gmean": gm, "interval": (too_few(n) if 0 < n < MIN_SEEDS else
                                               f"[{lo:.4g}, {hi:.4g}]" if n else "no finished seeds"),
                     "fid_se": se, "noise": noise_hint(sd, se, n), "seeds": int(g["seed"].nunique()),
                     "seed_reason": _seed_reasons(g)})
    cols = ["rank", by, "mean", "std", "n", "ci_low", "ci_high", "failed", "stopped", "separable", "gmean", "interval",
            "verdict", "vs_leader", "n_paired", "ratio", "ratio_low", "ratio_high", "diff", "diff_low", "diff_high",
            "fid_se", "noise", "seeds", "seed_reason"]
    if not rows:
        out = pd.DataFrame(columns=cols)
        out.attrs.update(objective=objective, scale="log" if log else "raw")
        return out
    out = pd.DataFrame(rows).sort_values(["gmean", "mean"], na_position="last").reset_index(drop=True)
    out.insert(0, "rank", range(1, len(out) + 1))
    leader = out.loc[0, by]
    pair = [paired(seeds[d], seeds[leader], log) for d in out[by]]
    for key in ("n_paired", "ratio", "ratio_low", "ratio_high", "diff", "diff_low", "diff_high", "separable"):
        out[key] = pd.Series([p[key] for p in pair], dtype=object if key == "separable" else None)
    out["vs_leader"] = [p["text"] for p in pair]
    out["verdict"] = ["separable" if s is True else "not separable" if s is False else "undetermined"
                      for s in out["separable"]]
    others = list(out["separable"].iloc[1:])
    out.at[0, "separable"] = False if any(s is False for s in others) else (None if any(s is None for s in others)
                                                                            else True)
    out.at[0, "verdict"] = "leader"
    out.at[0, "vs_leader"] = "leader"
    out.attrs.update(objective=objective, scale="log" if log else "raw")
    return out[cols]


def compare(trials: pd.DataFrame, a: str, b: str, objective: str, by: str = "design") -> dict:
    """``paired`` for two named designs of a study (a against b: ratio < 1 means a is ahead)."""
    col, se_col = _columns(trials, objective)
    ga, gb = trials[trials[by] == a], trials[trials[by] == b]
    return paired(per_seed(ga, col, se_col), per_seed(gb, col, se_col), _log_scale(trials, col))


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
