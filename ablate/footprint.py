"""What a study weighs before it is built, and one stored copy of every checkpoint.

- :func:`count_parameters`: a backbone's parameter count from its spec, built on the meta device (no memory,
  no compute), and :func:`check_backbone`, which refuses one above :data:`MAX_PARAMS` before anything allocates
  it (a width of 10⁹ would otherwise be allocated by the dry run itself).
- :func:`disk_estimate`: roughly what a study writes (checkpoint bytes × copies × trials + sample grids), for the
  dry run.
- :func:`tune_checkpoint`: the directory a trial reports to Tune with its checkpoint. The trial folder already
  holds ``checkpoint.pt``; when that folder is on a path every node sees (a local or shared
  ``resources.storage``), Tune gets only a pointer to it (``pointer.json``, a few hundred bytes), so the
  checkpoint is stored once. Under a URI storage the trial folder is node-local and Tune's copy is what a trial
  that moves to another node resumes from: Tune then gets ``checkpoint.pt`` itself (and ``final.json``), never the
  rest of the trial folder (sample grids, metrics), and keeps :data:`KEEP_CHECKPOINTS` of them.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

#: the largest backbone a study may ask for (parameters): 10 B, ~160 GB of training state in fp32 with AdamW
MAX_PARAMS = 10 ** 10
#: Tune checkpoints kept per trial (CheckpointConfig.num_to_keep); the trial folder keeps its newest one
KEEP_CHECKPOINTS = 1
POINTER = "pointer.json"
#: bytes per parameter in a checkpoint: fp32 weights 4 + AdamW's two moments 8 (+ 4 per EMA copy, below)
STATE_BYTES = 12
#: the HTML report (Plotly's JavaScript embedded), written to the study folder and attached to MLflow
REPORT_BYTES = 5e6
_counts: dict[str, int] = {}
#: design_id -> (parameters, EMA copies, data shape), noted by :func:`check_backbone` for :func:`disk_estimate`
NOTED: dict[str, tuple[int, int, tuple]] = {}


def count_parameters(name: str, kwargs: dict, data_shape: tuple, num_classes: int) -> int:
    """Parameters of backbone ``name(**kwargs)`` for rows of ``data_shape``, built on the meta device."""
    import torch

    from components.registry import BACKBONE

    key = json.dumps([name, kwargs, list(data_shape), num_classes], sort_keys=True, default=str)
    if key not in _counts:
        with torch.device("meta"):
            model = BACKBONE.build(name, dict(kwargs), data_shape=tuple(data_shape), num_classes=num_classes)
        _counts[key] = int(sum(p.numel() for p in model.parameters()))
    return _counts[key]


def check_backbone(design, data_shape: tuple, num_classes: int, train_steps: int = 1, ema: float = 0.999) -> int:
    """The backbone's parameter count; raises ``DesignError`` above :data:`MAX_PARAMS` (before it is built)."""
    from ablate.design import DesignError
    from components.registry import TARGET

    bb = design.components["backbone"]
    try:
        n = count_parameters(bb["name"], bb["kwargs"], data_shape, num_classes)
    except (ValueError, TypeError) as exc:
        raise DesignError([("design.backbone", f"cannot build {bb['name']}: {exc}")]) from exc
    except RuntimeError:  # an op the meta device lacks: nothing to say before building
        return 0
    if n > MAX_PARAMS:
        opts = ", ".join(f"{k}={v}" for k, v in bb["kwargs"].items() if v is not None)
        raise DesignError([("design.backbone", f"{bb['name']} ({opts}) has about {n:.3g} parameters "
                                               f"({_bytes(n * (STATE_BYTES + 4))} of training state), more than the "
                                               f"{MAX_PARAMS:.0e} this platform trains: lower its width/depth/size")])
    emas = 1
    try:  # a target with an EMA teacher at another rate keeps a second EMA copy (ablate/train.py setup)
        tgt = design.components["target"]
        teacher = TARGET.build(tgt["name"], dict(tgt["kwargs"]), train_steps=int(train_steps)).teacher_ema
        emas += teacher is not None and float(teacher) != float(ema)
    except Exception:  # noqa: BLE001 - the design's own checks report a target that cannot be built
        pass
    NOTED[design.design_id] = (n, emas, tuple(data_shape))
    return n


