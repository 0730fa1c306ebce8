"""Device and GPU-memory policy of training runs and Ray trials (README "Performance and scale").

- A trial uses the GPUs Ray gave it, or none: with ``resources.gpus_per_trial`` = 0 it trains on the CPU
  on purpose (``CUDA_VISIBLE_DEVICES=""``, ``train.device`` auto ⇒ cpu), since Ray 2.60 no longer hides
  the GPUs from zero-GPU workers and every such trial would otherwise pick ``cuda:0`` with no accounting.
  With GPUs it sees exactly the ones Ray assigned (``ray.get_gpu_ids()``), as ``cuda:0..n−1``.
- A fractional trial (0 < gpus_per_trial < 1) is held to that share of its GPU's memory
  (``torch.cuda.set_per_process_memory_fraction``): several trials share one GPU and Ray does not
  isolate their memory. CUDA's caching allocator uses expandable segments (less fragmentation when
  trials share a GPU), set through the environment before CUDA initialises.
- :func:`resource_lines`: what the dry run says about it, with a rough memory estimate per trial.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field

import torch

#: torch's allocator settings: the first of these that is set is the one in effect (torch 2.9+ reads
#: PYTORCH_ALLOC_CONF first; PYTORCH_CUDA_ALLOC_CONF is its older name, still read).
ALLOC_ENVS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
EXPANDABLE = "expandable_segments:True"
#: set by a fractional Ray trial (:func:`prepare_trial`), read by :func:`configure_device` in every process of
#: the trial (data-parallel ranks inherit it): the share of the GPU's memory this process may allocate.
FRACTION_ENV = "ABLATE_GPU_MEMORY_FRACTION"
GiB = 2 ** 30


# -- the device of a training process -----------------------------------------------------------
def cuda_hidden(environ=None) -> bool:
    """True when ``CUDA_VISIBLE_DEVICES`` is set to nothing: this process must not use a GPU."""
    environ = os.environ if environ is None else environ
    value = environ.get("CUDA_VISIBLE_DEVICES")
    return value is not None and value.strip() == ""


def auto_device() -> torch.device:
    """``train.device: auto``: CUDA when a GPU is visible to this process, else the CPU."""
    if cuda_hidden():  # a CPU trial (or a user) hid the GPUs: even a CUDA runtime initialised earlier is not used
        return torch.device("cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def allocator_env(environ=None) -> dict[str, str]:
    """The allocator variable to set so that CUDA's caching allocator uses expandable segments.

    Empty when the setting in effect already names ``expandable_segments`` (a user's explicit choice,
    True or False, is kept); other options already set are kept and the setting is appended.
    """
    environ = os.environ if environ is None else environ
    for name in ALLOC_ENVS:
        current = environ.get(name)
        if current is not None:
            if "expandable_segments" in current:
                return {}
            return {name: f"{current},{EXPANDABLE}" if current.strip() else EXPANDABLE}
    return {"PYTORCH_CUDA_ALLOC_CONF": EXPANDABLE}


def configure_device(device: torch.device) -> dict:
    """Process-wide CUDA settings for training on ``device`` (called by ``ablate.train.setup``).

    Expandable segments (when CUDA is not initialised yet: the allocator reads its settings once) and,
    in a fractional trial, the per-process memory limit. Returns what was done (for tests and logs).
    """
    done: dict = {}
    if device.type != "cuda":
        return done
    if not torch.cuda.is_initialized():
        env = allocator_env()
        os.environ.update(env)
        done["env"] = env
    fraction = os.environ.get(FRACTION_ENV)
    if fraction:
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.set_per_process_memory_fraction(float(fraction), index)
        done["memory_fraction"] = (float(fraction), index)
    return done


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` (on the CPU) on ``device`` without a host sync: to CUDA through pinned memory, non-blocking.

    A pageable copy blocks the host until the GPU has run everything queued before it; from pinned memory
    the copy is queued like a kernel (the pinned block is reused only once the copy is done: torch's
    caching host allocator records it). Elsewhere a plain ``.to`` (a no-op on the CPU).
    """
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


# -- the devices of a Ray trial --------------------------------------------------------------------
@dataclass(frozen=True)
class TrialPlan:
    """How one Ray trial uses devices: its ``train.device``, the environment to set before CUDA initialises,
    and the memory share of a fractional trial (None: the whole GPU, or no GPU)."""

    device: str
    env: dict = field(default_factory=dict)
    memory_fraction: float | None = None
    summary: str = ""


