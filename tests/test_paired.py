"""Paired comparisons (DESIGN §3 "Composition", §5): trials of one seed share every design-independent
source of randomness — the backbone's initial weights, the data order, ε, the label-dropout mask, the
draws behind the times — so designs can be compared seed by seed; a resumed run is still bit for bit
the uninterrupted one; data-parallel ranks still draw their own noise."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import ablate.train as train_mod
from ablate.config import compose
from ablate.train import setup, train
from components import compose as compose_mod
from components.compose import STREAMS, Streams, stream_seed

STEPS = 6
CHECK_AT = (0, 5)
# designs that draw differently: FM draws one time per row, MeanFlow pairs, ESC adds an r = 0 warm start and a
# plug-in velocity mask; "meanflow_esc_parts" is MeanFlow's sampler with ESC's learned log-variance weighting
# (parameters built before the backbone) and plug-in velocity (the target's own draws)
DESIGNS = {
    "flow_matching": ["design.preset=flow_matching"],
    "meanflow": ["design.preset=meanflow"],
    "esc": ["design.preset=esc"],
    "meanflow_esc_parts": ["design.preset=meanflow", "design.weighting=learned_logvar",
                           "design.target.velocity=plugin"],
}


def _cfg(tmp_path, name, *overrides, seed=0, steps=STEPS):
    cfg, _ = compose("meanflow", [f"train.out_dir={tmp_path / name}", f"train.steps={steps}", f"train.seed={seed}",
                                  "train.batch_size=32", "train.log_every=1", "train.ckpt_every=0",
                                  "train.classes_per_batch=0",  # the same loader for every design
                                  "sample.nfe=[1]", "sample.num=4", "eval.every=0", "eval.at_end=false",
                                  "design.backbone.depth=2", *overrides])
    return cfg


class _Spy:
    """Forwards everything to ``inner`` except the hooked attributes (and ``__call__``)."""

    def __init__(self, inner, **hooks):
        self.__dict__["_inner"], self.__dict__["_hooks"] = inner, hooks

    def __getattr__(self, name):
        return self._hooks[name] if name in self._hooks else getattr(self._inner, name)

    def __call__(self, *args, **kwargs):
        return self._hooks["__call__"](*args, **kwargs)


def _record(monkeypatch) -> dict:
    """Patch the loop's training_loss to record, per step, what every source of randomness produced."""
    log: dict[int, dict] = {}
    real = compose_mod.training_loss

    def wrapped(c, nets, x, labels, *, null_label, generator=None, step=0):
        rec = log.setdefault(step, {"x": x.clone(), "labels": labels.clone()})
        assert isinstance(generator, Streams), "the training loop must pass per-step streams"

        def sampler(n, *, step=0, generator=None, device="cpu"):
            rec["time_state"] = generator.get_state().clone()  # the draws behind the times
            rec["t"], rec["r"] = c.time_sampler(n, step=step, generator=generator, device=device)
            return rec["t"], rec["r"]

        def noise(x_, eps, t):
            rec["eps"] = eps.clone()
            return c.schedule.noise(x_, eps, t)

        def drop_labels(y, null, generator=None):
            rec["labels_state"] = generator.get_state().clone()
            out = c.guidance.drop_labels(y, null, generator)
            rec["dropped"] = out == null
            return out

        spied = dataclasses.replace(c, time_sampler=_Spy(c.time_sampler, __call__=sampler),
                                    schedule=_Spy(c.schedule, noise=noise),
                                    guidance=_Spy(c.guidance, drop_labels=drop_labels))
        return real(spied, nets, x, labels, null_label=null_label, generator=generator, step=step)

    monkeypatch.setattr(train_mod, "training_loss", wrapped)
    return log


def _backbone_weights(cfg) -> dict:
    return {k: v.clone() for k, v in setup(cfg).model.state_dict().items()}


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def paired_runs(tmp_path_factory):
    """Every design trained STEPS steps at seed 0, plus flow matching at seed 1: (records, initial weights)."""
    tmp = tmp_path_factory.mktemp("paired")
    mp = pytest.MonkeyPatch()
    logs, weights = {}, {}
    try:
        for seed, names in ((0, DESIGNS), (1, ["flow_matching"])):
            for name in names:
                cfg = _cfg(tmp, f"{name}-{seed}", *DESIGNS[name], seed=seed)
                weights[name, seed] = _backbone_weights(cfg)
                logs[name, seed] = _record(mp)
                train(cfg, progress=False)
                mp.undo()
    finally:
        mp.undo()
    return logs, weights


def test_same_seed_same_initial_backbone_weights(paired_runs):
    _, weights = paired_runs
    ref = weights["flow_matching", 0]
    for name in DESIGNS:  # incl. the designs whose weighting (learned_logvar's MLP) is built before the backbone
        assert _same_weights(weights[name, 0], ref), f"{name}: initial backbone weights differ from flow_matching's"
    assert not _same_weights(weights["flow_matching", 1], ref), "the seed must change the initial weights"


