"""Several processes per trial (ablate/distributed.py), on CPU with two real gloo ranks.

- gradient averaging without the DDP wrapper: after the all-reduce every rank
  holds exactly the single-process gradient of the mean loss over the global
  batch (flow matching, MeanFlow's exact JVP, a learned weighting);
- ``train.world_size=2`` through the CLI and ``train()``: one set of files,
  each step logged once, identical weights on both ranks at the end;
- errors: a batch that does not split, a rank that fails.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

import components  # noqa: F401  (registers the built-ins)
from ablate import distributed as ddp
from ablate.config import compose
from components.registry import BACKBONE, GUIDANCE, SCHEDULE, TARGET, WEIGHTING
from components.targets.base import Nets, Problem

DT = torch.float64
B, K = 8, 3  # global batch, classes

CASES = {  # name: (target, kwargs, weighting, kwargs)
    "flow_matching-l2": ("flow_matching", {}, "l2", {}),
    "meanflow_jvp-adaptive": ("meanflow", {"jvp": "exact"}, "adaptive", {}),
    "meanflow_jvp-learned_logvar": ("meanflow", {"jvp": "exact"}, "learned_logvar", {}),
}


def _on_two_ranks(fn, tmp_path: Path) -> None:
    """fn(rank, tmp_path) on two gloo ranks: this process and one spawned by ddp.launch."""
    cfg = OmegaConf.create({"train": {"world_size": 2, "batch_size": 2, "device": "cpu"}, "tmp": str(tmp_path),
                            "fn": fn.__name__})
    ddp.launch(_call, cfg)


def _call(cfg, **_):
    globals()[cfg.fn](ddp.rank(), Path(cfg.tmp))  # the spawned rank gets the config, not the function


# -- gradients ------------------------------------------------------------------------------
def _build(case: str):
    """The model in float64, every parameter random (the MLP's output layer starts at zero).

    Weightings compute in float32 whatever their input (components/weightings.py), so
    the loss passes through float32; the comparison stays tight because every
    per-sample value is computed identically on one rank and in one process.
    """
    target, tkw, weighting, wkw = CASES[case]
    model = BACKBONE.build("mlp", {"width": 16, "depth": 2}, data_shape=(2,), num_classes=K).to(DT)
    weight = WEIGHTING.build(weighting, wkw, data_shape=(2,))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in [*model.parameters(), *weight.parameters()]:
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=DT))
    return model, TARGET.build(target, tkw), weight


def _global_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 2, generator=g, dtype=DT)
    labels = torch.randint(K, (B,), generator=g)
    t = 0.05 + 0.9 * torch.rand(B, generator=g, dtype=DT)
    r = t * torch.rand(B, generator=g, dtype=DT)
    eps = torch.randn(B, 2, generator=g, dtype=DT)
    return x, labels, t, r, eps


def _grads(case: str, rows: slice) -> tuple[list, list[torch.Tensor]]:
    """Parameters and gradients of the mean loss over ``rows`` of the global batch."""
    model, target, weight = _build(case)
    schedule = SCHEDULE.build("linear")
    x, labels, t, r, eps = (v[rows] for v in _global_batch())
    pb = Problem(x=x, eps=eps, t=t, r=r, z=schedule.noise(x, eps, t), labels=labels, y=labels, null_label=K,
                 schedule=schedule, generator=torch.Generator().manual_seed(1))
    nets = Nets(model=model, teacher=model, guidance=GUIDANCE.build("none"))
    loss = weight(target(nets, pb)).mean()
    loss.backward()
    params = [*model.parameters(), *weight.parameters()]
    return params, [p.grad for p in params]


def _grad_worker(rank: int, tmp: Path) -> None:
    half = slice(rank * B // 2, (rank + 1) * B // 2)
    out = {}
    for case in CASES:
        params, _ = _grads(case, half)
        ddp.average_gradients(params)
        out[case] = [p.grad.clone() for p in params]
    # a parameter with a gradient on one rank only, one with none anywhere, and many small buckets
    a, b, c = (torch.nn.Parameter(torch.full((3,), float(i + 1), dtype=DT)) for i in range(3))
    ((a * (rank + 1)).sum() + ((b * 5).sum() if rank == 0 else 0)).backward()
    ddp.average_gradients([a, b, c], bucket_bytes=8)
    out["unused"] = [a.grad, b.grad, c.grad]
    logged = [torch.tensor(float(rank)), torch.tensor(10.0 * rank)]
    ddp.all_mean_(logged)
    out["logged"] = logged
    net = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(net.weight, float(rank))
    ddp.broadcast_modules(net)
    out["broadcast"] = net.weight.detach().clone()
    torch.save(out, tmp / f"rank{rank}.pt")


def test_averaged_gradients_equal_the_single_process_gradients_of_the_global_batch(tmp_path):
    _on_two_ranks(_grad_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for case in CASES:
        _, expected = _grads(case, slice(None))
        assert sum(float(g.abs().sum()) > 0 for g in expected) == len(expected)  # every parameter is trained
        for got in (ranks[0][case], ranks[1][case]):
            assert len(got) == len(expected)
            for g, e in zip(got, expected):  # float64 model: to 1e-10; the float32 weighting: to ~1e-6
                tol = dict(rtol=1e-10, atol=1e-12) if e.dtype == DT else dict(rtol=1e-6, atol=1e-6)
                torch.testing.assert_close(g, e, **tol, msg=lambda m, case=case: f"{case}: {m}")
        # the halves alone differ from the global batch: the test would notice a missing all-reduce
        _, half = _grads(case, slice(0, B // 2))
        assert any(not torch.allclose(h, e) for h, e in zip(half, expected))
    for out in ranks:
        a, b, c = out["unused"]
        torch.testing.assert_close(a, torch.full((3,), 1.5, dtype=DT))  # (1 + 2) / 2
        torch.testing.assert_close(b, torch.full((3,), 2.5, dtype=DT))  # (5 + 0) / 2: absent counts as zero
        assert c is None  # no gradient anywhere: the optimizer skips it, as in one process
        assert [float(v) for v in out["logged"]] == [0.5, 5.0]
        assert (out["broadcast"] == 0).all()  # rank 0's weights


# -- training -----------------------------------------------------------------------------
def _overrides(out: Path, *extra: str) -> list[str]:
    return [f"train.out_dir={out}", "train.world_size=2", "train.steps=20", "train.batch_size=64",
            "train.log_every=1", "train.ckpt_every=10", "eval.every=0", "eval.at_end=false", "sample.nfe=[1]",
            "sample.num=64", "design.backbone.width=32", "design.backbone.depth=1", "design.guidance=none", *extra]


def test_cli_trains_on_two_ranks_and_rank0_alone_writes(tmp_path, capsys):
    from ablate.train import load_checkpoint, main

    out = tmp_path / "run"
    assert main(["studies/toy_2d.yaml", *_overrides(out)]) == 0
    assert "trained" in capsys.readouterr().out
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["run/checkpoint.pt", "run/config.yaml", "run/design.json", "run/metrics.csv",
                       "run/metrics.jsonl", "run/samples/nfe_1.png"]
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "train/loss" in r["values"]]  # (the run's cost is its own line)
    assert train_steps == list(range(1, 21))  # each step once: rank 1 logs nothing
    assert all(torch.isfinite(torch.tensor(r["values"]["train/loss"])) for r in records if "train/loss" in r["values"])
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == 20


def _train_and_dump(cfg, **kwargs):
    """Train on this rank, then save the weights it ended with (each rank its own file)."""
    from ablate.train import train

    run = train(cfg, **kwargs)
    state = {**{f"model.{k}": v for k, v in run.model.state_dict().items()},
             **{f"ema.{k}": v for k, v in run.emas[float(cfg.train.ema)].state_dict().items()},
             **{f"weighting.{k}": v for k, v in run.comps.weighting.state_dict().items()}}
    torch.save(state, Path(cfg.train.out_dir).parent / f"weights_rank{ddp.rank()}.pt")
    return run


def test_ranks_end_with_identical_weights(tmp_path):
    cfg, _ = compose("studies/toy_2d.yaml", _overrides(tmp_path / "run", "design.weighting=learned_logvar",
                                                       "sample.nfe=[]"))
    run = ddp.launch(_train_and_dump, cfg, progress=False)
    assert run.step == 20 and not ddp.initialized()
    w0, w1 = (torch.load(tmp_path / f"weights_rank{r}.pt", weights_only=True) for r in range(2))
    assert w0.keys() == w1.keys() and any(k.startswith("weighting.") for k in w0)
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k  # bit-identical: same averaged gradients, same optimizer steps
    # the ranks trained (the weights moved away from the initialisation)
    cfg0, _ = compose("studies/toy_2d.yaml", _overrides(tmp_path / "init", "train.world_size=1", "train.steps=0",
                                                        "design.weighting=learned_logvar", "sample.nfe=[]"))
    from ablate.train import setup

    init = setup(cfg0).model.state_dict()
    assert any(not torch.equal(init[k], w0[f"model.{k}"]) for k in init)


def test_batch_that_does_not_split_is_refused_before_anything_starts(tmp_path, capsys):
    from ablate.train import main

    out = tmp_path / "run"
    assert main(["studies/toy_2d.yaml", *_overrides(out, "train.batch_size=63")]) == 2
    err = capsys.readouterr().err
    assert "train.batch_size=63" in err and "train.world_size=2" in err
    assert not out.exists()


def _fail_on_rank1(cfg, **kwargs):
    if ddp.rank() == 1:
        raise ValueError("rank 1 cannot go on")
    dist.all_reduce(torch.ones(2))  # rank 0 waits for a rank that is gone


def test_a_failing_rank_is_reported_not_a_hang(tmp_path):
    cfg, _ = compose("studies/toy_2d.yaml", _overrides(tmp_path / "run"))
    with pytest.raises(RuntimeError, match="rank 1 cannot go on"):
        ddp.launch(_fail_on_rank1, cfg)
    assert not ddp.initialized()
