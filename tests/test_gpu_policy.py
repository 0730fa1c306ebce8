"""Which device a trial trains on and how much GPU memory it may take (ablate/gpu.py).

This machine has no GPU: the decisions are checked, and the calls they make to CUDA are recorded by
stand-ins (``torch.cuda.set_per_process_memory_fraction``, ``ray.get_gpu_ids``, ``is_available``).
"""
from __future__ import annotations

import os

import pytest
import torch
from omegaconf import OmegaConf

from ablate import gpu
from ablate.config import ConfigError, compose

GIB = 2 ** 30


@pytest.fixture
def clean_env(monkeypatch):
    """Every variable the policy reads or writes starts unset and is restored afterwards."""
    for name in ("CUDA_VISIBLE_DEVICES", gpu.FRACTION_ENV, *gpu.ALLOC_ENVS):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _cfg(gpus=0, device="auto", *extra):
    cfg, _ = compose("flow_matching", [f"resources.gpus_per_trial={gpus}", f"train.device={device}",
                                       "data.name=checkerboard", *extra])
    return cfg


# -- fix 1: zero-GPU trials train on the CPU on purpose; GPU trials use Ray's GPUs ----------------------
def test_a_zero_gpu_trial_trains_on_the_cpu_even_where_gpus_are_visible(clean_env):
    clean_env.setattr(torch.cuda, "is_available", lambda: True)  # a GPU node (Ray 2.60 hides nothing)
    cfg = _cfg(0)
    plan = gpu.prepare_trial(cfg, gpu_ids=[])
    assert plan.device == "cpu" and cfg.train.device == "cpu"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    from ablate.train import pick_device

    assert pick_device(cfg.train.device) == torch.device("cpu")
    assert pick_device("auto") == torch.device("cpu")  # an emptied CUDA_VISIBLE_DEVICES also wins over auto


def test_auto_still_picks_cuda_outside_a_trial(clean_env):
    clean_env.setattr(torch.cuda, "is_available", lambda: True)
    from ablate.train import pick_device

    assert pick_device("auto") == torch.device("cuda")


def test_a_trial_asking_for_cuda_without_a_gpu_is_refused():
    with pytest.raises(ValueError, match="gpus_per_trial is 0"):
        gpu.plan_trial(0, "cuda", [], None)
    with pytest.raises(ValueError, match="pins a GPU"):
        gpu.plan_trial(1, "cuda:3", ["0"], "0")


@pytest.mark.parametrize("visible,initialised,ids,device,cvd", [
    ("3", False, ["3"], "cuda", None),  # Ray set CUDA_VISIBLE_DEVICES to the assigned GPU: it is cuda:0
    (None, False, ["3"], "cuda", "3"),  # nothing hidden (RAY_EXPERIMENTAL_NOSET_…): narrow it to Ray's GPU
    ("0,1,2,3", False, ["2"], "cuda", "2"),
    ("0,1,2,3", True, ["2"], "cuda:2", None),  # CUDA initialised already: address it among the visible ones
    ("4,5", False, ["4", "5"], "cuda", None),  # data parallel: rank r on cuda:r
    (None, False, [1, 2], "cuda", "1,2"),  # ids as Ray may give them (ints)
])
def test_a_gpu_trial_uses_the_gpus_ray_assigned(visible, initialised, ids, device, cvd):
    plan = gpu.plan_trial(1 if len(ids) == 1 else len(ids), "auto", ids, visible, initialised, environ={})
    assert plan.device == device
    assert plan.env.get("CUDA_VISIBLE_DEVICES") == cvd
    assert plan.memory_fraction is None


def test_a_gpu_trial_refuses_gpus_it_cannot_address():
    with pytest.raises(ValueError, match="cannot see"):
        gpu.plan_trial(1, "auto", ["7"], "0,1", cuda_initialized=True)
    with pytest.raises(ValueError, match="cuda:0..n"):
        gpu.plan_trial(2, "auto", ["2", "3"], "0,1,2,3", cuda_initialized=True)
    with pytest.raises(ValueError, match="no GPU"):
        gpu.plan_trial(1, "auto", [], None)


