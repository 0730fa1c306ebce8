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
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

DESIGN_KINDS = ("schedule", "time_sampler", "target", "weighting", "backbone", "guidance")


def _client(uri: str | None):
    from ablate.tracking import client, tracking_uri

    return client(tracking_uri(uri))


def _parent(cl, study: str):
    from ablate.tracking import mlflow_literal, retry

    exp = retry(cl.get_experiment_by_name, study)
    if exp is None:
        raise ValueError(f"no MLflow experiment named '{study}' at this tracking URI")
    runs = retry(cl.search_runs, [exp.experiment_id],
                 filter_string=f"tags.ablate_role = 'study' and tags.study = {mlflow_literal(study)} "
                                "and tags.superseded = 'false'")
    if not runs:
        raise ValueError(f"experiment '{study}' has no study (parent) run")
    return exp, runs[0]


def load_trials(study: str, uri: str | None = None) -> pd.DataFrame:
    """A row per trial (child run): design components and kwargs, seed, status, final and best metrics, cost.

    Also ``slug``, ``preset`` (tag ``preset`` or param ``design.preset`` where a run records one, else "")
    and ``seed_reason`` (the racing tag, else ""); ``attrs["racing"]`` is the parent run's ``racing`` tag.
    """
    from ablate.tracking import mlflow_literal, retry

    cl = _client(uri)
    exp, parent = _parent(cl, study)
    runs = retry(cl.search_runs, [exp.experiment_id],
                 filter_string=f"tags.`mlflow.parentRunId` = {mlflow_literal(parent.info.run_id)}",
                 max_results=50000)
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
    from ablate.tracking import mlflow_literal, retry

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


# -- the design's structure: which factors a study varies independently ------------------------------
# A factor is a ``design.<kind>.name`` column, a searched kwarg ``design.<kind>.<kwarg>`` or a searched
# ``train.*`` setting. Factors whose levels never vary independently over the trials (one determines the
# other: joint level sets in one-to-one correspondence with the finer one's) form one factor; options of a
# component that exist only for one of its choices are nested under that choice. Main effects, importance,
# interactions and the design labels are all computed over this one factor set.
WORDS = {"time_sampler": "time sampler"}  # how a kind is written for people
LEAD_ORDER = ("target", "weighting", "guidance", "time_sampler", "schedule", "backbone")  # how a group is named
CONTINUOUS = 5  # a numeric factor with more distinct values than this is continuous (binned for main effects)
NA = "—"  # the level of a kwarg where its component has no such option


def _fmt(v) -> str:
    if v is None or (not isinstance(v, str) and pd.isna(v)):
        return NA
    if isinstance(v, (float, np.floating)):
        return f"{float(v):g}"
    return str(v)


def _word(col: str) -> str:
    """design.time_sampler.name -> 'time sampler'; design.target.jvp -> 'target.jvp'; train.lr stays."""
    parts = col.split(".")
    if col.startswith("design.") and len(parts) == 3:
        return WORDS.get(parts[1], parts[1]) if parts[2] == "name" else f"{parts[1]}.{parts[2]}"
    return col


def _rank_key(col: str) -> tuple:
    parts = col.split(".")
    if col.startswith("design.") and len(parts) == 3:
        kind = LEAD_ORDER.index(parts[1]) if parts[1] in LEAD_ORDER else len(LEAD_ORDER)
        return (0 if parts[2] == "name" else 1, kind, col)
    return (2, 0, col)


