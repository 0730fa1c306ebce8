"""The study report: ``python -m dashboards.report STUDY [--tracking-uri URI] [--out FILE]``.

Rebuilds a self-contained HTML report (Plotly's JavaScript embedded: works
offline) from MLflow alone — also for a study that is still running — writes
it next to the study and attaches it to the study's parent run.
"""
from __future__ import annotations

import argparse
import base64
import html
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio

from dashboards.paper import MIN_PRESETS, SOURCE, compare_to_paper
from dashboards.tables import (MIN_SEEDS, SE_MARGIN, Structure, design_labels, design_structure, importance,
                               interactions, load_histories, load_trials, main_effects, nested_effects, rank,
                               too_few)
from dashboards.tables import add_cost_columns

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf"]
FONT = dict(family="sans-serif", size=13)


def _nfes(columns) -> list[int]:
    return sorted({int(c.rsplit("_", 1)[-1]) for c in columns if "fid/nfe_" in c})


# -- how the figures read: short labels, named features, readable log ticks, nothing clipped ----------------
def extractor(trials: pd.DataFrame) -> str:
    """The feature extractor of the study's FIDs (param ``fid.extractor``): 'classifier', 'inception', …"""
    if "fid.extractor" not in trials:
        return ""
    names = list(dict.fromkeys(trials["fid.extractor"].dropna().astype(str)))
    return names[0] if len(names) == 1 else (f"mixed: {', '.join(names)}" if names else "")


def fid_title(trials: pd.DataFrame | str, nfe: int | None = None) -> str:
    """'FID at 1 NFE (classifier features)': every FID axis names the features it was computed on."""
    ext = trials if isinstance(trials, str) else extractor(trials)
    at = f" at {nfe} NFE" if nfe is not None else ""
    return f"FID{at} ({ext} features)" if ext else f"FID{at} (features not recorded)"


def log_ticks(values) -> dict:
    """tickvals/ticktext for a log axis over ``values``: 1-2-5 steps (finer for a narrow range), plain numbers."""
    v = np.asarray([x for x in np.ravel(np.asarray(values, dtype=float)) if np.isfinite(x) and x > 0])
    if not len(v):
        return {}
    lo, hi = float(v.min()) / 1.03, float(v.max()) * 1.03
    decades = range(int(np.floor(np.log10(lo))) - 1, int(np.ceil(np.log10(hi))) + 1)
    ticks: list[float] = []
    for mant in ((1,), (1, 3), (1, 2, 5), (1, 1.5, 2, 3, 5, 7), (1, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9)):
        ticks = [float(f"{m * 10.0 ** e:.6g}") for e in decades for m in mant if lo <= m * 10.0 ** e <= hi]
        if len(ticks) >= 4:
            break
    if len(ticks) < 3:  # a narrow range: round linear steps (1, 2, 2.5, 5 × 10^k), at most 6 of them
        lo, hi = float(v.min()), float(v.max())  # the plotted range, about: no padding here
        if hi <= lo:
            return dict(tickvals=[lo], ticktext=[f"{lo:.4g}"])
        lo, hi = lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)
        k0 = int(np.floor(np.log10(hi - lo))) - 2
        for step in (m * 10.0 ** k for k in range(k0, k0 + 4) for m in (1, 2, 2.5, 5)):
            ticks = [float(f"{i * step:.6g}") for i in range(int(np.ceil(lo / step)), int(np.floor(hi / step)) + 1)]
            if len(ticks) <= 6:
                break
    while len(ticks) > 10:
        ticks = ticks[::2]
    return dict(tickvals=ticks, ticktext=[f"{t:g}" for t in ticks])


def wrap(text: str, width: int = 28, sep: str = "<br>") -> str:
    """Break a label into lines of at most ``width`` characters at spaces (Plotly's line break: <br>)."""
    lines, cur = [], ""
    for word in str(text).split(" "):
        if cur and len(cur) + 1 + len(word) > width:
            lines.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}" if cur else word
    return sep.join(lines + [cur])


def _layout(fig: go.Figure, title: str, height: int = 460, **kw) -> go.Figure:
    """Title wrapped above the plot, every axis' labels kept inside the figure (automargin)."""
    t = wrap(title, 95)
    fig.update_layout(title=dict(text=t, x=0.01, xanchor="left", font=dict(size=16)), font=FONT, height=height,
                      margin=dict(t=60 + 22 * t.count("<br>"), l=60, r=30, b=60), template="plotly_white",
                      hoverlabel=dict(align="left"), **kw)
    fig.update_xaxes(automargin=True)
    fig.update_yaxes(automargin=True)
    return fig


def _log_axis(values) -> dict:
    return dict(type="log", **log_ticks(values))


def _axis_name(f) -> str:
    """'preset (target + weighting + guidance + time sampler)' for an aliased group, else the factor's label."""
    return f"{f.short} ({f.label})" if f.short != f.label else f.label


class Styles:
    """Per design: its short label, its slug (hover), its colour (in ranking order, the same in every figure)."""

    def __init__(self, trials: pd.DataFrame, labels: pd.Series | None = None, order=None):
        self.labels = labels if labels is not None else design_labels(trials)
        designs = list(order) if order is not None else list(self.labels.index)
        designs += [d for d in self.labels.index if d not in designs]
        self.colors = {d: COLORS[i % len(COLORS)] for i, d in enumerate(designs)}
        self.order = designs
        first = trials.drop_duplicates("design").set_index("design")
        self.slugs = {d: str(first["slug"].get(d, d)) if "slug" in first else str(d) for d in designs}

    def label(self, design) -> str:
        return str(self.labels.get(design, design))

    def color(self, design) -> str:
        return self.colors.get(design, COLORS[0])

    def hover(self, design, extra: str = "") -> str:
        return (f"<b>{html.escape(self.label(design))}</b><br>{html.escape(str(design))}{extra}<extra></extra>")

    def sort(self, designs) -> list:
        pos = {d: i for i, d in enumerate(self.order)}
        return sorted(designs, key=lambda d: pos.get(d, len(pos)))


