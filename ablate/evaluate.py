"""Final numbers from a checkpoint: ``python -m ablate.evaluate CHECKPOINT --nfe 1 2 4 --num-samples 10000``.

CHECKPOINT is a run folder or its ``checkpoint.pt`` (loaded with
``weights_only=True``). The evaluation settings default to those the run was
trained with (``eval.*`` in its config), so with the same sample count and
seed the last FID logged during training is reproduced; every option below
overrides one of them. Prints a table with the provenance of the numbers and,
with ``--json``, writes them to a file.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf


def make_parser(prog: str) -> argparse.ArgumentParser:
    from ablate.cli import help_parser

    p = help_parser(prog, __doc__)  # the docstring, its markup rendered plainly
    p.add_argument("target", help="run folder or checkpoint.pt")
    p.add_argument("--nfe", type=int, nargs="+", help="step budgets (default: the run's eval.nfe)")
    p.add_argument("--num-samples", type=int, help="generated samples per metric (default: the run's)")
    p.add_argument("--metrics", nargs="+", choices=["fid", "kid", "prc"], help="default: the run's eval.metrics")
    p.add_argument("--extractor", help="feature extractor (raw | classifier | inception; default: the run's)")
    p.add_argument("--raw", action="store_true", help="evaluate the raw weights instead of the EMA")
    p.add_argument("--cfg-scale", type=float, help="guidance scale (default: the run's)")
    p.add_argument("--seed", type=int, help="sampling seed (default: the run's eval.seed)")
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: the run's train.device)")
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    p.add_argument("--grids", type=Path, help="write a sample grid per NFE into this folder")
    return p


def load_run(path: Path, device: str | None = None):
    """(Run, checkpoint step) rebuilt from a checkpoint: config, design and the EMA/raw weights."""
    from ablate.config import base_config
    from ablate.train import load_checkpoint, setup

    ckpt = path / "checkpoint.pt" if path.is_dir() else path
    if not ckpt.is_file():
        raise FileNotFoundError(f"no checkpoint at '{ckpt}' (give a run folder or its checkpoint.pt)")
    state = load_checkpoint(ckpt)
    cfg = OmegaConf.merge(base_config(), OmegaConf.create(state["config_yaml"]))
    cfg.train.out_dir = str(ckpt.parent)
    if device:
        cfg.train.device = device
    run = setup(cfg)
    if run.design.design_id != state["design_id"]:
        raise ValueError(f"{ckpt}: the rebuilt design {run.design.design_id} differs from the saved "
                         f"{state['design_id']} (a plugin's defaults changed since training?)")
    run.model.load_state_dict(state["model"])
    for rate, sd in state["emas"].items():
        run.emas[float(rate)].load_state_dict(sd)
    run.step = int(state["step"])
    return run


def evaluate(run, nfe=None, num_samples=None, metrics=None, extractor=None, raw=False, cfg_scale=None, seed=None,
             grids: Path | None = None) -> dict:
    from ablate.evaluation import Evaluator

    ec = run.cfg.eval.copy()
    for key, val in (("nfe", nfe), ("num_samples", num_samples), ("metrics", metrics), ("extractor", extractor),
                     ("cfg_scale", cfg_scale), ("seed", seed)):
        if val is not None:
            ec[key] = val
    if raw:
        ec.use_ema = False
    import torch

    ev = Evaluator(run, ec)
    with torch.no_grad():
        values = ev(run.step, grids)
    return {"step": run.step, "design_id": run.design.design_id, "slug": run.design.slug,
            "provenance": ev.provenance, "metrics": values}


def _main(args) -> int:
    run = load_run(Path(args.target), args.device)
    res = evaluate(run, args.nfe, args.num_samples, args.metrics, args.extractor, args.raw, args.cfg_scale,
                   args.seed, args.grids)
    p = res["provenance"]
    print(f"{res['slug']} ({res['design_id']}) at step {res['step']}")
    print(f"  features {p['extractor']} ({p['extractor_id']}), reference {p['reference']}, "
          f"{p['num_samples']} samples, {p['weights']} weights, seed {p['seed']}")
    names = sorted({k.split('/')[0] for k in res["metrics"] if "/nfe_" in k})
    nfes = sorted({int(k.split("_")[-1]) for k in res["metrics"] if "/nfe_" in k})
    print("  " + "nfe".rjust(5) + "".join(n.rjust(12) for n in names))
    for n in nfes:
        print("  " + str(n).rjust(5) + "".join(f"{res['metrics'].get(f'{m}/nfe_{n}', float('nan')):12.4f}"
                                               for m in names))
    print(f"  evaluation took {res['metrics']['time/eval_s']:.1f} s", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2, sort_keys=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    from ablate.cli import run_cli

    return run_cli(_main, argv, prog="python -m ablate.evaluate", make_parser=make_parser)


if __name__ == "__main__":
    raise SystemExit(main())