@dataclass
class Factor:
    """One independent factor of a study: a column, or a group of columns that always change together."""

    columns: list[str]  # the lead (most levels) first
    levels: pd.Series  # per trial (the trials' index): the level's label
    continuous: bool = False  # numeric with many values: ``values`` holds them, ``levels`` their tertiles
    values: pd.Series | None = None
    preset: bool = False  # a group whose levels are the study's presets (labelled by preset name)

    @property
    def key(self) -> str:
        return self.columns[0]

    @property
    def name(self) -> str:
        """The lead's name: 'target', 'schedule', 'target.jvp', 'train.lr'."""
        return _word(self.columns[0])

    @property
    def members(self) -> list[str]:
        """The members as people read them: components by name, an option only where its component is not."""
        kinds = {c.split(".")[1] for c in self.columns if c.startswith("design.") and c.endswith(".name")}
        return list(dict.fromkeys(_word(c) for c in self.columns
                                  if not (c.startswith("design.") and c.count(".") == 2 and not c.endswith(".name")
                                          and c.split(".")[1] in kinds)))

    @property
    def aliased(self) -> list[str]:
        """The members that change with the lead (empty for a factor of its own)."""
        return self.members[1:]

    @property
    def label(self) -> str:
        return " + ".join(self.members)

    @property
    def short(self) -> str:
        """'preset' for a group whose levels are the presets, else the label."""
        return "preset" if self.preset and len(self.columns) > 1 else self.label

    @property
    def caption(self) -> str:
        if len(self.columns) == 1:
            return self.label
        return self.label + (", varied together as the preset" if self.preset else ", varied together")

    @property
    def choices(self) -> list[str]:
        if self.continuous:  # tertiles, low to high
            return list(dict.fromkeys(self.levels[self.values.sort_values().index]))
        return list(dict.fromkeys(self.levels))

    def __repr__(self) -> str:
        return f"Factor({self.caption!r}: {', '.join(self.choices)})"


@dataclass
class Structure:
    """What a study's trial set varies: its independent factors, which pairs are crossed, nested options."""

    factors: list[Factor]
    crossed: list[tuple[Factor, Factor]]  # both vary and every combination of levels occurs
    partial: list[tuple[Factor, Factor]]  # neither aliased nor crossed: some combinations never occur
    nested: pd.DataFrame  # column, component, choice, option, values, varies, note
    n_trials: int = 0
    n_designs: int = 0

    def factor(self, key: str) -> Factor | None:
        return next((f for f in self.factors if key in f.columns or key in (f.label, f.name, f.short)), None)

    @property
    def aliased(self) -> list[Factor]:
        return [f for f in self.factors if len(f.columns) > 1]

    def lines(self) -> list[str]:
        """What the study can and cannot separate, in words (the dry run prints these)."""
        out = [f"what this design can separate ({self.n_designs} designs, {self.n_trials} trials):"]
        if not self.factors:
            return out + ["  nothing varies between the trials: a single design (its seeds are repeats)"]
        for f in self.factors:
            what = (f"continuous, {f.values.min():.3g} to {f.values.max():.3g}" if f.continuous
                    else ", ".join(f.choices))
            out.append(f"  factor {f.caption}: {what}")
        for f in self.aliased:
            out.append(f"  cannot separate {f.name} from {', '.join(f.aliased)}: they always change together, "
                       "so they have one effect" + (" (the preset's)" if f.preset else ""))
        for a, b in self.crossed:
            out.append(f"  can separate {a.short} from {b.short} and their interaction (every combination occurs)")
        for a, b in self.partial:
            out.append(f"  {a.short} and {b.short}: not crossed (some combinations never occur): their effects "
                       f"are partly confounded, no interaction")
        if len(self.factors) == 1 and not self.factors[0].continuous:
            out.append(f"  one factor: the ranking compares its {len(self.factors[0].choices)} levels, "
                       f"no interactions")
        if len(self.nested):
            out.append("  nested options (exist only for one choice of their component; not ranked):")
        for (kind, choice), g in self.nested.groupby(["component", "choice"], sort=False):
            words = [f"{r.option} ({r.values}: {r.note})" if r.varies else r.option for r in g.itertuples()]
            out.append(f"    {WORDS.get(kind, kind)}={choice}: {', '.join(words)}")
        return out


def _codes(levels: pd.Series) -> np.ndarray:
    return pd.factorize(levels.astype(object), use_na_sentinel=False)[0]


def _determines(a: np.ndarray, b: np.ndarray) -> bool:
    """Each level of a goes with one level of b."""
    return bool(pd.Series(b).groupby(a).nunique().max() <= 1)


def _crossed(a: np.ndarray, b: np.ndarray) -> bool:
    na, nb = len(set(a)), len(set(b))
    return na > 1 and nb > 1 and len(set(zip(a.tolist(), b.tolist()))) == na * nb


