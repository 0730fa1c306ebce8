"""The study's parent run in MLflow: a summary to chart, logged after every round of the study and at its end.

Without it the parent run has no metrics and the experiment's chart view stays empty until a person expands
the children. Per design (its short label, as the report writes it, in characters MLflow accepts), over its
finished seeds, for every NFE of ``eval.nfe`` (zero-padded, so that the names sort numerically: nfe_001,
nfe_002, nfe_004, nfe_016):

    summary/<design>/fid/nfe_001      the geometric mean of the final FID over seeds (the ranking's statistic)
    summary/<design>/fid_lo/nfe_001   its 95 % interval (t-interval on log FID; only with 3 or more seeds)
    summary/<design>/fid_hi/nfe_001
    summary/<design>/seeds            finished seeds
    summary/<design>/rank             rank by the study's objective (1 = best)
    summary/<design>/fid_vs_nfe       at the end only: step = NFE, so a chart of it is FID against NFE

The step of every other metric is the round: 0, then 1, 2, … for the rounds a race adds. Tags
``summary.design.<design>`` give each label's full design (slug and searched settings). A round logged
again with the same numbers (a resumed study) is not logged twice. Nothing here ever fails a study: an error
is printed as a note.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import time

PREFIX = "summary"
_ALLOWED = re.compile(r"[^A-Za-z0-9_\-. ]+")


def nfe_name(nfe: int, width: int = 3) -> str:
    """``nfe_001``: zero-padded, so that MLflow's (text) order of metric names is the numeric one."""
    return f"nfe_{int(nfe):0{width}d}"


def metric_label(label: str) -> str:
    """A design label as one segment of an MLflow metric name ([A-Za-z0-9_-. ], no '/'); e.g. 'meanflow · cosine'
    -> 'meanflow cosine', 'lr=0.001' -> 'lr-0.001'."""
    text = re.sub(r"\s*·\s*", " ", str(label)).replace("=", "-").replace("#", "n")
    text = re.sub(r"\s+", " ", _ALLOWED.sub("_", text)).strip(" ")
    if text.strip(".") == "":
        text = "design"
    if len(text) > 120:  # metric names are at most 250 characters
        text = f"{text[:110]}_{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    return text


def labels(trials) -> dict[str, str]:
    """design -> its metric label: the report's short labels (dashboards.tables.design_labels), made unique."""
    from dashboards.tables import design_labels

    out, used = {}, set()
    for design, label in design_labels(trials).items():
        name, k = metric_label(label), 2
        while name in used:
            name, k = f"{metric_label(label)}_{k}", k + 1
        used.add(name)
        out[design] = name
    return out


def summary_metrics(trials, nfes, objective: str, step: int, final: bool = False):
    """([(key, value, step)], {tag: value}) for a trials table (``dashboards.tables.load_trials``): the round's
    metrics at ``step``, or (``final``) FID against NFE (step = NFE)."""
    from dashboards.tables import rank

    if trials is None or not len(trials):
        return [], {}
    width = max(3, len(str(max(int(n) for n in nfes)))) if nfes else 3
    names = labels(trials)
    metrics, tags = [], {}
    for design, name in names.items():
        tags[f"{PREFIX}.design.{name}"] = str(design)[:5000]

    def add(key, value, at):
        if value is not None and isinstance(value, (int, float)) and math.isfinite(float(value)):
            metrics.append((key, float(value), int(at)))

    for n in nfes:
        r = rank(trials, f"fid/nfe_{int(n)}")
        for row in r.itertuples():
            name = names.get(getattr(row, "design"))
            if name is None or not row.n:
                continue
            if final:  # step = NFE: the chart of this metric is FID against NFE
                add(f"{PREFIX}/{name}/fid_vs_nfe", row.gmean, int(n))
                continue
            add(f"{PREFIX}/{name}/fid/{nfe_name(n, width)}", row.gmean, step)
            if row.n >= 3:
                add(f"{PREFIX}/{name}/fid_lo/{nfe_name(n, width)}", row.ci_low, step)
                add(f"{PREFIX}/{name}/fid_hi/{nfe_name(n, width)}", row.ci_high, step)
    if final:
        return metrics, tags
    r = rank(trials, objective)
    for row in r.itertuples():
        name = names.get(getattr(row, "design"))
        if name is not None:
            add(f"{PREFIX}/{name}/seeds", int(row.n), step)
            if row.n:
                add(f"{PREFIX}/{name}/rank", int(row.rank), step)
    return metrics, tags


def log(cl, parent_id: str, cfg, uri: str, step: int, final: bool = False) -> str | None:
    """Log the summary of the study's trials so far on its parent run; returns a note when it could not."""
    try:
        return _log(cl, parent_id, cfg, uri, step, final)
    except Exception as exc:  # noqa: BLE001 - the summary never decides the study's outcome
        note = f"(no summary on the parent run: {type(exc).__name__}: {exc})"
        print(note)
        return note


def _log(cl, parent_id, cfg, uri, step, final):
    from mlflow.entities import Metric, RunTag

    from ablate.tracking import retry
    from dashboards.tables import load_trials

    trials = load_trials(str(cfg.name), uri)
    objective = str(list(cfg.search.objective)[0])
    metrics, tags = summary_metrics(trials, [int(n) for n in cfg.eval.nfe], objective, step, final)
    if not metrics:
        return None
    mark = f"{PREFIX}.final" if final else f"{PREFIX}.round{step}"
    digest = hashlib.sha256(json.dumps(sorted((k, round(v, 9), s) for k, v, s in metrics)).encode()).hexdigest()[:16]
    if retry(cl.get_run, parent_id).data.tags.get(mark) == digest:
        return None  # logged before with the same numbers (a resumed study)
    now = int(time.time() * 1000)
    batch = [Metric(k, v, now, s) for k, v, s in metrics]
    for i in range(0, len(batch), 500):
        retry(cl.log_batch, parent_id, metrics=batch[i:i + 500])
    items = [RunTag(k, v) for k, v in {**tags, mark: digest}.items()]
    for i in range(0, len(items), 100):
        retry(cl.log_batch, parent_id, tags=items[i:i + 100])
    return None
