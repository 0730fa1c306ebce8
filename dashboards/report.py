"""The study report: ``python -m dashboards.report STUDY [--tracking-uri URI] [--out FILE]``.

Rebuilds a self-contained HTML report (Plotly's JavaScript embedded: works
offline) from MLflow alone — also for a study that is still running — writes
it next to the study and attaches it to the study's parent run.
"""
from __future__ import annotations

import argparse
import base64
import html
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio

from dashboards.paper import MIN_PRESETS, SOURCE, compare_to_paper
from dashboards.tables import (DESIGN_KINDS, MIN_SEEDS, SE_MARGIN, importance, interaction, load_histories,
                               load_trials, main_effects, rank, too_few)

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf"]


def _nfes(columns) -> list[int]:
    return sorted({int(c.rsplit("_", 1)[-1]) for c in columns if "fid/nfe_" in c})


def fig_curves(hist: pd.DataFrame) -> go.Figure:
    """FID vs training step per design: mean over seeds with a min–max band, one view per NFE (dropdown)."""
    fig = go.Figure()
    nfes = _nfes(hist["metric"].unique())
    per_nfe = []
    for nfe in nfes:
        h = hist[hist["metric"] == f"fid/nfe_{nfe}"]
        idx = []
        for i, (design, g) in enumerate(h.groupby("design")):
            a = g.groupby("step")["value"].agg(["mean", "min", "max"]).reset_index()
            c = COLORS[i % len(COLORS)]
            visible = nfe == nfes[0]
            idx.append(len(fig.data))
            fig.add_trace(go.Scatter(x=list(a["step"]) + list(a["step"])[::-1], y=list(a["max"]) + list(a["min"])[::-1],
                                     fill="toself", fillcolor=c, opacity=0.15, line=dict(width=0), hoverinfo="skip",
                                     showlegend=False, visible=visible, legendgroup=design))
            idx.append(len(fig.data))
            fig.add_trace(go.Scatter(x=a["step"], y=a["mean"], mode="lines+markers", name=design, line=dict(color=c),
                                     visible=visible, legendgroup=design))
        per_nfe.append(idx)
    buttons = []
    for nfe, idx in zip(nfes, per_nfe):
        vis = [False] * len(fig.data)
        for j in idx:
            vis[j] = True
        buttons.append(dict(label=f"{nfe} step{'s' if nfe > 1 else ''}", method="update",
                            args=[{"visible": vis}, {"yaxis.title.text": f"FID at {nfe} NFE"}]))
    fig.update_layout(title="FID during training (mean over seeds, band: min–max)", xaxis_title="training step",
                      yaxis_title=f"FID at {nfes[0] if nfes else '?'} NFE", yaxis_type="log",
                      updatemenus=[dict(buttons=buttons, x=1.0, y=1.15, xanchor="right")] if buttons else [])
    return fig


def fig_nfe(trials: pd.DataFrame) -> go.Figure:
    ok = trials[trials["status"] == "FINISHED"]
    fig = go.Figure()
    for i, (design, g) in enumerate(ok.groupby("design")):
        nfes = _nfes(g.columns[g.notna().any()])
        means = [g[f"final/fid/nfe_{n}"].mean() for n in nfes]
        sds = [g[f"final/fid/nfe_{n}"].std() for n in nfes]
        fig.add_trace(go.Scatter(x=nfes, y=means, error_y=dict(type="data", array=sds), mode="lines+markers",
                                 name=design, line=dict(color=COLORS[i % len(COLORS)])))
    fig.update_layout(title="Final FID vs step budget (mean ± sd over seeds)", xaxis_title="NFE", xaxis_type="log",
                      yaxis_title="FID", yaxis_type="log")
    return fig


def fig_main_effects(eff: pd.DataFrame, objective: str) -> go.Figure:
    fig = go.Figure()
    for i, (kind, g) in enumerate(eff.groupby("kind", sort=False)):
        fig.add_trace(go.Scatter(x=[f"{kind}={c}" for c in g["choice"]], y=g["mean"], mode="markers", name=kind,
                                 marker=dict(size=11, color=COLORS[i % len(COLORS)]),
                                 error_y=dict(type="data", symmetric=False, array=g["ci_high"] - g["mean"],
                                              arrayminus=g["mean"] - g["ci_low"])))
    fig.update_layout(title=f"Main effects on {objective} (mean and 95 % interval over all trials with the choice)",
                      yaxis_title=objective)
    return fig


