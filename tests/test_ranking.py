"""The ranking's statistics on synthetic run tables with planted answers: intervals on log FID, paired
differences seed by seed, the n<3 rule, FID sampling noise, seeds per design, and the paper orderings."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dashboards import paper, report
from dashboards.paper import PUBLISHED_ORDER, compare_to_paper, preset_of_slug, presets
from dashboards.tables import compare, paired, rank

OBJ = "fid/nfe_1"


def _rows(design, fids, seeds=None, se=None, slug=None, reason=None, **extra):
    seeds = list(range(len(fids))) if seeds is None else seeds
    out = []
    for i, (s, f) in enumerate(zip(seeds, fids)):
        row = {"design": design, "slug": slug or design, "seed": s, "status": "FINISHED", "final/fid/nfe_1": f,
               "wall_s": 1.0, **extra}
        if se is not None:
            row["final/fid_se/nfe_1"] = se[i] if isinstance(se, (list, tuple)) else se
        if reason is not None:
            row["seed_reason"] = reason[i] if isinstance(reason, (list, tuple)) else reason
        out.append(row)
    return out


def _frame(*groups):
    return pd.DataFrame([r for g in groups for r in g])


def test_interval_is_on_log_fid_and_stays_positive():
    # a spread-out design: the arithmetic t-interval (the old one) reaches below zero, FID never does
    t = _frame(_rows("wild", [1.0, 12.0, 0.6, 2.0]), _rows("calm", [3.0, 3.1, 2.9, 3.0]))
    r = rank(t, OBJ).set_index("design")
    w = r.loc["wild"]
    assert w["ci_low"] > 0 and w["ci_low"] < w["gmean"] < w["ci_high"]
    logs = np.log([1.0, 12.0, 0.6, 2.0])
    assert w["gmean"] == pytest.approx(np.exp(logs.mean()))
    from scipy import stats
    hw = stats.t.ppf(0.975, 3) * logs.std(ddof=1) / 2
    assert w["ci_high"] == pytest.approx(np.exp(logs.mean() + hw))
    assert w["mean"] == pytest.approx(np.mean([1.0, 12.0, 0.6, 2.0])) and w["n"] == 4  # old columns kept
    assert {"mean", "std", "n", "ci_low", "ci_high", "failed", "stopped", "separable"} <= set(r.columns)


def test_pairing_by_seed_separates_a_small_consistent_gain_hidden_in_seed_noise():
    # seeds move every design a lot (shared randomness); B is 5 % worse than A at every seed
    base = [10.0, 20.0, 14.0, 30.0, 8.0]
    t = _frame(_rows("A", base), _rows("B", [1.05 * b * (1 + 0.005 * (-1) ** i) for i, b in enumerate(base)]))
    r = rank(t, OBJ).set_index("design")
    assert r.loc["A", "ci_high"] > r.loc["B", "ci_low"]  # the per-design intervals overlap widely ...
    b = r.loc["B"]
    assert b["verdict"] == "separable" and b["separable"] is True  # ... yet the paired difference is clear
    assert b["ratio_low"] > 1.0 and b["ratio"] == pytest.approx(1.05, rel=0.01) and b["n_paired"] == 5
    assert r.loc["A", "verdict"] == "leader" and r.loc["A", "separable"] is True


def test_paired_interval_containing_one_is_not_separable():
    t = _frame(_rows("A", [10.0, 20.0, 14.0, 30.0]), _rows("B", [10.5, 19.4, 14.6, 29.5]))
    r = rank(t, OBJ)
    row = r[r["rank"] == 2].iloc[0]
    assert row["ratio_low"] < 1.0 < row["ratio_high"]
    assert row["separable"] is False and row["verdict"] == "not separable"
    assert r.loc[0, "separable"] is False  # the leader is not separable from everything


def test_only_shared_seeds_are_paired():
    # the leader raced to 6 seeds, the other kept its 3 initial ones: n_paired is 3, not 6
    t = _frame(_rows("A", [10.0, 11.0, 12.0, 10.5, 11.5, 12.5]),
               _rows("B", [20.0, 22.0, 24.0], seeds=[0, 1, 2]), _rows("C", [15.0, 16.0], seeds=[7, 8]))
    r = rank(t, OBJ).set_index("design")
    assert r.loc["B", "n_paired"] == 3 and r.loc["B", "ratio"] == pytest.approx(2.0)
    assert r.loc["C", "n_paired"] == 0 and r.loc["C", "separable"] is None
    assert "no seeds in common" in r.loc["C", "vs_leader"]


def test_two_seeds_give_no_interval_and_are_undetermined_without_a_wide_sampling_margin():
    t = _frame(_rows("A", [10.0, 10.2]), _rows("B", [30.0, 31.0]))
    r = rank(t, OBJ).set_index("design")
    assert r.loc["B", "interval"] == "n=2: too few seeds for an interval"
    assert "n=2: too few seeds for an interval" in r.loc["B", "vs_leader"]
    assert np.isnan(r.loc["B", "ratio_low"]) and r.loc["B", "separable"] is None  # no fid_se: undetermined
    assert r.loc["B", "verdict"] == "undetermined" and r.loc["A", "separable"] is None
    assert r.loc["B", "ci_low"] == 0 and r.loc["B", "ci_high"] == np.inf  # no interval claimed
    # small sampling SE: a 3× gap is far beyond 4 combined SE at both seeds -> separable
    t = _frame(_rows("A", [10.0, 10.2], se=0.1), _rows("B", [30.0, 31.0], se=0.3))
    assert rank(t, OBJ).set_index("design").loc["B", "separable"] is True
    # large sampling SE: within 4 combined SE -> undetermined
    t = _frame(_rows("A", [10.0, 10.2], se=3.0), _rows("B", [14.0, 14.5], se=3.0))
    assert rank(t, OBJ).set_index("design").loc["B", "separable"] is None
    # the gap flips sign between the two seeds: never separable by the SE rule
    t = _frame(_rows("A", [10.0, 30.0], se=0.01), _rows("B", [20.0, 15.0], se=0.01))
    assert rank(t, OBJ).iloc[1]["separable"] is None


def test_sampling_se_beside_seed_sd_and_the_more_seeds_or_samples_hint():
    t = _frame(_rows("seedy", [10.0, 14.0, 8.0, 12.0], se=0.2), _rows("sampley", [20.0, 20.3, 19.8, 20.1], se=0.5))
    r = rank(t, OBJ).set_index("design")
    assert r.loc["seedy", "fid_se"] == pytest.approx(0.2) and r.loc["seedy", "std"] > 2
    assert r.loc["seedy", "noise"].startswith("more seeds")
    assert r.loc["sampley", "noise"].startswith("more samples")
    view = report.ranking_view(rank(t, OBJ))
    assert {"sampling SE", "more seeds or more samples?", "sd over seeds"} <= set(view.columns)


def test_seeds_per_design_and_why():
    t = _frame(_rows("A", [10.0, 10.1, 10.2, 10.3], reason=["initial", "initial", "raced round 1: not separable "
                                                             "from B", "raced round 1: not separable from B"]),
               _rows("B", [10.0, 10.2], reason="initial"),
               [{"design": "B", "slug": "B", "seed": 5, "status": "FAILED", "final/fid/nfe_1": np.nan,
                 "seed_reason": "raced round 1: not separable from A"}])
    r = rank(t, OBJ).set_index("design")
    assert r.loc["A", "seeds"] == 4 and r.loc["B", "seeds"] == 3 and r.loc["B", "n"] == 2
    assert r.loc["A", "seed_reason"] == "2× initial; 2× raced round 1: not separable from B"
    assert "1× raced round 1" in r.loc["B", "seed_reason"] and r.loc["B", "failed"] == 1


def test_raw_scale_for_objectives_that_can_be_negative():
    t = _frame(_rows("A", [-1.0, -1.2, -0.9, -1.1]), _rows("B", [0.5, 0.6, 0.4, 0.55]))
    r = rank(t, OBJ)
    assert r.attrs["scale"] == "raw" and r.loc[0, "design"] == "A"
    assert r.loc[1, "separable"] is True and np.isnan(r.loc[1, "ratio"]) and r.loc[1, "diff_low"] > 0


# -- paper orderings ----------------------------------------------------------------------------------
PUB = {"esc": 2.9, "meanflow": 3.15, "imm": 4.41, "sct_linear": 4.46, "sct": 7.14, "scd": 12.92,
       "ct_linear": 14.82, "ct": 18.12}


def _study(fids: dict[str, float], n_seeds=4, noise=0.002, seed=0, se=None):
    rng = np.random.default_rng(seed)
    shared = rng.normal(0, 0.2, n_seeds)  # per-seed luck shared by every design
    rows = []
    for p, f in fids.items():
        vals = [f * np.exp(shared[s] + noise * rng.standard_normal()) for s in range(n_seeds)]
        rows += _rows(f"{p}-design", vals, preset=p, se=se)
    return pd.DataFrame(rows)


def test_published_order_gives_rho_one_and_reversed_minus_one():
    cmp = compare_to_paper(_study(PUB))
    assert cmp.n == 8 and cmp.rho == pytest.approx(1.0)
    assert list(cmp.table["preset"]) == list(PUBLISHED_ORDER)
    assert (cmp.table["our_rank"] == cmp.table["published_rank"]).all()
    row = cmp.table.set_index("preset").loc["meanflow"]
    assert row["published_fid"] == 3.15 and np.isnan(cmp.table.set_index("preset").loc["esc", "published_fid"])
    assert "< MeanFlow" in cmp.table.set_index("preset").loc["esc", "published"]
    rev = {p: 1.0 / v for p, v in PUB.items()}
    assert compare_to_paper(_study(rev)).rho == pytest.approx(-1.0)
    sub = compare_to_paper(_study({"ct": 5.0, "imm": 6.0, "scd": 7.0}))  # only the presets both have
    assert sub.n == 3 and list(sub.table["preset"]) == ["imm", "scd", "ct"]  # the published order
    assert list(sub.table["published_rank"]) == [1, 2, 3] and list(sub.table["our_rank"]) == [2, 3, 1]
    assert sub.rho == pytest.approx(-0.5)  # 1 - 6·(1 + 1 + 4)/(3·8)


def test_linear_vs_cosine_pairs():
    cmp = compare_to_paper(_study(PUB))
    pairs = cmp.pairs.set_index("pair")
    assert set(pairs.index) == {"CT-linear vs CT", "sCT-linear vs sCT"}
    assert pairs["linear_ahead"].all() and pairs["paper_linear_ahead"].all() and pairs["as_in_paper"].all()
    assert all(s is True for s in pairs["separable"]) and "as in the paper" in pairs.loc["CT-linear vs CT", "verdict"]
    flipped = dict(PUB, ct=10.0, ct_linear=14.82)  # cosine CT ahead of CT-linear here
    pairs = compare_to_paper(_study(flipped)).pairs.set_index("pair")
    assert pairs.loc["CT-linear vs CT", "linear_ahead"] is False
    assert pairs.loc["CT-linear vs CT", "as_in_paper"] is False
    assert "opposite to the paper" in pairs.loc["CT-linear vs CT", "verdict"]
    assert pairs.loc["sCT-linear vs sCT", "as_in_paper"] is True
    level = dict(PUB, sct=4.46)  # same planted FID: not separable
    pairs = compare_to_paper(_study(level)).pairs.set_index("pair")
    assert pairs.loc["sCT-linear vs sCT", "separable"] is False
    assert "not separable" in pairs.loc["sCT-linear vs sCT", "verdict"]
    none = compare_to_paper(_study({"ct": 5.0, "imm": 7.0, "scd": 6.0}))
    assert none.pairs.empty


def test_esc_at_least_level_with_meanflow():
    assert compare_to_paper(_study(PUB)).esc["at_least_level"] is True  # ESC ahead
    level = compare_to_paper(_study(dict(PUB, esc=3.15))).esc
    assert level["at_least_level"] is True and level["separable"] is False
    behind = compare_to_paper(_study(dict(PUB, esc=5.0))).esc
    assert behind["at_least_level"] is False and behind["ratio"] > 1 and "behind" in behind["verdict"]
    few = compare_to_paper(_study(dict(PUB, esc=5.0), n_seeds=2)).esc
    assert few["at_least_level"] is None and few["n_paired"] == 2  # two seeds, no fid_se: undetermined
    few_se = compare_to_paper(_study(dict(PUB, esc=5.0), n_seeds=2, se=0.02)).esc
    assert few_se["at_least_level"] is False  # far beyond 4 sampling SE at both seeds
    assert compare_to_paper(_study({"meanflow": 3.0, "imm": 4.0, "ct": 9.0})).esc == {}


def test_presets_from_the_slug_when_not_recorded():
    slugs = paper.preset_slugs()
    pre, post = slugs["ct_linear"]
    assert preset_of_slug(f"{pre}-dit_s2-{post}") == "ct_linear"
    assert preset_of_slug(f"{slugs['ct'][0]}-mlp-{slugs['ct'][1]}") == "ct"
    assert preset_of_slug(f"{slugs['esc'][0]}-dit_t2-{slugs['esc'][1]}") == "esc"
    assert preset_of_slug("cosine-discrete64-ct-l2-dit_t2-cfg") is None
    t = _frame(_rows("x [train.lr=0.001]", [3.0, 3.1, 3.2], slug=f"{slugs['imm'][0]}-dit_t2-{slugs['imm'][1]}"),
               _rows("y", [3.0], slug="something-else"))
    assert presets(t).to_dict() == {"x [train.lr=0.001]": "imm", "y": None}


def test_report_shows_paired_columns_and_the_paper_section(monkeypatch):
    t = _study(PUB)
    t.loc[(t["design"] == "scd-design") & (t["seed"] >= 2), "status"] = "FAILED"  # scd: 2 finished seeds
    t["error"] = ""
    monkeypatch.setattr(report, "load_trials", lambda study, uri=None: t)
    monkeypatch.setattr(report, "load_histories", lambda study, uri=None: pd.DataFrame(
        columns=["run_id", "design", "seed", "metric", "step", "value"]))
    monkeypatch.setattr(report, "sample_grids", lambda trials, uri: {})
    page, summary = report.build("synthetic")
    assert "vs leader (paired ratio, 95 % interval)" in page and "n=2: too few seeds for an interval" in page
    assert "<h2>Paper orderings</h2>" in page and "Spearman" in page and "CT-linear vs CT" in page
    assert "ESC vs MeanFlow" in page
    text = report.terminal_summary(summary)
    assert "paper orderings" in text and "Spearman's rho over 8 presets: 1.00" in text
    assert "n=2: too few seeds for an interval" in report.terminal_summary(summary, top=10)
    few = t[t["preset"].isin(["ct", "imm"])]  # fewer than 3 presets: no paper section
    monkeypatch.setattr(report, "load_trials", lambda study, uri=None: few)
    page, summary = report.build("synthetic")
    assert "Paper orderings" not in page and "paper orderings" not in report.terminal_summary(summary)


def test_compare_is_the_paired_rule_for_two_named_designs():
    t = _frame(_rows("A", [10.0, 20.0, 14.0]), _rows("B", [20.0, 40.0, 28.0]))
    c = compare(t, "B", "A", OBJ)
    assert c["ratio"] == pytest.approx(2.0) and c["n_paired"] == 3 and c["separable"] is True
    same = paired(pd.DataFrame({"value": [1.0, 2.0, 3.0], "se": np.nan}, index=[0, 1, 2]),
                  pd.DataFrame({"value": [1.0, 2.0, 3.0], "se": np.nan}, index=[0, 1, 2]))
    assert same["separable"] is False and same["ratio"] == 1.0
