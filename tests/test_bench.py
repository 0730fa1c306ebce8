"""``python -m ablate.bench`` produces every row (a smoke test of its plumbing, never of its speed)."""
from __future__ import annotations

import json
import math

import pytest

from ablate.bench import TARGET_ROWS, main


@pytest.mark.slow
def test_targets_section_has_every_row_with_ratios_to_flow_matching(tmp_path, capsys):
    assert main(["--only", "targets", "--backbones", "mlp", "--rounds", "1", "--steps", "1",
                 "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [r["row"] for r in rows] == [name for name, _ in TARGET_ROWS]
    assert rows[0]["row"] == "flow_matching" and rows[0]["x_flow_matching"] == 1.0
    for r in rows:
        assert r["ms_per_step"] > 0 and math.isfinite(r["x_flow_matching"]) and math.isfinite(r["peak_mib"])
    assert (tmp_path / "bench.csv").read_text().count("\n") == len(rows) + 1
    out = capsys.readouterr().out
    assert "== targets ==" in out and "meanflow (exact JVP)" in out


@pytest.mark.slow
def test_study_and_asha_sections_read_a_real_study(study, tmp_path, capsys):
    root, _, _ = study  # the tiny real study (tests/study_fixture.py)
    uri = f"sqlite:///{root}/mlflow.db"
    assert main(["--only", "study", "asha", "--study", "tiny", "--asha-study", "tiny", "--tracking-uri", uri,
                 "--out", str(tmp_path)]) == 0
    rows = {r["row"]: r for r in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    wall, ideal = rows["tiny: wall time"]["value"], next(v["value"] for k, v in rows.items() if "Σ" in k)
    assert 0 < ideal < wall
    assert rows["tiny: platform overhead"]["value"] == pytest.approx(100 * (wall - ideal) / wall)
    assert rows["training steps used (ASHA / grid)"]["value"] == pytest.approx(100.0)  # the same study twice
    best = next(r for k, r in rows.items() if k.startswith("ASHA's best"))
    assert "the grid's winner" in best["unit"]
    assert main(["--only", "study", "--study", "no_such_study", "--tracking-uri", uri, "--out", str(tmp_path)]) == 0
    assert "no MLflow experiment" in capsys.readouterr().out
