"""Bad input to ``python -m ablate.train`` fails before any compute: exit 2, one clear message on
stderr naming the problem and the valid choices, never a traceback (DESIGN §3, cli.py).

Every case runs in-process through ``ablate.train.main`` (the same code path as the console,
milliseconds each); a subset also runs as real subprocesses, all started at once, to check the
actual entry point, exit status and stderr. (Each subprocess spends seconds importing torch.)
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ablate.train import main

ROOT = Path(__file__).resolve().parents[1]
# Design-level errors load the data first; a small toy keeps sklearn's import out of the way.
TOY = ["data.name=checkerboard", "data.n=200"]

BAD_STUDY = """\
name: bad
data:
  name: checkerboard
  n: 200
design:
  preset: meanflow
trian:            # misspelled section
  steps: 10
"""

# case -> (argv, fragments stderr must contain)
CASES: dict[str, tuple[list[str], list[str]]] = {
    "unknown_plugin": (["meanflow", "design.target=meanflw"],
                       ["design.target", "meanflw", "Did you mean 'meanflow'?", "flow_matching", "shortcut"]),
    "bad_kwarg": (["meanflow", "design.target.jvpp=exact", *TOY],
                  ["jvpp", "Did you mean 'jvp'?", "fd_step", "velocity", "plugin_prob"]),
    "wrong_type_train": (["meanflow", "train.steps=abc"], ["train.steps", "integer", "abc"]),
    "wrong_type_study_train": (["studies/toy_2d.yaml", "train.steps=abc"], ["train.steps", "integer", "abc"]),
    "wrong_type_plugin_option": (["meanflow", "design.time_sampler.std=abc", *TOY],
                                 ["time_sampler", "std", "number", "abc"]),
    "unknown_train_key": (["meanflow", "train.stepz=3"], ["train.stepz", "steps", "batch_size", "lr"]),
    "missing_data_path": (["meanflow", "data.name=image_folder", "data.path=/nonexistent"],
                          ["/nonexistent", "image_folder"]),
    "bad_data_option": (["meanflow", "data.name=checkerboard", "data.nn=3"], ["'nn'", "Did you mean 'n'?", "squares"]),
    "unknown_dataset": (["meanflow", "data.name=checkerbord"], ["checkerbord", "Did you mean 'checkerboard'?"]),
    "unknown_preset": (["meanflw"], ["preset", "meanflw", "Did you mean 'meanflow'?", "flow_matching", "scd"]),
    "bad_study_file": (["{tmp}/bad_study.yaml"], ["bad_study.yaml", "trian", "train", "sample"]),
    "missing_study_file": (["{tmp}/no_such_study.yaml"], ["no_such_study.yaml", "not found"]),
}
SUBPROCESS_CASES = ["unknown_plugin", "wrong_type_train"]
OK_DRY_RUN = ["meanflow", *TOY]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "bad_study.yaml").write_text(BAD_STUDY)
    return d


def _argv(case, tmp):
    argv = [a.format(tmp=tmp) for a in CASES[case][0]]
    if argv[0].startswith("studies/") and not (ROOT / argv[0]).is_file():
        pytest.skip(f"{argv[0]} is not in this checkout")
    return [*argv, "--dry-run"]


def _check_bad(case: str, code: int, stdout: str, stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    assert code == 2, f"exit {code}\nstdout:\n{stdout[-1500:]}\nstderr:\n{stderr}"
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines and lines[0].startswith("error:"), stderr
    assert sum(ln.startswith("error:") for ln in lines) == 1, f"more than one message:\n{stderr}"
    for frag in CASES[case][1]:
        assert frag in stderr, f"{frag!r} not in:\n{stderr}"
    assert "design_id" not in stdout, "a failed validation must not print a design"


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_in_process(case, tmp, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code = main(_argv(case, tmp))  # an exception escaping here is the traceback a user would see
    out, err = capsys.readouterr()
    _check_bad(case, code, out, err)


def test_unknown_preset_is_named_first(tmp, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    main(_argv("unknown_preset", tmp))
    err = capsys.readouterr().err.splitlines()
    assert "preset" in err[1], "the preset problem comes before its consequences"


@pytest.mark.parametrize("target", [None, "meanflow", "studies/toy_2d.yaml"])
def test_override_types_are_checked_for_every_kind_of_target(target):
    """compose() checks an override's type whether it starts from a study, a preset or nothing."""
    from ablate.config import ConfigError, compose

    if target and target.endswith(".yaml") and not (ROOT / target).is_file():
        pytest.skip(f"{target} is not in this checkout")
    with pytest.raises(ConfigError) as exc:
        compose(str(ROOT / target) if target and target.endswith(".yaml") else target, ["train.lr=fast"])
    assert ("train.lr", "must be a number, got 'fast'") in exc.value.problems


def test_overrides_do_not_leak_into_the_next_compose():
    from ablate.config import compose

    cfg, _ = compose("meanflow", ["train.steps=7"])
    assert cfg.train.steps == 7
    again, _ = compose("meanflow", [])
    assert again.train.steps != 7


def _check_dry_run(code: int, out: str, err: str) -> None:
    assert code == 0, err
    assert "Traceback" not in err
    start = out.index("{\n")
    end = out.index("\n}", start) + 2
    design = json.loads(out[start:end])
    assert len(design["design_id"]) == 12
    assert design["preset"] == "meanflow"
    assert design["components"]["target"]["name"] == "meanflow"
    assert design["components"]["backbone"]["name"] == "mlp"  # the toy's default backbone
    assert design["slug"].startswith("linear-logit_normal-meanflow-adaptive-")
    assert "out_dir:" in out
    from ablate.design import resolve_design

    same = resolve_design({"preset": "meanflow"}, default_backbone={"name": "mlp"})
    assert same.design_id == design["design_id"], "the CLI and the library must agree on the design id"


def test_dry_run_in_process(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # a dry run writes nothing
    code = main([*OK_DRY_RUN, "--dry-run"])
    out, err = capsys.readouterr()
    _check_dry_run(code, out, err)
    assert list(tmp_path.iterdir()) == []


# -- the real entry point --------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp):
    argvs = {case: _argv(case, tmp) for case in SUBPROCESS_CASES}
    argvs["ok_dry_run"] = [*OK_DRY_RUN, "--dry-run"]
    procs = {case: subprocess.Popen([sys.executable, "-m", "ablate.train", *argv], cwd=ROOT, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for case, argv in argvs.items()}
    out = {}
    for case, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        out[case] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return out


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_bad_input_subprocess(case, runs):
    res = runs[case]
    _check_bad(case, res.returncode, res.stdout, res.stderr)


def test_dry_run_subprocess(runs):
    res = runs["ok_dry_run"]
    _check_dry_run(res.returncode, res.stdout, res.stderr)
