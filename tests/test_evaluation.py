"""Evaluation (FID/KID/PRC) end to end: sanity of the numbers, the closed-form Gaussian case, the caches,
the feature extractors, FID during training, the evaluate CLI and latent datasets.

Everything runs on the CPU with one thread (tiny convolutions and MLPs are much faster that way than with
oversubscribed threads on a small machine) and writes only under pytest's temporary folders.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ablate.config import compose
from ablate.data import Data, load_data
from ablate.evaluation import EvalError, Evaluator, check_comparable, metrics_from_features, reference
from ablate.features import INCEPTION_FILE, FeatureError, build_extractor, cache_root


# -- shared setup ----------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _one_thread_and_private_cache(tmp_path_factory):
    """One intra-op thread (restored afterwards) and $ABLATE_CACHE in a temporary folder."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ABLATE_CACHE", str(tmp_path_factory.mktemp("ablate_cache")))
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    return load_data({"name": "digits"})


@pytest.fixture(scope="module")
def digits_clf(digits, tmp_path_factory):
    """The default digits classifier extractor, trained once into its own cache folder."""
    cache = tmp_path_factory.mktemp("clf_cache")
    return build_extractor("classifier", digits, cache), cache


def _noisy(x: torch.Tensor, std: float, seed: int = 0, clamp: bool = False) -> torch.Tensor:
    y = x + std * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    return y.clamp(-1, 1) if clamp else y


