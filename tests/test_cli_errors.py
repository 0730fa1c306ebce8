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
    # named by the study file, or (a value an override set) by the command line and the override (ablate/cli.py)
    assert err.startswith("error:") and (str(run_study) in err or f"{override}:" in err), err
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


# -- malformed studies (python -m ablate.run): one clear error, exit 2, nothing started or written ----------------
GRID = RUN_STUDY + "search:\n  grid:\n    design.target: [flow_matching, meanflow]\n"
OPTUNA_HEAD = RUN_STUDY + "search:\n  mode: optuna\n  num_samples: 2\n  space:\n"


def _optuna(space: str) -> str:
    return OPTUNA_HEAD + "".join(f"    {line}\n" for line in space.strip().splitlines())


# case -> (study text, or None for RUN_STUDY; overrides; {extra file name: text}; fragments the message must hold).
# "{file}" in a fragment is the study file's path; "command line" cases name it too.
MALFORMED: dict[str, tuple[str | None, list[str], dict, list[str]]] = {
    # the objective names a metric no trial logs
    "objective_not_in_eval_metrics": (None, ["search.objective=[kid/nfe_1]"], {},
                                      ["search.objective", "kid/nfe_1", "eval.metrics", "valid:", "fid/nfe_1"]),
    "objective_unknown_metric": (None, ["search.objective=[fid_nfe_1]"], {}, ["search.objective", "fid_nfe_1", "valid:"]),
    "objective_with_evaluation_off": (None, ["eval.at_end=false", "search.objective=[fid/nfe_1]"], {},
                                      ["search.objective", "fid/nfe_1", "evaluation off", "train/loss"]),
    # optuna spaces
    "when_names_a_key_not_in_the_space": (_optuna("""
design.target: {choices: [flow_matching, meanflow]}
design.target.jvp: {choices: [exact, finite_difference], when: {design.targt: meanflow}}"""), [], {},
                                          ["search.space.design.target.jvp.when", "design.targt", "design.target"]),
    "when_value_never_sampled": (_optuna("""
design.target: {choices: [flow_matching, meanflow]}
design.target.jvp: {choices: [exact, finite_difference], when: {design.target: meanflw}}"""), [], {},
                                 ["search.space.design.target.jvp.when", "meanflw", "never sampled", "flow_matching"]),
    "empty_choices": (_optuna("design.target: {choices: []}"), [], {},
                      ["search.space.design.target.choices", "non-empty list", "[]"]),
    "choices_not_a_list": (_optuna("design.target: {choices: meanflow}"), [], {},
                           ["search.space.design.target.choices", "non-empty list", "meanflow"]),
    "low_high_not_numbers": (_optuna("train.lr: {low: small, high: large}"), [], {},
                             ["search.space.train.lr", "must be numbers", "small"]),
    "log_scale_from_zero": (_optuna("train.lr: {low: 0.0, high: 0.1, log: true}"), [], {},
                            ["search.space.train.lr", "log scale needs low > 0"]),
    # a command-line override the grid overwrites in every trial (a typo would never be seen)
    "override_overwritten_by_the_grid": (GRID, ["design.target=meanflw"], {},
                                         ["command line", "design.target=meanflw", "search.grid.design.target",
                                          "ignored"]),
    "override_of_a_kwarg_the_grid_replaces": (GRID, ["design.target.jvp=exact"], {},
                                              ["command line", "design.target.jvp=exact", "search.grid.design.target"]),
    "grid_entry_from_the_command_line_checked": (GRID, ["search.grid.design.target=[meanflw]"], {},
                                                 ["design.target", "meanflw", "Did you mean 'meanflow'?"]),
    # GPUs asked for on a machine (local Ray) without them
    "gpus_on_a_machine_without_gpus": (None, ["resources.gpus_per_trial=1"], {},
                                       ["resources.gpus_per_trial", "no GPU", "gpus_per_trial=0", "resources.address"]),
    "more_gpus_than_the_machine_has": (None, ["resources.gpus_per_trial=4"], {"__gpus__": "1"},
                                       ["resources.gpus_per_trial", "this machine has 1"]),
    # the file itself
    "empty_study_file": ("", [], {}, ["<file>", "empty", "default study"]),
    "comments_only_study_file": ("# nothing here yet\n", [], {}, ["<file>", "empty"]),
    "study_file_not_a_mapping": ("- train\n- eval\n", [], {}, ["<file>", "mapping", "list"]),
    "defaults_from_outside_the_folder": ("defaults:\n  - ../outside@_global_\n  - _self_\n" + RUN_STUDY, [],
                                         {"../outside.yaml": "train: {steps: 3}\n"},
                                         ["defaults", "../outside@_global_", "outside the study file's folder"]),
    "defaults_through_an_absolute_group": ("defaults:\n  - /../outside@_global_\n  - _self_\n" + RUN_STUDY, [],
                                           {"../outside.yaml": "train: {steps: 3}\n"},
                                           ["defaults", "outside the study file's folder"]),
    "defaults_of_an_included_file_leave": ("defaults:\n  - inner@_global_\n  - _self_\n" + RUN_STUDY, [],
                                           {"inner.yaml": "defaults:\n  - ../outside@_global_\n",
                                            "../outside.yaml": "train: {steps: 3}\n"},
                                           ["defaults", "../outside@_global_", "outside the study file's folder"]),
    "hydra_settings_in_a_study": (RUN_STUDY + "hydra:\n  searchpath: [file:///etc]\n", [], {},
                                  ["hydra", "not allowed"]),
    # sizes and data
    "backbone_of_a_billion_width": (None, ["design.backbone.width=1000000000"], {},
                                    ["design.backbone", "parameters", "width=1000000000", "1e+10"]),
    "data_modes_zero": (None, ["data.modes=0"], {}, ["data.modes", "≥ 1", "got 0", "gaussian_mixture"]),
    "data_n_zero": (None, ["data.n=0"], {}, ["data.n", "≥ 1", "got 0"]),
    "data_std_negative": (None, ["data.std=-0.3"], {}, ["data.std", "> 0", "-0.3"]),
    # interpolations that do not resolve
    "unregistered_resolver_in_the_file": (RUN_STUDY.replace("steps: 4,", "steps: '${nosuch:4}',"), [], {},
                                          ["train.steps", "cannot be resolved", "nosuch", "registered:", "oc.env"]),
    "unregistered_resolver_in_data": (RUN_STUDY.replace("modes: 2,", "modes: '${nosuch:2}',"), [], {},
                                      ["data.modes", "cannot be resolved", "nosuch"]),
    "unregistered_resolver_on_the_command_line": (None, ["train.steps=${nosuch:4}"], {},
                                                  ["command line", "train.steps", "cannot be resolved", "nosuch"]),
    "unset_environment_variable": (RUN_STUDY.replace("steps: 4,", "steps: '${oc.env:ABLATE_TEST_NOT_SET}',"), [], {},
                                   ["train.steps", "cannot be resolved", "ABLATE_TEST_NOT_SET"]),
    # values of eval/sample/search/train the first checks did not cover
    "unknown_eval_metric": (None, ["eval.metrics=[fdi]"], {}, ["eval.metrics", "fid, kid, prc", "fdi"]),
    "unknown_fid_se": (None, ["eval.fid_se=jackknife"], {}, ["eval.fid_se", "bootstrap, none", "jackknife"]),
    "one_bootstrap_replicate": (None, ["eval.fid_se_reps=1"], {}, ["eval.fid_se_reps", "≥ 2"]),
    "no_sample_grid_images": (None, ["sample.num=0"], {}, ["sample.num", "≥ 1"]),
    "sample_nfe_zero": (None, ["sample.nfe=[0]"], {}, ["sample.nfe", "≥ 1"]),
    "asha_reduction_factor_one": (None, ["search.reduction_factor=1"], {}, ["search.reduction_factor", "> 1"]),
    "negative_max_failures": (None, ["search.max_failures=-1"], {}, ["search.max_failures", "≥ 0"]),
    "negative_grace_period": (None, ["search.grace_period=-1"], {}, ["search.grace_period", "≥ 0"]),
    "negative_classes_per_batch": (None, ["train.classes_per_batch=-1"], {}, ["train.classes_per_batch", "≥ 0"]),
    "zero_world_size": (None, ["train.world_size=0"], {}, ["train.world_size", "≥ 1"]),
    "negative_reference_samples": (None, ["eval.reference_samples=-1"], {}, ["eval.reference_samples", "≥ 0"]),
    "negative_ckpt_every_s": (None, ["train.ckpt_every_s=-1.0"], {}, ["train.ckpt_every_s", "≥ 0"]),
}


