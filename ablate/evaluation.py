"""FID (and KID, precision/recall) of a design at every step budget, through torch-fidelity (DESIGN §6).

- Features come from a registered extractor (:mod:`ablate.features`).
- Reference statistics are computed once per (dataset, split, extractor,
  sample count, preprocessing) and cached under a hash of exactly those.
- Statistics and distances are torch-fidelity's: ``fid_features_to_statistics``,
  ``fid_statistics_to_metric``, ``kid_features_to_metric``, ``prc_features_to_metric``.
- Every result carries its provenance (extractor, sample counts, reference);
  :func:`check_comparable` refuses to compare results whose provenance differs.
- Every FID carries its own sampling standard error ``fid_se/nfe_N``
  (:func:`fid_standard_error`, ``eval.fid_se``): how much the number would move
  with another draw of the generated samples, against the same reference.
- FD-DINOv2 (Stein et al. 2023) beside FID: ``eval.fd_dinov2`` (null/false: off;
  true or {weights: PATH, ...}: the ``dinov2`` extractor's options) logs
  ``fd_dinov2/nfe_N`` (and ``fd_dinov2_se/nfe_N``), the Fréchet distance of the
  DINOv2 ViT-L/14 CLS features against their own cached reference; FID stays on
  ``eval.extractor``.
- Guidance scale as a study setting: ``eval.cfg_scale`` is null, a number or a
  list, ``eval.cfg_interval`` null or [t_min, t_max]. Every (scale, NFE) is
  evaluated; the first scale keeps ``fid/nfe_N``, another scale w logs
  ``fid@cfg<w>/nfe_N`` (every metric likewise; the ``/nfe_N`` suffix stays).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_features_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

from ablate.features import Extractor, _file_sha, build_extractor, cache_root, digest
from ablate.vae import to_images

METRICS = ("fid", "kid", "prc")
FID_SE = ("bootstrap", "none")  # eval.fid_se
CHUNK = 1000  # images decoded and featurised at once
PREPROCESS = {"uint8": "images quantised to uint8 (as PNG)", "float": "raw float coordinates"}
UINT8 = "round((clamp(x, -1, 1) + 1) * 127.5) -> uint8"  # ablate.features.to_uint8, recorded with every FID


def cfg_scales(value) -> list:
    """``eval.cfg_scale`` / ``sample.cfg_scale`` as a list: null → [None], a number → [w], a list → its numbers."""
    if value is None:
        return [None]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)]
    try:
        vals = list(value)
    except TypeError:
        raise EvalError(f"cfg_scale must be null, a number or a list of numbers, got {value!r}") from None
    if not vals or any(v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))) for v in vals):
        raise EvalError(f"cfg_scale must be null, a number or a non-empty list of numbers, got {vals!r}")
    if len(set(vals)) != len(vals):
        raise EvalError(f"cfg_scale lists a scale twice: {vals!r}")
    return [None if v is None else float(v) for v in vals]


def cfg_interval(value) -> tuple[float, float] | None:
    """``eval.cfg_interval`` / ``sample.cfg_interval``: null or [t_min, t_max] with 0 ≤ t_min ≤ t_max ≤ 1."""
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise EvalError(f"cfg_interval must be null or [t_min, t_max], got {value!r}") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise EvalError(f"cfg_interval needs 0 ≤ t_min ≤ t_max ≤ 1, got [{lo}, {hi}]")
    return lo, hi


def scale_tag(scale) -> str:
    """The metric-name tag of a non-first guidance scale: ``@cfg1.5`` (``@cfgdefault`` for null)."""
    return "@cfgdefault" if scale is None else f"@cfg{scale:g}"


class EvalError(ValueError):
    pass


@dataclass
class Reference:
    features: Tensor  # (N, D) reference features (KID / precision-recall need them)
    stats: dict  # torch-fidelity's {"mu", "sigma"}
    provenance: dict
    cache_hit: bool

    @property
    def label(self) -> str:
        p = self.provenance
        return f"{p['dataset']}/{p['split']}/{p['count']}@{p['key'][:8]}"

    @property
    def stats_sha(self) -> str:
        """sha256 (16 hex) of the reference statistics themselves (μ and Σ as float64 bytes)."""
        h = hashlib.sha256()
        for k in ("mu", "sigma"):
            h.update(np.ascontiguousarray(self.stats[k], dtype=np.float64).tobytes())
        return h.hexdigest()[:16]


def reference(data, extractor: Extractor, split: str = "train", count: int = 0, cache_dir=None) -> Reference:
    """Reference features and FID statistics of a data split, cached under a content hash of the settings."""
    x = {"train": data.x, "test": data.x_test}.get(split)
    if x is None:
        raise EvalError(f"eval.reference_split='{split}': dataset '{data.name}' has no such split "
                        f"(valid: train{', test' if data.x_test is not None else ''})")
    n = len(x) if count <= 0 else min(int(count), len(x))
    settings = {"dataset": data.meta.get("spec", {"name": data.name}), "split": split, "count": n,
                "extractor": extractor.provenance, "layer": extractor.layer, "preprocess": extractor.input}
    key = digest(settings)
    prov = {"dataset": data.name, "split": split, "count": n, "extractor": extractor.provenance["name"],
            "extractor_id": extractor.id, "preprocess": extractor.input, "key": key}
    path = cache_root(cache_dir) / "reference" / f"{key}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            feats = torch.from_numpy(z["features"])
            stats = {"mu": z["mu"], "sigma": z["sigma"]}
        return Reference(feats, stats, prov, cache_hit=True)
    # a fixed, seeded subset when count < split size, so the same settings give the same reference
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n].sort().values
    idx = idx.to(x.device)  # decode (latents) and extract in chunks: a whole split may not fit decoded
    feats = torch.cat([extractor(to_images(data, x[idx[i:i + CHUNK]])) for i in range(0, n, CHUNK)])
    stats = fid_features_to_statistics(feats)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npz")
    np.savez(tmp, features=feats.numpy(), mu=stats["mu"], sigma=stats["sigma"])
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps({**settings, "key": key}, indent=2, default=str))
    return Reference(feats, stats, prov, cache_hit=False)


def fid_standard_error(feats: Tensor, ref_stats: dict, reps: int = 20, seed: int = 0) -> float:
    """Bootstrap standard error of the FID of ``feats`` against fixed reference statistics.

    ``reps`` times: resample the n generated feature vectors with replacement (a generator
    seeded with ``seed``: deterministic), recompute the FID with torch-fidelity's own
    ``fid_features_to_statistics`` / ``fid_statistics_to_metric``; the SE is the standard
    deviation (ddof 1) of the replicates. It measures the generated set's sampling noise
    only (the reference is fixed and shared by every design), and shrinks like 1/√n while
    the generated and reference distributions differ. Cost: ``reps`` extra FID computations,
    i.e. ``reps`` × (an n×D covariance + a D×D eigen-decomposition). Measured on one CPU
    thread with n = 1000: digits classifier (D = 64) 1.0 ms per FID, 29 ms with the 20
    replicates (≈ 85 ms per evaluation at 3 NFEs, ~1–2 % of it); Inception (D = 2048)
    ≈ 3.4 s per replicate, so ≈ 70 s per NFE at 20 replicates: lower ``eval.fid_se_reps``
    or set ``eval.fid_se: none`` there.
    """
    if reps < 2:
        raise EvalError(f"eval.fid_se_reps must be ≥ 2, got {reps}")
    n = len(feats)
    g = torch.Generator().manual_seed(int(seed))
    vals = np.empty(reps)
    for i in range(reps):
        idx = torch.randint(n, (n,), generator=g)
        stats = fid_features_to_statistics(feats[idx])
        vals[i] = fid_statistics_to_metric(stats, ref_stats, verbose=False)[KEY_METRIC_FID]
    return float(vals.std(ddof=1))


def metrics_from_features(feats: Tensor, ref: Reference, metrics=("fid",), seed: int = 0, fid_se: str = "none",
                          fid_se_reps: int = 20) -> dict[str, float]:
    """{"fid": ..., "kid": ..., "precision": ..., "recall": ...} of generated features against the reference,
    plus "fid_se" (:func:`fid_standard_error`) with ``fid_se="bootstrap"``."""
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise EvalError(f"unknown metric(s) {sorted(unknown)}; valid: {', '.join(METRICS)}")
    if fid_se not in FID_SE:
        raise EvalError(f"eval.fid_se must be one of {', '.join(FID_SE)}, got {fid_se!r}")
    if feats.shape[1] != ref.features.shape[1]:
        raise EvalError(f"feature sizes differ ({feats.shape[1]} vs reference {ref.features.shape[1]})")
    out = {}
    feats = feats.to(ref.features.dtype)
    if "fid" in metrics:
        stats = fid_features_to_statistics(feats)
        out["fid"] = fid_statistics_to_metric(stats, ref.stats, verbose=False)[KEY_METRIC_FID]
        if fid_se == "bootstrap":
            out["fid_se"] = fid_standard_error(feats, ref.stats, fid_se_reps, seed)
    if "kid" in metrics:
        size = min(1000, len(feats), len(ref.features))
        out["kid"] = kid_features_to_metric(feats, ref.features, kid_subset_size=size, rng_seed=seed,
                                            verbose=False)[KEY_METRIC_KID_MEAN]
    if "prc" in metrics:  # k-NN balls on equal-sized sets (a seeded reference subset of the generated count)
        g = torch.Generator().manual_seed(seed)
        sub = ref.features[torch.randperm(len(ref.features), generator=g)[:len(feats)]]
        pr = prc_features_to_metric(feats, sub, verbose=False)
        out["precision"], out["recall"] = pr[KEY_METRIC_PRECISION], pr[KEY_METRIC_RECALL]
    return out


def check_comparable(provenances: list[dict]) -> None:
    """Raise if metric provenances differ (different extractor, sample count or reference)."""
    keys = ("extractor_id", "num_samples", "reference")
    seen = {tuple(p.get(k) for k in keys) for p in provenances}
    if len(seen) > 1:
        raise EvalError("these results were computed with different evaluation settings and cannot be compared: "
                        + "; ".join(str(dict(zip(keys, s))) for s in sorted(seen, key=str)))


_DEFAULT = object()  # "the first of eval.cfg_scale" (None itself means the design's default)


class Evaluator:
    """Samples a run at each (guidance scale, NFE), extracts features and scores them against the cached reference."""

    def __init__(self, run, ecfg, cache_dir=None):
        self.run, self.cfg = run, ecfg
        self.nfe = [int(n) for n in ecfg.nfe]
        if not self.nfe or any(n < 1 for n in self.nfe):
            raise EvalError(f"eval.nfe must be a non-empty list of step counts ≥ 1, got {list(ecfg.nfe)}")
        self.metrics = list(ecfg.metrics)
        self.num = int(ecfg.num_samples)
        if self.num < 2:
            raise EvalError(f"eval.num_samples must be ≥ 2, got {self.num}")
        self.fid_se = str(ecfg.get("fid_se", "bootstrap") or "none")  # older run configs lack the key
        self.fid_se_reps = int(ecfg.get("fid_se_reps", 20))
        if self.fid_se not in FID_SE:
            raise EvalError(f"eval.fid_se must be one of {', '.join(FID_SE)}, got {self.fid_se!r}")
        if self.fid_se == "bootstrap" and self.fid_se_reps < 2:
            raise EvalError(f"eval.fid_se_reps must be ≥ 2, got {self.fid_se_reps}")
        self.scales = cfg_scales(_plain(ecfg.get("cfg_scale")))
        self.interval = cfg_interval(_plain(ecfg.get("cfg_interval")))
        sc = run.cfg.get("sample") if hasattr(run, "cfg") else None
        if sc is not None:  # the end-of-training grids' settings, checked now rather than after training
            cfg_scales(_plain(sc.get("cfg_scale")))
            cfg_interval(_plain(sc.get("cfg_interval")))
        cache = cache_dir or ecfg.get("cache_dir")
        spec = ecfg.extractor
        spec = spec if isinstance(spec, str) else dict(spec)
        self.extractor = build_extractor(spec, run.data, cache)
        self.ref = reference(run.data, self.extractor, ecfg.reference_split, int(ecfg.reference_samples), cache)
        self.dinov2 = self.dinov2_ref = None
        fd = _plain(ecfg.get("fd_dinov2"))
        if fd:  # FD-DINOv2 beside FID: its own extractor and reference
            opts = {} if fd is True else dict(fd)
            self.dinov2 = build_extractor({"name": "dinov2", **opts}, run.data, cache)
            self.dinov2_ref = reference(run.data, self.dinov2, ecfg.reference_split, int(ecfg.reference_samples),
                                        cache)
        self.seconds = 0.0

    @staticmethod
    def _pipeline(ex: Extractor, ref: Reference) -> dict:
        """Everything between a generated sample and the distance: extractor, its weights, the preprocessing
        and the reference statistics."""
        path = ex.fidelity_kwargs.get("feature_extractor_weights_path")
        return {"extractor": ex.provenance["name"], "extractor_id": ex.id,
                "extractor_detail": json.dumps(ex.provenance, sort_keys=True),
                "extractor_layer": ex.layer,
                "extractor_weights_sha": ex.provenance.get("sha") or (_file_sha(path) if path else "none"),
                "reference": ref.label, "reference_key": ref.provenance["key"], "reference_stats_sha": ref.stats_sha,
                "reference_count": ref.provenance["count"], "preprocess": PREPROCESS[ex.input],
                "uint8": UINT8 if ex.input == "uint8" else "none", "resize": ex.resize}

    @property
    def provenance(self) -> dict:
        out = {**self._pipeline(self.extractor, self.ref), "num_samples": self.num, "seed": int(self.cfg.seed),
               "weights": "ema" if self.cfg.use_ema else "raw",
               "fid_se": f"bootstrap x{self.fid_se_reps}" if self.fid_se == "bootstrap" else "none",
               "cfg_scale": json.dumps(self.scales), "cfg_interval": json.dumps(self.interval)}
        if self.dinov2 is not None:
            out.update({f"fd_dinov2_{k}": v for k, v in self._pipeline(self.dinov2, self.dinov2_ref).items()})
        return out

    def model(self):
        run = self.run
        if self.cfg.use_ema and float(run.cfg.train.ema) in run.emas:
            return run.emas[float(run.cfg.train.ema)]
        return run.model

    def batches(self, nfe: int, cfg_scale=_DEFAULT):
        """``num_samples`` data-space samples in fixed batches (seed + batch index), labels cycling 0..K−1,
        at guidance scale ``cfg_scale`` (default: the first of ``eval.cfg_scale``)."""
        run, bs = self.run, int(self.cfg.batch_size)
        scale = self.scales[0] if cfg_scale is _DEFAULT else cfg_scale
        k = run.data.num_classes
        for b, start in enumerate(range(0, self.num, bs)):
            n = min(bs, self.num - start)
            idx = torch.arange(start, start + n, device=run.device)
            labels = idx % k if k else torch.zeros(n, dtype=torch.long, device=run.device)
            kw = {} if self.interval is None else {"cfg_interval": self.interval}
            yield run.generate(n, nfe, seed=int(self.cfg.seed) * 100003 + b, cfg_scale=scale,
                               model=self.model(), labels=labels, **kw)

    def samples(self, nfe: int, cfg_scale=_DEFAULT) -> Tensor:
        return torch.cat(list(self.batches(nfe, cfg_scale)))

    def names(self) -> dict[str, list[str]]:
        """Metric names per entry of eval.metrics (plus fd_dinov2 when on)."""
        se = self.fid_se != "none"
        out = {"fid": ["fid"] + (["fid_se"] if se else []), "kid": ["kid"], "prc": ["precision", "recall"]}
        out = {m: out[m] for m in self.metrics if m in out}
        if self.dinov2 is not None:
            out["fd_dinov2"] = ["fd_dinov2"] + (["fd_dinov2_se"] if se else [])
        return out

    def __call__(self, step: int, grid_dir: Path | None = None) -> dict[str, float]:
        """{"fid/nfe_N": ..., "fid_se/nfe_N": ..., ...} at every NFE (plus kid/precision/recall if asked, and
        fd_dinov2), for every guidance scale: ``fid/nfe_N`` for the first, ``fid@cfg<w>/nfe_N`` for the others."""
        from ablate.images import save_samples

        t0 = time.perf_counter()
        out = {}
        names = self.names()
        for si, scale in enumerate(self.scales):
            tag = "" if si == 0 else scale_tag(scale)
            for nfe in self.nfe:
                feats, dfeats, first, finite = [], [], None, True
                for x in self.batches(nfe, scale):  # decode and featurise batch by batch (latents may be large)
                    finite = finite and bool(torch.isfinite(x).all())
                    if not finite:
                        break
                    img = to_images(self.run.data, x)
                    first = img if first is None else first
                    feats.append(self.extractor(img))
                    if self.dinov2 is not None:
                        dfeats.append(self.dinov2(img))
                if not finite:  # a diverged sampler: every metric is NaN, not silently missing
                    out.update({f"{n}{tag}/nfe_{nfe}": float("nan") for ns in names.values() for n in ns})
                    continue
                seed = int(self.cfg.seed)
                vals = metrics_from_features(torch.cat(feats), self.ref, self.metrics, seed, self.fid_se,
                                             self.fid_se_reps)
                if self.dinov2 is not None:
                    fd = metrics_from_features(torch.cat(dfeats), self.dinov2_ref, ("fid",), seed, self.fid_se,
                                               self.fid_se_reps)
                    vals.update({k.replace("fid", "fd_dinov2"): v for k, v in fd.items()})
                for name, val in vals.items():
                    out[f"{name}{tag}/nfe_{nfe}"] = float(val)
                if grid_dir is not None:
                    vis = first[:64] if first.dim() > 2 else first[:2000]
                    ref = self.run.data.x[:2000] if first.dim() == 2 else None
                    save_samples(vis, Path(grid_dir) / f"step_{step:07d}_nfe_{nfe}{tag}.png", ref)
        self.seconds += time.perf_counter() - t0
        out["time/eval_s"] = self.seconds
        return out


def _plain(value):
    """OmegaConf containers → plain Python (lists, dicts); anything else unchanged."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