def _bytes(b: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= size:
            v = b / size
            return f"{v:.3g} {unit}"
    return f"{b:.0f} B"


def grid_bytes(data_shape: tuple, n: int) -> float:
    """About the size of one sample-grid PNG: a scatter plot for 2-D points, else tiles of the images."""
    if len(data_shape) <= 1:
        return 6e3
    h, w = data_shape[-2:]
    tile = max(h, 32) * max(w, 32) * 3  # small tiles are upscaled to 32 px (ablate/images.py)
    return 0.5 * tile * min(n, 64) + 1e3


def disk_estimate(cfg, trials: list[dict], remote: bool = False) -> str | None:
    """A line: roughly what the study writes — checkpoints (parameters × bytes × copies × trials) and sample
    grids (evaluation grids and the final ones, which MLflow also keeps as artifacts). None when no trial's
    backbone size is known (the data could not be loaded)."""
    from ablate.run import trial_config

    ckpt, grids, known, n_trials = 0.0, 0.0, 0, 0
    params = []
    for t in trials:
        noted = NOTED.get(t.get("design_id", ""))
        if noted is None:
            continue
        known += 1
        n, emas, shape = noted
        params.append(n)
        tc = trial_config(cfg, t["overrides"], int(t["seed"]))
        ckpt += n * (STATE_BYTES + 4 * emas)
        ec, steps = tc.eval, int(tc.train.steps)
        evals = (steps // int(ec.every) if int(ec.every) else 0) + (
            1 if ec.at_end and (not int(ec.every) or steps % int(ec.every)) else 0)
        per_eval = len(list(ec.nfe)) * grid_bytes(shape, int(ec.num_samples)) if ec.grids else 0.0
        final = len(list(tc.sample.nfe)) * grid_bytes(shape, int(tc.sample.num))
        grids += evals * per_eval + 2 * final  # the final grids: the trial folder and MLflow's artifacts
        n_trials += 1
    if not known:
        return None
    copies = 2 if remote else 1
    lo, hi = min(params), max(params)
    size = f"{lo / 1e6:.3g}M" if lo == hi else f"{lo / 1e6:.3g}M–{hi / 1e6:.3g}M"
    where = ("the trial folders (node-local) and Tune's copy in the URI storage" if remote else
             "the trial folders; Tune keeps a pointer, not a copy")
    more = f" (of {len(trials)} listed; the others' sizes are unknown)" if known < len(trials) else ""
    return (f"disk (roughly): {_bytes(ckpt * copies + grids + 2 * REPORT_BYTES)} for {n_trials} trials{more} = "
            f"checkpoints {_bytes(ckpt / n_trials)} each ({size} parameters × {STATE_BYTES}+4·EMA bytes) × {copies} "
            f"cop{'ies' if copies > 1 else 'y'} ({where}) + sample grids {_bytes(grids)} + the report "
            f"{_bytes(REPORT_BYTES)} (in the study folder and in MLflow)")


@contextlib.contextmanager
def tune_checkpoint(out: Path, step: int, remote: bool, final: bool = False):
    """A directory to hand to ``tune.Checkpoint.from_directory`` for the checkpoint ``out/checkpoint.pt`` at
    ``step``: a pointer when ``out`` is on storage every node sees, else ``checkpoint.pt`` (+ ``final.json``)
    alone, hard-linked where possible (no second copy on this disk). Removed once Tune has persisted it
    (``tune.report`` copies a checkpoint before it returns)."""
    out = Path(out)
    stage = out / f".tune-checkpoint-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        if remote:
            for name in ("checkpoint.pt",) + (("final.json",) if final else ()):
                src = out / name
                if src.exists():
                    try:
                        os.link(src, stage / name)
                    except OSError:
                        shutil.copy2(src, stage / name)
        else:
            (stage / POINTER).write_text(json.dumps({"trial_dir": str(out.resolve()), "step": int(step),
                                                     "checkpoint": "checkpoint.pt", "final": bool(final)}))
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def pointer(directory: str | Path) -> dict | None:
    """The pointer a Tune checkpoint holds (a checkpoint of a trial folder on shared storage), or None."""
    path = Path(directory) / POINTER
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def study_bytes(folder: str | Path) -> int:
    """Bytes under ``folder`` (a test and a user's check of :func:`disk_estimate`)."""
    total = 0
    for root, _dirs, files in os.walk(folder):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def gpu_problems(cfg, machine: tuple | None = None) -> list[tuple[str, str]]:
    """A study that reserves GPUs on a local Ray (no ``resources.address``/``RAY_ADDRESS``) of a machine that has
    none, or fewer than one trial needs: Ray would keep every trial pending, forever. Said before anything starts
    (the dry run too); on a cluster the GPUs are the cluster's, not this machine's, and nothing is said."""
    gpus = float(cfg.resources.gpus_per_trial or 0)
    if gpus <= 0 or cfg.resources.address or os.environ.get("RAY_ADDRESS"):
        return []
    from ablate import gpu

    count, _ = machine if machine is not None else gpu.machine_gpus()
    way_out = ("set resources.gpus_per_trial=0 to train on the CPU, or resources.address (or RAY_ADDRESS) to a Ray "
               "cluster with GPUs")
    if count == 0:
        return [("resources.gpus_per_trial", f"{gpus:g} GPU per trial, but this machine has no GPU that Ray can use "
                                             f"(a local Ray would keep every trial waiting for one): {way_out}")]
    if gpus > count:
        return [("resources.gpus_per_trial", f"{gpus:g} GPUs per trial, but this machine has {count}: no trial could "
                                             f"start; at most {count}, or {way_out}")]
    return []