def fig_curves(hist: pd.DataFrame, style: Styles | None = None, ext: str = "") -> go.Figure:
    """FID vs training step per design: mean over seeds with a min–max band, one view per NFE (dropdown)."""
    style = style or Styles(hist.drop_duplicates("design").assign(slug=lambda d: d["design"]))
    fig = go.Figure()
    nfes = _nfes(hist["metric"].unique())
    per_nfe = []
    for nfe in nfes:
        h = hist[hist["metric"] == f"fid/nfe_{nfe}"]
        idx = []
        for design in style.sort(h["design"].unique()):
            g = h[h["design"] == design]
            a = g.groupby("step")["value"].agg(["mean", "min", "max"]).reset_index()
            c = style.color(design)
            visible = nfe == nfes[0]
            idx.append(len(fig.data))
            fig.add_trace(go.Scatter(x=list(a["step"]) + list(a["step"])[::-1], y=list(a["max"]) + list(a["min"])[::-1],
                                     fill="toself", fillcolor=c, opacity=0.15, line=dict(width=0), hoverinfo="skip",
                                     showlegend=False, visible=visible, legendgroup=str(design)))
            idx.append(len(fig.data))
            fig.add_trace(go.Scatter(x=a["step"], y=a["mean"], mode="lines+markers", name=style.label(design),
                                     line=dict(color=c), visible=visible, legendgroup=str(design),
                                     hovertemplate=style.hover(design, "<br>step %{x}: FID %{y:.4g}")))
        per_nfe.append(idx)
    buttons = []
    for nfe, idx in zip(nfes, per_nfe):
        vis = [False] * len(fig.data)
        for j in idx:
            vis[j] = True
        buttons.append(dict(label=f"{nfe} step{'s' if nfe > 1 else ''}", method="update",
                            args=[{"visible": vis}, {"yaxis.title.text": fid_title(ext, nfe)}]))
    _layout(fig, "FID during training (mean over seeds, band: min–max over seeds)",
            updatemenus=[dict(buttons=buttons, x=1.0, y=1.02, xanchor="right", yanchor="bottom")] if buttons else [])
    fig.update_xaxes(title_text="training step")
    fig.update_yaxes(title_text=fid_title(ext, nfes[0] if nfes else None),
                     **_log_axis(hist.loc[hist["metric"].str.startswith("fid/"), "value"]))
    return fig


def fig_nfe(trials: pd.DataFrame, style: Styles | None = None) -> go.Figure:
    style = style or Styles(trials)
    ok = trials[trials["status"] == "FINISHED"]
    fig = go.Figure()
    every = _nfes(ok.columns)
    for design in style.sort(ok["design"].unique()):
        g = ok[ok["design"] == design]
        nfes = _nfes(g.columns[g.notna().any()])
        means = [g[f"final/fid/nfe_{n}"].mean() for n in nfes]
        sds = [g[f"final/fid/nfe_{n}"].std() for n in nfes]
        fig.add_trace(go.Scatter(x=nfes, y=means, error_y=dict(type="data", array=sds), mode="lines+markers",
                                 name=style.label(design), line=dict(color=style.color(design)),
                                 customdata=[style.slugs.get(design, design)] * len(nfes),
                                 hovertemplate=style.hover(design, "<br>%{x} NFE: FID %{y:.4g}")))
    _layout(fig, "Final FID vs step budget (mean ± sd over seeds)")
    fig.update_xaxes(title_text="NFE (sampling steps)", type="log", tickvals=every, ticktext=[str(n) for n in every])
    fig.update_yaxes(title_text=fid_title(trials),
                     **_log_axis([ok[f"final/fid/nfe_{n}"] for n in every] if every else []))
    return fig


def fig_main_effects(eff: pd.DataFrame, objective: str, ylabel: str | None = None) -> go.Figure:
    """Per factor (aliased components as one), the mean of each level with its 95 % interval."""
    fig = go.Figure()
    for i, (kind, g) in enumerate(eff.groupby("kind", sort=False)):
        name = g["factor"].iloc[0] if "factor" in g else kind
        fig.add_trace(go.Scatter(x=[[wrap(name, 26)] * len(g), [wrap(c, 16) for c in g["choice"]]], y=g["mean"],
                                 mode="markers", name=wrap(name, 30),
                                 marker=dict(size=11, color=COLORS[i % len(COLORS)]),
                                 error_y=dict(type="data", symmetric=False, array=g["ci_high"] - g["mean"],
                                              arrayminus=g["mean"] - g["ci_low"]),
                                 hovertemplate=f"{html.escape(name)} = %{{x}}<br>mean %{{y:.4g}}<extra></extra>"))
    _layout(fig, f"Main effects on {objective}: mean and 95 % interval over the trials at each level "
                 f"(components that always change together are one factor)", showlegend=False)
    fig.update_yaxes(title_text=ylabel or objective)
    return fig


def fig_interaction(tab: pd.DataFrame, objective: str, a: str | None = None, b: str | None = None,
                    zlabel: str | None = None) -> go.Figure:
    short_a, short_b = tab.index.name, tab.columns.name
    a = a or str(tab.index.name)
    b = b or str(tab.columns.name)
    fig = go.Figure(go.Heatmap(z=tab.values, x=[wrap(c, 16) for c in tab.columns], y=[wrap(r, 16) for r in tab.index],
                               colorscale="Viridis_r", text=[[f"{v:.3g}" for v in row] for row in tab.values],
                               texttemplate="%{text}", colorbar=dict(title=dict(text=wrap(zlabel or objective, 14)))))
    _layout(fig, f"Interaction: {short_a or a} × {short_b or b} (mean {objective}; only factors the design crosses)",
            height=420)
    fig.update_xaxes(title_text=wrap(b, 60))
    fig.update_yaxes(title_text=wrap(a, 30))
    return fig