def test_prepare_trial_asks_ray_for_the_gpus(clean_env):
    import ray

    clean_env.setattr(ray, "get_gpu_ids", lambda: ["5"])
    cfg = _cfg(1)
    plan = gpu.prepare_trial(cfg)
    assert cfg.train.device == "cuda" and os.environ["CUDA_VISIBLE_DEVICES"] == "5"
    assert gpu.FRACTION_ENV not in os.environ and plan.memory_fraction is None


def test_run_trial_applies_the_plan_before_training(clean_env, tmp_path):
    """ablate.run.run_trial hands its trial config to prepare_trial before anything else touches a device."""
    from ablate import run as run_mod

    seen = []

    class Stop(Exception):
        pass

    def fake(cfg, gpu_ids=None):
        seen.append(OmegaConf.to_container(cfg, resolve=True))
        raise Stop

    clean_env.setattr(gpu, "prepare_trial", fake)
    study = _cfg(0.5)
    trial = {"overrides": {}, "seed": 0, "key": "k", "slug": "s", "design_id": "d", "params": {}}
    with pytest.raises(Stop):
        run_mod.run_trial({"trial": trial}, OmegaConf.to_yaml(study), "sqlite:///x.db", "0", "p", str(tmp_path))
    assert seen and seen[0]["resources"]["gpus_per_trial"] == 0.5 and seen[0]["train"]["out_dir"]


# -- fix 2: a fractional trial's memory share, expandable segments -----------------------------------------
def test_a_fractional_trial_is_held_to_its_share(clean_env):
    cfg = _cfg(0.25)
    plan = gpu.prepare_trial(cfg, gpu_ids=["0"])
    assert plan.memory_fraction == 0.25 and os.environ[gpu.FRACTION_ENV] == "0.25"
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    calls = []
    clean_env.setattr(torch.cuda, "is_initialized", lambda: False)
    clean_env.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d=None: calls.append((f, d)))
    clean_env.setattr(torch.cuda, "current_device", lambda: 0)
    done = gpu.configure_device(torch.device("cuda"))
    assert calls == [(0.25, 0)] and done["memory_fraction"] == (0.25, 0)
    gpu.configure_device(torch.device("cuda", 1))
    assert calls[-1] == (0.25, 1)
    calls.clear()
    gpu.configure_device(torch.device("cpu"))
    assert calls == []  # nothing to limit on the CPU
    gpu.prepare_trial(_cfg(1), gpu_ids=["0"])  # a whole GPU: no limit left behind
    assert gpu.FRACTION_ENV not in os.environ


def test_setup_configures_the_device_before_building(clean_env, tmp_path):
    from ablate import train as train_mod

    seen = []
    clean_env.setattr(gpu, "configure_device", lambda d: seen.append(d) or {})
    train_mod.setup(_cfg(0, "cpu", f"train.out_dir={tmp_path}"))
    assert seen == [torch.device("cpu")]


def test_the_allocator_setting_keeps_what_a_user_set():
    assert gpu.allocator_env({}) == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    assert gpu.allocator_env({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}) == {
        "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128,expandable_segments:True"}
    assert gpu.allocator_env({"PYTORCH_ALLOC_CONF": "expandable_segments:False"}) == {}  # the user's choice
    assert gpu.allocator_env({"PYTORCH_ALLOC_CONF": "", "PYTORCH_CUDA_ALLOC_CONF": "x:1"}) == {
        "PYTORCH_ALLOC_CONF": "expandable_segments:True"}  # the variable in effect is the one extended


def test_configure_device_sets_expandable_segments_only_before_cuda_starts(clean_env):
    clean_env.setattr(torch.cuda, "is_initialized", lambda: True)
    gpu.configure_device(torch.device("cuda", 0))
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ  # too late to matter: left alone
    clean_env.setattr(torch.cuda, "is_initialized", lambda: False)
    gpu.configure_device(torch.device("cuda", 0))
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


