"""Train one design (no Ray): ``python -m ablate.train STUDY.yaml|PRESET [key=value ...]``.

    python -m ablate.train meanflow train.steps=2000
    python -m ablate.train studies/toy_2d.yaml design.target=shortcut --dry-run

Writes into the run folder: ``design.json``, ``config.yaml``, ``checkpoint.pt``
(atomic, every ``train.ckpt_every`` steps; a rerun resumes from it),
``metrics.jsonl``/``.csv`` and ``samples/nfe_<N>.png``.
"""
from __future__ import annotations

if __name__ == "__main__":  # --help is answered before torch loads (the imports below take seconds)
    from ablate.cli import early_help, parser as _help_parser

    early_help(_help_parser, "python -m ablate.train", "", __doc__)

import copy
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from ablate import distributed as ddp
from ablate.data import Data, load_data, make_loader
from ablate.design import Design, build_components, preset_train_setting, resolve_design
from ablate.images import save_samples
from ablate.reporting import LocalReporter, MultiReporter, Reporter
from components.compose import Components, Streams, sample, sampling_mode, training_loss
from components.targets.base import Nets


class DivergenceError(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class Run:
    """Everything a trained (or training) design consists of."""

    cfg: DictConfig
    data: Data
    design: Design
    comps: Components
    model: torch.nn.Module
    emas: dict[float, torch.nn.Module]
    device: torch.device
    out_dir: Path
    step: int = 0
    history: list = field(default_factory=list)

    @property
    def eval_model(self) -> torch.nn.Module:
        if self.cfg.sample.use_ema and float(self.cfg.train.ema) in self.emas:
            return self.emas[float(self.cfg.train.ema)]
        return self.model

    def generate(self, n: int, nfe: int, *, seed: int = 0, cfg_scale=None, model=None, labels=None,
                 cfg_interval=None) -> torch.Tensor:
        """n samples at ``nfe`` steps (class labels cycle through 0..K−1 unless given); ``cfg_scale`` /
        ``cfg_interval`` ((t_min, t_max)): the guidance at sampling (None: the design's default)."""
        g = torch.Generator(self.device).manual_seed(seed)
        noise = torch.randn((n, *self.data.shape), generator=g, device=self.device)
        k = self.data.num_classes
        y = labels if labels is not None else (torch.arange(n, device=self.device) % k if k else
                                               torch.zeros(n, dtype=torch.long, device=self.device))
        net = model or self.eval_model
        with self.autocast():
            x = sample(net, self.comps.guidance, noise, nfe, y, null_label=self.data.null_label, cfg_scale=cfg_scale,
                       mode=sampling_mode(self.comps), schedule=self.comps.schedule, generator=g,
                       cfg_interval=None if cfg_interval is None else tuple(float(v) for v in cfg_interval))
        return x.float()

    def autocast(self):
        bf16 = self.cfg.train.precision == "bf16" or (self.cfg.train.precision == "auto" and self.device.type == "cuda")
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)


def pick_device(spec: str) -> torch.device:
    """``auto``: CUDA when a GPU is visible to this process, else the CPU (a zero-GPU Ray trial hides the
    GPUs with ``CUDA_VISIBLE_DEVICES=""`` and sets ``train.device=cpu``: ablate/gpu.py)."""
    from ablate.gpu import auto_device

    if spec == "auto":
        return auto_device()
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={spec} but CUDA is not available")
    return dev


def default_out_dir(cfg: DictConfig, design: Design) -> Path:
    if cfg.train.out_dir:
        return Path(cfg.train.out_dir)
    return Path("runs") / str(cfg.name or "run") / f"{design.slug}-seed{cfg.train.seed}"