def _presets_of(t: pd.DataFrame) -> pd.Series:
    """Per trial: the preset it was recorded as (tag/param ``preset``), else matched by its slug; NaN if none."""
    out = pd.Series(np.nan, index=t.index, dtype=object)
    for col in ("preset", "design.preset"):
        if col in t:
            v = t[col].astype(object).where(t[col].notna(), None)
            v = v.map(lambda x: x if isinstance(x, str) and x else np.nan)
            out = out.where(out.notna(), v)
    if out.notna().any() or "slug" not in t or "design" not in t:
        return out
    try:  # older runs without a preset tag: match the slug against each preset's (dashboards.paper)
        from dashboards.paper import presets

        by_design = presets(t)
        return t["design"].map(by_design).where(lambda s: s.notna(), np.nan)
    except Exception:  # noqa: BLE001 - no presets known here: the groups are labelled by their lead
        return out


def design_structure(trials: pd.DataFrame) -> Structure:
    """The study's factors from its trial set (every status: the design as planned).

    Candidates: ``design.<kind>.name`` columns that vary, kwargs ``design.<kind>.<kwarg>`` whose values vary
    where present, ``train.*`` settings that vary. A kwarg present only where its component's name has one
    value (MeanFlow's ``jvp``) is *nested* under that choice, not a factor. Two categorical candidates where
    one determines the other (every level of one goes with a single level of the other: their joint levels
    are one-to-one with the finer one's) are aliased and become one factor, named by the member with the
    most levels (target before schedule, weighting, guidance, time sampler); two candidates that are crossed
    are never merged. A group whose levels are the study's presets is labelled by preset name; a study of
    whole designs (every design one preset, unchanged: ``search.grid.design: [{preset: …}, …]``) has one
    design factor, the preset.
    """
    t = trials
    cand: dict[str, pd.Series] = {}
    nested = []
    for c in t.columns:
        parts = c.split(".")
        if c.startswith("design.") and len(parts) == 3:
            kind, kw = parts[1], parts[2]
            col = t[c].astype(object).where(t[c].notna(), None)
            present = t[c].notna()
            if kw == "name":
                if col.map(_fmt).nunique() > 1:
                    cand[c] = col
                continue
            if not present.any():
                continue
            vals = col[present]
            parent = f"design.{kind}.name"
            if not present.all() and parent in t and t.loc[present, parent].nunique(dropna=False) == 1:
                nested.append({"column": c, "component": kind, "choice": _fmt(t.loc[present, parent].iloc[0]),
                               "option": kw, "values": ", ".join(dict.fromkeys(vals.map(_fmt))),
                               "varies": vals.map(_fmt).nunique() > 1, "note": "fixed"})
                continue
            if vals.map(_fmt).nunique() > 1:
                cand[c] = col
        elif c.startswith("train.") and c not in ("train.seed", "train.out_dir"):
            if t[c].dropna().map(_fmt).nunique() > 1:
                cand[c] = t[c].astype(object).where(t[c].notna(), None)
    numeric = {c: pd.to_numeric(v, errors="coerce") for c, v in cand.items()}
    continuous = {c for c, v in numeric.items() if v.notna().all() and v.nunique() > CONTINUOUS}
    cats = sorted((c for c in cand if c not in continuous),
                  key=lambda c: (-cand[c].map(_fmt).nunique(), _rank_key(c)))
    codes = {c: _codes(cand[c].map(_fmt)) for c in cats}
    group = {c: [c] for c in cats}  # union of aliased candidates (finest first)
    for a in cats:
        for b in cats:
            ga, gb = group[a], group[b]
            if ga is gb or not (_determines(codes[a], codes[b]) or _determines(codes[b], codes[a])):
                continue
            if any(_crossed(codes[x], codes[y]) for x in ga for y in gb):
                continue  # never merge two factors the design crosses
            merged = ga + gb
            for m in merged:
                group[m] = merged
    presets = _presets_of(t) if cats else pd.Series(dtype=object)
    design_cats = [c for c in cats if c.startswith("design.")]
    key = t["slug"] if "slug" in t else (t["design"] if "design" in t else None)
    if len(design_cats) > 1 and key is not None and presets.notna().all() \
            and presets.groupby(key.values).nunique().max() == 1 and presets.nunique() == key.nunique():
        merged = list(design_cats)  # whole designs (every design one preset, unchanged): one factor, the preset
        for m in merged:
            group[m] = merged
    factors, seen = [], set()
    for c in cats:
        if id(group[c]) in seen:
            continue
        seen.add(id(group[c]))
        members = sorted(group[c], key=lambda m: (_rank_key(m)[0], -cand[m].map(_fmt).nunique(), _rank_key(m)))
        members = members[:1] + sorted(members[1:], key=_rank_key)
        joint = pd.Series(list(zip(*(cand[m].map(_fmt) for m in members))), index=t.index)
        levels, is_preset = _group_levels(joint, presets, len(members) > 1)
        factors.append(Factor(members, levels, preset=is_preset))
    for c in sorted(continuous, key=_rank_key):
        v = numeric[c]
        bins = pd.qcut(v, 3, labels=False, duplicates="drop")  # tertiles, labelled by the values they hold
        span = v.groupby(bins).agg(["min", "max"])
        labels = bins.map({b: f"{r['min']:.3g}–{r['max']:.3g}" for b, r in span.iterrows()}).astype(object)
        factors.append(Factor([c], labels, continuous=True, values=v))
    factors.sort(key=lambda f: (f.continuous, _rank_key(f.key)))
    crossed, partial = [], []
    cat_f = [f for f in factors if not f.continuous]
    for i, a in enumerate(cat_f):
        for b in cat_f[i + 1:]:
            (crossed if _crossed(_codes(a.levels), _codes(b.levels)) else partial).append((a, b))
    nest = pd.DataFrame(nested, columns=["column", "component", "choice", "option", "values", "varies", "note"])
    for i, r in nest.iterrows():  # a varying nested option: is it separable within its choice?
        if not r["varies"]:
            continue
        sub = t[r["column"]].notna()
        own = _codes(t.loc[sub, r["column"]].map(_fmt))
        with_ = [f.short for f in cat_f if len(set(_codes(f.levels[sub]))) > 1
                 and (_determines(own, _codes(f.levels[sub])) or _determines(_codes(f.levels[sub]), own))]
        nest.at[i, "note"] = (f"varies with the {' and the '.join(with_)}" if with_ else
                              f"its own effect within {WORDS.get(r['component'], r['component'])}={r['choice']}")
    n_designs = t["design"].nunique() if "design" in t else (t["slug"].nunique() if "slug" in t else len(t))
    return Structure(factors, crossed, partial, nest, len(t), int(n_designs))