def fig_parallel(trials: pd.DataFrame, objective: str, structure: Structure | None = None) -> go.Figure:
    ok = trials[trials["status"] == "FINISHED"]
    col = objective if objective in ok else f"final/{objective}"
    st = structure or design_structure(trials)
    dims = [dict(label=f.short, values=f.levels.loc[ok.index]) for f in st.factors if not f.continuous]
    y = pd.to_numeric(ok[col], errors="coerce")
    if y.nunique() > 4:  # a category per trial clutters the axis: quartiles, labelled by their range
        bins = pd.qcut(y, 4, duplicates="drop")
        names = {iv: f"{iv.left:.3g}–{iv.right:.3g}" for iv in bins.cat.categories}
        dims.append(dict(label=f"{objective} (quartiles)", values=bins.map(names).astype(str),
                         categoryorder="array", categoryarray=[names[iv] for iv in bins.cat.categories]))
    else:
        dims.append(dict(label=objective, values=y.round(3)))
    fig = go.Figure(go.Parcats(dimensions=dims, line=dict(color=y, colorscale="Viridis_r", showscale=True,
                                                          colorbar=dict(title=dict(text=objective))),
                               labelfont=dict(size=13), tickfont=dict(size=12)))
    _layout(fig, f"Factors → {objective} (each band a trial; components that change together are one factor)")
    fig.update_layout(margin=dict(t=110, l=90, r=90, b=40))
    return fig


def fig_pareto(trials: pd.DataFrame, style: Styles | None = None) -> go.Figure:
    """1-step vs many-step FID per design (colour: design, as in every figure), marker size: wall time per trial."""
    style = style or Styles(trials)
    ok = trials[trials["status"] == "FINISHED"]
    nfes = _nfes(ok.columns)
    lo, hi = (nfes[0], nfes[-1]) if nfes else (1, 1)
    cost_col, unit, what = _pareto_cost(ok)
    g = ok.groupby("design").agg(few=(f"final/fid/nfe_{lo}", "mean"), many=(f"final/fid/nfe_{hi}", "mean"),
                                 cost=(cost_col, "mean"))
    top = max(float(g["cost"].max()), 1e-9) if len(g) else 1.0

    def size(c):
        return 10 + 22 * float(c) / top

    fig = go.Figure()
    for design in style.sort(g.index):
        r = g.loc[design]
        fig.add_trace(go.Scatter(x=[r["few"]], y=[r["many"]], mode="markers", name=style.label(design),
                                 marker=dict(size=size(r["cost"]), color=style.color(design), opacity=0.85,
                                             line=dict(color="white", width=1)), legendgroup="designs",
                                 legendgrouptitle_text="design",
                                 customdata=[style.slugs.get(design, design)],
                                 hovertemplate=style.hover(design, f"<br>FID {lo} NFE %{{x:.4g}}, {hi} NFE %{{y:.4g}}"
                                                                   f"<br>{what} {r['cost']:.4g} {unit} per trial")))
    costs = sorted({float(f"{c:.2g}") for c in np.quantile(g["cost"].dropna(), [0.0, 0.5, 1.0])}) \
        if g["cost"].notna().any() else []
    if costs:  # the key for marker size, drawn at true size on its own small axes below the legend
        fig.add_trace(go.Scatter(x=[0] * len(costs), y=list(range(len(costs))), mode="markers+text",
                                 name=f"marker size: {what} per trial", showlegend=False, hoverinfo="skip",
                                 text=[f"  {c:g} {unit}" for c in costs], textposition="middle right",
                                 marker=dict(size=[size(c) for c in costs], color="rgba(150,150,150,0.5)",
                                             line=dict(color="#666", width=1)), xaxis="x2", yaxis="y2",
                                 cliponaxis=False))
        fig.update_layout(xaxis2=dict(domain=[0.84, 1.0], range=[-0.5, 3], visible=False, fixedrange=True),
                          yaxis2=dict(domain=[0.0, 0.3], range=[-0.7, len(costs) - 0.3], visible=False,
                                      fixedrange=True, anchor="x2"),
                          annotations=[dict(text=f"marker size:<br>{what} per trial", xref="paper", yref="paper",
                                            x=0.84, y=0.36, xanchor="left", yanchor="bottom", showarrow=False,
                                            align="left")])
    ext = extractor(trials)
    _layout(fig, f"Trade-off: FID at {lo} vs {hi} NFE (marker size: {what} per trial)",
            legend=dict(x=0.84, y=1.0, xanchor="left", yanchor="top", itemsizing="constant"))
    fig.update_layout(xaxis=dict(domain=[0.0, 0.8], title_text=fid_title(ext, lo), **_log_axis(g["few"])),
                      yaxis=dict(title_text=fid_title(ext, hi), **_log_axis(g["many"])))
    return fig


def _pareto_cost(trials: pd.DataFrame) -> tuple[str, str, str]:
    """(column, unit, words) of the Pareto view's cost: training compute where recorded, else wall time."""
    for col, unit, what in (("final/cost/train_tflops", "TFLOPs", "training compute"),
                            ("final/cost/device_hours", "device-h", "device hours")):
        if col in trials and trials[col].notna().any():
            return col, unit, what
    return "wall_s", "s", "wall time"


CFG_KEY = re.compile(r"^final/fid@cfg(.+)/nfe_(\d+)$")