def setup(cfg: DictConfig) -> Run:
    """Load data, resolve and build the design, create EMAs. Validates before building anything."""
    device = pick_device(cfg.train.device)
    from ablate.gpu import configure_device

    configure_device(device)  # before anything is on the GPU: allocator settings, a fractional trial's share
    data = load_data(OmegaConf.to_container(cfg.data, resolve=True), device=device)
    design = resolve_design(OmegaConf.to_container(cfg.design, resolve=True), data.default_backbone())
    from ablate.data import ResidentLoader

    tc = cfg.train
    if tc.classes_per_batch is None:  # the preset's recommendation (esc: 8 groups), where the data has classes
        tc.classes_per_batch = preset_train_setting(design.preset, "classes_per_batch", 0) if data.num_classes else 0
    ResidentLoader.check_classes_per_batch(tc.classes_per_batch, int(tc.batch_size), data)  # before building
    ddp.local_classes_per_batch(tc.classes_per_batch, ddp.world_size(cfg))  # whole groups on every rank
    torch.manual_seed(int(cfg.train.seed))  # anything else on the global RNG; parameters are seeded per component
    comps = build_components(design, data.shape, data.num_classes, train_steps=int(cfg.train.steps),
                             seed=int(cfg.train.seed))  # backbone init: f(seed, backbone spec, data shape) only
    model = comps.backbone.to(device)
    comps.weighting.to(device)
    rates = {float(cfg.train.ema)}
    if comps.target.teacher_ema is not None:
        rates.add(float(comps.target.teacher_ema))
    emas = {rate: copy.deepcopy(model).requires_grad_(False).eval() for rate in rates}
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Run(cfg, data, design, comps, model, emas, device, default_out_dir(cfg, design))


def _optimizer(cfg, params, device):
    kw = dict(lr=float(cfg.train.lr), betas=tuple(cfg.train.betas), weight_decay=float(cfg.train.weight_decay))
    if device.type == "cuda":
        kw["fused"] = True
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}.get(cfg.train.optimizer)
    if cls is None:
        raise ValueError(f"train.optimizer must be adam or adamw, got {cfg.train.optimizer!r}")
    return cls(params, **kw)


def ema_decay(rate: float, step: int, warmup: bool = True) -> float:
    """min(rate, (1 + k)/(10 + k)) at update k when warming up (TensorFlow's num_updates rule).

    Without it an EMA of rate 0.999 still holds 0.999^2000 ≈ 13 % of the random
    initial weights after 2000 steps, which on short runs ruins its samples.
    """
    return min(float(rate), (1.0 + step) / (10.0 + step)) if warmup else float(rate)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    e, m = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(e, m, 1.0 - decay)


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: write a temporary file, fsync, rename over the old checkpoint, fsync the folder (the rename
    itself survives a power cut). Until the rename the previous checkpoint is the one on disk."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        except OSError:  # some filesystems cannot fsync a folder
            pass
        finally:
            os.close(fd)


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    return torch.load(path, map_location=map_location, weights_only=True)