def _group_levels(joint: pd.Series, presets: pd.Series, group: bool) -> tuple[pd.Series, bool]:
    """Level labels of a factor from its members' joint values: the preset name where every level has one
    (a group only), else the lead's value, with more members' values where the lead's alone repeats."""
    keys = list(dict.fromkeys(joint))
    if group and presets.notna().any():
        names = {}
        for k in keys:
            ps = set(presets[joint.map(lambda j: j == k)].dropna())
            names[k] = ps.pop() if len(ps) == 1 else None
        if all(names.values()) and len(set(names.values())) == len(keys):
            return joint.map(names).astype(object), True
    width = 1
    while width < len(keys[0]) and len({k[:width] for k in keys}) < len(keys):
        width += 1
    lab = {k: " / ".join(k[:width]) for k in keys}
    return joint.map(lab).astype(object), False


def _structure(trials: pd.DataFrame, structure: Structure | None) -> Structure:
    return structure if structure is not None else design_structure(trials)


def _finished(trials: pd.DataFrame, col: str) -> pd.DataFrame:
    ok = trials[trials["status"] == "FINISHED"] if "status" in trials else trials
    if col not in ok:
        return ok.iloc[0:0]
    return ok[pd.to_numeric(ok[col], errors="coerce").notna()]


def main_effects(trials: pd.DataFrame, objective: str, structure: Structure | None = None) -> pd.DataFrame:
    """Per independent factor and level: mean and 95 % interval of the objective over the finished trials.

    Factors are those of ``design_structure``: aliased components appear once (``factor`` names every member,
    ``aliased`` the ones that change with the lead ``kind``); nested options are not here (``nested_effects``);
    a continuous factor by tertiles. Ordered by the spread of the level means: the one that matters most first.
    """
    col = objective if objective in trials else f"final/{objective}"
    st = _structure(trials, structure)
    ok = _finished(trials, col)
    y = pd.to_numeric(ok[col], errors="coerce") if col in ok else pd.Series(dtype=float)
    grand = y.mean()
    rows = []
    for f in st.factors:
        lev = f.levels.loc[ok.index]
        for choice in f.choices:
            g = y[lev == choice]
            if not len(g):
                continue
            mean, sd, n, hw = ci95(g)
            rows.append({"kind": f.name, "factor": f.label, "aliased": ", ".join(f.aliased), "choice": choice,
                         "mean": mean, "effect": mean - grand, "n": n, "ci_low": mean - hw, "ci_high": mean + hw})
    cols = ["kind", "factor", "aliased", "choice", "mean", "effect", "n", "ci_low", "ci_high", "spread"]
    out = pd.DataFrame(rows, columns=cols[:-1])
    if len(out):  # factors ordered by the spread of their levels: the one that matters most first
        spread = out.groupby("kind")["mean"].agg(lambda m: m.max() - m.min())
        out["spread"] = out["kind"].map(spread)
        out = out.sort_values(["spread", "kind", "mean"], ascending=[False, True, True]).reset_index(drop=True)
    else:
        out["spread"] = pd.Series(dtype=float)
    return out


