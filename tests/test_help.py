"""``python -m ablate.* --help``: fast (nothing heavy imported), plain text, presets listed; errors once per cause."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("ablate.run", "ablate.train", "ablate.evaluate", "ablate.encode", "ablate.list", "ablate")
HEAVY = ("torch", "ray", "mlflow", "components", "numpy", "pandas")

PROBE = """
import json, runpy, sys
mod = sys.argv[1]
sys.argv = [mod, "--help"]
try:
    runpy.run_module(mod, run_name="__main__", alter_sys=True)
    code = None
except SystemExit as exc:
    code = exc.code
print("\\n@@" + json.dumps({"code": code, "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def _help(mod: str) -> tuple[str, dict, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PROBE, mod], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "COLUMNS": "100"})
    wall = time.perf_counter() - t0
    text, _, tail = proc.stdout.rpartition("\n@@")
    assert tail, proc.stdout + proc.stderr
    return text, json.loads(tail), wall


@pytest.fixture(scope="module")
def helps():
    return {m: _help(m) for m in MODULES}


@pytest.mark.parametrize("mod", MODULES)
def test_help_imports_nothing_heavy(helps, mod):
    text, probe, wall = helps[mod]
    assert probe["code"] in (0, None) and "usage: python -m" in text, text
    assert probe["heavy"] == [], f"{mod} --help imported {probe['heavy']} ({wall:.1f} s)"
    assert wall < 5.0, f"{mod} --help took {wall:.1f} s"  # ~0.1-0.3 s; seconds means an import crept in


@pytest.mark.parametrize("mod", MODULES)
def test_help_shows_no_docstring_markup(helps, mod):
    text = helps[mod][0]
    assert "``" not in text and ":func:" not in text and ":class:" not in text, text


def test_train_help_lists_every_preset(helps):
    from ablate.design import PRESETS

    text = helps["ablate.train"][0]
    listed = text.split("presets (", 1)[1]
    for name in PRESETS:
        assert f"\n  {name} " in listed or listed.rstrip().endswith(f"  {name}"), f"{name} not listed:\n{text}"
    assert "Mean Flows" in listed  # with its paper


def test_presets_read_without_importing_design_match_the_registry():
    from ablate.cli import presets
    from ablate.design import PRESETS

    assert presets() == sorted((n, d["_paper"]) for n, d in PRESETS.items())


def test_list_kinds_for_help_match_the_registries():
    from ablate.list import KINDS, _all_registries

    assert list(KINDS) == [*_all_registries(), "preset"]


def test_run_has_a_verbose_flag(helps):
    from ablate.run import make_parser

    assert make_parser("x").parse_args(["s.yaml", "--verbose"]).verbose is True
    assert "--verbose" in helps["ablate.run"][0] and "ray.log" in helps["ablate.run"][0]


def test_plain_renders_markup():
    from ablate.cli import plain

    assert plain("Run ``python -m ablate.run X``; see :class:`~ablate.evaluation.Evaluator` and "
                 ":func:`ablate.run.launch`.") == "Run python -m ablate.run X; see Evaluator and ablate.run.launch."


# -- one error per cause, from its true source ----------------------------------------------------------
def test_a_mistyped_override_is_reported_once_and_attributed_to_the_command_line(capsys):
    from ablate.run import main

    code = main([str(ROOT / "studies" / "design_space.yaml"), "design.target.jpv=exact", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[0] == "error: invalid configuration (command line):", err
    problems = [ln for ln in lines[1:] if ln.startswith("  - ")]
    assert len(problems) == 1, err  # not once per design (9)
    assert problems[0].startswith("  - design.target.jpv=exact: ") and "Did you mean 'jvp'?" in problems[0], err
    assert "design_space.yaml" not in err


def test_a_problem_of_the_file_repeated_by_every_design_is_one_line_under_the_file(tmp_path, capsys):
    from ablate.run import main

    study = tmp_path / "s.yaml"
    study.write_text("data: {name: gaussian_mixture, modes: 2}\n"
                     "design: {preset: meanflow, guidance: none, backbone: {name: mlp, width: 8, depth: 1},"
                     " target: {jpv: exact}}\n"
                     "search: {grid: {design.schedule: [linear, cosine]}, seeds: 1}\n")
    code = main([str(study), "train.steps=3", "--dry-run"])  # an override unrelated to the problem
    err = capsys.readouterr().err
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[0] == f"error: invalid configuration ({study}):", err
    assert len(lines) == 2 and lines[1].startswith("  - design.target: ") and "(in 2 trials)" in lines[1], err


def test_a_train_override_typo_is_the_command_lines(capsys):
    from ablate.train import main

    assert main(["meanflow", "design.target.jpv=exact", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid design (command line):") and "design.target.jpv=exact:" in err, err


def test_attribute_groups_one_cause_and_keeps_distinct_ones():
    from ablate.cli import attribute

    problems = [("design.target", "target 'meanflow' option 'jvp' must be one of 'exact', got 'x' (in trial a)"),
                ("design.target", "target 'consistency' option 'jvp' must be one of 'exact', got 'x' (in trial b)"),
                ("design.target", "target 'imm' has no option 'jvp'. Accepted options: k (in trial c)"),
                ("train.lr", "must be a finite number > 0, got -1")]
    where, lines = attribute("s.yaml", problems, ["design.target.jvp=x"])
    assert where == "s.yaml, command line"
    assert lines == ["design.target.jvp=x: target 'meanflow', 'consistency': option 'jvp' must be one of 'exact', "
                     "got 'x' (in 2 trials)",
                     "design.target.jvp=x: target 'imm' has no option 'jvp'. Accepted options: k (in trial c)",
                     "train.lr: must be a finite number > 0, got -1"]