# -- the dry run says which and what fits --------------------------------------------------------------
def _trials(cfg):
    return [{"overrides": {}, "seed": 0, "slug": "fm"}]


def test_the_dry_run_says_trials_run_on_the_cpu_and_the_gpus_go_unused():
    cfg = _cfg(0)
    lines = gpu.resource_lines(cfg, _trials(cfg), machine=(4, 80 * GIB))
    assert lines == ["trials run on the CPU: resources.gpus_per_trial is 0 — 4 GPUs on this machine are not used "
                     "(set resources.gpus_per_trial: 1, or 0.25 for four trials per GPU)"]
    assert gpu.resource_lines(cfg, _trials(cfg), machine=(0, None)) == [
        "trials run on the CPU (resources.gpus_per_trial is 0)"]
    with pytest.raises(ConfigError, match="gpus_per_trial is 0"):
        gpu.resource_lines(_cfg(0, "cuda"), _trials(cfg), machine=(4, 80 * GIB))


def test_the_dry_run_estimates_what_fits_in_a_gpu_share():
    cfg, _ = compose("scd", ["resources.gpus_per_trial=0.25", "train.batch_size=256",
                             "design.backbone={name: dit, size: S, patch: 2}"])
    lines = gpu.resource_lines(cfg, _trials(cfg), machine=(1, 80 * GIB))
    assert lines[0] == ("trials run on the GPUs Ray assigns: 0.25 per trial; 4 trials share a GPU, each held to 25% "
                        "of its memory")
    assert lines[1].startswith("memory (a rough estimate, fm, batch 256): ")
    assert "EMA" in lines[1] and "activations" in lines[1] and "/image × 256" in lines[1]
    assert lines[2].endswith(": fits") and "20.0 GiB of a 80.0 GiB GPU" in lines[2]
    small = gpu.resource_lines(cfg, _trials(cfg), machine=(1, 4 * GIB))
    assert "does NOT fit" in small[2]
    elsewhere = gpu.resource_lines(cfg, _trials(cfg), machine=(0, None))
    assert "needs a GPU of at least" in elsewhere[2]


def test_the_estimate_grows_with_the_backbone_and_the_batch():
    from ablate.design import resolve_design

    def est(size, batch, preset="flow_matching"):
        cfg, _ = compose(preset, [f"train.batch_size={batch}"])
        design = resolve_design({"preset": preset, "backbone": {"name": "dit", "size": size, "patch": 2}})
        return gpu.estimate_memory(cfg, design, (4, 32, 32), 1000, 1)

    s, b = est("S", 64), est("B", 64)
    assert 30e6 < s.params < 40e6 and b.params > 2.5 * s.params  # DiT-S/2 ≈ 33M parameters
    assert s.state_bytes == s.params * 20  # fp32 weights, gradients, AdamW's two moments, one EMA
    assert est("S", 128).act_bytes == pytest.approx(2 * s.act_bytes)
    assert est("S", 64, "meanflow").act_bytes == pytest.approx(2 * s.act_bytes)  # the JVP's tangents


def test_dry_run_prints_the_device_line(capsys, monkeypatch, tmp_path):
    from ablate.run import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(gpu, "machine_gpus", lambda: (2, 40 * GIB))
    study = tmp_path / "s.yaml"
    study.write_text("data: {name: checkerboard}\ndesign: {preset: flow_matching}\n"
                     "search: {grid: {train.lr: [0.001]}}\n")
    assert main([str(study), f"resources.storage={tmp_path}/ray", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "trials run on the CPU: resources.gpus_per_trial is 0 — 2 GPUs on this machine are not used" in out
    assert main([str(study), f"resources.storage={tmp_path}/ray", "resources.gpus_per_trial=0.5", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 trials share a GPU, each held to 50% of its memory" in out and "memory (a rough estimate" in out
    assert main([str(study), f"resources.storage={tmp_path}/ray", "train.device=cuda", "--dry-run"]) == 2