def figs_cfg_scale(trials: pd.DataFrame, style: Styles | None = None) -> list[tuple[int, go.Figure]]:
    """'FID vs guidance scale', one figure per NFE, where trials evaluated several scales (``eval.cfg_scale``
    a list: ``fid/nfe_N`` is the first scale of param ``fid.cfg_scale``, ``fid@cfg<w>/nfe_N`` the others)."""
    import json

    ok = trials[trials["status"] == "FINISHED"]
    other = {}
    for c in ok.columns:
        m = CFG_KEY.match(str(c))
        if m and m.group(1) != "default":
            other.setdefault(int(m.group(2)), []).append((float(m.group(1)), c))
    if not other:
        return []
    style = style or Styles(trials)

    def first_scale(v):
        try:
            val = json.loads(v)[0] if isinstance(v, str) else None
        except (ValueError, IndexError, TypeError):
            return None
        return float(val) if isinstance(val, (int, float)) else None

    firsts = ok["fid.cfg_scale"].map(first_scale) if "fid.cfg_scale" in ok else pd.Series(None, index=ok.index)
    out, ext = [], extractor(trials)
    for nfe in sorted(other):
        fig = go.Figure()
        for design in style.sort(ok["design"].unique()):
            g = ok[ok["design"] == design]
            pts = {}
            base = f"final/fid/nfe_{nfe}"
            w0 = firsts[g.index].dropna()
            if base in g and len(w0) and w0.nunique() == 1:
                pts[float(w0.iloc[0])] = float(g[base].mean())
            for w, col in other[nfe]:
                if g[col].notna().any():
                    pts[w] = float(g[col].mean())
            if not pts:
                continue
            xs = sorted(pts)
            fig.add_trace(go.Scatter(x=xs, y=[pts[x] for x in xs], mode="lines+markers", name=style.label(design),
                                     line=dict(color=style.color(design)),
                                     hovertemplate=style.hover(design, "<br>scale %{x:g}: FID %{y:.4g}")))
        _layout(fig, f"FID vs guidance scale at {nfe} NFE (mean over seeds)")
        fig.update_xaxes(title_text="guidance scale (eval.cfg_scale)")
        fig.update_yaxes(title_text=fid_title(ext, nfe))
        out.append((nfe, fig))
    return out


def fig_importance(imp: pd.Series) -> go.Figure:
    fig = go.Figure(go.Bar(x=imp.values[::-1], y=[wrap(k, 34) for k in list(imp.index)[::-1]], orientation="h",
                           text=[f"{v:.2f}" for v in imp.values[::-1]], textposition="auto"))
    _layout(fig, f"{imp.name or 'importance'} over the independent factors (aliased components as one)",
            height=max(260, 120 + 60 * len(imp)))
    fig.update_xaxes(title_text="importance (fANOVA, sums to 1)", range=[0, 1.05])
    return fig


def sample_grids(trials: pd.DataFrame, uri: str | None) -> list[dict]:
    """Per design, its latest sample grid (fewest NFE, first finished seed) from the run's artifacts:
    {design, b64 (PNG), nfe, seed, step} — the grid is drawn at the end of training, so step = its last step."""
    from ablate.tracking import client, retry, tracking_uri

    cl = client(tracking_uri(uri))
    out = []
    for design, g in trials[trials["status"] == "FINISHED"].groupby("design"):
        row = g.sort_values("seed").iloc[0]
        run_id = row["run_id"]
        try:
            files = [f.path for f in retry(cl.list_artifacts, run_id, "samples") if f.path.endswith(".png")]
        except Exception:  # noqa: BLE001 - a report without a picture is still a report
            continue
        if not files:
            continue
        nfe = {p: int(m.group(1)) if (m := re.search(r"nfe_(\d+)\.png$", p)) else 10 ** 6 for p in files}
        pick = sorted(files, key=lambda p: (nfe[p], p))[0]
        step = row.get("steps")
        step = int(step) if step is not None and pd.notna(step) and step else row.get("train.steps")
        with tempfile.TemporaryDirectory() as d:
            local = retry(cl.download_artifacts, run_id, pick, d)
            out.append({"design": design, "b64": base64.b64encode(Path(local).read_bytes()).decode(),
                        "nfe": None if nfe[pick] == 10 ** 6 else nfe[pick], "seed": int(row["seed"]),
                        "step": None if step is None or pd.isna(step) else int(step)})
    return out


def grids_html(grids, labels: pd.Series | None = None) -> str:
    """The sample-grid gallery: each grid captioned with its design's label, NFE, seed and training step."""
    if isinstance(grids, dict):  # {design: base64}: no NFE, seed or step known
        grids = [{"design": d, "b64": b} for d, b in grids.items()]
    if not grids:
        return ""
    labels = labels if labels is not None else pd.Series(dtype=object)
    items = []
    for g in grids:
        lab = str(labels.get(g["design"], g["design"]))
        what = " · ".join(x for x in (f"{g['nfe']} NFE" if g.get("nfe") is not None else "",
                                      f"seed {g['seed']}" if g.get("seed") is not None else "",
                                      f"step {g['step']}" if g.get("step") is not None else "") if x)
        items.append(f"<figure title='{html.escape(str(g['design']))}'><img alt='{html.escape(lab)}' "
                     f"src='data:image/png;base64,{g['b64']}'><figcaption><b>{html.escape(lab)}</b><br>"
                     f"{html.escape(what)}</figcaption></figure>")
    return "<h2>Latest samples</h2><div class='grids'>" + "".join(items) + "</div>"


