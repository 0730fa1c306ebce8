"""Benchmarks that print a table (never timed tests): ``python -m ablate.bench [--only SECTION ...]``.

Sections:
- ``targets``: training-step time and peak memory per target estimator, as a ratio to flow matching,
  on the same backbone, batch and guidance: an MLP on 2-D data and a small DiT on digits. Rows are
  timed in interleaved rounds (A B C … A B C …) and the median round is kept, so a busy machine slows
  every row alike and the ratios stay comparable within one run.
- ``eval``: sampling and feature-extraction throughput of evaluation, and one whole evaluation.
- ``study``: a finished study's overhead from its MLflow records: wall time against the sum of its
  trials' training and evaluation time divided by the concurrency.
- ``asha``: an ASHA study against the full grid of the same designs: the share of the grid's training
  steps ASHA used, and whether ASHA's best design is the grid's winner or inside its 95 % interval.

The table is printed and written as JSON and CSV (``--out``, default runs/bench/).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SECTIONS = ("targets", "eval", "study", "asha")
# (row, design overrides): the preset gives the sampler the target needs; guidance is held at `cfg` (label
# dropout only) so that rows differ in the target estimator alone, except the row that says otherwise.
TARGET_ROWS = [
    ("flow_matching", {"preset": "flow_matching"}),
    ("shortcut", {"preset": "scd"}),
    ("meanflow (exact JVP)", {"preset": "meanflow"}),
    ("meanflow (finite difference)", {"preset": "meanflow", "target": {"jvp": "finite_difference"}}),
    ("meanflow + plug-in velocity", {"preset": "meanflow", "target": {"velocity": "plugin", "plugin_prob": 0.5}}),
    ("meanflow + meanflow_cfg guidance", {"preset": "meanflow", "guidance": "meanflow_cfg"}),
    ("ct (discrete)", {"preset": "ct_linear"}),
    ("sct (continuous)", {"preset": "sct_linear"}),
    ("imm", {"preset": "imm"}),
]
BACKBONES = {  # data, design backbone, batch
    "mlp": ({"name": "gaussian_mixture", "modes": 8}, {"name": "mlp"}, 256),
    "dit": ({"name": "digits"}, {"name": "dit", "size": "T", "patch": 2}, 64),
}


def _row_design(over: dict, backbone: dict) -> dict:
    return {"guidance": "cfg", **over, "backbone": backbone}


class Stepper:
    """One design's training step exactly as ``ablate.train`` takes it: loss, backward, clip, AdamW, EMA."""

    def __init__(self, design_spec: dict, data_spec: dict, batch: int, device: torch.device):
        import copy

        from ablate.data import load_data
        from ablate.design import build_components, resolve_design
        from components.targets.base import Nets

        self.data = load_data(data_spec, device=device)
        design = resolve_design(design_spec, self.data.default_backbone())
        torch.manual_seed(0)
        self.comps = build_components(design, self.data.shape, self.data.num_classes, train_steps=100_000, seed=0)
        self.model = self.comps.backbone.to(device)
        self.comps.weighting.to(device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        rate = self.comps.target.teacher_ema
        self.nets = Nets(model=self.model, teacher=self.ema if rate is not None else self.model,
                         guidance=self.comps.guidance)
        self.params = list(self.model.parameters()) + list(self.comps.weighting.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
        from components.compose import Streams

        self.gen = Streams(0, device)  # the loop's per-step streams (their re-seeding is part of the step)
        idx = torch.randint(len(self.data.x), (batch,), generator=torch.Generator().manual_seed(0))
        self.x, self.y = self.data.x[idx.to(device)], self.data.labels[idx.to(device)]
        self.device, self.k = device, 0

    def step(self) -> None:
        from ablate.train import ema_update
        from components.compose import training_loss

        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            loss, _, _ = training_loss(self.comps, self.nets, self.x, self.y, null_label=self.data.null_label,
                                       generator=self.gen, step=self.k)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        ema_update(self.ema, self.model, 0.999)
        self.k += 1

    def timed(self, n: int) -> float:
        """Seconds per step over n steps."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            self.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n


def _proc_status_mib(key: str) -> float:
    """VmRSS / VmHWM (peak RSS) of this process in MiB, from /proc/self/status."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def _reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0), so the next peak is this code's own."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def peak_memory_mib(row: int, backbone: str, device: torch.device) -> float:
    """Peak memory of a training step above everything that persists between steps (model, optimizer state,
    data, batch): GPU the allocator's peak, CPU the peak RSS (VmHWM) over three steps minus the RSS before."""
    name, over = TARGET_ROWS[row]
    data, back, batch = BACKBONES[backbone]
    s = Stepper(_row_design(over, back), data, batch, device)
    s.step()  # the optimizer state and allocator pools exist after one step: measure the steady steps
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            s.step()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    _reset_peak_rss()
    before = _proc_status_mib("VmRSS")
    for _ in range(3):
        s.step()
    return _proc_status_mib("VmHWM") - before


#: rows timed again under ``train.compile`` (``--compile``, DiT only): flow matching and the JVP targets
COMPILED_ROWS = ("flow_matching", "meanflow (exact JVP)", "sct (continuous)")


def _compiled(s: Stepper) -> Stepper:
    """The stepper's network under torch.compile, as ``train.compile`` wraps it (the teacher too when it is
    the model); the JVP targets then compile their tangent pass alike (components/targets/jvp.py)."""
    from components.targets.base import Nets

    net = torch.compile(s.model)
    s.nets = Nets(model=net, teacher=net if s.nets.teacher is s.model else s.nets.teacher, guidance=s.nets.guidance)
    return s


def bench_targets(device: torch.device, rounds: int, steps: int, backbones=tuple(BACKBONES),
                  compile: bool = False) -> list[dict]:
    """Per row: ms/step, × flow matching, peak memory and its × flow matching. Compiled rows (``compile``)
    are timed in the same rounds and compared with compiled flow matching; their memory is not probed."""
    from tqdm import tqdm

    out = []
    for backbone in backbones:
        data, back, batch = BACKBONES[backbone]
        rows = [(name, over, False) for name, over in TARGET_ROWS]
        if compile and backbone == "dit":
            rows += [(f"{name} (compiled)", over, True) for name, over in TARGET_ROWS if name in COMPILED_ROWS]
        steppers = []
        for name, over, comp in rows:
            s = Stepper(_row_design(over, back), data, batch, device)
            steppers.append((name, _compiled(s) if comp else s))
        n = steps * (4 if backbone == "mlp" else 1)
        times: dict[str, list[float]] = {name: [] for name, _ in steppers}
        for name, s in tqdm(steppers, desc=f"warm-up on {backbone}", file=sys.stderr):
            s.timed(8 if name.endswith("(compiled)") else 3)  # allocator, kernels; compilation and its re-compiles
        for _ in tqdm(range(rounds), desc=f"targets on {backbone}", file=sys.stderr):
            for name, s in steppers:
                times[name].append(s.timed(n))
        mems = [_memory_in_subprocess(i, backbone, device) for i in range(len(TARGET_ROWS))]
        mems += [float("nan")] * (len(rows) - len(mems))
        for (name, _, comp), mem in zip(rows, mems):
            t = statistics.median(times[name])
            ref_t = statistics.median(times["flow_matching (compiled)" if comp else "flow_matching"])
            out.append({"section": "targets", "backbone": f"{backbone} (batch {batch})", "row": name,
                        "ms_per_step": 1000 * t, "x_flow_matching": t / ref_t, "peak_mib": mem,
                        "mem_x_flow_matching": mem / mems[0] if mems[0] > 0 else float("nan")})
    return out


def _memory_in_subprocess(row: int, backbone: str, device: torch.device) -> float:
    """A fresh process per row: CPU peak RSS is per process and never goes down."""
    if device.type == "cuda":
        return peak_memory_mib(row, backbone, device)
    cmd = [sys.executable, "-m", "ablate.bench", "--_memory-row", str(row), "--_backbone", backbone]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if res.returncode:
        raise RuntimeError(f"memory probe failed: {res.stderr[-2000:]}")
    return float(res.stdout.strip().splitlines()[-1])


def bench_eval(device: torch.device) -> list[dict]:
    """Sampling and feature-extraction throughput of the default study's evaluation."""
    from ablate.config import compose
    from ablate.evaluation import Evaluator
    from ablate.train import setup

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg, _ = compose(None, [f"train.out_dir={tmp}/run"])
        run = setup(cfg)
        ev = Evaluator(run, cfg.eval)
        bs = int(cfg.eval.batch_size)
        with torch.no_grad():
            for nfe in (1, 2, 4):
                run.generate(bs, nfe)
                t0 = time.perf_counter()
                run.generate(bs, nfe)
                rows.append({"section": "eval", "row": f"sampling, NFE {nfe}", "value": bs / (time.perf_counter() - t0),
                             "unit": f"samples/s (batch {bs}, {run.design.slug})"})
            x = run.generate(int(cfg.eval.num_samples), 1)
            ev.extractor(x)
            t0 = time.perf_counter()
            ev.extractor(x)
            rows.append({"section": "eval", "row": f"feature extraction ({ev.extractor.provenance['name']})",
                         "value": len(x) / (time.perf_counter() - t0), "unit": "features/s"})
            ev(0)
            t0 = time.perf_counter()
            ev(0)
            rows.append({"section": "eval", "row": f"one evaluation (NFE {list(cfg.eval.nfe)}, "
                                                   f"{cfg.eval.num_samples} samples)",
                         "value": time.perf_counter() - t0, "unit": "s"})
    return rows


def bench_study(study: str, uri: str | None) -> list[dict]:
    """Overhead of a finished study: wall time vs. Σ(train + eval time)/concurrency, from MLflow."""
    from dashboards.tables import _client, _parent, load_trials

    trials = load_trials(study, uri)
    if not len(trials):
        return [{"section": "study", "row": study, "value": float("nan"), "unit": "no trials recorded"}]
    _, parent = _parent(_client(uri), study)
    wall = ((parent.info.end_time or parent.info.start_time) - parent.info.start_time) / 1000.0
    work = float((trials.get("final/time/train_s", 0).fillna(0) + trials.get("final/time/eval_s", 0).fillna(0)).sum())
    conc = int(parent.data.tags.get("concurrency", 0)) or int(min(len(trials), os.cpu_count() or 1))
    ideal = work / conc
    return [{"section": "study", "row": f"{study}: wall time", "value": wall, "unit": "s"},
            {"section": "study", "row": f"{study}: Σ(train + eval)/{conc}", "value": ideal, "unit": "s"},
            {"section": "study", "row": f"{study}: platform overhead", "value": 100 * (wall - ideal) / wall,
             "unit": "% of wall time"}]


def bench_asha(asha: str, grid: str, objective: str, uri: str | None) -> list[dict]:
    """ASHA's share of the grid's training steps, and whether it returns the grid's winner (or one inside its CI)."""
    from dashboards.tables import load_trials, rank

    a, g = load_trials(asha, uri), load_trials(grid, uri)
    if not len(a) or not len(g):
        return [{"section": "asha", "row": f"{asha} vs {grid}", "value": float("nan"), "unit": "no records"}]
    share = a["steps"].sum() / max(1, g["steps"].sum())
    rg = rank(g, objective)
    ra = rank(a[a["steps"] == a["steps"].max()], objective)  # ASHA's survivors, fully trained
    best_a = ra.loc[0, "design"]
    inside = rg[rg["design"] == best_a]
    lead = rg.loc[0]
    verdict = ("the grid's winner" if best_a == lead["design"] else
               "inside the winner's 95 % interval" if len(inside) and inside.iloc[0]["ci_low"] <= lead["ci_high"]
               else "NOT the grid's winner")
    return [{"section": "asha", "row": "training steps used (ASHA / grid)", "value": 100 * share, "unit": "%"},
            {"section": "asha", "row": f"ASHA's best: {best_a}", "value": float(ra.loc[0, "mean"]),
             "unit": f"{objective}; {verdict} ({lead['design']}: {lead['mean']:.2f})"}]


def print_table(rows: list[dict]) -> None:
    import pandas as pd

    for section in SECTIONS:
        part = [r for r in rows if r["section"] == section]
        if not part:
            continue
        df = pd.DataFrame(part).drop(columns="section")
        print(f"\n== {section} ==")
        print(df.to_string(index=False, float_format=lambda v: f"{v:.3g}"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ablate.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", choices=SECTIONS, help="sections to run (default: all)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per target row")
    p.add_argument("--steps", type=int, default=5, help="steps per round (×4 for the MLP)")
    p.add_argument("--backbones", nargs="*", choices=list(BACKBONES), default=list(BACKBONES),
                   help="backbones of the targets section")
    p.add_argument("--compile", action="store_true",
                   help="targets: also time flow matching and the JVP targets under train.compile (DiT; minutes)")
    p.add_argument("--study", default="schedule_vs_target", help="a finished study for the overhead row")
    p.add_argument("--asha-study", default="schedule_vs_target_asha", help="the ASHA version of --study")
    p.add_argument("--objective", default="fid/nfe_1")
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    p.add_argument("--out", default="runs/bench", help="folder for bench.json and bench.csv")
    p.add_argument("--_memory-row", type=int, help=argparse.SUPPRESS)
    p.add_argument("--_backbone", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from ablate.train import pick_device

    device = pick_device(args.device)
    if args._memory_row is not None:  # the per-row memory probe (a subprocess of the targets section)
        print(peak_memory_mib(args._memory_row, args._backbone, device))
        return 0
    sections = args.only or list(SECTIONS)
    rows: list[dict] = []
    if "targets" in sections:
        rows += bench_targets(device, args.rounds, args.steps, args.backbones, args.compile)
    if "eval" in sections:
        rows += bench_eval(device)
    for name, fn in (("study", lambda: bench_study(args.study, args.tracking_uri)),
                     ("asha", lambda: bench_asha(args.asha_study, args.study, args.objective, args.tracking_uri))):
        if name in sections:
            try:
                rows += fn()
            except ValueError as exc:  # no such study at this tracking URI
                rows.append({"section": name, "row": "not available", "value": float("nan"), "unit": str(exc)})
    print(f"device: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print_table(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps({"device": str(device), "rows": rows}, indent=2))
    import pandas as pd

    pd.DataFrame(rows).to_csv(out / "bench.csv", index=False)
    print(f"\nwritten: {out / 'bench.json'}, {out / 'bench.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