# -- 1. the data against itself ----------------------------------------------------------------------
def test_digits_test_split_is_close_to_train_and_fid_grows_with_noise(digits, digits_clf, tmp_path):
    ex, _ = digits_clf
    ref = reference(digits, ex, "train", cache_dir=tmp_path)
    assert metrics_from_features(ref.features, ref)["fid"] == pytest.approx(0.0, abs=1e-6)  # identical sets
    fid = lambda x: metrics_from_features(ex(x), ref)["fid"]  # noqa: E731
    clean = fid(digits.x_test)  # held-out digits: the same distribution, 359 other samples
    one_class = fid(digits.x_test[digits.labels_test == 0])
    uniform = fid(torch.rand(len(digits.x_test), 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    # only the finite-sample bias separates the held-out split from the reference: it is tiny on the
    # scale of FIDs of wrong distributions (a single class; uniform noise images)
    assert clean < 0.05 * one_class, (clean, one_class)
    assert clean < 0.05 * uniform, (clean, uniform)
    stds = [0.1, 0.2, 0.4, 0.8]
    fids = [clean] + [fid(_noisy(digits.x_test, s, clamp=True)) for s in stds]
    assert all(a < b for a, b in zip(fids, fids[1:])), dict(zip([0.0] + stds, fids))
    assert fids[-1] > 10 * clean


def _toy_sampling_floor(x_ref: torch.Tensor, n_ref: int, n_gen: int) -> float:
    """E[FID] between two independent Gaussian samples with the covariance of x_ref (sizes n_ref, n_gen).

    For Σ ≈ σ²I in d dimensions: the means contribute σ²·d·(1/n₁ + 1/n₂); the sample covariances differ
    by Δ with E‖Δ‖²_F = σ⁴·d(d+1)·(1/n₁ + 1/n₂), and the Bures term is ‖Δ‖²_F/(4σ²) to second order.
    """
    d = x_ref.shape[1]
    sigma2 = float(torch.cov(x_ref.T.double()).trace()) / d
    return sigma2 * (d + d * (d + 1) / 4) * (1 / n_ref + 1 / n_gen)


@pytest.mark.parametrize("toy", ["checkerboard", "gaussian_mixture", "moons"])
def test_two_draws_of_a_toy_have_fid_at_the_sampling_floor(toy, tmp_path):
    data = load_data({"name": toy})
    ex = build_extractor("raw", data)
    assert ex.provenance == {"name": "raw"}
    ref = reference(data, ex, cache_dir=tmp_path)
    assert metrics_from_features(ref.features, ref)["fid"] == pytest.approx(0.0, abs=1e-9)
    other = load_data({"name": toy, "seed": 1}).x  # an independent draw of the same distribution
    floor = _toy_sampling_floor(data.x, len(data.x), len(other))
    fid = lambda x: metrics_from_features(ex(x), ref)["fid"]  # noqa: E731
    bound = 5 * floor  # ~ the 99.9 % quantile of a χ²(5)/5 fluctuation for Gaussian data (lighter tails here)
    assert fid(other) < bound, (fid(other), bound)
    assert fid(other + torch.tensor([0.1, 0.0])) > bound  # the bound does discriminate: a 0.1 shift is seen
    stds = [0.25, 0.5, 1.0, 2.0]  # well above the sampling floor (the added Bures term grows like d·s⁴/4)
    fids = [fid(other)] + [fid(_noisy(other, s)) for s in stds]
    assert all(a < b for a, b in zip(fids, fids[1:])), dict(zip([0.0] + stds, fids))


# -- 2. closed form ---------------------------------------------------------------------------------
def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _frechet(m1, s1, m2, s2) -> tuple[float, float]:
    """(‖m1 − m2‖², tr(S1 + S2 − 2(S1^½ S2 S1^½)^½))."""
    r = _psd_sqrt(s1)
    return float(((m1 - m2) ** 2).sum()), float(np.trace(s1 + s2 - 2 * _psd_sqrt(r @ s2 @ r)))


def _frechet_sd(m1, s1, m2, s2, n1, n2) -> float:
    """Delta-method standard deviation of the plug-in Fréchet distance from n1 and n2 Gaussian samples.

    ∂/∂m1 = 2(m1 − m2); ∂/∂S1 = I − T with T = S1^-½ (S1^½ S2 S1^½)^½ S1^-½ (the transport map S1 → S2),
    ∂/∂S2 = I − T⁻¹; Var(m̂ᵀa) = aᵀSa/n and Var tr(AŜ) = 2 tr(ASAS)/n for Gaussian samples.
    """
    eye, delta = np.eye(len(m1)), m1 - m2
    r = _psd_sqrt(s1)
    ri = np.linalg.inv(r)
    t = ri @ _psd_sqrt(r @ s2 @ r) @ ri
    a1, a2 = eye - t, eye - np.linalg.inv(t)
    var = ((4 * delta @ s1 @ delta + 2 * np.trace(a1 @ s1 @ a1 @ s1)) / n1
           + (4 * delta @ s2 @ delta + 2 * np.trace(a2 @ s2 @ a2 @ s2)) / n2)
    return float(np.sqrt(var))


@pytest.mark.parametrize("d", [2, 4])
def test_raw_fid_matches_the_closed_form_frechet_distance(d, tmp_path):
    rng = np.random.default_rng(d)
    a, b = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    s1, s2 = a @ a.T / d + 0.2 * np.eye(d), b @ b.T / d + 0.5 * np.eye(d)  # correlated, non-commuting
    m1, m2 = np.linspace(0.6, -0.6, d), np.zeros(d)
    n = 20000
    x2 = torch.from_numpy(rng.multivariate_normal(m2, s2, n))
    x1 = torch.from_numpy(rng.multivariate_normal(m1, s1, n))
    data = Data("gaussian", x2, torch.zeros(n, dtype=torch.long), 0, "vector",
                meta={"spec": {"name": "gaussian", "d": d}})
    ex = build_extractor("raw", data)
    ref = reference(data, ex, cache_dir=tmp_path)
    got = metrics_from_features(ex(x1), ref)["fid"]
    mean_part, cov_part = _frechet(m1, s1, m2, s2)
    exact = mean_part + cov_part
    # 5 delta-method standard deviations plus a bound on the O(1/n) plug-in bias (tr S/n from the means,
    # ≈ (d+1)/4 · tr S/n from the covariances)
    tol = 5 * _frechet_sd(m1, s1, m2, s2, n, n) + (d + 1) * (np.trace(s1) + np.trace(s2)) / n
    assert abs(got - exact) < tol, (got, exact, tol)
    # dropping or mis-scaling either term would miss by several tolerances
    assert tol < 0.25 * min(mean_part, cov_part), (tol, mean_part, cov_part)


# -- 3. reference-statistics cache -------------------------------------------------------------------
def test_reference_cache_hits_and_keys(digits, digits_clf, tmp_path):
    raw = build_extractor("raw", digits)
    first = reference(digits, raw, "train", cache_dir=tmp_path)
    again = reference(digits, raw, "train", cache_dir=tmp_path)
    assert not first.cache_hit and again.cache_hit
    assert again.provenance == first.provenance
    assert np.array_equal(first.stats["mu"], again.stats["mu"])
    assert np.array_equal(first.stats["sigma"], again.stats["sigma"])
    assert torch.equal(first.features, again.features)
    assert first.features.shape == (len(digits.x), 64)

    # one setting changed at a time from (digits, train split, 300 samples, raw features)
    base = reference(digits, raw, "train", count=300, cache_dir=tmp_path)
    test = reference(digits, raw, "test", count=300, cache_dir=tmp_path)  # same count: only the split differs
    sub = reference(digits, raw, "train", count=500, cache_dir=tmp_path)
    clf = reference(digits, digits_clf[0], "train", count=300, cache_dir=tmp_path)
    quick = build_extractor({"name": "classifier", "epochs": 1}, digits, tmp_path / "clf")  # same layer, input
    clf_quick = reference(digits, quick, "train", count=300, cache_dir=tmp_path)
    resplit = load_data({"name": "digits", "seed": 1})  # another dataset spec (another train/test split)
    other_data = reference(resplit, raw, "train", count=300, cache_dir=tmp_path)
    changed = [test, sub, clf, clf_quick, other_data]
    assert not base.cache_hit and not any(r.cache_hit for r in changed)
    keys = {r.provenance["key"] for r in [first, base, *changed]}
    assert len(keys) == 7
    assert sorted(p.stem for p in (tmp_path / "reference").glob("*.npz")) == sorted(keys)
    assert [len(r.features) for r in (base, test, sub)] == [300, 300, 500]
    assert clf.features.shape[1] == 64 and clf.provenance["extractor"] == "classifier"
    assert not np.allclose(test.stats["mu"], base.stats["mu"])
    assert not np.allclose(other_data.stats["mu"], base.stats["mu"])

    # each entry now hits, and a subset is the same seeded subset in a fresh cache
    assert all(reference(digits, raw, s, count=c, cache_dir=tmp_path).cache_hit
               for s, c in [("train", 300), ("test", 300), ("train", 500)])
    fresh = reference(digits, raw, "train", count=500, cache_dir=tmp_path / "other")
    assert not fresh.cache_hit and torch.equal(fresh.features, sub.features)
    # count ≥ the split size means the whole split: one entry
    assert reference(digits, raw, "train", count=10 ** 6, cache_dir=tmp_path).cache_hit
    with pytest.raises(EvalError, match="no such split"):
        reference(digits, raw, "validation", cache_dir=tmp_path)


# -- 4. the classifier extractor ---------------------------------------------------------------------
def test_classifier_is_accurate_deterministic_and_cached(digits, digits_clf, tmp_path):
    ex, cache = digits_clf
    assert ex.provenance["name"] == "classifier"
    assert ex.provenance["test_accuracy"] >= 0.95, ex.provenance
    files = sorted((cache_root(cache) / "classifiers").iterdir())
    weights = cache_root(cache) / "classifiers" / f"{ex.provenance['weights']}.pt"
    assert weights in files
    mtime = weights.stat().st_mtime_ns

    again = build_extractor("classifier", digits, cache)  # reuses the file: nothing retrained or rewritten
    assert again.provenance == ex.provenance
    assert sorted((cache_root(cache) / "classifiers").iterdir()) == files
    assert weights.stat().st_mtime_ns == mtime

    other = build_extractor("classifier", digits, tmp_path)  # a second, independent training
    assert other.provenance == ex.provenance
    a = torch.load(weights, weights_only=True)
    b = torch.load(tmp_path / "classifiers" / weights.name, weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["meta"] == b["meta"]
    assert torch.equal(ex(digits.x_test[:50]), other(digits.x_test[:50]))

    # any training setting is part of the cache key
    assert build_extractor({"name": "classifier", "epochs": 1}, digits, tmp_path).id != ex.id
    with pytest.raises(FeatureError, match="labelled image"):
        build_extractor("classifier", load_data({"name": "moons"}), tmp_path)


def test_classifier_trains_even_when_autograd_is_off(digits, tmp_path):
    # ablate.evaluate.load_run switches autograd off before the Evaluator builds (and maybe trains) its extractor
    with torch.no_grad():
        ex = build_extractor({"name": "classifier", "epochs": 5}, digits, tmp_path)
    assert (tmp_path / "classifiers" / f"{ex.provenance['weights']}.pt").is_file()
    assert ex.provenance["test_accuracy"] > 0.3  # it did learn something (chance: 0.1)


# -- 5. Inception weights are never downloaded --------------------------------------------------------
def test_missing_inception_weights_name_the_expected_path(digits, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / INCEPTION_FILE
    with pytest.raises(FeatureError) as err:
        build_extractor("inception", digits)
    assert str(expected) in str(err.value)
    assert "weights-inception-2015-12-05-6726825d.pth" in str(err.value)

    given = tmp_path / "elsewhere" / "inception.pth"
    with pytest.raises(FeatureError) as err:
        build_extractor({"name": "inception", "weights": str(given)}, digits)
    assert str(given) in str(err.value)

    given.parent.mkdir()
    given.write_bytes(b"not a checkpoint")  # present but not a plain tensor file: refused, not unpickled
    with pytest.raises(FeatureError, match="not a plain tensor state dict"):
        build_extractor({"name": "inception", "weights": str(given)}, digits)


# -- 6. comparability -----------------------------------------------------------------------------------
def test_check_comparable(digits_clf, tmp_path):
    from ablate.train import setup

    _, clf_cache = digits_clf
    cfg, _ = compose("meanflow", [f"train.out_dir={tmp_path / 'run'}", "eval.num_samples=100",
                                  f"eval.cache_dir={clf_cache}", "eval.extractor=classifier"])
    run = setup(cfg)
    base = Evaluator(run, cfg.eval)

    def variant(**changes):
        ec = cfg.eval.copy()
        for k, v in changes.items():
            ec[k] = v
        return Evaluator(run, ec).provenance

    check_comparable([base.provenance, variant(), Evaluator(run, cfg.eval).provenance])  # identical: fine
    check_comparable([base.provenance])
    for changed in (variant(num_samples=200), variant(extractor="raw"), variant(reference_samples=500),
                    variant(reference_split="test")):
        with pytest.raises(EvalError, match="cannot be compared"):
            check_comparable([base.provenance, changed])
        with pytest.raises(EvalError):
            check_comparable([changed, base.provenance, base.provenance])


# -- 7. FID during training ------------------------------------------------------------------------------
# Two Gaussians far apart on a line, normalised: strongly anisotropic (x-variance ≈ 3.5, y-variance ≈ 0.02),
# so raw FID tells noise (N(0, I), what the zero-initialised untrained model samples) from the data, and the
# one-step flow-matching sample (pulled towards the mean) is far off, while 32 Euler steps are accurate.
TOY = ["data.name=gaussian_mixture", "data.modes=2"]
EVAL_NFE = [1, 4, 32]


def _fm_cfg(out, cache, steps, *extra):
    cfg, _ = compose("flow_matching", [*TOY, "design.guidance=none", f"train.steps={steps}", f"train.out_dir={out}",
                                       "train.batch_size=256", "train.ema=0.99", "design.backbone.width=128",
                                       "design.backbone.depth=3", "train.log_every=50", "train.ckpt_every=0",
                                       "eval.every=100", f"eval.nfe=[{','.join(map(str, EVAL_NFE))}]",
                                       "eval.num_samples=2000", f"eval.cache_dir={cache}", "eval.grids=false",
                                       "sample.nfe=[1]", "sample.num=16", *extra])
    return cfg


def _evals(run_dir):
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()
            if ln and json.loads(ln)["kind"] == "eval"]


@pytest.fixture(scope="module")
def fm_runs(tmp_path_factory):
    from ablate.train import train

    root = tmp_path_factory.mktemp("fm")
    for name, steps in (("untrained", 0), ("trained", 300)):
        train(_fm_cfg(root / name, root / "cache", steps), progress=False)
    return root


def test_training_evaluates_and_flow_matching_needs_many_steps(fm_runs):
    trained, untrained = _evals(fm_runs / "trained"), _evals(fm_runs / "untrained")
    assert [e["step"] for e in trained] == [100, 200, 300] and [e["step"] for e in untrained] == [0]
    for e in trained + untrained:
        assert set(e["values"]) == ({f"fid/nfe_{n}" for n in EVAL_NFE} | {f"fid_se/nfe_{n}" for n in EVAL_NFE}
                                    | {"time/eval_s"})  # every FID with its sampling SE next to it
        assert all(math.isfinite(v) for v in e["values"].values())
        assert all(e["values"][f"fid_se/nfe_{n}"] > 0 for n in EVAL_NFE)
    params = json.loads((fm_runs / "trained" / "params.json").read_text())
    assert params["fid.extractor"] == "raw" and params["fid.num_samples"] == 2000
    assert params["fid.reference_count"] == 16000
    assert params["fid.fid_se"] == "bootstrap x20"

    last, init = trained[-1]["values"], untrained[-1]["values"]
    # the untrained (zero-output) model samples the noise itself, whatever the step count
    assert init["fid/nfe_1"] == pytest.approx(init["fid/nfe_32"], rel=1e-9)
    assert last["fid/nfe_32"] < 0.1 * init["fid/nfe_32"], (last, init)  # training helps at its budget
    assert last["fid/nfe_1"] > 5 * last["fid/nfe_32"], last  # one flow-matching step is far worse
    assert last["fid/nfe_1"] > last["fid/nfe_4"] > last["fid/nfe_32"], last


# -- 7b. FID's own sampling error ----------------------------------------------------------------------------
SE_DIM = 6


def _gaussian_ref() -> "Reference":
    """A reference with exact statistics N(0, I): only the generated set is random."""
    from ablate.evaluation import Reference

    stats = {"mu": np.zeros(SE_DIM, dtype=np.float32), "sigma": np.eye(SE_DIM)}
    return Reference(torch.zeros(2, SE_DIM), stats, {}, cache_hit=False)


def _gaussian_feats(n: int, seed: int) -> torch.Tensor:
    """n features from N(δ, diag(s²)), a distribution that differs from the reference (δ ≠ 0, s ≠ 1)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.7, 1.3, SE_DIM)
    return 0.4 + scale * torch.randn(n, SE_DIM, generator=g)


def test_fid_se_matches_the_true_sampling_spread_and_shrinks_like_one_over_root_n():
    from ablate.evaluation import fid_standard_error

    ref = _gaussian_ref()
    fid = lambda f: metrics_from_features(f, ref)["fid"]  # noqa: E731
    for n in (400, 1600):  # the bootstrap SE against the spread of FID over 200 independent generated sets
        true_sd = float(np.std([fid(_gaussian_feats(n, 1000 + k)) for k in range(200)], ddof=1))
        se = np.mean([fid_standard_error(_gaussian_feats(n, k), ref.stats, reps=20, seed=k) for k in range(5)])
        assert 0.7 * true_sd < se < 1.4 * true_sd, (n, se, true_sd)
    small = [metrics_from_features(_gaussian_feats(400, k), ref, fid_se="bootstrap")["fid_se"] for k in range(5)]
    large = [metrics_from_features(_gaussian_feats(1600, k), ref, fid_se="bootstrap")["fid_se"] for k in range(5)]
    ratio = np.mean(small) / np.mean(large)
    assert 1.5 < ratio < 2.7, ratio  # 4x the samples: about half the SE (1/√n)
    assert min(small) > 0 and min(large) > 0


def test_fid_se_is_deterministic_and_absent_when_off():
    ref, feats = _gaussian_ref(), _gaussian_feats(500, 0)
    on = metrics_from_features(feats, ref, fid_se="bootstrap", seed=3)
    assert on == metrics_from_features(feats, ref, fid_se="bootstrap", seed=3)  # bit-identical
    other = metrics_from_features(feats, ref, fid_se="bootstrap", seed=4)["fid_se"]
    assert other != on["fid_se"] and other == pytest.approx(on["fid_se"], rel=0.6)  # another resampling
    assert on["fid"] == metrics_from_features(feats, ref)["fid"]  # the point estimate is untouched
    assert set(metrics_from_features(feats, ref)) == {"fid"}  # default and "none": no SE
    assert set(metrics_from_features(feats, ref, fid_se="none")) == {"fid"}
    assert "fid_se" not in metrics_from_features(feats, ref, ("kid",), fid_se="bootstrap")  # no FID, no SE
    with pytest.raises(EvalError, match="fid_se"):
        metrics_from_features(feats, ref, fid_se="jackknife")
    with pytest.raises(EvalError, match="fid_se_reps"):
        metrics_from_features(feats, ref, fid_se="bootstrap", fid_se_reps=1)


def test_evaluator_records_fid_se_next_to_fid_unless_off(tmp_path):
    from ablate.train import setup

    cfg, _ = compose("flow_matching", [*TOY, "design.guidance=none", f"train.out_dir={tmp_path / 'run'}",
                                       "design.backbone.width=16", "design.backbone.depth=1", "eval.nfe=[1,2]",
                                       "eval.num_samples=300", f"eval.cache_dir={tmp_path / 'cache'}",
                                       "eval.grids=false", "eval.fid_se_reps=10"])
    run = setup(cfg)
    on = Evaluator(run, cfg.eval)(0)
    assert set(on) == {"fid/nfe_1", "fid/nfe_2", "fid_se/nfe_1", "fid_se/nfe_2", "time/eval_s"}
    assert all(0 < on[f"fid_se/nfe_{n}"] < on[f"fid/nfe_{n}"] for n in (1, 2))
    again = Evaluator(run, cfg.eval)(0)
    assert {k: v for k, v in again.items() if k != "time/eval_s"} == {k: v for k, v in on.items()
                                                                      if k != "time/eval_s"}
    ec = cfg.eval.copy()
    ec.fid_se = "none"
    off = Evaluator(run, ec)
    assert off.provenance["fid_se"] == "none"
    values = off(0)
    assert set(values) == {"fid/nfe_1", "fid/nfe_2", "time/eval_s"}
    assert values["fid/nfe_1"] == on["fid/nfe_1"]
    ec.fid_se = "bogus"
    with pytest.raises(EvalError, match="eval.fid_se"):
        Evaluator(run, ec)


def test_fid_se_reaches_metrics_jsonl_and_mlflow(tmp_path):
    pytest.importorskip("mlflow")
    from ablate.tracking import MlflowReporter, client
    from ablate.train import train

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cl = client(uri)
    run_id = cl.create_run(cl.create_experiment("fid_se")).info.run_id
    cfg, _ = compose("flow_matching", [*TOY, "design.guidance=none", f"train.out_dir={tmp_path / 'run'}",
                                       "design.backbone.width=16", "design.backbone.depth=1", "train.steps=2",
                                       "train.ckpt_every=0", "eval.every=0", "eval.at_end=true", "eval.nfe=[1]",
                                       "eval.num_samples=200", f"eval.cache_dir={tmp_path / 'cache'}",
                                       "eval.grids=false", "sample.nfe=[]"])
    train(cfg, reporter=MlflowReporter(uri, run_id), progress=False)
    local = _evals(tmp_path / "run")[-1]["values"]
    assert local["fid_se/nfe_1"] > 0
    hist = cl.get_metric_history(run_id, "fid_se/nfe_1")
    assert [(m.step, m.value) for m in hist] == [(2, pytest.approx(local["fid_se/nfe_1"]))]
    assert cl.get_run(run_id).data.params["fid.fid_se"] == "bootstrap x20"


# -- 8. the evaluate CLI -----------------------------------------------------------------------------------
@pytest.fixture
def _restore_grad_mode():
    was = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(was)  # ablate.evaluate.load_run switches autograd off process-wide


def test_evaluate_cli_reproduces_the_last_logged_fid(fm_runs, tmp_path, capsys, _restore_grad_mode):
    from ablate.evaluate import main

    run_dir = fm_runs / "trained"
    logged = _evals(run_dir)[-1]["values"]
    out = tmp_path / "res.json"
    assert main([str(run_dir), "--nfe", "1", "32", "--num-samples", "2000", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["step"] == 300
    for n in (1, 32):
        assert res["metrics"][f"fid/nfe_{n}"] == pytest.approx(logged[f"fid/nfe_{n}"], abs=1e-6)
        assert res["metrics"][f"fid_se/nfe_{n}"] == pytest.approx(logged[f"fid_se/nfe_{n}"], abs=1e-6)
    assert "fid/nfe_4" not in res["metrics"]
    params = json.loads((run_dir / "params.json").read_text())
    check_comparable([res["provenance"], {k[len("fid."):]: v for k, v in params.items() if k.startswith("fid.")}])
    assert "nfe" in capsys.readouterr().out

    # another seed gives another (but close) number: the match above is not a coincidence of constant output
    assert main([str(run_dir), "--nfe", "32", "--num-samples", "2000", "--seed", "1", "--json", str(out)]) == 0
    other = json.loads(out.read_text())["metrics"]["fid/nfe_32"]
    assert other != logged["fid/nfe_32"] and other < 5 * logged["fid/nfe_32"] + 0.01


def test_evaluate_cli_unknown_path_exits_2(tmp_path, capsys, _restore_grad_mode):
    from ablate.evaluate import main

    assert main([str(tmp_path / "no_such_run")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


# -- 9. latent datasets ------------------------------------------------------------------------------------
def test_latent_dataset_decodes_through_the_vae_and_evaluates(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from ablate.vae import to_images

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                                  latent_channels=4, norm_num_groups=8, sample_size=16).eval()
    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    g = torch.Generator().manual_seed(0)
    shards = tmp_path / "shards"
    shards.mkdir()
    raw = []
    for i in range(2):  # two classes, told apart by the sign of the latents' mean
        labels = torch.arange(40) % 2
        lat = torch.randn(40, 4, 8, 8, generator=g) + (2.0 * labels - 1.0)[:, None, None, None]
        torch.save({"latents": lat, "labels": labels}, shards / f"shard_{i}.pt")
        raw.append(lat)
    raw = torch.cat(raw)
    scale = 0.5
    data = load_data({"name": "latents", "path": str(shards), "num_classes": 2, "scale": scale,
                      "vae": str(tmp_path / "vae")})
    assert data.kind == "latent" and data.shape == (4, 8, 8) and len(data.x) == 80
    assert torch.allclose(data.x, raw * scale)

    images = to_images(data, data.x)
    assert images.shape == (80, 3, 8, 8)
    assert images.min() >= -1 and images.max() <= 1
    with torch.no_grad():
        expected = vae.decode(data.x / scale).sample.clamp(-1, 1)
        unscaled = vae.decode(data.x).sample.clamp(-1, 1)
    assert torch.allclose(images, expected, atol=1e-5)
    assert not torch.allclose(images, unscaled, atol=1e-2)  # the test would notice a forgotten 1/scale

    ex = build_extractor({"name": "classifier", "epochs": 3, "width": 16}, data, tmp_path / "cache")
    assert 0.0 <= ex.provenance["test_accuracy"] <= 1.0
    ref = reference(data, ex, "train", cache_dir=tmp_path / "cache")
    assert ref.features.shape == (80, 16) and not ref.cache_hit
    assert reference(data, ex, "train", cache_dir=tmp_path / "cache").cache_hit
    gen = data.x[:32] + 0.3 * torch.randn(32, 4, 8, 8, generator=g)
    m = metrics_from_features(ex(to_images(data, gen)), ref, ("fid", "kid", "prc"))
    assert set(m) == {"fid", "kid", "precision", "recall"}
    assert all(math.isfinite(v) for v in m.values()) and m["fid"] >= 0 and 0 <= m["precision"] <= 1
    assert metrics_from_features(ref.features, ref)["fid"] == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(EvalError, match="no such split"):
        reference(data, ex, "test", cache_dir=tmp_path / "cache")