def build(study: str, uri: str | None = None, objective: str | None = None) -> tuple[str, dict]:
    """(HTML text, summary dict) of a study's report."""
    trials = load_trials(study, uri)
    if trials.empty:
        raise ValueError(f"study '{study}' has no trials yet")
    nfes = _nfes(trials.columns)
    objective = objective or (f"fid/nfe_{nfes[0]}" if nfes else "train/loss")
    if not _any_finished(trials, objective):  # every trial failed or stopped: a table of what happened, no ranking
        return failures_page(study, trials, objective)
    hist = load_histories(study, uri)
    ranking = add_cost_columns(rank(trials, objective), trials, hist)  # cost columns, FID at equal compute
    structure = design_structure(trials)  # one factor set for main effects, importance, interactions, labels
    labels = design_labels(trials, structure)
    style = Styles(trials, labels, ranking["design"])
    effects = main_effects(trials, objective, structure)
    nested = nested_effects(trials, objective, structure)
    crossed = interactions(trials, objective, structure)
    ylabel = fid_title(trials, int(objective.rsplit("_", 1)[-1])) if "fid/nfe_" in objective else objective
    figs: list[tuple[str, go.Figure]] = []
    if not hist.empty:
        figs.append(("curves", fig_curves(hist, style, extractor(trials))))
    figs.append(("nfe", fig_nfe(trials, style)))
    if not effects.empty:
        figs.append(("main_effects", fig_main_effects(effects, objective, ylabel)))
    if crossed:  # the first pair the design crosses (schedule × the preset, say); every table is below
        a, b, tab = crossed[0]
        figs.append(("interaction", fig_interaction(tab, objective, _axis_name(a), _axis_name(b), ylabel)))
    if any(not f.continuous for f in structure.factors):
        figs.append(("parallel", fig_parallel(trials, objective, structure)))
    figs.append(("pareto", fig_pareto(trials, style)))
    figs += [(f"cfg_scale_nfe_{n}", f) for n, f in figs_cfg_scale(trials, style)]  # FID vs guidance scale
    imp = importance(trials, objective, structure=structure) if structure.factors else pd.Series(dtype=float)
    if not imp.empty:
        figs.append(("importance", fig_importance(imp)))
    line = verdict(ranking, effects, labels, imp, structure, extractor(trials))
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
             f"<p class='verdict'><b>Verdict.</b> {html.escape(line)}</p>",
             f"<p>{len(trials)} trials: {int((trials['status'] == 'FINISHED').sum())} finished, {n_fail} failed, "
             f"{n_stop} stopped, {int((trials['status'] == 'RUNNING').sum())} running. Objective: "
             f"<b>{html.escape(objective)}</b> (lower is better).</p>", f"<p>{html.escape(RANKING_NOTE if ranking.attrs.get('scale', 'log') == 'log' else RAW_NOTE)}</p>",
             f"<p>Seeds by racing: {html.escape(racing)}</p>" if racing else "", _provenance(trials),
             "<h2>Ranking</h2>", ranking_html(ranking, labels)]
    if paper is not None and paper.n >= MIN_PRESETS:
        parts += paper_html(paper, labels)
    parts.append(paper_error)
    if len(nfes) > 1:
        parts += ["<h2>Ranking at every step budget</h2>", ranks_by_nfe(trials, nfes, labels).to_html(classes="tbl")]
    if n_fail:
        fails = trials[trials["status"] == "FAILED"][["design", "seed", "error"]]
        fails.insert(0, "label", fails["design"].map(labels))
        parts += ["<h2>Failed trials</h2>", fails.to_html(index=False, classes="tbl")]
    if structure.factors:
        parts += components_html(structure, effects, nested, crossed, imp, objective)
    for name, fig in figs:
        parts.append(f'<div class="fig" id="fig-{name}">'
                     + pio.to_html(fig, full_html=False, include_plotlyjs=False, div_id=f"plot-{name}",
                                   config={"responsive": True, "displaylogo": False})
                     + "</div>")
    if isinstance(grids, list):  # in ranking order, like every figure's legend
        pos = {d: i for i, d in enumerate(style.order)}
        grids = sorted(grids, key=lambda g: pos.get(g["design"], len(pos)))
    parts.append(grids_html(grids, labels))
    from plotly.offline import get_plotlyjs

    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>" + html.escape(study) + " report</title>"
            "<style>body{font-family:sans-serif;margin:2em;max-width:1300px}.tbl{border-collapse:collapse}"
            ".tbl td,.tbl th{border:1px solid #ccc;padding:3px 8px;text-align:right}.tbl{font-size:14px}"
            ".rank{font-size:13px}.rank td:nth-child(-n+4){white-space:nowrap}.rank td:nth-child(2){text-align:left}"
            ".rank td{min-width:3em}"
            ".scroll{overflow-x:auto;max-width:100%}figure{display:inline-block;"
            "margin:6px;vertical-align:top}figure img{width:180px;image-rendering:pixelated}"
            "figcaption{font-size:12px;width:180px}.verdict{font-size:1.1em;background:#f3f6fa;"
            "border-left:4px solid #1f77b4;padding:8px 12px}.fig{margin:1.5em 0}.note{color:#444}"
            "</style><script type='text/javascript'>" + get_plotlyjs() + "</script></head><body>"
            + "\n".join(parts) + "</body></html>")
    summary = {"objective": objective, "ranking": ranking, "effects": effects, "figures": [n for n, _ in figs],
               "paper": paper, "verdict": line, "labels": labels, "structure": structure, "importance": imp,
               "figs": figs}
    return page, summary


def _any_finished(trials: pd.DataFrame, objective: str) -> bool:
    """Whether some finished trial has a finite value of ``objective`` (else there is nothing to rank)."""
    col = objective if objective in trials else f"final/{objective}"
    if col not in trials:
        return False
    ok = pd.to_numeric(trials.loc[trials["status"] == "FINISHED", col], errors="coerce")
    return bool(np.isfinite(ok).any())