def fig_interaction(tab: pd.DataFrame, objective: str) -> go.Figure:
    fig = go.Figure(go.Heatmap(z=tab.values, x=list(tab.columns), y=list(tab.index), colorscale="Viridis_r",
                               text=[[f"{v:.3g}" for v in row] for row in tab.values], texttemplate="%{text}",
                               colorbar=dict(title=objective)))
    fig.update_layout(title=f"Interaction: {tab.index.name.split('.')[1]} × {tab.columns.name.split('.')[1]} "
                            f"(mean {objective})", xaxis_title=tab.columns.name, yaxis_title=tab.index.name)
    return fig


def fig_parallel(trials: pd.DataFrame, objective: str) -> go.Figure:
    ok = trials[trials["status"] == "FINISHED"]
    col = f"final/{objective}"
    dims = [dict(label=k, values=ok[f"design.{k}.name"]) for k in DESIGN_KINDS
            if f"design.{k}.name" in ok and ok[f"design.{k}.name"].nunique() > 1]
    dims.append(dict(label=objective, values=ok[col].round(3)))
    fig = go.Figure(go.Parcats(dimensions=dims, line=dict(color=ok[col], colorscale="Viridis_r", showscale=True)))
    fig.update_layout(title=f"Components → {objective} (each band a trial)")
    return fig


def fig_pareto(trials: pd.DataFrame) -> go.Figure:
    ok = trials[trials["status"] == "FINISHED"]
    nfes = _nfes(ok.columns)
    lo, hi = (nfes[0], nfes[-1]) if nfes else (1, 1)
    g = ok.groupby("design").agg(few=(f"final/fid/nfe_{lo}", "mean"), many=(f"final/fid/nfe_{hi}", "mean"),
                                 cost=("wall_s", "mean")).reset_index()
    fig = go.Figure(go.Scatter(x=g["few"], y=g["many"], mode="markers+text", text=g["design"],
                               textposition="top center", marker=dict(size=8 + 12 * g["cost"] / max(g["cost"].max(), 1e-9),
                                                                      color=g["cost"], colorscale="Blues",
                                                                      showscale=True, colorbar=dict(title="wall s"))))
    fig.update_layout(title=f"Trade-off: FID at {lo} vs {hi} NFE (marker: cost per trial)",
                      xaxis_title=f"FID at {lo} NFE", yaxis_title=f"FID at {hi} NFE", xaxis_type="log",
                      yaxis_type="log")
    return fig


def fig_importance(imp: pd.Series) -> go.Figure:
    fig = go.Figure(go.Bar(x=imp.values[::-1], y=list(imp.index)[::-1], orientation="h"))
    fig.update_layout(title=imp.name or "importance", xaxis_title="importance (fANOVA, sums to 1)")
    return fig


def sample_grids(trials: pd.DataFrame, uri: str | None) -> dict[str, str]:
    """design → base64 PNG of its latest 1-step sample grid (first finished seed), from the run's artifacts."""
    from ablate.tracking import client, retry, tracking_uri

    cl = client(tracking_uri(uri))
    out = {}
    for design, g in trials[trials["status"] == "FINISHED"].groupby("design"):
        run_id = g.sort_values("seed")["run_id"].iloc[0]
        try:
            files = [f.path for f in retry(cl.list_artifacts, run_id, "samples") if f.path.endswith(".png")]
        except Exception:  # noqa: BLE001 - a report without a picture is still a report
            continue
        if not files:
            continue
        pick = sorted(files, key=lambda p: (0 if p.endswith("nfe_1.png") else 1, p))[0]
        with tempfile.TemporaryDirectory() as d:
            local = retry(cl.download_artifacts, run_id, pick, d)
            out[design] = base64.b64encode(Path(local).read_bytes()).decode()
    return out


