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


# -- values are checked for meaning, not only type (python -m ablate.run) ----------------------------
RUN_STUDY = """\
name: ranges
data: {name: gaussian_mixture, modes: 2, n: 400}
design:
  preset: flow_matching
  guidance: none
  backbone: {name: mlp, width: 8, depth: 1}
train: {steps: 4, batch_size: 16, log_every: 2, ckpt_every: 0}
eval: {every: 0, nfe: [1], num_samples: 50}
sample: {nfe: [1], num: 8}
resources: {cpus_per_trial: 1}
"""

# override -> fragments the message must hold (the key and the valid range or choices)
RANGES = {
    "train.steps=0": ["train.steps", "≥ 1", "got 0"],
    "train.batch_size=0": ["train.batch_size", "≥ 1"],
    "train.log_every=0": ["train.log_every", "≥ 1"],
    "eval.nfe=[1,0]": ["eval.nfe", "≥ 1", "[1, 0]"],
    "eval.nfe=[1,-2]": ["eval.nfe", "≥ 1"],
    "train.optimizer=sgd": ["train.optimizer", "'sgd'", "adam, adamw"],
    "train.device=gpu": ["train.device", "auto, cpu, cuda or cuda:N", "'gpu'"],
    "train.precision=fp16": ["train.precision", "auto, fp32, bf16", "'fp16'"],
    "train.lr=0": ["train.lr", "finite number > 0"],
    "train.lr=-0.1": ["train.lr", "finite number > 0"],
    "train.lr=inf": ["train.lr", "finite number > 0", "inf"],
    "train.lr=nan": ["train.lr", "finite number > 0", "nan"],
    "train.betas=[0.9]": ["train.betas", "two numbers in [0, 1)"],
    "train.betas=[0.9,1.0]": ["train.betas", "two numbers in [0, 1)"],
    "train.betas=[-0.1,0.9]": ["train.betas", "two numbers in [0, 1)"],
    "train.ema=1.0": ["train.ema", "[0, 1)"],
    "train.ema=-0.5": ["train.ema", "[0, 1)"],
    "eval.every=-1": ["eval.every", "≥ 0"],
    "train.ckpt_every=-5": ["train.ckpt_every", "≥ 0"],
    "train.grad_clip=-1.0": ["train.grad_clip", "≥ 0"],
    "train.warmup_steps=-1": ["train.warmup_steps", "≥ 0"],
    "train.weight_decay=-0.1": ["train.weight_decay", "≥ 0"],
    "resources.max_concurrent=-1": ["resources.max_concurrent", "≥ 0"],
    "resources.cpus_per_trial=-1": ["resources.cpus_per_trial", "≥ 0"],
    "resources.gpus_per_trial=-0.5": ["resources.gpus_per_trial", "≥ 0"],
    "eval.num_samples=0": ["eval.num_samples", "≥ 1"],
    "eval.batch_size=0": ["eval.batch_size", "≥ 1"],
}


@pytest.fixture
def run_study(tmp_path, monkeypatch):
    import ray

    def tripwire(*a, **k):
        raise AssertionError("ray.init reached: validation let a bad value through")

    monkeypatch.setattr(ray, "init", tripwire)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ranges.yaml").write_text(RUN_STUDY)
    return tmp_path / "ranges.yaml"


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry_run", "run"])
@pytest.mark.parametrize("override", sorted(RANGES))
def test_out_of_range_values_are_refused(override, dry_run, run_study, capsys):
    from ablate.run import main as run_main

    tmp = run_study.parent
    code = run_main([str(run_study), override, f"resources.storage={tmp}/runs", f"tracking.uri=sqlite:///{tmp}/m.db",
                     *(["--dry-run"] if dry_run else [])])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    assert code == 2, f"exit {code}\n{out[-1500:]}\n{err}"
    assert err.startswith("error:") and str(run_study) in err, err
    for frag in RANGES[override]:
        assert frag in err, f"{frag!r} not in:\n{err}"
    assert sorted(p.name for p in tmp.iterdir()) == ["ranges.yaml"], "nothing may be written"


def test_every_bad_value_is_reported_at_once(run_study, capsys):
    from ablate.run import main as run_main

    assert run_main([str(run_study), "train.steps=0", "train.lr=-1.0", "train.optimizer=sgd", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert sum(ln.startswith("error:") for ln in err.splitlines()) == 1
    assert all(k in err for k in ("train.steps", "train.lr", "train.optimizer"))


def test_a_searched_value_is_checked_like_a_written_one(run_study, capsys):
    from ablate.run import main as run_main

    run_study.write_text(RUN_STUDY + "search:\n  grid:\n    train.lr: [0.001, -1.0]\n")
    assert run_main([str(run_study), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "train.lr" in err and "finite number > 0" in err and "train.lr=-1.0" in err


def test_good_values_pass(run_study, capsys):
    from ablate.run import main as run_main

    from ablate.config import check_values, compose

    argv = [str(run_study), "train.device=cpu", "train.precision=bf16", "train.ema=0.0", "train.betas=[0.0,0.99]",
            "train.grad_clip=0.0", "resources.max_concurrent=0", "train.optimizer=adam", "--dry-run"]
    assert run_main(argv) == 0, capsys.readouterr().err
    for device in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"):
        assert check_values(compose(str(run_study), [f"train.device={device}"])[0]) == []


# -- the report: an objective the study never logged ---------------------------------------------------
def test_report_with_an_unknown_objective_names_the_ones_that_exist(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from dashboards.report import main as report_main

    uri = f"sqlite:///{tmp_path}/m.db"
    cl = MlflowClient(uri)
    exp = cl.create_experiment("fake")
    parent = cl.create_run(exp, run_name="fake", tags={"ablate_role": "study", "study": "fake", "superseded": "false"})
    for seed in range(2):
        for slug in ("a", "b"):
            r = cl.create_run(exp, tags={"mlflow.parentRunId": parent.info.run_id, "ablate_role": "trial",
                                         "slug": slug, "seed": str(seed), "design_id": slug, "trial_key": slug + str(seed)})
            cl.log_metric(r.info.run_id, "fid/nfe_1", 10.0 + seed + (slug == "b"), step=10)
            cl.set_terminated(r.info.run_id, "FINISHED")
    argv = ["fake", "--tracking-uri", uri, "--no-attach", "--out", str(tmp_path / "r.html")]
    assert report_main([*argv, "--objective", "fid/nfe_3"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    msg = [ln for ln in err.splitlines() if ln.startswith("error:")]  # (MLflow logs its own lines to stderr)
    assert len(msg) == 1 and "fid/nfe_3" in msg[0] and "fid/nfe_1" in msg[0], err
    assert not (tmp_path / "r.html").exists()
    assert report_main([*argv, "--objective", "fid/nfe_1"]) == 0
