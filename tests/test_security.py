"""Inputs that must not reach outside the study: names used as paths, folders --fresh would delete, pickles that run
code (CIFAR-10 batches, Tune's tuner.pkl), MLflow filter strings, listening addresses. Every check is fast and
never starts Ray: ``ray.init`` is replaced by a tripwire, so code that would get past validation fails loudly.
"""
from __future__ import annotations

import json
import os
import pickle
import socket
from pathlib import Path

import numpy as np
import pytest

from ablate.run import MARKER, main, mlflow_literal, prepare_study_folder, study_state, StudyStateError

STUDY = """\
name: {name}
data: {{name: gaussian_mixture, modes: 2, n: 400}}
design:
  preset: flow_matching
  guidance: none
  backbone: {{name: mlp, width: 8, depth: 1}}
train: {{steps: 4, batch_size: 16, log_every: 2, ckpt_every: 0}}
eval: {{every: 0, nfe: [1], num_samples: 50}}
sample: {{nfe: [1], num: 8}}
resources: {{cpus_per_trial: 1}}
"""


class Payload:
    """Unpickling this runs a shell command that writes ``path``: what a crafted pickle does."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch '{self.path}'",)


@pytest.fixture
def no_ray(monkeypatch):
    """Fail at once if anything gets as far as starting Ray."""
    import ray

    def tripwire(*a, **k):
        raise AssertionError("ray.init reached: validation let this input through")

    monkeypatch.setattr(ray, "init", tripwire)


def _study(tmp_path: Path, name: str, **fmt) -> Path:
    f = tmp_path / "study.yaml"
    f.write_text(STUDY.format(name=name, **fmt))
    return f


def _argv(study: Path, tmp_path: Path, storage: Path, *extra: str) -> list[str]:
    return [str(study), f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"resources.storage={storage}", *extra]


# -- A. study names are plain names ------------------------------------------------------------
BAD_NAMES = ["../../../victim", "..", "../x", "/abs/olute", "a/b", ".hidden", "quote'name", 'dq"name',
             "sp ace", "nl\\nx", "${oc.env:HOME}", "${now:%Y-%m-%d_%H-%M-%S}", "x-${oc.env:HOME}", "''"]


@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize("dry_run", [True, False])
def test_bad_study_name_is_refused_before_anything(name, dry_run, tmp_path, capsys, monkeypatch, no_ray):
    monkeypatch.chdir(tmp_path)
    study = _study(tmp_path, json.dumps(name))  # YAML-quoted: the value is exactly `name`
    storage = tmp_path / "a" / "b" / "c" / "runs"
    rc = main(_argv(study, tmp_path, storage, "--fresh", *(["--dry-run"] if dry_run else [])))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    assert str(study) in err and "name:" in err, err
    assert ("plain name" in err) or ("interpolations are not allowed" in err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"], "nothing may be written"


def test_fresh_with_a_traversing_name_leaves_the_victim_alone(tmp_path, capsys, no_ray):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    storage = tmp_path / "a" / "b" / "c"  # <storage>/../../../victim is tmp_path/victim
    study = _study(tmp_path, "../../../victim")
    assert main(_argv(study, tmp_path, storage, "--fresh")) == 2
    assert (victim / "precious.txt").read_text() == "keep me"
    assert "name" in capsys.readouterr().err


def test_name_override_on_the_command_line_is_checked_too(tmp_path, capsys, no_ray):
    study = _study(tmp_path, "fine")
    assert main(_argv(study, tmp_path, tmp_path / "runs", "name=../elsewhere", "--dry-run")) == 2
    err = capsys.readouterr().err
    assert "name" in err and "../elsewhere" in err


def test_a_name_from_an_unusable_file_name_says_so(tmp_path, capsys, no_ray):
    f = tmp_path / "my study.yaml"
    f.write_text(STUDY.format(name="unused").replace("name: unused\n", ""))
    assert main([str(f), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "my study" in err and "from the file name" in err


def test_plain_names_pass(tmp_path, capsys):
    from ablate.config import compose

    for name in ["tiny", "schedule_vs_target", "a.b-c_1", "2024", "x" * 128]:
        cfg, _ = compose(str(_study(tmp_path, name)))
        assert cfg.name == name
    with pytest.raises(Exception, match="plain name"):
        compose(str(_study(tmp_path, "x" * 129)))


# -- A. --fresh removes only a folder the platform created for this study -------------------------
def test_fresh_refuses_a_folder_without_the_marker(tmp_path, capsys, no_ray):
    storage = tmp_path / "runs"
    foreign = storage / "mine"
    foreign.mkdir(parents=True)
    (foreign / "thesis.tex").write_text("not a study")
    study = _study(tmp_path, "mine")
    assert main(_argv(study, tmp_path, storage, "--fresh")) == 2
    err = capsys.readouterr().err
    assert "refusing to delete" in err and MARKER in err and str(foreign) in err
    assert (foreign / "thesis.tex").exists()
    assert not (tmp_path / "mlflow.db").exists(), "nothing is recorded before the folder is checked"
    assert main(_argv(study, tmp_path, storage, "--fresh", "--dry-run")) == 2  # a dry run says so too


def test_fresh_removes_only_its_own_marked_folder(tmp_path):
    root = tmp_path / "runs"
    assert prepare_study_folder(str(root), "s1", fresh=False) == "absent"
    marker = json.loads((root / "s1" / MARKER).read_text())
    assert marker["platform"] == "ablate" and marker["study"] == "s1" and marker["created"]
    (root / "s1" / "trials").mkdir()
    (root / "s1" / "trials" / "old.txt").write_text("x")
    assert study_state(str(root), "s1") == "ours"
    assert prepare_study_folder(str(root), "s1", fresh=True) == "ours"
    assert not (root / "s1" / "trials").exists() and (root / "s1" / MARKER).is_file()


def test_a_marker_of_another_study_is_refused(tmp_path):
    root = tmp_path / "runs"
    prepare_study_folder(str(root), "one", fresh=False)
    (root / "two").mkdir()
    (root / "two" / MARKER).write_text((root / "one" / MARKER).read_text())
    with pytest.raises(StudyStateError, match="belongs to study 'one'"):
        study_state(str(root), "two", fresh=True)
    (root / "three").mkdir()
    (root / "three" / MARKER).write_text("{not json")
    with pytest.raises(StudyStateError, match="not a study marker"):
        study_state(str(root), "three")


def test_a_symlinked_study_folder_is_refused(tmp_path):
    root = tmp_path / "runs"
    outside = tmp_path / "outside"
    prepare_study_folder(str(tmp_path), "outside", fresh=False)  # even one that carries a valid-looking marker
    root.mkdir()
    (root / "outside").symlink_to(outside)
    for fresh in (False, True):
        with pytest.raises(StudyStateError, match="symbolic link"):
            prepare_study_folder(str(root), "outside", fresh=fresh)
    assert (outside / MARKER).exists()


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="needs root to chown a file")
def test_a_study_folder_written_by_another_user_is_refused(tmp_path):
    root = tmp_path / "runs"
    prepare_study_folder(str(root), "s", fresh=False)
    os.chown(root / "s" / MARKER, 4242, 4242)
    with pytest.raises(StudyStateError, match="another user"):
        study_state(str(root), "s")


def test_an_empty_folder_is_adopted(tmp_path):
    root = tmp_path / "runs"
    (root / "s").mkdir(parents=True)
    assert prepare_study_folder(str(root), "s", fresh=False) == "empty"
    assert study_state(str(root), "s") == "ours"


def test_uri_storage_gets_the_marker_too(tmp_path):
    root = (tmp_path / "bucket").as_uri()  # file:// goes through the same pyarrow filesystem code as s3://
    assert prepare_study_folder(root, "s", fresh=False) == "absent"
    assert (tmp_path / "bucket" / "s" / MARKER).is_file()
    assert study_state(root, "s") == "ours"
    (tmp_path / "bucket" / "t").mkdir()
    (tmp_path / "bucket" / "t" / "tuner.pkl").write_bytes(b"x")
    with pytest.raises(StudyStateError, match="refusing to restore"):
        study_state(root, "t")


# -- C. restore: only a folder that carries the marker --------------------------------------------
def test_a_planted_tuner_pkl_is_never_unpickled(tmp_path, capsys, no_ray):
    from ray import tune

    storage = tmp_path / "shared"
    planted = storage / "team_study"
    planted.mkdir(parents=True)
    hit = tmp_path / "code_ran"
    (planted / "tuner.pkl").write_bytes(pickle.dumps(Payload(hit)))
    assert tune.Tuner.can_restore(str(planted)), "the folder looks restorable to Tune: the danger is real"
    study = _study(tmp_path, "team_study")
    for extra in ([], ["--dry-run"]):
        rc = main(_argv(study, tmp_path, storage, *extra))
        err = capsys.readouterr().err
        assert rc == 2, err
        assert "refusing to restore" in err and "tuner.pkl" in err and MARKER in err
    assert not hit.exists()
    assert not (tmp_path / "mlflow.db").exists()


# -- B. CIFAR-10 batches are read with a restricted unpickler -------------------------------------
def _cifar(root: Path, protocol: int = 2, bytes_keys: bool = True, n: int = 3) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    k = (lambda s: s.encode()) if bytes_keys else (lambda s: s)
    for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        d = {k("batch_label"): k(f"batch {i}"), k("labels"): [int(v) for v in rng.integers(0, 10, n)],
             k("data"): rng.integers(0, 256, (n, 3072), dtype=np.uint8), k("filenames"): [k(f"{j}.png") for j in range(n)]}
        (root / name).write_bytes(pickle.dumps(d, protocol=protocol))
    return root


@pytest.mark.parametrize("protocol,bytes_keys", [(2, True), (2, False), (4, True), (5, False)])
def test_genuine_cifar_batches_load(protocol, bytes_keys, tmp_path):
    from ablate.data import cifar10

    root = _cifar(tmp_path / "c", protocol, bytes_keys)
    data = cifar10(str(root))
    assert tuple(data.x.shape) == (15, 3, 32, 32) and tuple(data.x_test.shape) == (3, 3, 32, 32)
    assert data.num_classes == 10 and int(data.labels.max()) < 10
    first = pickle.loads((root / "data_batch_1").read_bytes())
    raw = first[b"data" if bytes_keys else "data"][0].reshape(3, 32, 32) / 255.0 * 2 - 1
    assert np.allclose(data.x[0].numpy(), raw, atol=1e-6)


def test_a_crafted_cifar_batch_is_refused_and_runs_nothing(tmp_path, capsys, monkeypatch, no_ray):
    from ablate.data import DataError, cifar10

    root = _cifar(tmp_path / "c")
    hit = tmp_path / "code_ran"
    (root / "data_batch_1").write_bytes(pickle.dumps({b"data": Payload(hit), b"labels": []}, protocol=2))
    with pytest.raises(DataError, match=r"posix\.system|os\.system|nt\.system") as exc:
        cifar10(str(root))
    assert "refused" in str(exc.value) and "data_batch_1" in str(exc.value)
    assert not hit.exists()
    # and through the command line, where --dry-run already loads the data
    monkeypatch.chdir(tmp_path)
    study = tmp_path / "cifar.yaml"
    study.write_text(STUDY.format(name="cifar").replace("{name: gaussian_mixture, modes: 2, n: 400}",
                                                        f"{{name: cifar10, path: '{root}'}}"))
    for extra in (["--dry-run"], []):
        rc = main([str(study), f"resources.storage={tmp_path}/runs", f"tracking.uri=sqlite:///{tmp_path}/m.db",
                   *extra])
        out, err = capsys.readouterr()
        assert "refused" in out + err
        assert not hit.exists()
        if not extra:
            assert rc == 2, err


@pytest.mark.parametrize("payload", [
    {b"data": np.zeros((2, 3072), dtype=object), b"labels": [0, 1]},  # object arrays could hold anything
    {b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [0, 11]},
    {b"labels": [0]},
    [1, 2, 3],
])
def test_malformed_cifar_batches_are_clear_errors(payload, tmp_path):
    from ablate.data import DataError, cifar10

    root = _cifar(tmp_path / "c")
    (root / "data_batch_1").write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(DataError, match="data_batch_1"):
        cifar10(str(root))


def test_codecs_encode_is_only_latin1(tmp_path):
    """Protocol-2 pickles write bytes as _codecs.encode(text, 'latin1'); no other codec is reachable."""
    from ablate.data import DataError, cifar10

    class Codec:
        def __reduce__(self):
            import _codecs

            return _codecs.encode, ("x", "rot13")

    root = _cifar(tmp_path / "c")
    (root / "data_batch_1").write_bytes(pickle.dumps({b"data": Codec(), b"labels": []}, protocol=2))
    with pytest.raises(DataError, match="rot13"):
        cifar10(str(root))


# -- MLflow filter strings --------------------------------------------------------------------------
def test_mlflow_literal_keeps_a_filter_s_meaning(tmp_path):
    from mlflow.tracking import MlflowClient

    cl = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    exp = cl.create_experiment("e")
    values = ["plain", "it's", 'say "hi"', "x' and tags.k != '"]
    for v in values:
        cl.create_run(exp, tags={"k": v})
    for v in values:
        runs = cl.search_runs([exp], filter_string=f"tags.k = {mlflow_literal(v)}")
        assert [r.data.tags["k"] for r in runs] == [v]
    with pytest.raises(ValueError, match="both"):
        mlflow_literal("""it's "both" """)