def build(study: str, uri: str | None = None, objective: str | None = None) -> tuple[str, dict]:
    """(HTML text, summary dict) of a study's report."""
    trials = load_trials(study, uri)
    if trials.empty:
        raise ValueError(f"study '{study}' has no trials yet")
    hist = load_histories(study, uri)
    nfes = _nfes(trials.columns)
    objective = objective or (f"fid/nfe_{nfes[0]}" if nfes else "train/loss")
    ranking = rank(trials, objective)
    effects = main_effects(trials, objective)
    varying = [k for k in DESIGN_KINDS if f"design.{k}.name" in trials and trials[f"design.{k}.name"].nunique() > 1]
    figs: list[tuple[str, go.Figure]] = []
    if not hist.empty:
        figs.append(("curves", fig_curves(hist)))
    figs.append(("nfe", fig_nfe(trials)))
    if not effects.empty:
        figs.append(("main_effects", fig_main_effects(effects, objective)))
    if len(varying) >= 2:
        pair = ("schedule", "target") if {"schedule", "target"} <= set(varying) else tuple(varying[:2])
        figs.append(("interaction", fig_interaction(interaction(trials, *pair, objective), objective)))
    if varying:
        figs.append(("parallel", fig_parallel(trials, objective)))
    figs.append(("pareto", fig_pareto(trials)))
    imp = importance(trials, objective) if varying else pd.Series(dtype=float)
    if not imp.empty:
        figs.append(("importance", fig_importance(imp)))
    grids = sample_grids(trials, uri)
    n_fail = int((trials["status"] == "FAILED").sum())
    n_stop = int((trials["status"] == "KILLED").sum())
    racing = trials.attrs.get("racing", "")
    paper, paper_error = None, ""
    if "final/fid/nfe_1" in trials:  # the paper's orderings are at 1 NFE
        try:
            paper = compare_to_paper(trials)
        except Exception as exc:  # noqa: BLE001 - the rest of the report stands without this section
            paper_error = f"<p>(no paper orderings: {html.escape(type(exc).__name__)}: {html.escape(str(exc))})</p>"
    parts = [f"<h1>Study {html.escape(study)}</h1>",
             f"<p>{len(trials)} trials: {int((trials['status'] == 'FINISHED').sum())} finished, {n_fail} failed, "
             f"{n_stop} stopped, {int((trials['status'] == 'RUNNING').sum())} running. Objective: "
             f"<b>{html.escape(objective)}</b> (lower is better).</p>", f"<p>{html.escape(RANKING_NOTE if ranking.attrs.get('scale', 'log') == 'log' else RAW_NOTE)}</p>",
             f"<p>Seeds by racing: {html.escape(racing)}</p>" if racing else "", _provenance(trials),
             "<h2>Ranking</h2>", ranking_view(ranking).to_html(index=False, classes="tbl")]
    if paper is not None and paper.n >= MIN_PRESETS:
        parts += paper_html(paper)
    parts.append(paper_error)
    if len(nfes) > 1:
        parts += ["<h2>Ranking at every step budget</h2>", ranks_by_nfe(trials, nfes).to_html(classes="tbl")]
    if n_fail:
        fails = trials[trials["status"] == "FAILED"][["design", "seed", "error"]]
        parts += ["<h2>Failed trials</h2>", fails.to_html(index=False, classes="tbl")]
    if not effects.empty:
        parts += ["<h2>Which component matters</h2>",
                  effects.to_html(index=False, float_format=lambda v: f"{v:.4g}", classes="tbl")]
        if not imp.empty:
            parts += [f"<p>Parameter importance ({html.escape(str(imp.name))}): "
                      + ", ".join(f"{html.escape(k)} {v:.2f}" for k, v in imp.items()) + "</p>"]
        for i, a in enumerate(varying):  # every two-way interaction table
            for b in varying[i + 1:]:
                parts += [f"<h3>{a} × {b} (mean {html.escape(objective)})</h3>",
                          interaction(trials, a, b, objective).to_html(float_format=lambda v: f"{v:.4g}",
                                                                      classes="tbl")]
    for name, fig in figs:
        parts.append(f'<div class="fig" id="fig-{name}">'
                     + pio.to_html(fig, full_html=False, include_plotlyjs=False, div_id=f"plot-{name}")
                     + "</div>")
    if grids:
        parts.append("<h2>Latest samples</h2><div class='grids'>" + "".join(
            f"<figure><img alt='{html.escape(d)}' src='data:image/png;base64,{b}'><figcaption>{html.escape(d)}"
            f"</figcaption></figure>" for d, b in grids.items()) + "</div>")
    from plotly.offline import get_plotlyjs

    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>" + html.escape(study) + " report</title>"
            "<style>body{font-family:sans-serif;margin:2em;max-width:1300px}.tbl{border-collapse:collapse}"
            ".tbl td,.tbl th{border:1px solid #ccc;padding:3px 8px;text-align:right}figure{display:inline-block;"
            "margin:6px}figure img{width:180px;image-rendering:pixelated}figcaption{font-size:11px;width:180px}"
            "</style><script type='text/javascript'>" + get_plotlyjs() + "</script></head><body>"
            + "\n".join(parts) + "</body></html>")
    summary = {"objective": objective, "ranking": ranking, "effects": effects, "figures": [n for n, _ in figs],
               "paper": paper}
    return page, summary


