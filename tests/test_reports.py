"""Report statistics on synthetic run tables with planted answers, and the real report in headless Chromium."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from dashboards.tables import importance, interaction, interactions, main_effects, rank


def _table(seed=0, n_seeds=4, effect=10.0, noise=0.5):
    """schedule × target grid; only the target matters (meanflow 10 lower); two failed trials."""
    rng = np.random.default_rng(seed)
    rows = []
    for sched in ("linear", "cosine"):
        for target in ("flow_matching", "meanflow", "shortcut"):
            for s in range(n_seeds):
                fid = 30.0 - (effect if target == "meanflow" else 0.0) + noise * rng.standard_normal()
                rows.append({"design": f"{sched}-{target}", "seed": s, "status": "FINISHED",
                             "design.schedule.name": sched, "design.target.name": target,
                             "final/fid/nfe_1": fid})
    rows.append({"design": "linear-shortcut", "seed": 9, "status": "FAILED", "design.schedule.name": "linear",
                 "design.target.name": "shortcut", "final/fid/nfe_1": float("nan")})
    rows.append({"design": "cosine-meanflow", "seed": 9, "status": "FAILED", "design.schedule.name": "cosine",
                 "design.target.name": "meanflow", "final/fid/nfe_1": 1e9})  # a failed trial's value is never used
    return pd.DataFrame(rows)


def test_planted_component_effect_comes_first_with_an_interval_excluding_zero():
    eff = main_effects(_table(), "fid/nfe_1")
    assert eff.iloc[0]["kind"] == "target"
    best = eff[(eff["kind"] == "target") & (eff["choice"] == "meanflow")].iloc[0]
    grand = _table().query("status == 'FINISHED'")["final/fid/nfe_1"].mean()
    assert best["ci_high"] - grand < 0  # the effect's interval excludes zero
    sched = eff[eff["kind"] == "schedule"]
    assert (sched["ci_low"] - grand < 0).all() and (sched["ci_high"] - grand > 0).all()  # no planted effect
    imp = importance(_table(), "fid/nfe_1")
    assert imp.index[0] == "target" and imp.iloc[0] > 0.8  # indexed by factor (design_structure), not column
    assert set(imp.index) == {"target", "schedule"}
    tab = interaction(_table(), "schedule", "target", "fid/nfe_1")
    assert tab.shape == (2, 3) and tab.loc["linear", "meanflow"] < tab.loc["linear", "flow_matching"] - 5
    (fa, fb, crossed), = interactions(_table(), "fid/nfe_1")  # the one crossed pair, same numbers
    assert {fa.name, fb.name} == {"schedule", "target"} and crossed.shape in ((2, 3), (3, 2))


def test_equal_means_are_not_separable_and_a_clear_gap_is():
    r = rank(_table(), "fid/nfe_1")
    assert set(r.loc[:1, "design"]) == {"linear-meanflow", "cosine-meanflow"}
    assert not r.loc[0, "separable"] and not r.loc[1, "separable"]  # same planted mean
    assert r.loc[2:, "separable"].all()  # 10 FID worse with noise 0.5: clearly separated
    assert (r["ci_low"] <= r["gmean"]).all() and (r["gmean"] <= r["ci_high"]).all() and (r["ci_low"] > 0).all()
    assert r.loc[1, "verdict"] == "not separable" and r.loc[1, "ratio_low"] < 1 < r.loc[1, "ratio_high"]
    assert (r.loc[2:, "ratio_low"] > 1.3).all() and (r["n_paired"] == 4).all()  # paired over the 4 shared seeds


def test_failures_are_counted_and_never_averaged():
    r = rank(_table(), "fid/nfe_1").set_index("design")
    assert r.loc["linear-shortcut", "failed"] == 1 and r.loc["cosine-meanflow", "failed"] == 1
    assert r.loc["cosine-meanflow", "n"] == 4 and r.loc["cosine-meanflow", "mean"] < 25
    assert r["failed"].sum() == 2


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe:
        return exe
    if os.geteuid() == 0 and shutil.which("apt-get"):  # the test set-up installs Debian's chromium
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
        if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
            subprocess.run(cmd, env=env, capture_output=True)
        exe = shutil.which("chromium")
    if not exe:
        pytest.skip("no chromium and it cannot be installed here (needs root and apt-get)")
    return exe


@pytest.mark.slow
def test_report_of_a_real_study_opens_cleanly_in_headless_chromium(study, tmp_path):
    from mlflow.tracking import MlflowClient
    from PIL import Image

    root, _, _ = study
    report = root / "ray" / "tiny" / "report.html"
    assert report.is_file()
    c = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = c.get_experiment_by_name("tiny")
    parent = [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("ablate_role") == "study"][0]
    assert [f.path for f in c.list_artifacts(parent.info.run_id, "report")] == ["report/report.html"]
    text = report.read_text()
    assert "<script src" not in text.replace(" ", "").lower().replace("<scriptsrc", "<script src") \
        and len(text) > 3_000_000  # self-contained: Plotly's JavaScript is embedded, nothing is fetched
    assert "vs leader (paired ratio, 95 % interval)" in text  # the ranking pairs designs seed by seed
    assert "n=1: too few seeds for an interval" in text  # one seed per design: no interval is claimed
    figures = re.findall(r'id="fig-([a-z_]+)"', text)
    assert {"curves", "nfe", "main_effects", "parallel", "pareto"} <= set(figures)
    exe = _chromium()
    flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
             "--enable-logging=stderr", "--v=0", "--virtual-time-budget=15000", "--window-size=1300,5000"]
    dom = subprocess.run([exe, *flags, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=180)
    errors = [ln for ln in dom.stderr.splitlines() if "CONSOLE" in ln and ("Error" in ln or "error" in ln)]
    assert not errors, errors
    for name in figures:  # every figure was drawn by Plotly (its SVG root exists inside the div)
        block = dom.stdout.split(f'id="fig-{name}"', 1)[1][:20000]
        assert "main-svg" in block or "gl-container" in block, f"figure {name} was not rendered"
    shot = tmp_path / "report.png"
    subprocess.run([exe, *flags, f"--screenshot={shot}", report.as_uri()], capture_output=True, timeout=180)
    img = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert img.std() > 5, "the screenshot is blank"