# -- D. listening addresses -------------------------------------------------------------------------
def _listening(pids: set[int]) -> list[str]:
    import re
    import subprocess

    try:
        out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        pytest.skip("ss (iproute2) is not available")
    return [ln.split()[3] for ln in out.splitlines() if {int(p) for p in re.findall(r"pid=(\d+)", ln)} & pids]


def _descendants(pid: int) -> set[int]:
    """``pid`` and every process below it (from /proc)."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    out, grew = {pid}, True
    while grew:
        new = {p for p, pp in parent.items() if pp in out} - out
        out |= new
        grew = bool(new)
    return out


def _is_loopback(addr: str) -> bool:
    host = addr.rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "::1", "::ffff:127.0.0.1", "localhost")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_the_local_ray_listens_on_loopback_only_and_is_shut_down(monkeypatch):
    import time

    import ray

    from ablate.run import ray_session

    if ray.is_initialized():
        pytest.skip("a Ray instance is already running in this process")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    before = _descendants(os.getpid())  # children of earlier tests in this process (compile workers, ...): not Ray's
    with ray_session(None):
        @ray.remote
        def pid():
            return os.getpid()

        ray.get(pid.remote())
        pids = _descendants(os.getpid()) - before
        addrs = _listening(pids)
        assert addrs, "no listening socket found for the local Ray"
        assert all(_is_loopback(a) for a in addrs), addrs
    assert not ray.is_initialized()
    deadline = time.monotonic() + 30
    while (left := _descendants(os.getpid()) & pids - {os.getpid()}) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"Ray processes outlived the study: {sorted(left)}"
    assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") is None  # the switch does not leak


def _listening_on_rank0(cfg, **kwargs):
    """Run by ablate.distributed.launch on both ranks: rank 0 (this process) lists its listening sockets."""
    import torch.distributed as dist

    dist.barrier()  # both ranks have joined the process group (gloo's own sockets are open)
    out = _listening({os.getpid()}) if dist.get_rank() == 0 else None
    dist.barrier()
    return out


def test_the_data_parallel_store_listens_on_loopback_only():
    from ablate import distributed as ddp
    from ablate.config import compose

    cfg, _ = compose(None, ["data.name=checkerboard", "train.world_size=2", "train.device=cpu",
                            "train.batch_size=4"])
    addrs = ddp.launch(_listening_on_rank0, cfg)
    assert addrs, "rank 0 listens on nothing?"
    # rank 0 holds the TCPStore (loopback) and gloo's listener, bound to the address the host name resolves to
    # (GLOO_SOCKET_IFNAME picks another interface): nothing on every interface
    assert not [a for a in addrs if a.startswith(("0.0.0.0:", "*:", "[::]:"))], addrs


def test_an_unreachable_uri_storage_is_a_note_in_a_dry_run_and_an_error_otherwise(tmp_path, capsys, no_ray):
    study = _study(tmp_path, "remote")
    argv = [str(study), "resources.storage=nosuchscheme://bucket/ablate", f"tracking.uri=sqlite:///{tmp_path}/m.db"]
    assert main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "not checked" in out and "nosuchscheme" in out
    assert main(argv) == 2
    assert "cannot open it" in capsys.readouterr().err
    assert not (tmp_path / "m.db").exists()


# -- D. a study file builds only on files in its own folder ---------------------------------------------------
@pytest.mark.parametrize("dry_run", [True, False])
def test_defaults_cannot_merge_a_file_from_outside_the_study_folder(dry_run, tmp_path, capsys, no_ray):
    folder = tmp_path / "studies"
    folder.mkdir()
    (tmp_path / "elsewhere.yaml").write_text("tracking: {uri: 'sqlite:////tmp/somebody_elses.db'}\n")
    study = folder / "study.yaml"
    study.write_text("defaults:\n  - ../elsewhere@_global_\n  - _self_\n" + STUDY.format(name="inside"))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    rc = main(_argv(study, tmp_path, tmp_path / "runs", *(["--dry-run"] if dry_run else [])))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "defaults" in err and "../elsewhere@_global_" in err and "outside the study file's folder" in err
    assert str(study) in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_a_symlink_inside_the_folder_that_leads_out_is_refused(tmp_path, capsys, no_ray):
    folder = tmp_path / "studies"
    folder.mkdir()
    (tmp_path / "elsewhere.yaml").write_text("train: {steps: 3}\n")
    (folder / "inner.yaml").symlink_to(tmp_path / "elsewhere.yaml")
    study = folder / "study.yaml"
    study.write_text("defaults:\n  - inner@_global_\n  - _self_\n" + STUDY.format(name="inside"))
    assert main(_argv(study, tmp_path, tmp_path / "runs", "--dry-run")) == 2
    err = capsys.readouterr().err
    assert "inner@_global_" in err and "outside the study file's folder" in err


def test_defaults_inside_the_folder_still_compose(tmp_path):
    from ablate.config import compose

    folder = tmp_path / "studies"
    (folder / "bases").mkdir(parents=True)
    (folder / "bases" / "short.yaml").write_text("train: {steps: 3}\n")
    study = folder / "study.yaml"
    study.write_text("defaults:\n  - bases/short@_global_\n  - _self_\n"
                     + STUDY.format(name="inside").replace("train: {steps: 4, ", "train: {"))
    cfg, _ = compose(str(study))
    assert cfg.train.steps == 3


def test_hydra_search_path_is_refused(tmp_path, capsys, no_ray):
    study = _study(tmp_path, "hydra_sp")
    study.write_text(study.read_text() + "hydra:\n  searchpath: [file:///etc]\n")
    assert main(_argv(study, tmp_path, tmp_path / "runs", "--dry-run")) == 2
    assert "hydra" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# -- E. the study's trial record (trials.json) is data, read only from a marked folder -------------------------
def test_a_damaged_or_foreign_trial_record_is_refused(tmp_path, capsys, no_ray):
    storage = tmp_path / "runs"
    prepare_study_folder(str(storage), "rec", fresh=False)
    record = storage / "rec" / "trials.json"
    study = _study(tmp_path, "rec")
    for text, says in (("{not json", "damaged"), (json.dumps({"platform": "ablate", "study": "other", "mode": "grid",
                                                              "trials": {}}), "not the trial record")):
        record.write_text(text)
        for extra in ([], ["--dry-run"]):
            assert main(_argv(study, tmp_path, storage, *extra)) == 2
            err = capsys.readouterr().err
            assert says in err and "--fresh" in err, err
    record.unlink()
    record.symlink_to(tmp_path / "study.yaml")
    assert main(_argv(study, tmp_path, storage, "--dry-run")) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()


def test_a_planted_trial_record_without_the_marker_is_never_read(tmp_path, capsys, no_ray, monkeypatch):
    from ablate import trialset

    storage = tmp_path / "runs"
    (storage / "planted").mkdir(parents=True)
    (storage / "planted" / "trials.json").write_text("{}")
    read = []
    monkeypatch.setattr(trialset, "_read", lambda *a: read.append(a))
    assert main(_argv(_study(tmp_path, "planted"), tmp_path, storage, "--dry-run")) == 2
    assert "refusing" in capsys.readouterr().err and not read