RANKING_NOTE = (f"FID: geometric mean over seeds with the 95 % t-interval of mean log FID, exponentiated. "
                f"vs leader: per seed, log FID(design) - log FID(leader) over the seeds both have (paired: "
                f"seeds share all design-independent randomness), as a ratio with its 95 % t-interval; "
                f"not separable when it contains 1. Fewer than {MIN_SEEDS} shared seeds give no interval: "
                f"separable only when every shared seed's difference exceeds {SE_MARGIN:g} combined FID "
                f"sampling SEs (fid_se), else undetermined.")
RAW_NOTE = (f"The objective takes values <= 0: mean with its 95 % t-interval, and per seed the raw difference "
            f"to the leader over the seeds both have, with its 95 % t-interval (n >= {MIN_SEEDS}); not separable "
            f"when it contains 0, undetermined with fewer shared seeds.")


def _num(v, digits: int = 4) -> str:
    return "" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{digits}g}"


def ranking_view(ranking: pd.DataFrame) -> pd.DataFrame:
    """The ranking as the report shows it: paired columns in words, the n<3 message, noise and seed columns."""
    r = ranking
    view = pd.DataFrame({
        "rank": r["rank"], "design": r["design"] if "design" in r else r.iloc[:, 1],
        "FID (geom. mean)": [_num(v) for v in r["gmean"]], "95 % interval": r["interval"],
        "vs leader (paired ratio, 95 % interval)": r["vs_leader"], "verdict": r["verdict"],
        "mean": [_num(v) for v in r["mean"]], "sd over seeds": [_num(v, 3) for v in r["std"]], "n": r["n"]})
    if r["fid_se"].notna().any():
        view["sampling SE"] = [_num(v, 3) for v in r["fid_se"]]
        view["more seeds or more samples?"] = r["noise"]
    view["seeds"] = r["seeds"]
    if (r["seed_reason"].astype(str) != "").any():
        view["why these seeds"] = r["seed_reason"]
    view["failed"], view["stopped"] = r["failed"], r["stopped"]
    return view


def paper_html(cmp) -> list[str]:
    """The "paper orderings" section: our 1-NFE ranking beside the published one."""
    tab = cmp.table[["preset", "design", "ours", "our_rank", "study_rank", "published", "published_rank"]].rename(
        columns={"ours": f"ours ({cmp.objective}, geom. mean [95 %])", "study_rank": "rank in study",
                 "published": "published FID"})
    rho = "n/a" if not np.isfinite(cmp.rho) else f"{cmp.rho:.2f}"
    items = [f"<li>{html.escape(p.pair)}: {html.escape(p.verdict)}</li>" for p in cmp.pairs.itertuples()]
    if cmp.esc:
        items.append(f"<li>ESC vs MeanFlow: {html.escape(cmp.esc['verdict'])}</li>")
    return ["<h2>Paper orderings</h2>", f"<p>Published: {html.escape(SOURCE)}. Ranks are among the presets "
            f"listed; ESC has no published CIFAR-10 number and is placed ahead of MeanFlow.</p>",
            tab.to_html(index=False, classes="tbl"),
            f"<p>Spearman's &rho; between our order and the published one over {cmp.n} presets: <b>{rho}</b>"
            + (f" (p = {cmp.rho_p:.2g})" if np.isfinite(cmp.rho_p) else "") + "</p>",
            "<ul>" + "".join(items) + "</ul>" if items else ""]


