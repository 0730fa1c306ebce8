"""Seeds by racing: the plan, the round decision, and a real raced study (local Ray, MLflow SQLite)."""
from __future__ import annotations

import pandas as pd
import pytest

from ablate.race import SeedPlan, decide, next_trials, round_dir, run_race


def test_seed_plan_parses_int_and_mapping():
    assert SeedPlan.parse(3) == SeedPlan(3, 3, 1) and not SeedPlan.parse(3).racing
    assert SeedPlan.parse({"min": 2, "max": 8}) == SeedPlan(2, 8, 1) and SeedPlan.parse({"min": 2, "max": 8}).racing
    for bad in (0, -1, True, "3", {"min": 3, "max": 2}, {"min": 0, "max": 2}, {"min": 2, "max": 4, "step": 0},
                {"min": 2, "maxx": 4}, {"min": 2.5, "max": 4}):
        with pytest.raises(ValueError):
            SeedPlan.parse(bad)


def _ranking(rows):
    return pd.DataFrame(rows, columns=["design", "mean", "separable"])


def test_decide_adds_seeds_to_contenders_and_the_leader_only():
    plan = SeedPlan(2, 4, 1)
    ranking = _ranking([("a", 1.0, None), ("b", 1.1, False), ("c", 5.0, True), ("d", 1.2, None)])
    leader, add, contenders = decide(ranking, {"a": 2, "b": 2, "c": 2, "d": 2}, plan)
    assert leader == "a" and contenders == ["b", "d"]
    assert add == {"a": 1, "b": 1, "d": 1}  # c is separated: no more seeds for it


def test_decide_stops_when_separated_or_at_max():
    plan = SeedPlan(2, 3, 1)
    assert decide(_ranking([("a", 1.0, None), ("b", 9.0, True)]), {"a": 2, "b": 2}, plan)[1] == {}
    # every contender at max: more seeds for the leader alone would pair with nothing
    assert decide(_ranking([("a", 1.0, None), ("b", 1.1, False)]), {"a": 2, "b": 3}, plan)[1] == {}
    assert decide(_ranking([("a", 1.0, None), ("b", 1.1, False)]), {"a": 3, "b": 3}, plan)[1] == {}
    # a design with no finished trial (NaN mean) is never raced
    assert decide(_ranking([("a", 1.0, None), ("b", float("nan"), None)]), {"a": 2, "b": 2}, plan)[1] == {}
    assert decide(_ranking([]), {}, plan) == (None, {}, [])


def test_next_trials_continue_each_designs_seed_sequence():
    designs = {"a": {"overrides": {"design.target": "meanflow"}}, "b": {"overrides": {"design.target": "shortcut"}}}
    made = next_trials(designs, {"a": 2, "b": 3}, {"a": 2, "b": 1},
                       lambda over, seed: {"over": over, "seed": seed}, lambda d: f"raced: {d}")
    assert [(m["over"]["design.target"], m["seed"], m["reason"]) for m in made] == [
        ("meanflow", 2, "raced: a"), ("meanflow", 3, "raced: a"), ("shortcut", 3, "raced: b")]
    assert round_dir("/r", "s", 0) == ("/r", "s") and round_dir("/r", "s", 2) == ("/r/s", "race2")


def test_run_race_adds_rounds_until_nothing_is_left_to_decide():
    """Two designs that never separate (a tie) race to max; a clearly worse one gets no more seeds."""
    first = [{"slug": s, "seed": i, "overrides": {"design.target": s}} for s in ("a", "b", "c") for i in range(2)]
    done: list[dict] = []

    def ranking():
        return _ranking([("a", 1.0, None), ("b", 1.0, False), ("c", 9.0, True)])

    def fit(k, new):
        done.extend({**t, "round": k} for t in new)
        return [k] * len(new)

    notes = []
    results = run_race(first, SeedPlan(2, 4, 1), fit, lambda over, seed: {"slug": over["design.target"], "seed": seed},
                       ranking, lambda k, leader, contenders, new: notes.append((k, leader, contenders, len(new))))
    assert [(t["slug"], t["seed"], t["round"]) for t in done] == [("a", 2, 1), ("b", 2, 1), ("a", 3, 2), ("b", 3, 2)]
    assert results == [1, 1, 2, 2]
    assert notes == [(1, "a", ["b"], 2), (2, "a", ["b"], 2), (3, "a", ["b"], 0)]
    assert done[0]["reason"].startswith("raced round 1: the leader") and "not separable from the leader a" in done[1]["reason"]


RACE = """
name: race
data: {name: gaussian_mixture, modes: 2, n: 2000}
design:
  preset: flow_matching
  guidance: none
  backbone: {name: mlp, width: 16, depth: 1}
train: {steps: 20, batch_size: 64, log_every: 10, ckpt_every: 20}
eval: {every: 0, nfe: [1], num_samples: 200}
sample: {nfe: [1], num: 50}
search:
  grid:
    train.log_every: [10, 20]   # two labels of one design: a tie that never separates, so it races to max
  seeds: {min: 1, max: 2}
resources: {cpus_per_trial: 1}
"""


@pytest.mark.slow
def test_a_raced_study_adds_seeds_to_the_tie_and_resumes_without_new_trials(tmp_path):
    from mlflow.tracking import MlflowClient

    from ablate.run import main

    path = tmp_path / "race.yaml"
    path.write_text(RACE)
    argv = [str(path), f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"resources.storage={tmp_path}/ray"]
    assert main(argv) == 0
    c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = c.get_experiment_by_name("race")

    def children():
        return [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("ablate_role") == "trial"]

    runs = children()
    got = sorted((r.data.tags["variant"], r.data.tags["seed"], r.data.tags["seed_reason"].split(":")[0]) for r in runs)
    assert got == [("train.log_every=10", "0", "initial"), ("train.log_every=10", "1", "raced round 1"),
                   ("train.log_every=20", "0", "initial"), ("train.log_every=20", "1", "raced round 1")]
    assert {r.info.status for r in runs} == {"FINISHED"}
    parent = next(r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("ablate_role") == "study")
    assert parent.data.tags["racing"].startswith("min=1, max=2")
    assert "race over" in parent.data.tags["race.round2"]
    assert (tmp_path / "ray" / "race" / "race1").is_dir()  # the raced round lives inside the study's folder
    assert main(argv) == 0  # the same command: every round restored, the same decisions, nothing new
    assert sorted(r.data.tags["trial_key"] for r in children()) == sorted(r.data.tags["trial_key"] for r in runs)