def train(cfg: DictConfig, reporter: Reporter | None = None, progress: bool = True,
          on_eval=None, resume: bool = True) -> Run:
    """Train one design to ``cfg.train.steps``; resumes from the run folder's checkpoint.

    ``train.world_size`` > 1: data parallel over that many processes (ablate/distributed.py).
    """
    ws = ddp.world_size(cfg)  # DDP hook: spawn ranks 1..N−1 and train as rank 0 in this process
    if ws > 1 and not ddp.initialized():
        return ddp.launch(train, cfg, reporter=reporter, progress=progress, on_eval=on_eval, resume=resume)
    rank = ddp.rank() if ws > 1 else 0
    main = rank == 0  # DDP hook: rank 0 alone writes files, reports and evaluates
    run = setup(cfg)
    out, tc = run.out_dir, cfg.train
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "design.json").write_text(run.design.to_json())
        (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    params = list(run.model.parameters()) + list(run.comps.weighting.parameters())
    opt = _optimizer(cfg, params, run.device)
    streams = Streams(int(tc.seed), run.device, rank=rank)  # noise: per (seed, rank, step, stream); DDP: own noise
    data_gen = torch.Generator().manual_seed(int(tc.seed) + 2 + ddp.seed_offset(rank))  # DDP: own data
    loader = make_loader(run.data, ddp.local_batch_size(int(tc.batch_size), ws), data_gen,  # DDP: B/N rows
                         ddp.local_classes_per_batch(tc.classes_per_batch, ws))  # DDP: k/N same-class groups
    ckpt_path = out / "checkpoint.pt"
    resume_step = None
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path, run.device)
        if state["design_id"] != run.design.design_id:
            raise ValueError(f"{ckpt_path} belongs to design {state['design_id']}, not {run.design.design_id}; "
                             "use another train.out_dir or delete the folder")
        run.model.load_state_dict(state["model"])
        run.comps.weighting.load_state_dict(state["weighting"])
        for rate, sd in state["emas"].items():
            run.emas[float(rate)].load_state_dict(sd)
        opt.load_state_dict(state["optimizer"])
        data_gen.set_state(state["data_gen"].cpu())
        run.step = resume_step = int(state["step"])
    if ws > 1:  # DDP hook: rank 0's weights everywhere; ranks > 0 reseed (the checkpoint holds rank 0's data stream)
        ddp.broadcast_modules(run.model, run.comps.weighting, *run.emas.values())
        if rank and resume_step is not None:
            ddp.reseed([data_gen], int(tc.seed), resume_step)
    local = LocalReporter(out, resume_step) if main else None
    rep = MultiReporter(reporter, local)  # the tracker first: a record it lacks is never marked done locally
    rep.artifact(out / "design.json", "config")
    rep.artifact(out / "config.yaml", "config")
    evaluator = make_evaluator(run) if main else None
    if evaluator is not None:
        rep.params({f"fid.{k}": v for k, v in evaluator.provenance.items()})
    last_eval = [resume_step if resume_step is not None and _evaluated_at(out, resume_step) else None]

    def evaluate():
        grids = out / "samples" / "eval" if cfg.eval.grids else None
        values = evaluator(run.step, grids)
        rep.metrics(run.step, values, kind="eval")
        last_eval[0] = run.step
        if progress:
            shown = "  ".join(f"{k}={v:.3g}" for k, v in values.items() if k.startswith("fid/"))
            tqdm.write(f"step {run.step}: {shown}", file=sys.stderr)
    net = torch.compile(run.model) if tc.compile else run.model
    teacher_rate = run.comps.target.teacher_ema
    nets = Nets(model=net, teacher=run.emas[float(teacher_rate)] if teacher_rate is not None else net,
                guidance=run.comps.guidance)

    from ablate.checkpointing import Checkpointer

    # every train.ckpt_every steps and/or train.ckpt_every_s seconds; written in the background (ablate/checkpointing.py)
    ckpt = Checkpointer(ckpt_path, save_checkpoint, rep.checkpoint, every_steps=int(tc.ckpt_every or 0),
                        every_s=float(tc.get("ckpt_every_s") or 0), total_steps=int(tc.steps))

    def checkpoint(wait: bool = False):
        """Snapshot the state on the CPU and write it in the background (one write at a time); ``wait``: until
        it is on disk and reported (before an evaluation, and at the end)."""
        if not main:  # DDP hook: rank 0 writes
            return
        ckpt.save({
            "step": run.step, "design_id": run.design.design_id, "design_json": run.design.to_json(),
            "config_yaml": OmegaConf.to_yaml(cfg), "model": run.model.state_dict(),
            "weighting": run.comps.weighting.state_dict(),
            "emas": {str(k): v.state_dict() for k, v in run.emas.items()},
            "optimizer": opt.state_dict(), "data_gen": data_gen.get_state()},  # noise streams: stateless per step
            run.step, wait=wait)

    every = int(cfg.eval.every) if evaluator is not None else 0
    if every and resume_step and resume_step % every == 0 and last_eval[0] != resume_step:
        evaluate()  # interrupted between the checkpoint and its evaluation
    steps, log_every = int(tc.steps), max(1, int(tc.log_every))
    bar = tqdm(total=steps, initial=run.step, disable=not progress, desc=run.design.slug[:40],
               dynamic_ncols=True, file=sys.stderr)
    acc, n_acc, t_log, t_train = torch.zeros((), device=run.device), 0, time.perf_counter(), 0.0
    acc_mse = torch.zeros((), device=run.device)
    warm = int(tc.warmup_steps)
    try:
        while run.step < steps:
            t0 = time.perf_counter()
            if warm:
                for g in opt.param_groups:
                    g["lr"] = float(tc.lr) * min(1.0, (run.step + 1) / warm)
            x, labels = loader.next()
            with run.autocast():
                loss, _, tout = training_loss(run.comps, nets, x, labels, null_label=run.data.null_label,
                                           generator=streams, step=run.step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if ws > 1:  # DDP hook: mean gradient over the ranks = gradient of the global batch's mean loss
                ddp.average_gradients(params)
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, float(tc.grad_clip))
            opt.step()
            for rate, ema in run.emas.items():
                ema_update(ema, run.model, ema_decay(rate, run.step, tc.ema_warmup))
            run.step += 1
            acc += loss.detach().float()
            acc_mse += (tout.pred.detach().float() - tout.target.float()).square().mean()
            n_acc += 1
            t_train += time.perf_counter() - t0
            if run.step % log_every == 0 or run.step == steps:
                if ws > 1:  # DDP hook: log the global mean (every rank sees the same divergence)
                    ddp.all_mean_([acc, acc_mse])
                mean = float(acc) / n_acc  # the only host sync, once per log interval
                if not math.isfinite(mean):
                    raise DivergenceError(f"loss is {mean} at step {run.step} ({run.design.slug}); "
                                          "lower train.lr, enable train.grad_clip or change the weighting")
                now = time.perf_counter()
                rate = n_acc / max(now - t_log, 1e-9)
                mse = float(acc_mse) / n_acc
                rep.metrics(run.step, {"train/loss": mean, "train/mse": mse, "train/steps_per_s": rate,
                                       "time/train_s": t_train})
                run.history.append((run.step, mean))
                bar.set_postfix(loss=f"{mean:.4f}", mse=f"{mse:.4f}", it_s=f"{rate:.1f}")
                bar.update(n_acc)
                acc.zero_()
                acc_mse.zero_()
                n_acc, t_log = 0, now
            if evaluator is not None and int(cfg.eval.every) and run.step % int(cfg.eval.every) == 0:
                checkpoint(wait=True)  # first: an evaluation is always of a state that a resume can reach
                evaluate()
            elif ckpt.due(run.step):  # by steps or wall clock, before the last step (also reports a finished write)
                checkpoint()
            if on_eval is not None:
                on_eval(run, rep)
    except BaseException:
        ckpt.close()  # a write in flight completes: the newest finished checkpoint survives the error
        raise
    finally:
        bar.close()
    checkpoint(wait=True)
    if evaluator is not None and cfg.eval.at_end and last_eval[0] != run.step:
        evaluate()
    from ablate.evaluation import _plain, cfg_interval, cfg_scales, scale_tag, training_cost

    if main:  # compute of this trial (ranking at equal compute); device hours of this process's training time
        rep.metrics(run.step, training_cost(run, t_train, ws), kind="cost")

    interval = cfg_interval(_plain(cfg.sample.get("cfg_interval")))
    scales = cfg_scales(_plain(cfg.sample.cfg_scale))  # a list: one grid per scale (the first keeps nfe_N.png)
    for nfe in cfg.sample.nfe if main else []:  # DDP hook: rank 0 writes the grids
        for si, scale in enumerate(scales):
            x = run.generate(int(cfg.sample.num), int(nfe), cfg_scale=scale, cfg_interval=interval)
            ref = run.data.x[: 2000] if x.dim() == 2 else None
            name = f"nfe_{nfe}{scale_tag(scale) if si else ''}.png"
            rep.artifact(save_samples(x, out / "samples" / name, ref), "samples")
    rep.close()
    return run


