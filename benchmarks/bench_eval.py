"""How much does evaluation cost? ``python benchmarks/bench_eval.py [--threads N] [--cache-dir DIR]``

For the default study (``ablate/conf/base.yaml``: digits, the meanflow preset, its default backbone, the
default ``eval.*`` settings) on this machine, prints:

- sampling throughput (samples/s) at NFE 1, 2, 4 with the untrained default design (speed does not depend
  on the weights);
- feature-extraction throughput of the default digits extractor (the cached classifier);
- the time of one full evaluation (every eval.nfe, eval.num_samples samples each, sample grids included);
- the training throughput (steps/s, ~30 steps) and from it the share of a default study's wall time that
  goes to evaluation: eval_s / (eval.every / steps_per_s + eval_s).

Not a test: numbers depend on the machine and on whatever else runs on it.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ablate.config import base_config, compose  # noqa: E402
from ablate.evaluation import Evaluator, metrics_from_features  # noqa: E402
from ablate.features import build_extractor, cache_root, default_extractor  # noqa: E402
from ablate.train import setup, train  # noqa: E402


def timed(fn, repeat: int = 3) -> float:
    """Best-of-``repeat`` wall time of fn() after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    p.add_argument("--cache-dir", help="classifier/reference cache (default: $ABLATE_CACHE or ~/.cache/ablate)")
    p.add_argument("--train-steps", type=int, default=30, help="training steps timed for steps/s")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = base_config()
    rows: list[tuple[str, str]] = []

    with tempfile.TemporaryDirectory() as tmp:
        cfg, _ = compose(None, [f"train.out_dir={tmp}/run"] + ([f"eval.cache_dir={args.cache_dir}"]
                                                               if args.cache_dir else []))
        run = setup(cfg)
        data, ec = run.data, cfg.eval
        torch.set_grad_enabled(False)

        # the default extractor (classifier for digits): a one-off training unless already cached
        name = default_extractor(data)
        t0 = time.perf_counter()
        ex = build_extractor(ec.extractor, data, ec.cache_dir)
        t_build = time.perf_counter() - t0
        rows.append(("dataset / design", f"{data.name} {tuple(data.shape)} / {run.design.slug}"))
        rows.append(("device, threads", f"{run.device}, {torch.get_num_threads()}"))
        rows.append(("extractor", f"{name} {json.dumps(ex.provenance)}"))
        rows.append(("extractor build (one-off, cached)", f"{t_build:10.2f} s  (cache {cache_root(ec.cache_dir)})"))

        # sampling throughput at one eval batch
        bs = int(ec.batch_size)
        model = run.emas[float(cfg.train.ema)]
        for nfe in (1, 2, 4):
            t = timed(lambda: run.generate(bs, nfe, seed=0, model=model))
            rows.append((f"sampling, NFE {nfe} (batch {bs})", f"{bs / t:10.1f} samples/s"))

        # features and FID of eval.num_samples images
        num = int(ec.num_samples)
        x = run.generate(num, 1, seed=0, model=model)
        t = timed(lambda: ex(x))
        rows.append((f"feature extraction ({num} images)", f"{num / t:10.1f} features/s"))
        ev = Evaluator(run, ec)
        feats = ex(x)
        t = timed(lambda: metrics_from_features(feats, ev.ref, list(ec.metrics)))
        rows.append((f"metrics {list(ec.metrics)} from features", f"{t * 1000:10.1f} ms"))

        # one whole evaluation as training runs it (all eval.nfe, grids written)
        grid_dir = Path(tmp) / "grids"
        ev(0, grid_dir if ec.grids else None)  # warm-up
        t0 = time.perf_counter()
        ev(0, grid_dir if ec.grids else None)
        eval_s = time.perf_counter() - t0
        rows.append((f"one evaluation (NFE {list(ec.nfe)}, {num} samples)", f"{eval_s:10.2f} s"))

        # training throughput of the default config
        torch.set_grad_enabled(True)
        steps = int(args.train_steps)
        log_every = max(1, steps // 3)
        tcfg, _ = compose(None, [f"train.out_dir={tmp}/train", f"train.steps={steps}", f"train.log_every={log_every}",
                                 "train.ckpt_every=0", "eval.every=0", "eval.at_end=false", "sample.nfe=[1]",
                                 "sample.num=8"])
        train(tcfg, progress=False)
        lines = [json.loads(ln) for ln in (Path(tmp) / "train" / "metrics.jsonl").read_text().splitlines() if ln]
        rates = [ln["values"]["train/steps_per_s"] for ln in lines if "train/steps_per_s" in ln["values"]]
        steps_per_s = sum(rates[1:]) / len(rates[1:]) if len(rates) > 1 else rates[0]  # first interval: warm-up
        rows.append((f"training (batch {tcfg.train.batch_size}, {steps} steps)", f"{steps_per_s:10.2f} steps/s"))

    every, total = int(ec.every), int(base.train.steps)
    n_evals = (total // every if every else 0) + (1 if ec.at_end and (not every or total % every) else 0)
    share = eval_s / (every / steps_per_s + eval_s) if every else float("nan")
    train_s = total / steps_per_s
    rows.append((f"eval share (every {every} steps)", f"{100 * share:10.1f} %  = {eval_s:.2f} / "
                                                      f"({every} / {steps_per_s:.2f} + {eval_s:.2f})"))
    rows.append((f"default study ({total} steps, {n_evals} evals)",
                 f"{train_s / 60:8.1f} min training + {n_evals * eval_s / 60:.1f} min evaluation"))

    width = max(len(k) for k, _ in rows)
    print("evaluation cost, default study on this machine")
    print("-" * (width + 40))
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