def failures_page(study: str, trials: pd.DataFrame, objective: str) -> tuple[str, dict]:
    """The report of a study no trial of which finished with ``objective``: a table of every trial, its status and
    why (error, stopped, interrupted), instead of a ranking."""
    counts = trials["status"].value_counts().to_dict()
    said = ", ".join(f"{n} {s.lower()}" for s, n in counts.items())
    line = (f"no trial finished with {objective} ({len(trials)} trials: {said}): nothing to rank; "
            f"the table below says what happened to each")
    cols = [c for c in ("design", "seed", "status", "steps", "error", "stopped", "trial_key") if c in trials]
    table = trials[cols].copy()
    for c in ("error", "stopped"):
        if c in table:
            table[c] = table[c].fillna("").astype(str).str.slice(0, 300)
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>" + html.escape(study) + " report</title>"
            "<style>body{font-family:sans-serif;margin:2em;max-width:1300px}.tbl{border-collapse:collapse;"
            "font-size:14px}.tbl td,.tbl th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
            ".verdict{font-size:1.1em;background:#fbf3f3;border-left:4px solid #d62728;padding:8px 12px}</style>"
            "</head><body>" + f"<h1>Study {html.escape(study)}</h1>"
            + f"<p class='verdict'><b>Verdict.</b> {html.escape(line)}</p>"
            + "<h2>Trials</h2>" + table.to_html(index=False, classes="tbl") + "</body></html>")
    ranking = pd.DataFrame(columns=["rank", "design", "gmean", "n", "interval", "vs_leader", "fid_se", "noise",
                                    "seeds", "seed_reason", "failed", "ci_low", "ci_high"])
    summary = {"objective": objective, "ranking": ranking, "effects": pd.DataFrame(), "figures": [], "paper": None,
               "verdict": line, "labels": None, "structure": None, "importance": pd.Series(dtype=float),
               "figs": [], "failures": table}
    return page, summary


def verdict(ranking: pd.DataFrame, effects: pd.DataFrame, labels: pd.Series | None = None,
            imp: pd.Series | None = None, structure: Structure | None = None, ext: str = "") -> str:
    """One line: the leader, its margin to the runner-up (paired ratio with interval) and whether that is
    separable, and the component that matters most with its caveat (what it is aliased with)."""
    if ranking.empty or not ranking["n"].gt(0).any():
        return "No finished trials yet."
    labels = labels if labels is not None else pd.Series(dtype=object)
    name = (lambda d: str(labels.get(d, d)))
    r = ranking[ranking["n"] > 0].reset_index(drop=True)
    lead = r.iloc[0]
    iv = f" {lead['interval']}" if str(lead["interval"]).startswith("[") else f" (n={lead['n']})"
    obj = ranking.attrs.get("objective", "")
    if "fid/nfe_" in obj:  # 'FID 12.07 [11.56, 12.59] at 1 NFE (classifier features)'
        what, where = "FID", fid_title(ext, int(obj.rsplit("_", 1)[-1]))[3:]
    else:
        what, where = obj or "objective", ""
    out = f"Leader: {name(lead['design'])}, {what} {_num(lead['gmean'])}{iv}{where}"
    if len(r) > 1:
        ru = r.iloc[1]
        n = int(ru["n_paired"]) if pd.notna(ru["n_paired"]) else 0
        if np.isfinite(ru["ratio"]):
            m = f"×{ru['ratio']:.3g}"
            m += f" [{ru['ratio_low']:.3g}, {ru['ratio_high']:.3g}]" if np.isfinite(ru["ratio_low"]) else ""
        else:
            m = f"{ru['diff']:+.3g}" + (f" [{ru['diff_low']:+.3g}, {ru['diff_high']:+.3g}]"
                                        if np.isfinite(ru["diff_low"]) else "")
        m += f" (paired, n={n})" if n >= MIN_SEEDS or not n else f" (paired, {too_few(n)})"
        word = {True: "separable", False: "not separable"}.get(ru["separable"], "undetermined")
        if ru["separable"] is True and n < MIN_SEEDS:
            word += f" (every seed beyond {SE_MARGIN:g} sampling SE)"
        out += f"; runner-up {name(ru['design'])} at {m}: {word}"
        if len(r) > 2:
            s = list(r["separable"].iloc[1:])
            nots = sum(v is False for v in s)
            und = sum(v is None for v in s)
            out += (f"; separable from all {len(s)} others" if not nots and not und else
                    f"; {nots} of {len(s)} others not separable" + (f", {und} undetermined" if und else "")
                    if nots else f"; {und} of {len(s)} others undetermined")
    else:
        out += ", the only design with finished trials"
    out += "."
    if effects is not None and len(effects):
        top = effects.iloc[0]
        f = structure.factor(top["kind"]) if structure is not None and "aliased" in top and top["aliased"] else None
        if f is not None and f.preset:  # a whole-design study: the preset is the factor
            out += (f" Component that matters most: the preset ({top['kind']}, {top['aliased']} vary together, "
                    "so their effects cannot be told apart)")
        else:
            out += f" Component that matters most: {top['kind']}"
            if "aliased" in top and top["aliased"]:
                out += f", aliased with {top['aliased']} (varied together)"
        if imp is not None and len(imp) > 1 and "factor" in top and imp.index[0] != top["factor"]:
            out += f"; fANOVA's variance share puts {imp.index[0]} first"
        out += "."
    return out