@pytest.fixture
def malformed(tmp_path, monkeypatch):
    """A sandbox: ray.init is a tripwire, and the study writes (if anything) into the sandbox only."""
    import ray

    from ablate import gpu

    def tripwire(*a, **k):
        raise AssertionError("ray.init reached: validation let a malformed study through")

    monkeypatch.setattr(ray, "init", tripwire)
    monkeypatch.setattr(gpu, "machine_gpus", lambda: (0, None))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    box = tmp_path / "box"
    (box / "studies").mkdir(parents=True)
    monkeypatch.chdir(box)
    return box


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry_run", "run"])
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_study_is_one_clear_error_and_writes_nothing(case, dry_run, malformed, capsys, monkeypatch):
    from ablate import gpu
    from ablate.run import main as run_main

    text, overrides, extra, fragments = MALFORMED[case]
    study = malformed / "studies" / "study.yaml"
    study.write_text(RUN_STUDY if text is None else text)
    for name, body in extra.items():
        if name == "__gpus__":
            monkeypatch.setattr(gpu, "machine_gpus", lambda n=int(body): (n, 40 * 2 ** 30))
            continue
        (study.parent / name).write_text(body)
    before = _listing(malformed)
    code = run_main([str(study), *overrides, f"resources.storage={malformed}/runs",
                     f"tracking.uri=sqlite:///{malformed}/m.db", *(["--dry-run"] if dry_run else [])])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    assert code == 2, f"exit {code}\nstdout:\n{out[-2000:]}\nstderr:\n{err}"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and lines[0].startswith("error:") and sum(ln.startswith("error:") for ln in lines) == 1, err
    # the study file names the problem, or (one an override causes: ablate/cli.py) the command line and the override
    assert str(study) in lines[0] or (overrides and "(command line)" in lines[0]), f"name the file:\n{err}"
    for frag in fragments:
        assert frag in err, f"{frag!r} not in:\n{err}"
    assert _listing(malformed) == before, "nothing may be written: no study folder, no MLflow database"