def make_evaluator(run: Run):
    """The run's :class:`~ablate.evaluation.Evaluator`, or None when evaluation is off."""
    ec = run.cfg.eval
    if not int(ec.every) and not ec.at_end:
        return None
    from ablate.evaluation import Evaluator

    return Evaluator(run, ec)


def _evaluated_at(out: Path, step: int) -> bool:
    path = out / "metrics.jsonl"
    if not path.exists():
        return False
    return any(json.loads(ln)["step"] == step and json.loads(ln)["kind"] == "eval"
               for ln in path.read_text().splitlines() if ln)


def main(argv: list[str] | None = None) -> int:
    from ablate.cli import run_cli

    return run_cli(_main, argv, prog="python -m ablate.train", make_parser=make_parser)


def make_parser(prog: str):
    """The arguments, this module's docstring and the presets (ablate/cli.py; also answers --help early)."""
    from ablate.cli import parser

    return parser(prog, doc=__doc__)


def _main(args) -> int:
    from ablate.config import compose, validate

    cfg, source = compose(args.target, args.overrides)
    validate(cfg, source)  # value ranges: one message per bad key, exit 2, before anything is built
    if args.dry_run:
        run_cfg = OmegaConf.to_container(cfg, resolve=True)
        from ablate.data import load_data as _ld

        data = _ld(run_cfg["data"])
        design = resolve_design(run_cfg["design"], data.default_backbone())
        build_components(design, data.shape, data.num_classes, train_steps=int(cfg.train.steps))
        print(OmegaConf.to_yaml(cfg))
        print(design.to_json())
        print(f"out_dir: {default_out_dir(cfg, design)}")
        return 0
    run = train(cfg)
    print(f"trained {run.design.slug} ({run.design.design_id}) for {run.step} steps -> {run.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
