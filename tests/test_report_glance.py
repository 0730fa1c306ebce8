"""The report at a glance, on a synthetic study shaped like studies/schedule_vs_target.yaml (preset × schedule,
2 seeds): aliased components found as one factor, interactions only for crossed pairs, importance over the
independent factors, nested options not ranked, the one-line verdict, short labels, named FID features."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from dashboards import report
from dashboards.tables import (design_frame, design_labels, design_structure, importance, interactions,
                               main_effects, nested_effects, separability_lines)

OBJ = "fid/nfe_1"
_TS = {"design.time_sampler.std": 1.0, "design.time_sampler.r_mode": "pair", "design.time_sampler.r_zero_warmup": 0,
       "design.time_sampler.r_zero_warmup_rows": "pairs"}
_COMMON = {"design.backbone.name": "dit", "design.backbone.size": "T", "design.backbone.patch": 2,
           "design.backbone.depth": 2, "design.backbone.mlp_ratio": 4.0, "design.guidance.label_dropout": 0.1}
PRESETS = {  # flat params as ablate.run records them (design.<kind>.name / design.<kind>.<kwarg>), linear schedule
    "flow_matching": {"design.time_sampler.name": "logit_normal", "design.time_sampler.mean": 0.0,
                      "design.time_sampler.fraction_r_neq_t": 0.0, "design.time_sampler.r_eq_t_time": "single", **_TS,
                      "design.target.name": "flow_matching", "design.target.velocity": "conditional",
                      "design.weighting.name": "l2", "design.guidance.name": "cfg", "design.guidance.scale": 1.0},
    "scd": {"design.time_sampler.name": "dyadic", "design.time_sampler.base_steps": 128,
            "design.target.name": "shortcut", "design.target.base_steps": 128, "design.target.teacher": "ema",
            "design.target.clip": 4.0, "design.weighting.name": "l2", "design.guidance.name": "cfg",
            "design.guidance.scale": 1.0},
    "meanflow": {"design.time_sampler.name": "logit_normal", "design.time_sampler.mean": -0.4,
                 "design.time_sampler.fraction_r_neq_t": 0.25, "design.time_sampler.r_eq_t_time": "max_of_two", **_TS,
                 "design.target.name": "meanflow", "design.target.jvp": "exact", "design.target.fd_step": 0.001,
                 "design.weighting.name": "adaptive", "design.weighting.p": 1.0,
                 "design.guidance.name": "meanflow_cfg", "design.guidance.omega": 1.0},
}
SLUG = {"flow_matching": "logit_normal-flow_matching-l2-dit_t2-cfg", "scd": "dyadic-shortcut-l2-dit_t2-cfg",
        "meanflow": "logit_normal-meanflow-adaptive-dit_t2-meanflow_cfg"}
PLANTED = {"flow_matching": 40.0, "scd": 25.0, "meanflow": 12.0}  # FID at 1 NFE; cosine 10 % worse


def schedule_vs_target(n_seeds: int = 2, seed: int = 0) -> pd.DataFrame:
    """A trials table as ``load_trials`` gives it for schedule_vs_target: preset × schedule × seeds."""
    rng = np.random.default_rng(seed)
    luck = rng.normal(0, 0.05, n_seeds)  # per-seed luck shared by every design
    rows = []
    for preset, params in PRESETS.items():
        for sched in ("linear", "cosine"):
            slug = f"{sched}-{SLUG[preset]}"
            for s in range(n_seeds):
                base = PLANTED[preset] * (1.1 if sched == "cosine" else 1.0) * np.exp(luck[s])
                row = {"run_id": f"{slug}-{s}", "design": slug, "slug": slug, "seed": s, "status": "FINISHED",
                       "error": "", "preset": preset if sched == "linear" else "", "seed_reason": "",
                       "wall_s": {"flow_matching": 60.0, "scd": 90.0, "meanflow": 140.0}[preset], "steps": 600,
                       "design.schedule.name": sched, **_COMMON, **params,
                       "fid.extractor": "classifier", "fid.num_samples": 500, "train.lr": 0.001,
                       "train.steps": 600}
                for k, nfe in enumerate((1, 2, 4, 16)):
                    fid = base * (0.8 ** k if preset != "flow_matching" else 0.5 ** k)
                    row[f"final/fid/nfe_{nfe}"] = fid * np.exp(0.01 * rng.standard_normal())
                    row[f"final/fid_se/nfe_{nfe}"] = 0.01 * fid
                rows.append(row)
    return pd.DataFrame(rows)


def test_aliased_components_are_one_factor_and_nested_options_are_not_factors():
    st = design_structure(schedule_vs_target())
    assert sorted(f.label for f in st.factors) == ["schedule", "target + weighting + guidance + time sampler"]
    preset = st.factor("design.target.name")
    assert preset.preset and preset.short == "preset" and preset.aliased == ["weighting", "guidance", "time sampler"]
    assert preset.caption == "target + weighting + guidance + time sampler, varied together as the preset"
    assert set(preset.choices) == {"flow_matching", "scd", "meanflow"}  # labelled by preset, not target name
    nested = st.nested.set_index("column")
    assert nested.loc["design.target.jvp", "choice"] == "meanflow" and not nested.loc["design.target.jvp", "varies"]
    assert nested.loc["design.target.fd_step", "component"] == "target"
    assert nested.loc["design.time_sampler.mean", "note"] == "varies with the preset"  # 0 vs -0.4: part of the preset
    assert [(a.short, b.short) for a, b in st.crossed] == [("preset", "schedule")] and not st.partial


def test_main_effects_importance_interactions_and_terminal_use_one_factor_set():
    t = schedule_vs_target()
    eff = main_effects(t, OBJ)
    assert list(dict.fromkeys(eff["factor"])) == ["target + weighting + guidance + time sampler", "schedule"]
    assert eff.iloc[0]["kind"] == "target" and eff.iloc[0]["aliased"] == "weighting, guidance, time sampler"
    assert not eff["factor"].str.contains("jvp|fd_step|weighting.p").any()  # nested: not ranked beside target
    imp = importance(t, OBJ)
    assert set(imp.index) == {"target + weighting + guidance + time sampler", "schedule"}  # 2 parameters, not 26
    assert imp.index[0] == eff.iloc[0]["factor"]  # importance and main effects agree on what matters most
    tabs = interactions(t, OBJ)
    assert len(tabs) == 1 and tabs[0][2].shape == (3, 2) and not tabs[0][2].isna().any().any()
    assert nested_effects(t, OBJ).empty  # nothing nested varies on its own here
    summary = {"objective": OBJ, "ranking": report.rank(t, OBJ), "effects": eff, "labels": design_labels(t)}
    text = report.terminal_summary(summary)
    assert "component that matters most: target (aliased with weighting, guidance, time sampler" in text
    summary["structure"] = design_structure(t)
    assert "time sampler: varied together as the preset" in report.terminal_summary(summary)


def test_interactions_only_for_crossed_pairs():
    t = schedule_vs_target()
    t = t[~((t["preset"] == "") & (t["design.target.name"] == "meanflow"))]  # no cosine MeanFlow: not crossed
    st = design_structure(t)
    assert not st.crossed and [(a.short, b.short) for a, b in st.partial] == [("preset", "schedule")]
    assert interactions(t, OBJ) == []
    assert any("not crossed" in ln for ln in st.lines())


def test_labels_are_short_unique_and_keep_the_slug_as_key():
    t = schedule_vs_target()
    labels = design_labels(t)
    assert labels["cosine-logit_normal-meanflow-adaptive-dit_t2-meanflow_cfg"] == "meanflow · cosine"
    assert labels["linear-dyadic-shortcut-l2-dit_t2-cfg"] == "scd"  # the preset as it is: its name alone
    assert labels.is_unique and labels.str.len().max() <= 24 and len(labels) == 6
    assert all(len(lab) < len(slug) / 2 for slug, lab in labels.items())
    whole = schedule_vs_target()
    whole = whole[whole["preset"] != ""]  # whole designs (search.grid.design: [{preset: …}, …])
    st = design_structure(whole)
    assert len(st.factors) == 1 and st.factors[0].preset and not st.crossed
    assert sorted(design_labels(whole, st)) == ["flow_matching", "meanflow", "scd"]
    plain = schedule_vs_target().drop(columns="preset")  # no presets recorded: every factor's level
    plain["slug"] = plain["design"] = plain["design"].str.replace("-dit_t2", "-mlp")  # no slug matches a preset
    assert "meanflow · cosine" in set(design_labels(plain))


def test_verdict_names_leader_margin_and_separability():
    t = schedule_vs_target(n_seeds=3)
    page, summary = _build(t)
    v = summary["verdict"]
    assert v.startswith("Leader: meanflow, FID 12.") and "at 1 NFE (classifier features)" in v
    assert "runner-up meanflow · cosine" in v
    assert re.search(r"at ×1\.\d+ \[1\.\d+, 1\.\d+\] \(paired, n=3\): separable", v)  # ratio, interval, verdict
    assert "matters most: the preset (target, weighting, guidance, time sampler vary together" in v
    assert page.index(v.split(":")[0]) < page.index("<h2>Ranking</h2>")  # at the top
    two = report.verdict(report.rank(schedule_vs_target(n_seeds=2), OBJ), pd.DataFrame(),
                         design_labels(schedule_vs_target(n_seeds=2)))
    assert "(paired, n=2: too few seeds for an interval)" in two and ("undetermined" in two or "separable" in two)


def test_fid_axes_name_the_extractor_and_figures_use_short_labels():
    t = schedule_vs_target()
    page, summary = _build(t)
    figs = dict(summary["figs"])
    assert figs["nfe"].layout.yaxis.title.text == "FID (classifier features)"
    assert "classifier features" in figs["pareto"].layout.xaxis.title.text
    assert "classifier features" in figs["pareto"].layout.yaxis.title.text
    assert "classifier features" in figs["curves"].layout.yaxis.title.text
    names = {tr.name for tr in figs["nfe"].data}
    assert "meanflow · cosine" in names and not any("logit_normal" in n for n in names)
    hover = [tr.hovertemplate or "" for tr in figs["nfe"].data]
    assert any("cosine-logit_normal-meanflow" in (h + str(tr.customdata)) for h, tr in zip(hover, figs["nfe"].data))
    assert figs["nfe"].layout.yaxis.tickvals  # readable ticks on the log axis
    key = [tr for tr in figs["pareto"].data if tr.name and "marker size" in tr.name]  # the key for marker size
    assert len(key) == 1 and len(set(key[0].marker.size)) == 3 and all(x.strip().endswith(" s") for x in key[0].text)
    assert "interaction" in figs and page.count("<h3>Interaction:") == 1  # one crossed pair, one table


def test_sample_grids_are_captioned_with_nfe_seed_and_step():
    t = schedule_vs_target()
    grids = [{"design": t["design"][0], "b64": "AAAA", "nfe": 1, "seed": 0, "step": 600}]
    html = report.grids_html(grids, design_labels(t))
    assert "1 NFE" in html and "seed 0" in html and "step 600" in html and "flow_matching</b>" in html


def test_dry_run_says_what_can_and_cannot_be_separated():
    t = schedule_vs_target()
    cols = [c for c in t.columns if c.startswith("design.")]
    planned = [{"slug": r["slug"], "variant": "", "seed": r["seed"], "preset": r["preset"],
                "params": {c: r[c] for c in cols if pd.notna(r[c])}} for _, r in t.iterrows()]
    lines = separability_lines(design_frame(planned))
    text = "\n".join(lines)
    assert "cannot separate target from weighting, guidance, time sampler" in text
    assert "can separate preset from schedule" in text
    assert "not ranked" in text and "target=meanflow: jvp, fd_step" in text


def _build(t, grids=()):
    hist_rows = []
    for _, r in t.iterrows():
        for step in (200, 400, 600):
            hist_rows.append({"run_id": r["run_id"], "design": r["design"], "seed": r["seed"], "metric": "fid/nfe_1",
                              "step": step, "value": r["final/fid/nfe_1"] * 600 / step})
    hist = pd.DataFrame(hist_rows)
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(report, "load_trials", lambda study, uri=None: t)
        mp.setattr(report, "load_histories", lambda study, uri=None: hist)
        mp.setattr(report, "sample_grids", lambda trials, uri: list(grids))
        return report.build("schedule_vs_target")
    finally:
        mp.undo()