def plan_trial(gpus_per_trial: float, device: str, gpu_ids, visible: str | None,
               cuda_initialized: bool = False, environ=None) -> TrialPlan:
    """The device plan of a trial that reserved ``gpus_per_trial`` GPUs and was given ``gpu_ids`` by Ray.

    ``device``: the trial's ``train.device``; ``visible``: ``CUDA_VISIBLE_DEVICES`` as the trial found it
    (None: unset, every GPU of the node visible, indexed by its physical id); ``cuda_initialized``: CUDA
    already initialised in this process (a reused worker), so its visible devices can no longer change.
    """
    gpus, spec = float(gpus_per_trial), str(device)
    if gpus <= 0:
        if spec.startswith("cuda"):
            raise ValueError(f"train.device={spec} but resources.gpus_per_trial is 0: the trial has no GPU. "
                             "Request GPUs (resources.gpus_per_trial: 1, or 0.25 for four trials per GPU) or "
                             "use train.device=auto to train on the CPU")
        return TrialPlan("cpu", {"CUDA_VISIBLE_DEVICES": ""}, None,
                         "CPU (resources.gpus_per_trial is 0; CUDA_VISIBLE_DEVICES='')")
    if spec == "cpu":
        return TrialPlan("cpu", {"CUDA_VISIBLE_DEVICES": ""}, None,
                         f"CPU (train.device=cpu), although the trial reserved {gpus:g} GPU")
    if spec.startswith("cuda:"):
        raise ValueError(f"train.device={spec} pins a GPU, but in a study Ray chooses the trial's GPU: "
                         "use train.device=auto (or cuda)")
    ids = [str(i).strip() for i in gpu_ids]
    if not ids:
        raise ValueError(f"resources.gpus_per_trial={gpus:g} but Ray assigned this trial no GPU")
    env = allocator_env(environ) if not cuda_initialized else {}
    shown = [s.strip() for s in visible.split(",") if s.strip()] if visible is not None else None
    if shown == ids:  # Ray's own setting: the assigned GPUs are cuda:0..n−1
        dev = "cuda"
    elif not cuda_initialized:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
        dev = "cuda"
    else:  # too late to narrow the visible devices: address the assigned GPU among the visible ones
        pos = [(shown.index(i) if i in shown else None) if shown is not None else (int(i) if i.isdigit() else None)
               for i in ids]
        if None in pos:
            raise ValueError(f"Ray assigned GPU(s) {ids}, which this process (CUDA_VISIBLE_DEVICES={visible!r}, "
                             "CUDA already initialised) cannot see")
        if len(pos) > 1 and pos != list(range(len(pos))):
            raise ValueError(f"Ray assigned GPUs {ids}, but CUDA was initialised in this worker with "
                             f"CUDA_VISIBLE_DEVICES={visible!r}: the data-parallel ranks need them as cuda:0..n−1")
        dev = "cuda" if pos == list(range(len(pos))) else f"cuda:{pos[0]}"
    fraction = gpus if gpus < 1 else None
    share = f", at most {fraction:.0%} of its memory" if fraction else ""
    return TrialPlan(dev, env, fraction, f"GPU {','.join(ids)} as {dev}{share}")


def prepare_trial(cfg, gpu_ids=None) -> TrialPlan:
    """Apply the device plan at the start of a Ray trial: environment, ``cfg.train.device``, memory share.

    ``gpu_ids``: default ``ray.get_gpu_ids()`` (asked only when the trial reserved GPUs).
    """
    gpus = float(cfg.resources.gpus_per_trial)
    if gpu_ids is None:
        gpu_ids = []
        if gpus > 0:
            import ray

            gpu_ids = ray.get_gpu_ids()
    plan = plan_trial(gpus, str(cfg.train.device), gpu_ids, os.environ.get("CUDA_VISIBLE_DEVICES"),
                      torch.cuda.is_initialized())
    os.environ.update(plan.env)
    if plan.memory_fraction:
        os.environ[FRACTION_ENV] = repr(plan.memory_fraction)
    else:
        os.environ.pop(FRACTION_ENV, None)
    cfg.train.device = plan.device
    return plan