def nested_effects(trials: pd.DataFrame, objective: str, structure: Structure | None = None) -> pd.DataFrame:
    """Options nested under one choice of a component: per value, the objective over the trials with that
    choice (only options that vary there and are not aliased with a factor)."""
    col = objective if objective in trials else f"final/{objective}"
    st = _structure(trials, structure)
    ok = _finished(trials, col)
    rows = []
    for r in st.nested.itertuples():
        if not r.varies or r.note.startswith("varies with"):
            continue
        sub = ok[ok[r.column].notna()]
        for value, g in sub.groupby(sub[r.column].map(_fmt), sort=False):
            mean, sd, n, hw = ci95(pd.to_numeric(g[col], errors="coerce"))
            rows.append({"component": r.component, "choice": r.choice, "option": r.option, "value": value,
                         "mean": mean, "n": n, "ci_low": mean - hw, "ci_high": mean + hw})
    return pd.DataFrame(rows, columns=["component", "choice", "option", "value", "mean", "n", "ci_low", "ci_high"])


def interaction(trials: pd.DataFrame, a: str, b: str, objective: str) -> pd.DataFrame:
    """Mean objective for every (a choice, b choice) pair; a, b are design kinds (e.g. schedule × target)."""
    col = objective if objective in trials else f"final/{objective}"
    ok = trials[trials["status"] == "FINISHED"]
    return ok.pivot_table(index=f"design.{a}.name", columns=f"design.{b}.name", values=col, aggfunc="mean")


def interactions(trials: pd.DataFrame, objective: str, structure: Structure | None = None
                 ) -> list[tuple[Factor, Factor, pd.DataFrame]]:
    """(a, b, mean objective per level pair) for each pair of factors the design crosses, and only those."""
    col = objective if objective in trials else f"final/{objective}"
    st = _structure(trials, structure)
    ok = _finished(trials, col)
    out = []
    for a, b in st.crossed:
        y = pd.to_numeric(ok[col], errors="coerce")
        tab = y.groupby([a.levels.loc[ok.index], b.levels.loc[ok.index]]).mean().unstack()
        tab = tab.reindex(index=[c for c in a.choices if c in tab.index], columns=[c for c in b.choices
                                                                                  if c in tab.columns])
        tab.index.name, tab.columns.name = a.short, b.short
        out.append((a, b, tab))
    return out


