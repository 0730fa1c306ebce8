"""Seeds by racing: a grid study adds seeds only to the designs still not separable from the leader.

    search:
      seeds: {min: 2, max: 8, step: 1}

Round 0 trains every design with seeds 0..min−1. After each round the designs are ranked
from MLflow (``dashboards.tables.rank``: paired differences to the leader over shared seeds);
every design whose difference to the leader is not separable (or not yet decidable) gets
``step`` more seeds, and so does the leader (a paired comparison needs the leader's run at
the same seeds), up to ``max`` seeds each. The race ends when every design is separated from
the leader or has ``max`` seeds.

Each round is its own Tune experiment (round 0 is the study's, round k ≥ 1 is ``race<k>`` inside
the study's folder) under the same MLflow parent run, so rerunning the command restores
every finished round and recomputes the same decisions from the records: a race resumes
like any study. Every trial records why it exists in its ``seed_reason`` tag.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping


@dataclass(frozen=True)
class SeedPlan:
    """Seeds per design: ``min`` to start with, at most ``max``, ``step`` more per racing round."""

    min: int
    max: int
    step: int = 1

    @property
    def racing(self) -> bool:
        return self.max > self.min

    @classmethod
    def parse(cls, seeds: Any) -> "SeedPlan":
        """From ``search.seeds``: an int n (n seeds, no race) or a mapping {min, max, step}."""
        if isinstance(seeds, Mapping):
            extra = set(seeds) - {"min", "max", "step"}
            if extra:
                raise ValueError(f"unknown key(s) {sorted(extra)}; valid: min, max, step")
            lo = seeds.get("min", 2)
            hi = seeds.get("max", lo)
            step = seeds.get("step", 1)
            for k, v in (("min", lo), ("max", hi), ("step", step)):
                if isinstance(v, bool) or not isinstance(v, int):
                    raise ValueError(f"{k} must be an integer, got {v!r}")
            if lo < 1 or step < 1 or hi < lo:
                raise ValueError(f"need 1 ≤ min ≤ max and step ≥ 1, got min={lo}, max={hi}, step={step}")
            return cls(lo, hi, step)
        if isinstance(seeds, bool) or not isinstance(seeds, int):
            raise ValueError(f"must be a number of seeds or {{min: ..., max: ..., step: ...}}, got {seeds!r}")
        if seeds < 1:
            raise ValueError(f"must be ≥ 1, got {seeds}")
        return cls(seeds, seeds, 1)


def round_dir(root: str, study: str, k: int) -> tuple[str, str]:
    """(storage path, Tune experiment name) of racing round k: round 0 is the study's own experiment (so a plain
    study is unchanged), round k ≥ 1 lives inside it (``<root>/<study>/race<k>``, removed with the study)."""
    return (root, study) if k == 0 else (f"{root}/{study}", f"race{k}")


def design_label(slug: str, variant: str = "") -> str:
    """A design as the tables name it: the slug, with the train/data settings searched beside it."""
    return f"{slug} [{variant}]" if variant else slug


def decide(ranking, seeds_of: Mapping[str, int], plan: SeedPlan) -> tuple[str | None, dict[str, int], list[str]]:
    """(leader, {design: seeds to add}, contenders) from a ranking with ``design`` and ``separable`` columns.

    A contender is a ranked design other than the leader whose ``separable`` is not True (not
    separable, or undetermined with too few seeds). Contenders and the leader get up to ``step``
    seeds more, never past ``max``. Nothing to add: the race is over.
    """
    rows = [r for r in ranking.to_dict("records") if r.get("design") in seeds_of]
    rows = [r for r in rows if r.get("mean") == r.get("mean")]  # NaN: no finished trial, nothing to rank
    if not rows:
        return None, {}, []
    leader = rows[0]["design"]
    contenders = [r["design"] for r in rows[1:] if r.get("separable") is not True]
    add = {}
    for d in ([leader] if contenders else []) + contenders:
        more = min(plan.step, plan.max - seeds_of[d])
        if more > 0:
            add[d] = more
    if set(add) == {leader}:  # every contender is at max: more leader seeds would pair with nothing
        add = {}
    return leader, add, contenders


def next_trials(designs: Mapping[str, dict], seeds_of: Mapping[str, int], add: Mapping[str, int],
                describe: Callable[[dict, int], dict], reason: Callable[[str], str]) -> list[dict]:
    """The new trials of a round: for each design in ``add``, its next seeds, described by ``describe(over, seed)``."""
    out = []
    for d, more in add.items():
        for seed in range(seeds_of[d], seeds_of[d] + more):
            t = describe(designs[d]["overrides"], seed)
            t["reason"] = reason(d)
            out.append(t)
    return out


def run_race(trials: list[dict], plan: SeedPlan, fit: Callable[[int, list[dict]], list],
             describe: Callable[[dict, int], dict], ranking: Callable[[], Any],
             note: Callable[[int, str | None, list[str], list[dict]], None]) -> list:
    """Racing rounds 1, 2, … after round 0 (``trials``): each round ranks the records (``ranking()``), decides,
    runs the new trials (``fit(k, new)``, which returns that round's results) and reports (``note``).
    Returns the results of every raced round."""
    results, k = [], 1
    while True:
        designs: dict[str, dict] = {}
        seeds_of: dict[str, int] = {}
        for t in trials:
            d = design_label(t["slug"], t.get("variant", ""))
            designs.setdefault(d, t)
            seeds_of[d] = max(seeds_of.get(d, 0), int(t["seed"]) + 1)
        leader, add, contenders = decide(ranking(), seeds_of, plan)
        why = {d: f"raced round {k}: " + ("the leader, paired with its contenders" if d == leader
                                          else f"not separable from the leader {leader}") for d in add}
        new = next_trials(designs, seeds_of, add, describe, why.__getitem__) if add else []
        note(k, leader, contenders, new)
        if not new:
            return results
        results += fit(k, new)
        trials = trials + new
        k += 1
