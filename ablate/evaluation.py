"""FID (and KID, precision/recall) of a design at every step budget, through torch-fidelity (DESIGN §6).

- Features come from a registered extractor (:mod:`ablate.features`).
- Reference statistics are computed once per (dataset, split, extractor,
  sample count, preprocessing) and cached under a hash of exactly those.
- Statistics and distances are torch-fidelity's: ``fid_features_to_statistics``,
  ``fid_statistics_to_metric``, ``kid_features_to_metric``, ``prc_features_to_metric``.
- Every result carries its provenance (extractor, sample counts, reference);
  :func:`check_comparable` refuses to compare results whose provenance differs.
"""
from __future__ import annotations

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

from ablate.features import Extractor, build_extractor, cache_root, digest
from ablate.vae import to_images

METRICS = ("fid", "kid", "prc")
CHUNK = 1000  # images decoded and featurised at once
PREPROCESS = {"uint8": "images quantised to uint8 (as PNG)", "float": "raw float coordinates"}


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


def metrics_from_features(feats: Tensor, ref: Reference, metrics=("fid",), seed: int = 0) -> dict[str, float]:
    """{"fid": ..., "kid": ..., "precision": ..., "recall": ...} of generated features against the reference."""
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise EvalError(f"unknown metric(s) {sorted(unknown)}; valid: {', '.join(METRICS)}")
    if feats.shape[1] != ref.features.shape[1]:
        raise EvalError(f"feature sizes differ ({feats.shape[1]} vs reference {ref.features.shape[1]})")
    out = {}
    feats = feats.to(ref.features.dtype)
    if "fid" in metrics:
        stats = fid_features_to_statistics(feats)
        out["fid"] = fid_statistics_to_metric(stats, ref.stats, verbose=False)[KEY_METRIC_FID]
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


class Evaluator:
    """Samples a run at each NFE, extracts features and scores them against the cached reference."""

    def __init__(self, run, ecfg, cache_dir=None):
        self.run, self.cfg = run, ecfg
        self.nfe = [int(n) for n in ecfg.nfe]
        if not self.nfe or any(n < 1 for n in self.nfe):
            raise EvalError(f"eval.nfe must be a non-empty list of step counts ≥ 1, got {list(ecfg.nfe)}")
        self.metrics = list(ecfg.metrics)
        self.num = int(ecfg.num_samples)
        if self.num < 2:
            raise EvalError(f"eval.num_samples must be ≥ 2, got {self.num}")
        spec = ecfg.extractor
        spec = spec if isinstance(spec, str) else dict(spec)
        self.extractor = build_extractor(spec, run.data, cache_dir or ecfg.get("cache_dir"))
        self.ref = reference(run.data, self.extractor, ecfg.reference_split, int(ecfg.reference_samples),
                             cache_dir or ecfg.get("cache_dir"))
        self.seconds = 0.0

    @property
    def provenance(self) -> dict:
        return {"extractor": self.extractor.provenance["name"], "extractor_id": self.extractor.id,
                "extractor_detail": json.dumps(self.extractor.provenance, sort_keys=True),
                "num_samples": self.num, "reference": self.ref.label, "reference_count": self.ref.provenance["count"],
                "preprocess": PREPROCESS[self.extractor.input], "seed": int(self.cfg.seed),
                "weights": "ema" if self.cfg.use_ema else "raw"}

    def model(self):
        run = self.run
        if self.cfg.use_ema and float(run.cfg.train.ema) in run.emas:
            return run.emas[float(run.cfg.train.ema)]
        return run.model

    def batches(self, nfe: int):
        """``num_samples`` data-space samples in fixed batches (seed + batch index), labels cycling 0..K−1."""
        run, bs = self.run, int(self.cfg.batch_size)
        k = run.data.num_classes
        for b, start in enumerate(range(0, self.num, bs)):
            n = min(bs, self.num - start)
            idx = torch.arange(start, start + n, device=run.device)
            labels = idx % k if k else torch.zeros(n, dtype=torch.long, device=run.device)
            yield run.generate(n, nfe, seed=int(self.cfg.seed) * 100003 + b, cfg_scale=self.cfg.cfg_scale,
                               model=self.model(), labels=labels)

    def samples(self, nfe: int) -> Tensor:
        return torch.cat(list(self.batches(nfe)))

    def __call__(self, step: int, grid_dir: Path | None = None) -> dict[str, float]:
        """{"fid/nfe_N": ..., ...} at every NFE (plus kid/precision/recall if asked)."""
        from ablate.images import save_samples

        t0 = time.perf_counter()
        out = {}
        names = {"fid": ["fid"], "kid": ["kid"], "prc": ["precision", "recall"]}
        for nfe in self.nfe:
            feats, first, finite = [], None, True
            for x in self.batches(nfe):  # decode and featurise batch by batch (latents may be large decoded)
                finite = finite and bool(torch.isfinite(x).all())
                if not finite:
                    break
                img = to_images(self.run.data, x)
                first = img if first is None else first
                feats.append(self.extractor(img))
            if not finite:  # a diverged sampler: every metric is NaN, not silently missing
                out.update({f"{n}/nfe_{nfe}": float("nan") for m in self.metrics for n in names[m]})
                continue
            feats = torch.cat(feats)
            for name, val in metrics_from_features(feats, self.ref, self.metrics, int(self.cfg.seed)).items():
                out[f"{name}/nfe_{nfe}"] = float(val)
            if grid_dir is not None:
                vis = first[:64] if first.dim() > 2 else first[:2000]
                ref = self.run.data.x[:2000] if first.dim() == 2 else None
                save_samples(vis, Path(grid_dir) / f"step_{step:07d}_nfe_{nfe}.png", ref)
        self.seconds += time.perf_counter() - t0
        out["time/eval_s"] = self.seconds
        return out