def importance(trials: pd.DataFrame, objective: str, seed: int = 0, structure: Structure | None = None) -> pd.Series:
    """fANOVA importance (optuna's ``FanovaImportanceEvaluator``) of the study's independent factors.

    One parameter per factor of ``design_structure`` (indexed by its ``label``: aliased components are one
    parameter, nested options none), categorical, or a float for a continuous factor. The finished trials
    become an in-memory Optuna study, so the same evaluator serves grid and Optuna studies.
    """
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    col = objective if objective in trials else f"final/{objective}"
    st = _structure(trials, structure)
    ok = _finished(trials, col)
    factors = st.factors
    if not factors or len(ok) < 2:
        return pd.Series(dtype=float, name=f"fANOVA importance for {objective}")
    dists, vals = {}, {}
    for f in factors:
        if f.continuous:
            v = f.values.loc[ok.index].astype(float)
            dists[f.label] = FloatDistribution(float(v.min()), float(v.max()))
        else:
            v = f.levels.loc[ok.index].astype(str)
            dists[f.label] = CategoricalDistribution(sorted(set(v)))
        vals[f.label] = v
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize")
    y = pd.to_numeric(ok[col], errors="coerce")
    for i in ok.index:
        params = {k: (float(v[i]) if isinstance(dists[k], FloatDistribution) else str(v[i])) for k, v in vals.items()}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=float(y[i])))
    imp = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=seed))
    return pd.Series(imp, name=f"fANOVA importance for {objective}")


# -- short design labels -----------------------------------------------------------------------------
def design_labels(trials: pd.DataFrame, structure: Structure | None = None, by: str = "design") -> pd.Series:
    """design -> a short unique label; the slug stays the ``design`` key (the report shows it on hover).

    Where the designs are presets (an aliased group labelled by preset, or every design recorded as one): the
    preset and the components that differ from it, e.g. "meanflow" and "meanflow · cosine"; otherwise the
    level of every factor ("meanflow · linear"). Searched train settings and kwargs as "option=value".
    """
    st = _structure(trials, structure)
    first = trials.drop_duplicates(by)
    recorded = _presets_of(first)
    group = next((f for f in st.factors if f.preset and len(f.columns) > 1), None)
    vary = st.nested[st.nested["varies"] & ~st.nested["note"].str.startswith("varies with")] \
        if len(st.nested) else st.nested
    by_preset = group is not None or (len(first) > 1 and recorded.notna().all())
    pure = {p: i for i, p in recorded.dropna().items()}  # preset -> the design that is it, unchanged

    def text(f: Factor, i) -> str:
        if f.continuous:
            return f"{f.name.split('.')[-1]}={f.values[i]:.3g}"
        if f.key.endswith(".name") or len(f.columns) > 1:
            return str(f.levels[i])
        return f"{f.name.split('.')[-1]}={f.levels[i]}"

    out = {}
    for i, row in first.iterrows():
        preset = recorded[i] if isinstance(recorded.get(i), str) else (
            str(group.levels[i]) if group is not None else None)
        ref = pure.get(preset) if by_preset and preset else None
        parts = [preset] if by_preset and preset else []
        for f in sorted(st.factors, key=lambda f: (not f.preset, f.continuous, _rank_key(f.key))):
            if parts and f is group:
                continue
            train = f.key.startswith("train.")
            if parts and not train and (ref is None and isinstance(recorded.get(i), str)):
                continue  # the design is this preset, unchanged
            if parts and not train and ref is not None and f.levels[ref] == f.levels[i]:
                continue  # as in the preset
            parts.append(text(f, i))
        for r in vary.itertuples():
            if pd.notna(row.get(r.column)) and not (ref is not None and _fmt(first.loc[ref, r.column])
                                                    == _fmt(row[r.column])):
                parts.append(f"{r.option}={_fmt(row[r.column])}")
        if not parts:
            parts = [str(row.get("slug") or row[by])]
        out[row[by]] = " · ".join(parts)
    labels = pd.Series(out, dtype=object)
    dup = labels.duplicated(keep=False)
    if dup.any():  # designs that differ only in what the factors do not see: number them
        labels[dup] = [f"{v} #{k + 1}" for k, v in enumerate(labels[dup])]
    return labels


