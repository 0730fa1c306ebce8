"""Precomputed VAE latents (ImageNet-256 scale): shards on disk, posterior moments, streaming.

Shards come from ``python -m ablate.encode`` (or any ``{latents|mean,logvar, labels}``
``*.pt`` files); :class:`ShardStream` serves shards larger than memory a few at a time.
"""
from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from ablate.data import Data, DataError, ResidentLoader, _need_dir
from ablate.gpu import to_device
from components.registry import DATASET

LATENT_META = "meta.json"  # written by ``python -m ablate.encode`` next to its shards


def _read_shard(f: Path) -> dict:
    """One shard's tensors, memory-mapped where the file allows it (nothing is read until used)."""
    try:
        try:
            d = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # files in torch's legacy (non-zip) format cannot be mapped
            d = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(f"latents: cannot read shard '{f}': {exc}") from exc
    if not isinstance(d, dict) or "labels" not in d or not ("latents" in d or {"mean", "logvar"} <= set(d)):
        raise DataError(f"latents: shard '{f}' must hold a dict with 'labels' and 'latents' (samples) "
                        "or 'mean' and 'logvar' (moments)")
    return d


@dataclass
class LatentShards:
    """The shards of a latent folder and how their rows become training latents.

    A shard holds ``labels`` (n,) and either ``latents`` (n, C, H, W) — samples
    of the VAE posterior — or ``mean`` and ``logvar`` (n, C, H, W) — its
    moments. A row is ``scale · (z − shift)``, z the sample or, for moments, a
    fresh draw z = mean + e^{logvar/2}·ε each time the row is served (the
    posterior's reparameterisation); ``shift`` is the VAE's shift factor.
    """

    files: list[Path]
    rows: list[int]
    format: Literal["samples", "moments"]
    shape: tuple[int, ...]
    scale: float
    shift: float = 0.0

    @classmethod
    def open(cls, root: Path, scale: float | None) -> tuple["LatentShards", dict]:
        """The shards under ``root`` (listed by its meta.json, else every *.pt) and the meta.json content."""
        meta_path = root / LATENT_META
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        if meta and not meta.get("complete"):
            raise DataError(f"latents: the encode into '{root}' did not finish; rerun the same "
                            "`python -m ablate.encode` command to complete it")
        files = [root / s["file"] for s in meta["shards"]] if meta else sorted(root.glob("*.pt"))
        if not files:
            raise DataError(f"latents: no *.pt shards under '{root}'")
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise DataError(f"latents: shard(s) listed in {meta_path} are missing: {', '.join(missing[:3])}; "
                            "rerun the encode command to restore them")
        if meta:
            rows, fmt, shape = [int(s["rows"]) for s in meta["shards"]], meta["format"], tuple(meta["shape"])
        else:  # a folder without meta.json: read the shapes (cheap: the shards are memory-mapped)
            rows, fmts, shapes = [], set(), set()
            for f in files:
                d = _read_shard(f)
                z = d["latents"] if "latents" in d else d["mean"]
                rows.append(len(z))
                fmts.add("samples" if "latents" in d else "moments")
                shapes.add(tuple(z.shape[1:]))
            if len(fmts) > 1 or len(shapes) > 1:
                raise DataError(f"latents: shards under '{root}' mix formats or shapes ({fmts}, {shapes})")
            fmt, shape = fmts.pop(), shapes.pop()
        scale = float(meta.get("scaling_factor", 1.0)) if scale is None else float(scale)
        return cls(files, rows, fmt, shape, scale, float(meta.get("shift_factor") or 0.0)), meta

    def nbytes(self) -> int:
        """Bytes all rows take resident as float32 (moments: mean and standard deviation)."""
        return sum(self.rows) * math.prod(self.shape) * 4 * (2 if self.format == "moments" else 1)

    def load(self, i: int) -> tuple[Tensor, Tensor | None, Tensor]:
        """Shard i as (scaled mean or sample (n, C, H, W), scaled std or None, labels (n,)), float32 on the CPU."""
        d = _read_shard(self.files[i])
        if self.format == "samples":
            return (d["latents"].float() - self.shift) * self.scale, None, d["labels"].long()
        std = torch.exp(0.5 * d["logvar"].float()) * self.scale
        return (d["mean"].float() - self.shift) * self.scale, std, d["labels"].long()

    def sample(self, i: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Shard i as training rows (n, C, H, W) and labels (n,); moments are sampled with ``generator``."""
        x, std, y = self.load(i)
        if std is not None:
            x = x + std * torch.randn(x.shape, generator=generator)
        return x, y


class MomentsLoader(ResidentLoader):
    """Resident posterior moments (``data.x`` = scaled mean): every batch draws x = mean + std·ε afresh."""

    def __init__(self, data: Data, std: Tensor, batch_size: int, generator: torch.Generator,
                 classes_per_batch: int = 0):
        super().__init__(data, batch_size, generator, classes_per_batch)
        self.std = std  # (N, C, H, W), already scaled

    def next(self) -> tuple[Tensor, Tensor]:
        idx = self.indices()
        mean = self.data.x[idx]
        # ε on the data's device from a seed drawn from the (checkpointed) loader generator: resumable
        seed = int(torch.randint(1 << 62, (), generator=self.generator))
        eps = torch.randn(mean.shape, generator=torch.Generator(mean.device).manual_seed(seed), device=mean.device)
        return mean + self.std[idx] * eps, self.data.labels[idx]


class ShardStream:
    """Batches from latent shards larger than memory; every row exactly once per pass.

    A pass visits the shards in a fresh random order, ``group`` shards at a
    time: their rows are loaded (memory-mapped; moments sampled), shuffled
    together and served as batches. The fewer than ``batch_size`` rows left over
    are served first from the next buffer, so consecutive passes never mix. A
    background thread reads the next group while this one is served: at most
    about 2·``group`` shards plus one batch are in memory (``peak_rows`` records it).

    ``classes_per_batch`` = k ≥ 1 (ESC's class-consistent batches, see
    :class:`ablate.data.ResidentLoader`): every batch is k contiguous blocks of
    batch_size/k rows, each block one class, the k classes distinct (k ≤
    ``num_classes``) and drawn in one call in proportion to the rows the buffer
    holds of each, among the classes with a whole block buffered. The buffer is
    kept sorted by class; rows of a class not yet served stay, ahead of the
    next group's rows, so within each class every row is still served once per
    pass and passes never mix (a class short of a whole group waits for the
    next group of shards; ``peak_rows`` records what that costs in memory).
    """

    def __init__(self, shards: LatentShards, batch_size: int, generator: torch.Generator, *, device="cpu",
                 group: int = 2, classes_per_batch: int = 0, num_classes: int = 0):
        self.shards, self.batch_size, self.generator = shards, batch_size, generator
        self.device, self.group = torch.device(device), max(1, int(group))
        self.classes_per_batch, self.num_classes = int(classes_per_batch), int(num_classes)
        if self.classes_per_batch > self.num_classes:
            raise DataError(f"latents: train.classes_per_batch={self.classes_per_batch} needs as many distinct "
                            f"classes per batch when streamed; the data has {self.num_classes} (data.stream=false "
                            "draws classes with replacement)")
        self.counts, self.starts, self.taken = (torch.zeros(max(1, self.num_classes), dtype=torch.long) for _ in 'cst')
        self.added = 0  # rows read since the last batch of same-class groups (bounds a hopeless search)
        self.order: list[int] = []
        self.x = torch.empty((0, *shards.shape))
        self.y = torch.empty(0, dtype=torch.long)
        self.pos = self.peak_rows = 0
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="latent-shards")
        self.pending, self.pending_rows = self._schedule()

    def _schedule(self):
        """Choose the next group and its sampling seed here (deterministic), read it in the background."""
        ids: list[int] = []
        while len(ids) < self.group:
            if not self.order:
                if ids:  # a group never spans two passes
                    break
                self.order = torch.randperm(len(self.shards.files), generator=self.generator).tolist()
            ids.append(self.order.pop(0))
        seed = int(torch.randint(1 << 62, (), generator=self.generator))
        return self.pool.submit(self._read, ids, seed), sum(self.shards.rows[i] for i in ids)

    def _read(self, ids: list[int], seed: int) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(seed)
        parts = [self.shards.sample(i, g) for i in ids]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _refill(self) -> None:
        x, y = self.pending.result()
        self.pending, self.pending_rows = self._schedule()  # read the next group while this one is served
        perm = torch.randperm(len(x), generator=self.generator)
        self.x = torch.cat([self.x[self.pos:], x[perm]])  # leftover rows first: passes stay apart
        self.y = torch.cat([self.y[self.pos:], y[perm]])
        self.pos = 0
        self.peak_rows = max(self.peak_rows, len(self.x) + self.pending_rows)

    def _refill_by_class(self) -> None:
        """Like :meth:`_refill`, for class groups: unserved rows first, then the new group shuffled, sorted by class."""
        x, y = self.pending.result()
        self.pending, self.pending_rows = self._schedule()
        self.added += len(x)
        perm = torch.randperm(len(x), generator=self.generator)
        x, y = x[perm], y[perm]
        if len(self.y):  # the rows not served yet go first
            keep = torch.arange(len(self.y)) - self.starts[self.y] >= self.taken[self.y]
            x, y = torch.cat([self.x[keep], x]), torch.cat([self.y[keep], y])
        order = torch.argsort(y, stable=True)  # stable: within a class, older rows first
        self.x, self.y = x[order], y[order]
        self.counts = torch.bincount(self.y, minlength=self.num_classes)
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        self.taken = torch.zeros_like(self.counts)
        self.peak_rows = max(self.peak_rows, len(self.x) + self.pending_rows)

    def _next_by_class(self) -> tuple[Tensor, Tensor]:
        k = self.classes_per_batch
        m = self.batch_size // k
        while True:
            avail = self.counts - self.taken
            avail = avail * (avail >= m)  # classes with a whole group buffered
            if int((avail > 0).sum()) >= k:
                break
            if self.added > 2 * sum(self.shards.rows):  # a whole pass read and still too few: never enough
                raise DataError(f"latents: train.classes_per_batch={k} needs {k} classes with {m} rows each "
                                f"(batch {self.batch_size}/k); the shards hold fewer")
            self._refill_by_class()
        classes = torch.multinomial(avail.double(), k, replacement=False, generator=self.generator)
        idx = ((self.starts[classes] + self.taken[classes])[:, None] + torch.arange(m)).reshape(-1)
        self.taken[classes] += m
        self.added = 0
        return to_device(self.x[idx], self.device), to_device(self.y[idx], self.device)  # pinned, non-blocking

    def next(self) -> tuple[Tensor, Tensor]:
        if self.classes_per_batch:
            return self._next_by_class()
        while len(self.x) - self.pos < self.batch_size:
            self._refill()
        sl = slice(self.pos, self.pos + self.batch_size)
        self.pos += self.batch_size
        return to_device(self.x[sl], self.device), to_device(self.y[sl], self.device)  # pinned, non-blocking

    def close(self) -> None:
        if getattr(self, "pool", None) is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)

    __del__ = close


@DATASET.register("latents")
def latents(path: str = "", num_classes: int | None = None, scale: float | None = None, vae: str = "",
            stream: bool | Literal["auto"] = "auto", memory_gb: float = 8.0, stream_group: int = 2,
            eval_rows: int = 10000, *, device="cpu") -> Data:
    """Precomputed VAE latents: ``path``/*.pt shards (see ``python -m ablate.encode``) with labels.

    Shards hold samples {'latents': (n, C, H, W), 'labels': (n,)} or posterior
    moments {'mean', 'logvar', 'labels'} (a fresh sample each time a row is
    served). ``num_classes`` and ``scale`` default to the folder's meta.json
    (else 1000 and 1.0; e.g. 0.18215 for SD-VAE); rows are scale·(z − shift).
    ``stream``: serve shards from disk a few at a time (:class:`ShardStream`)
    instead of holding every row; ``auto`` streams when the rows would take more
    than ``memory_gb``. Streamed, ``x`` holds the first ``eval_rows`` rows (the
    encoder shuffles images over shards) for evaluation. ``vae`` is a local
    diffusers AutoencoderKL folder that decodes samples for image metrics
    (see ablate.vae); optional for training.
    """
    root = _need_dir(path, "latents")
    shards, meta = LatentShards.open(root, scale)
    if vae and not Path(vae).expanduser().is_dir():
        raise DataError(f"latents: VAE folder '{vae}' does not exist (data.vae)")
    k = int(num_classes if num_classes is not None else meta.get("num_classes", 1000))
    streamed = stream is True or (stream == "auto" and shards.nbytes() > memory_gb * 2 ** 30)
    xs, stds, ys = [], [], []
    for i in range(len(shards.files)):  # everything, or (streamed) the first eval_rows rows
        if streamed and sum(map(len, ys)) >= max(1, eval_rows):
            break
        x, std, y = shards.load(i)
        xs.append(x)
        ys.append(y)
        stds.append(None if streamed else std)
    n = sum(map(len, ys)) if not streamed else min(max(1, eval_rows), sum(map(len, ys)))
    x, y = torch.cat(xs)[:n].to(device), torch.cat(ys)[:n].to(device)
    if streamed:
        def loader(batch_size, generator, classes_per_batch=0):
            ResidentLoader.check_classes_per_batch(classes_per_batch, batch_size, data)
            return ShardStream(shards, batch_size, generator, device=device, group=stream_group,
                               classes_per_batch=classes_per_batch, num_classes=data.num_classes)
    elif shards.format == "moments":
        std = torch.cat(stds).to(device)

        def loader(batch_size, generator, classes_per_batch=0):
            return MomentsLoader(data, std, batch_size, generator, classes_per_batch)
    else:
        loader = None
    data = Data("latents", x, y, k, "latent", loader=loader,
                meta={"path": str(root), "vae": str(Path(vae).expanduser()) if vae else "", "scale": shards.scale,
                      "shift": shards.shift, "format": shards.format, "rows": sum(shards.rows), "streamed": streamed})
    return data