# -- what the dry run says -------------------------------------------------------------------------
def machine_gpus() -> tuple[int, float | None]:
    """(GPUs visible here, the smallest one's memory in bytes or None), without initialising CUDA here.

    The count is torch's (NVML based); the memory comes from ``nvidia-smi`` where it exists, so the
    driver of a study holds no CUDA context on a GPU its trials share.
    """
    try:
        count = torch.cuda.device_count() if not cuda_hidden() else 0
    except Exception:  # noqa: BLE001 - a broken driver: no GPU for our purposes
        count = 0
    if not count or shutil.which("nvidia-smi") is None:
        return count, None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        mib = [float(v) for v in out.split() if v.strip()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return count, None
    return count, (min(mib) * 2 ** 20 if mib else None)


@dataclass
class MemoryEstimate:
    """A rough per-trial GPU memory need (bytes), from the backbone's size."""

    params: int  # parameters of the backbone
    n_ema: int  # EMA copies kept (sampling EMA, teacher EMA)
    act_per_image: float  # bytes of layer outputs per image (one forward)
    batch: int  # rows per process
    act_factor: float = 1.0  # JVP targets: a forward-mode pass carries a tangent next to every activation

    @property
    def state_bytes(self) -> int:
        # fp32 weights 4 + gradients 4 + AdamW moments 8, + 4 per EMA copy
        return self.params * (16 + 4 * self.n_ema)

    @property
    def act_bytes(self) -> float:
        return self.act_per_image * self.batch * self.act_factor

    @property
    def total(self) -> float:
        return self.state_bytes + self.act_bytes


def backbone_size(name: str, kwargs: dict, data_shape: tuple, num_classes: int) -> tuple[int, float]:
    """(parameter count, elements of layer outputs per image) of a backbone, built and run on the meta
    device (no memory, no compute): the sum of every leaf module's output for one image."""
    from components.registry import BACKBONE

    with torch.device("meta"):
        model = BACKBONE.build(name, dict(kwargs), data_shape=tuple(data_shape), num_classes=num_classes)
    params = sum(p.numel() for p in model.parameters())
    seen = [0]

    def hook(_m, _i, out):
        for o in (out if isinstance(out, (tuple, list)) else (out,)):
            if torch.is_tensor(o):
                seen[0] += o.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.device("meta"), torch.no_grad():
            z, t = torch.empty(1, *data_shape), torch.full((1,), 0.5)
            model(z, t, t, torch.zeros(1, dtype=torch.long))
    except Exception:  # noqa: BLE001 - an op without a meta kernel: parameters only
        seen[0] = 0
    finally:
        for h in handles:
            h.remove()
    return params, float(seen[0])


def estimate_memory(tc, design, data_shape: tuple, num_classes: int, gpus_per_trial: float) -> MemoryEstimate:
    """The rough estimate for one trial config ``tc`` (its design resolved; ``data_shape`` of one row)."""
    from components.registry import TARGET

    bb = design.components["backbone"]
    params, act = backbone_size(bb["name"], bb["kwargs"], data_shape, num_classes)
    bf16 = str(tc.train.precision) in ("auto", "bf16")  # auto: bf16 autocast on CUDA
    tgt = design.components["target"]
    target = TARGET.build(tgt["name"], dict(tgt["kwargs"]), train_steps=int(tc.train.steps))
    n_ema = 1 + (target.teacher_ema is not None and float(target.teacher_ema) != float(tc.train.ema))
    jvp = getattr(target, "jvp", None) == "exact" and getattr(target, "mode", "continuous") != "discrete"
    ranks = int(gpus_per_trial) if gpus_per_trial > 1 else 1
    return MemoryEstimate(params, n_ema, act * (2 if bf16 else 4), max(1, int(tc.train.batch_size) // ranks),
                          2.0 if jvp else 1.0)


def _gib(b: float) -> str:
    """Bytes for a message: KiB, MiB or GiB, two or three significant digits."""
    for unit, size in (("GiB", GiB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if b >= size or unit == "KiB":
            v = b / size
            return f"{v:.2f} {unit}" if v < 10 else f"{v:.1f} {unit}" if v < 100 else f"{v:.0f} {unit}"
    return f"{b:.0f} B"


def resource_lines(cfg, trials: list[dict], machine: tuple[int, float | None] | None = None) -> list[str]:
    """What the dry run (and the start of a study) says about devices: CPU or GPU trials, on purpose, and
    (when trials reserve GPUs) a rough memory estimate per trial against its share of a GPU.

    Raises ``ConfigError`` for a trial that asks for CUDA without reserving a GPU.
    """
    from ablate.config import ConfigError

    gpus = float(cfg.resources.gpus_per_trial)
    devices = {str(t["overrides"].get("train.device", cfg.train.device)) for t in trials} or {str(cfg.train.device)}
    if gpus <= 0:
        bad = sorted(d for d in devices if d.startswith("cuda"))
        if bad:
            raise ConfigError("resources", [("train.device", f"{bad[0]} but resources.gpus_per_trial is 0: trials "
                                             "get no GPU. Set resources.gpus_per_trial (1, or 0.25 for four trials "
                                             "per GPU) or train.device=auto to train on the CPU")])
    count, mem = machine if machine is not None else machine_gpus()
    if gpus <= 0:
        if count:
            return [f"trials run on the CPU: resources.gpus_per_trial is 0 — {count} GPU{'s' * (count != 1)} on this "
                    f"machine {'are' if count != 1 else 'is'} not used (set resources.gpus_per_trial: 1, or 0.25 for "
                    "four trials per GPU)"]
        return ["trials run on the CPU (resources.gpus_per_trial is 0)"]
    lines = []
    if devices == {"cpu"}:
        lines.append(f"trials run on the CPU (train.device=cpu), although each reserves {gpus:g} GPU")
        return lines
    share = (f"; {int(1 // gpus)} trials share a GPU, each held to {gpus:.0%} of its memory" if gpus < 1 else
             f" (data parallel, one rank per GPU)" if gpus > 1 else "")
    lines.append(f"trials run on the GPUs Ray assigns: {gpus:g} per trial{share}")
    est = _largest_estimate(cfg, trials, gpus)
    if est is None:
        return lines
    e, which = est
    act = (f"activations {_gib(e.act_per_image)}/image × {e.batch}" + (" × 2 (JVP)" if e.act_factor > 1 else "")
           if e.act_per_image else "activations unknown")
    need = f"{_gib(e.total)} per {'rank' if gpus > 1 else 'trial'}"
    lines.append(f"memory (a rough estimate, {which}): {need} = weights, gradients, AdamW state and "
                 f"{e.n_ema} EMA ({e.params / 1e6:.1f}M parameters) {_gib(e.state_bytes)} + {act}")
    per_gpu = min(gpus, 1.0)
    if mem:
        budget = per_gpu * mem
        verdict = "fits" if e.total <= budget else "does NOT fit: lower train.batch_size or raise gpus_per_trial"
        lines.append(f"  each trial may use {_gib(budget)} of a {_gib(mem)} GPU here (each process's CUDA context, "
                     f"about 0.5 GiB, comes on top): {verdict}")
    else:
        lines.append(f"  needs a GPU of at least {_gib(e.total / per_gpu)} at {gpus:g} GPU per trial")
    return lines


def _largest_estimate(cfg, trials: list[dict], gpus: float):
    """(the largest per-trial estimate, which trial) over the trials' distinct data/backbone/batch."""
    import json

    from ablate.data import DataError, load_data
    from ablate.design import resolve_design
    from ablate.run import trial_config
    from omegaconf import OmegaConf

    best, data_cache, seen = None, {}, set()
    for t in trials or [{"overrides": {}, "seed": 0, "slug": "the base design"}]:
        tc = trial_config(cfg, t["overrides"], t["seed"])
        spec = OmegaConf.to_container(tc.data, resolve=True)
        dkey = json.dumps(spec, sort_keys=True)
        try:
            if dkey not in data_cache:
                data_cache[dkey] = load_data(spec)
            data = data_cache[dkey]
            design = resolve_design(OmegaConf.to_container(tc.design, resolve=True), data.default_backbone())
            key = (dkey, json.dumps(design.components["backbone"], sort_keys=True), design.components["target"]["name"],
                   int(tc.train.batch_size), str(tc.train.precision))
            if key in seen:
                continue
            seen.add(key)
            e = estimate_memory(tc, design, data.shape, data.num_classes, gpus)
        except (DataError, ValueError, TypeError, KeyError):
            continue
        if best is None or e.total > best[0].total:
            best = (e, f"{t.get('slug', design.slug)}, batch {int(tc.train.batch_size)}")
    return best