# -- the dry run: what a planned study can separate --------------------------------------------------
def design_frame(trials: list[dict]) -> pd.DataFrame:
    """Planned trials (``ablate.run.expand_trials`` dicts: 'slug', 'variant', 'params', …) as a trials table."""
    rows = []
    for t in trials:
        variant = t.get("variant") or ""
        row = {"slug": t.get("slug"), "design": f"{t.get('slug')} [{variant}]" if variant else t.get("slug"),
               "seed": int(t.get("seed", 0)), "status": "PLANNED", "preset": t.get("preset") or "",
               **dict(t.get("params") or {})}
        for part in re.split(r", (?=[\w.]+=)", variant) if variant else []:
            k, _, v = part.partition("=")
            row[k] = _num(v)
        rows.append(row)
    return pd.DataFrame(rows)


def separability(trials: pd.DataFrame) -> Structure:
    """The design structure of a trial set (run or planned: see ``design_frame``); ``.lines()`` in words."""
    return design_structure(trials)


def separability_lines(trials: pd.DataFrame) -> list[str]:
    """What a study can and cannot separate, as lines to print (the dry run)."""
    return design_structure(trials).lines()


# -- compute cost: cost columns and FID at equal compute ----------------------------------------------------
COST = {"device_hours": "final/cost/device_hours", "train_tflops": "final/cost/train_tflops"}


def fid_at_compute(trials: pd.DataFrame, hist: pd.DataFrame, metric: str = "fid/nfe_1",
                   budget: float | None = None) -> tuple[pd.Series, float]:
    """(per design: ``metric`` read off its curve at a common compute ``budget`` in TFLOPs, the budget).

    Each finished trial's history of ``metric`` is put on a compute axis (step × ``cost/step_tflops``) and
    linearly interpolated at the budget (NaN where the curve starts after it or the trial lacks its cost);
    designs aggregate their seeds by the geometric mean (arithmetic where a value is ≤ 0). Default budget:
    the smallest final compute (``cost/train_tflops``, mean over seeds) among the designs."""
    step_col, total_col = "final/cost/step_tflops", COST["train_tflops"]
    empty = pd.Series(dtype=float, name=metric)
    if step_col not in trials or hist is None or hist.empty:
        return empty, math.nan
    ok = trials[(trials["status"] == "FINISHED") & trials[step_col].notna()]
    if budget is None:
        finals = ok.groupby("design")[total_col].mean().dropna() if total_col in ok else pd.Series(dtype=float)
        finals = finals[finals > 0]
        if finals.empty:
            return empty, math.nan
        budget = float(finals.min())
    h = hist[hist["metric"] == metric]
    out = {}
    for design, g in ok.groupby("design", sort=False):
        vals = []
        for t in g.itertuples():
            per_step = float(g.loc[t.Index, step_col])
            pts = h[h["run_id"] == t.run_id].sort_values("step")
            pts = pts[np.isfinite(pts["value"])]
            if pts.empty or not math.isfinite(per_step) or per_step <= 0:
                continue
            x = pts["step"].to_numpy(float) * per_step
            if budget < x[0] - 1e-12 * max(1.0, abs(budget)):
                vals.append(math.nan)
                continue
            vals.append(float(np.interp(budget, x, pts["value"].to_numpy(float))))
        v = np.asarray([x for x in vals if math.isfinite(x)])
        out[design] = (math.nan if not len(v) else float(np.exp(np.log(v).mean())) if (v > 0).all()
                       else float(v.mean()))
    return pd.Series(out, name=metric, dtype=float), budget


def add_cost_columns(ranking: pd.DataFrame, trials: pd.DataFrame, hist: pd.DataFrame | None = None,
                     metric: str = "fid/nfe_1", by: str = "design") -> pd.DataFrame:
    """The ranking with ``device_hours`` and ``train_tflops`` (means over finished seeds) and ``fid_at_budget``
    (:func:`fid_at_compute`; ``attrs["budget_tflops"]``) where the trials recorded their cost."""
    out = ranking.copy()
    out.attrs.update(ranking.attrs)
    if not any(c in trials for c in COST.values()) or out.empty:
        return out
    ok = trials[trials["status"] == "FINISHED"]
    for name, col in COST.items():
        if col in ok:
            out[name] = out[by].map(ok.groupby(by)[col].mean())
    if hist is not None and by == "design":
        at, budget = fid_at_compute(trials, hist, metric)
        if math.isfinite(budget):
            out["fid_at_budget"] = out[by].map(at)
            out.attrs.update(budget_tflops=budget, budget_metric=metric)
    return out