def components_html(st: Structure, effects: pd.DataFrame, nested: pd.DataFrame, crossed, imp: pd.Series,
                    objective: str) -> list[str]:
    """Which component matters: the design's factors (aliased ones as one), main effects, importance over the
    same factors, options nested under one choice, and interaction tables for crossed pairs only."""
    fmt = (lambda v: f"{v:.4g}")
    out = ["<h2>Which component matters</h2>",
           "<p class='note'>Main effects, importance and the interactions below use the same factors: components "
           "whose levels never vary independently in this study are one factor (their effects cannot be told "
           "apart), options that exist for only one choice are nested under it and not ranked.</p>",
           "<ul>" + "".join(f"<li>{html.escape(ln.strip())}</li>" for ln in st.lines()[1:]
                            if not ln.startswith("    ") and "nested options" not in ln) + "</ul>"]
    if len(effects):
        view = pd.DataFrame({"factor": effects["factor"], "aliased with": effects["aliased"],
                             "level": effects["choice"], "mean": effects["mean"], "effect": effects["effect"],
                             "95 % interval": [f"[{fmt(a)}, {fmt(b)}]" if np.isfinite(b - a) else "n<2"
                                               for a, b in zip(effects["ci_low"], effects["ci_high"])],
                             "n": effects["n"], "spread of level means": effects["spread"]})
        out += [f"<h3>Main effects on {html.escape(objective)}</h3>",
                view.to_html(index=False, float_format=fmt, classes="tbl")]
    if not imp.empty:
        out += [f"<p>{html.escape(str(imp.name))}, over the same factors: "
                + ", ".join(f"{html.escape(k)} {v:.2f}" for k, v in imp.items()) + "</p>"]
    if len(nested):
        out += ["<h3>Options nested under one choice (within that choice only)</h3>",
                nested.to_html(index=False, float_format=fmt, classes="tbl")]
    if len(st.nested):
        items = []
        for (kind, choice), g in st.nested.groupby(["component", "choice"], sort=False):
            words = [f"{r.option}={r.values}" + (f" ({r.note})" if r.varies else "") for r in g.itertuples()]
            items.append(f"<li>{html.escape(kind)}={html.escape(choice)}: {html.escape(', '.join(words))}</li>")
        out += ["<details><summary>Nested options (exist only for one choice; not ranked)</summary><ul>"
                + "".join(items) + "</ul></details>"]
    for a, b, tab in crossed:
        out += [f"<h3>Interaction: {html.escape(a.short)} × {html.escape(b.short)} "
                f"(mean {html.escape(objective)})</h3>",
                tab.to_html(float_format=fmt, classes="tbl")]
    if st.partial:
        out += ["<p class='note'>No interaction table for " + "; ".join(
            f"{html.escape(a.short)} × {html.escape(b.short)}" for a, b in st.partial)
                + ": not crossed (some combinations never occur).</p>"]
    return out


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


def ranking_view(ranking: pd.DataFrame, labels: pd.Series | None = None) -> pd.DataFrame:
    """The ranking as the report shows it: paired columns in words, the n<3 message, noise and seed columns.

    With ``labels`` (``tables.design_labels``): the short label as "design", the full design (slug) last."""
    r = ranking
    key = r["design"] if "design" in r else r.iloc[:, 1]
    view = pd.DataFrame({
        "rank": r["rank"], "design": key.map(lambda d: labels.get(d, d)) if labels is not None else key,
        "FID (geom. mean)": [_num(v) for v in r["gmean"]], "95 % interval": [v if str(v).startswith("[") else str(v).replace(": too few seeds for an interval",
                                                                             ": too few seeds") for v in r["interval"]],
        "vs leader (paired ratio, 95 % interval)": [_vs_leader_cell(row) for row in r.to_dict("records")],
        "verdict": [_verdict_cell(row) for row in r.to_dict("records")],
        "mean": [_num(v) for v in r["mean"]], "sd over seeds": [_num(v, 3) for v in r["std"]], "n": r["n"]})
    if r["fid_se"].notna().any():
        view["sampling SE"] = [_num(v, 3) for v in r["fid_se"]]
        view["more seeds or more samples?"] = [str(v).replace(" (seed sd only ", " (seed sd ").replace(
            " sampling SE)", " SE)") for v in r["noise"]]
    if "train_tflops" in r:  # compute recorded by the trials (ablate.evaluation.training_cost)
        view["train TFLOPs"] = [_num(v, 3) for v in r["train_tflops"]]
    if "device_hours" in r:
        view["device hours"] = [_num(v, 3) for v in r["device_hours"]]
    if "fid_at_budget" in r:
        b = r.attrs.get("budget_tflops", float("nan"))
        view[f"FID at equal compute ({_num(b, 3)} TFLOPs)"] = [_num(v) for v in r["fid_at_budget"]]
    view["seeds"] = r["seeds"]
    if (r["seed_reason"].astype(str) != "").any():
        short = (lambda text: _relabel(str(text), labels)) if labels is not None else str
        view["why these seeds"] = [short(v) for v in r["seed_reason"]]
    view["failed"], view["stopped"] = r["failed"], r["stopped"]
    if labels is not None:
        view["slug"] = key
    return view


def _vs_leader_cell(row: dict) -> str:
    """The paired ratio to the leader, compact: '×1.14 [0.816, 1.59]' or '×4.16 (n=2: no interval)'."""
    if row.get("verdict") == "leader":
        return "—"
    n = row.get("n_paired")
    n = int(n) if n is not None and np.isfinite(n) else 0
    if not n:
        return "no shared seed"
    ratio, lo, hi = row.get("ratio"), row.get("ratio_low"), row.get("ratio_high")
    if ratio is None or not np.isfinite(ratio):  # objectives ≤ 0: raw differences
        ratio, lo, hi, fmt = row.get("diff"), row.get("diff_low"), row.get("diff_high"), "{:+.3g}"
    else:
        fmt = "×{:.3g}"
    text = fmt.format(ratio)
    if lo is not None and np.isfinite(lo) and np.isfinite(hi):
        return f"{text} [{fmt.format(lo).lstrip('×')}, {fmt.format(hi).lstrip('×')}] (n={n})"
    return f"{text} (n={n}: no interval)"