@pytest.mark.parametrize("step", CHECK_AT)
def test_same_seed_same_data_noise_and_label_dropout(paired_runs, step):
    logs, _ = paired_runs
    ref = logs["flow_matching", 0][step]
    for name in DESIGNS:
        rec = logs[name, 0][step]
        assert torch.equal(rec["x"], ref["x"]) and torch.equal(rec["labels"], ref["labels"]), f"{name}: data order"
        assert torch.equal(rec["eps"], ref["eps"]), f"{name}: ε differs at step {step}"
        assert torch.equal(rec["dropped"], ref["dropped"]), f"{name}: label-dropout mask differs at step {step}"
        assert torch.equal(rec["labels_state"], ref["labels_state"])
        # the stream behind the times starts at the same state: samplers that draw alike draw the same numbers
        assert torch.equal(rec["time_state"], ref["time_state"]), f"{name}: time draws differ at step {step}"
    # same sampler, different weighting and target (with draws of its own): identical (t, r)
    a, b = logs["meanflow", 0][step], logs["meanflow_esc_parts", 0][step]
    assert torch.equal(a["t"], b["t"]) and torch.equal(a["r"], b["r"])
    # a different seed changes every source
    other = logs["flow_matching", 1][step]
    assert not torch.equal(other["eps"], ref["eps"])
    assert not torch.equal(other["x"], ref["x"])
    assert not torch.equal(other["time_state"], ref["time_state"])
    assert not torch.equal(other["labels_state"], ref["labels_state"])


def test_steps_draw_fresh_noise_and_dropout_happens(paired_runs):
    logs, _ = paired_runs
    log = logs["flow_matching", 0]
    assert not torch.equal(log[0]["eps"], log[5]["eps"])  # a new ε every step, not one reused
    assert any(bool(log[k]["dropped"].any()) for k in log)  # the dropout masks compared above are not all-False


def test_streams_are_independent_deterministic_and_per_rank():
    s = Streams(3)
    draws = {name: torch.rand(8, generator=getattr(s.at(7), name)) for name in STREAMS}
    assert len({tuple(d.tolist()) for d in draws.values()}) == len(STREAMS)  # distinct streams
    # drawing more from one stream does not move another
    s.at(7)
    torch.rand(1000, generator=s.time)
    assert torch.equal(torch.rand(8, generator=s.noise), draws["noise"])
    # re-seeding reproduces; another step, seed or rank does not
    assert torch.equal(torch.rand(8, generator=Streams(3).at(7).noise), draws["noise"])
    for other in (Streams(3).at(8), Streams(4).at(7), Streams(3, rank=1).at(7)):
        assert not torch.equal(torch.rand(8, generator=other.noise), draws["noise"])
    assert stream_seed(3, 7, "noise") == stream_seed(3, 7, "noise") != stream_seed(3, 7, "noise", rank=1)
    assert 0 <= stream_seed(2 ** 40, 10 ** 9, "target", rank=63) < 2 ** 63


def test_ranks_get_their_own_noise_in_the_loop(tmp_path, monkeypatch):
    """The loop builds its streams with the data-parallel rank (checked without spawning processes)."""
    seen = []
    real = compose_mod.Streams

    class Recording(real):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            seen.append(self)

    monkeypatch.setattr(train_mod, "Streams", Recording)
    monkeypatch.setattr(train_mod.ddp, "rank", lambda: 1)
    monkeypatch.setattr(train_mod.ddp, "world_size", lambda cfg: 2)
    monkeypatch.setattr(train_mod.ddp, "initialized", lambda: True)
    monkeypatch.setattr(train_mod.ddp, "broadcast_modules", lambda *m: None)
    monkeypatch.setattr(train_mod.ddp, "average_gradients", lambda p: None)
    monkeypatch.setattr(train_mod.ddp, "all_mean_", lambda t: None)
    train(_cfg(tmp_path, "rank1", "design.preset=flow_matching", steps=1), progress=False)
    assert seen and seen[0].rank == 1 and seen[0].seed == 0
    assert not torch.equal(torch.randn(4, generator=Streams(0, rank=1).at(0).noise),
                           torch.randn(4, generator=Streams(0, rank=0).at(0).noise))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streams_on_cuda():
    s = Streams(5, "cuda")
    a = torch.randn(16, generator=s.at(2).noise, device="cuda")
    b = torch.randn(16, generator=s.at(2).noise, device="cuda")
    assert a.is_cuda and torch.equal(a, b)
    assert not torch.equal(a, torch.randn(16, generator=s.at(3).noise, device="cuda"))


def _losses(run_dir):
    return [json.loads(ln)["values"]["train/loss"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "train/loss" in ln]


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    design = DESIGNS["meanflow_esc_parts"]  # every stream in use, incl. the target's own draws
    train(_cfg(tmp_path, "full", *design, steps=8), progress=False)
    train(_cfg(tmp_path, "cut", *design, steps=4), progress=False)
    run = train(_cfg(tmp_path, "cut", *design, steps=8), progress=False)
    assert run.step == 8
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "full")


def test_evaluation_noise_does_not_depend_on_the_design(tmp_path, monkeypatch):
    from ablate.evaluation import Evaluator

    seen = []

    def fake_sample(net, guidance, noise, nfe, y, **kw):
        seen.append((noise.clone(), y.clone()))
        return noise

    monkeypatch.setattr(train_mod, "sample", fake_sample)
    for name in ("flow_matching", "esc"):
        cfg = _cfg(tmp_path, name, *DESIGNS[name], "eval.num_samples=20", "eval.batch_size=8")
        ev = Evaluator.__new__(Evaluator)  # only the sampling part (no feature extractor needed)
        ev.run, ev.cfg, ev.num = setup(cfg), cfg.eval, int(cfg.eval.num_samples)
        ev.scales, ev.interval = [None], None  # the design's own guidance
        list(ev.batches(1))
    per_design = len(seen) // 2
    assert per_design == 3
    for (na, ya), (nb, yb) in zip(seen[:per_design], seen[per_design:]):
        assert torch.equal(na, nb) and torch.equal(ya, yb)