# -- compute cost of a trial (ranking at equal compute: dashboards/tables.py) -------------------------------------
COST_ROWS = 8  # rows of the batch whose training step is FLOP-counted (FLOPs are linear in the batch)


def step_flops(run, batch_size: int | None = None) -> float:
    """Model FLOPs of one training step (forward + backward, the global batch) of ``run``'s design.

    Counted once with ``torch.utils.flop_counter.FlopCounterMode`` on the CPU, on copies of the network (and
    weighting) so that the run's own weights, gradients and random streams are untouched, on ``COST_ROWS``
    rows of the training data scaled linearly to the batch. NaN where the counter cannot trace the step."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    from components.compose import Components, training_loss
    from components.targets.base import Nets

    b = int(batch_size or run.cfg.train.batch_size)
    rows = min(b, COST_ROWS, len(run.data.x))
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            model = copy.deepcopy(run.model).cpu().train()
            weighting = copy.deepcopy(run.comps.weighting).cpu()
            c = run.comps
            comps = Components(c.schedule, c.time_sampler, c.target, weighting, model, c.guidance)
            teacher = run.comps.target.teacher_ema
            teacher = copy.deepcopy(run.emas[float(teacher)]).cpu() if teacher is not None else model
            nets = Nets(model=model, teacher=teacher, guidance=c.guidance)
            x = run.data.x[:rows].detach().cpu()
            labels = (run.data.labels[:rows].cpu() if run.data.labels is not None
                      else torch.zeros(rows, dtype=torch.long))
            with FlopCounterMode(display=False) as counter:
                loss, _, _ = training_loss(comps, nets, x, labels, null_label=run.data.null_label,
                                           generator=torch.Generator().manual_seed(0), step=0)
                loss.backward()
            return float(counter.get_total_flops()) * b / rows
    except Exception:  # noqa: BLE001 - a design the counter cannot trace: its cost is unknown, not fatal
        return float("nan")


def training_cost(run, train_seconds: float, devices: int = 1) -> dict[str, float]:
    """``cost/device_hours`` (training wall time × devices), ``cost/step_tflops`` (one step, measured once:
    :func:`step_flops`) and ``cost/train_tflops`` (× the steps trained), logged once at the end of training."""
    per_step = step_flops(run) / 1e12
    return {"cost/device_hours": float(train_seconds) * max(1, int(devices)) / 3600.0,
            "cost/step_tflops": per_step, "cost/train_tflops": per_step * int(run.step)}