def ranks_by_nfe(trials: pd.DataFrame, nfes: list[int]) -> pd.DataFrame:
    """design × NFE: "geometric mean [95 % interval] #rank" of the final FID at each step budget."""
    cols = {}
    for n in nfes:
        r = rank(trials, f"fid/nfe_{n}").set_index("design")
        cols[f"FID @ {n} NFE"] = {d: f"{row['gmean']:.4g} " + (f"[{row['ci_low']:.3g}, {row['ci_high']:.3g}]"
                                                              if row["n"] >= MIN_SEEDS else f"({too_few(row['n'])})")
                                  + f" #{row['rank']}" for d, row in r.iterrows()}
    return pd.DataFrame(cols)


def _provenance(trials: pd.DataFrame) -> str:
    cols = [c for c in trials.columns if c.startswith("fid.") and c != "fid.extractor_detail"]
    if not cols:
        return ""
    prov = trials[cols].drop_duplicates()
    note = "" if len(prov) == 1 else ("<p><b>Warning:</b> trials were evaluated with different settings; "
                                      "their FIDs are not comparable.</p>")
    return "<h2>Evaluation</h2>" + note + prov.to_html(index=False, classes="tbl")


def write(study: str, uri: str | None = None, out: Path | None = None, objective: str | None = None,
          attach: bool = True) -> tuple[Path, dict]:
    """Write the report (atomically) and attach it to the study's parent run."""
    from ablate.tracking import client, retry, tracking_uri

    page, summary = build(study, uri, objective)
    out = Path(out) if out else Path("runs") / "studies" / study / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.html")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    if attach:
        from dashboards.tables import _parent

        cl = client(tracking_uri(uri))
        _, parent = _parent(cl, study)
        retry(cl.log_artifact, parent.info.run_id, str(out), "report")
    return out, summary


def terminal_summary(summary: dict, top: int = 6) -> str:
    r = summary["ranking"].head(top)
    lines = [f"ranking by {summary['objective']} (geometric mean, 95 % interval over seeds; vs #1 paired by seed):"]
    for row in r.itertuples():
        iv = (f"[{row.ci_low:.4g}, {row.ci_high:.4g}] n={row.n}" if row.n >= MIN_SEEDS else row.interval)
        vs = "" if row.rank == 1 else f"  vs #1: {row.vs_leader}"
        se = f"  sampling SE {row.fid_se:.3g}: {row.noise}" if np.isfinite(row.fid_se) else ""
        why = f"  seeds: {row.seeds} ({row.seed_reason})" if row.seed_reason else ""
        fails = f"  [{row.failed} failed]" if row.failed else ""
        lines.append(f"  {row.rank}. {row.design}: {row.gmean:.4g} {iv}{vs}{se}{why}{fails}")
    paper = summary.get("paper")
    if paper is not None and paper.n >= MIN_PRESETS:
        lines += paper.lines()
    eff = summary["effects"]
    if len(eff):
        lines.append(f"component that matters most: {eff.iloc[0]['kind']} "
                     f"(spread {eff.iloc[0]['spread']:.4g} between its choices)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dashboards.report", description=__doc__.split("\n\n")[0])
    p.add_argument("study", help="the study name (its MLflow experiment), or its study file")
    p.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    p.add_argument("--out", type=Path, help="default: runs/studies/<study>/report.html")
    p.add_argument("--objective", help="default: FID at the smallest NFE")
    p.add_argument("--no-attach", action="store_true", help="do not log the report to the parent run")
    args = p.parse_args(argv)
    study = Path(args.study).stem if args.study.endswith((".yaml", ".yml")) else args.study
    try:
        out, summary = write(study, args.tracking_uri, args.out, args.objective, not args.no_attach)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(terminal_summary(summary))
    print(f"report: {out.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