def test_the_malformed_suite_counts_its_cases():
    """The suite above: every case twice (dry run and a real start)."""
    assert len(MALFORMED) == 41


def test_a_grid_entry_can_be_set_from_the_command_line(malformed, capsys):
    from ablate.run import main as run_main

    study = malformed / "studies" / "study.yaml"
    study.write_text(GRID)
    argv = [str(study), "search.grid.design.target=[meanflow]", "search.grid.design.schedule=[linear,cosine]",
            f"resources.storage={malformed}/runs", "--dry-run"]
    assert run_main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "study ranges: 2 trials" in out
    assert "design.target=meanflow design.schedule=linear" in out and "design.schedule=cosine" in out
    assert "flow_matching" not in out.split("resources:")[0]


def test_search_space_entries_from_the_command_line(malformed):
    from ablate.config import compose

    study = malformed / "studies" / "study.yaml"
    study.write_text(_optuna("train.lr: {low: 0.001, high: 0.01}"))
    cfg, _ = compose(str(study), ["search.space.train.lr.high=0.1", "search.space.design.target={choices: [meanflow]}",
                                  "search.space.train.ema.low=0.9", "search.space.train.ema.high=0.99"])
    space = _container(cfg.search.space)
    assert space["train.lr"] == {"low": 0.001, "high": 0.1}
    assert space["design.target"] == {"choices": ["meanflow"]}
    assert space["train.ema"] == {"low": 0.9, "high": 0.99}


def _container(node):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True)
