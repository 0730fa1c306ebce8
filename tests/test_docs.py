"""docs/presets.md lists every preset with the components the registry gives it."""
from __future__ import annotations

from pathlib import Path

from ablate.design import PRESETS

DOC = Path(__file__).resolve().parents[1] / "docs" / "presets.md"


def test_presets_page_matches_the_registry():
    rows = {line.split("|")[1].strip().strip("`"): line for line in DOC.read_text().splitlines()
            if line.startswith("| `")}
    assert set(rows) == set(PRESETS), "docs/presets.md and the registered presets differ"
    for name, design in PRESETS.items():
        cells = [c.strip() for c in rows[name].split("|")[2:7]]
        for cell, kind in zip(cells, ("schedule", "time_sampler", "target", "weighting", "guidance")):
            choice = design[kind]
            assert cell.startswith(f"`{choice['name']}`"), (name, kind, cell)
            for key, value in choice.items():
                if key != "name":
                    assert f"{key}={value}" in cell, (name, kind, key, value, cell)