def _verdict_cell(row: dict) -> str:
    v = str(row.get("verdict", ""))
    n = row.get("n_paired")
    if v == "separable" and n is not None and np.isfinite(n) and 0 < n < MIN_SEEDS:
        return f"separable (each seed > {SE_MARGIN:g} sampling SE)"
    return v


def _relabel(text: str, labels: pd.Series) -> str:
    """``text`` with every full design name (slug) replaced by its short label."""
    for slug, label in sorted(labels.items(), key=lambda kv: -len(str(kv[0]))):
        text = text.replace(str(slug), str(label))
    return text


def ranking_html(ranking: pd.DataFrame, labels: pd.Series) -> str:
    """The ranking table: designs by their short label, the full design (slug) as the label's tooltip."""
    view = ranking_view(ranking, labels)
    slugs = view.pop("slug")
    esc = view.apply(lambda c: c.map(lambda v: html.escape(_cell(v))))
    esc["design"] = [f"<span title='{html.escape(str(k))}'>{html.escape(str(v))}</span>"
                     for k, v in zip(slugs, view["design"])]
    return ("<p class='note'>Hover a design for its full name (slug).</p><div class='scroll'>"
            + esc.to_html(index=False, escape=False, classes="tbl rank") + "</div>")


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return ""
    return str(v)


def paper_html(cmp, labels: pd.Series | None = None) -> list[str]:
    """The "paper orderings" section: our 1-NFE ranking beside the published one."""
    tab = cmp.table[["preset", "design", "ours", "our_rank", "study_rank", "published", "published_rank"]]
    if labels is not None:
        tab = tab.assign(design=tab["design"].map(lambda d: labels.get(d, d)))
    tab = tab.rename(
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


def ranks_by_nfe(trials: pd.DataFrame, nfes: list[int], labels: pd.Series | None = None) -> pd.DataFrame:
    """design × NFE: "geometric mean [95 % interval] #rank" of the final FID at each step budget."""
    cols = {}
    for n in nfes:
        r = rank(trials, f"fid/nfe_{n}").set_index("design")
        cols[f"FID @ {n} NFE"] = {d: f"{row['gmean']:.4g} " + (f"[{row['ci_low']:.3g}, {row['ci_high']:.3g}]"
                                                              if row["n"] >= MIN_SEEDS else f"({too_few(row['n'])})")
                                  + f" #{row['rank']}" for d, row in r.iterrows()}
    out = pd.DataFrame(cols)
    if labels is not None:
        out.index = [labels.get(d, d) for d in out.index]
    return out


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
    labels = summary.get("labels")
    lines = [summary["verdict"]] if summary.get("verdict") else []
    if summary.get("failures") is not None:  # nothing finished: the trials and why, no ranking
        for row in summary["failures"].head(3 * top).to_dict("records"):
            why = row.get("error") or row.get("stopped") or ""
            lines.append(f"  {row.get('design')} seed {row.get('seed')}: {row.get('status')}"
                         + (f" — {str(why)[:160]}" if why else ""))
        return "\n".join(lines)
    lines.append(f"ranking by {summary['objective']} (geometric mean, 95 % interval over seeds; vs #1 paired by seed):")
    for row in r.itertuples():
        iv = (f"[{row.ci_low:.4g}, {row.ci_high:.4g}] n={row.n}" if row.n >= MIN_SEEDS else row.interval)
        vs = "" if row.rank == 1 else f"  vs #1: {row.vs_leader}"
        se = f"  sampling SE {row.fid_se:.3g}: {row.noise}" if np.isfinite(row.fid_se) else ""
        why = f"  seeds: {row.seeds} ({row.seed_reason})" if row.seed_reason else ""
        fails = f"  [{row.failed} failed]" if row.failed else ""
        name = f"{labels.get(row.design, row.design)} ({row.design})" if labels is not None else row.design
        lines.append(f"  {row.rank}. {name}: {row.gmean:.4g} {iv}{vs}{se}{why}{fails}")
    paper = summary.get("paper")
    if paper is not None and paper.n >= MIN_PRESETS:
        lines += paper.lines()
    eff = summary["effects"]
    if len(eff):  # from the same factor set as the report's main effects and importance (aliased ones as one)
        top = eff.iloc[0]
        st = summary.get("structure")
        f = st.factor(top["kind"]) if st is not None else None
        how = "varied together as the preset" if f is not None and f.preset else "varied together"
        caveat = f"aliased with {top['aliased']}: {how}; " if top.get("aliased") else ""
        lines.append(f"component that matters most: {top['kind']} "
                     f"({caveat}spread {top['spread']:.4g} between its levels)")
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
        if args.objective:  # a metric the study never logged: say which exist (before any work is done)
            import re

            from ablate.tracking import mlflow_literal
            from ablate.tracking import client, retry, tracking_uri
            from dashboards.tables import _parent

            cl = client(tracking_uri(args.tracking_uri))
            exp, parent = _parent(cl, study)
            runs = retry(cl.search_runs, [exp.experiment_id], max_results=50000,
                         filter_string=f"tags.`mlflow.parentRunId` = {mlflow_literal(parent.info.run_id)}")
            logged = sorted({k for r in runs for k in r.data.metrics})
            metric = re.sub(r"^(final|best)/", "", args.objective)
            if "/" in metric and metric not in logged:
                print(f"error: study '{study}' never logged {args.objective!r} (--objective); its metrics: "
                      f"{', '.join(logged) or 'none yet'}", file=sys.stderr)
                return 2
        out, summary = write(study, args.tracking_uri, args.out, args.objective, not args.no_attach)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(terminal_summary(summary))
    print(f"report: {out.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
