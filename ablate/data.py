"""Datasets behind the ``dataset`` registry (DESIGN §7), resident on the training device.

Every factory returns a :class:`Data`: tensors in the model's range (images in
[−1, 1], toys roughly unit scale), labels 0..K−1 (zeros when unlabelled, K = 0),
and the facts a backbone needs. Nothing is ever downloaded. Latent shards too
large for memory are streamed (:class:`ShardStream`); :func:`make_loader` gives
the training loop the right loader (latent shards: ablate/latents.py).
"""
from __future__ import annotations

import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from torch import Tensor

from components.registry import DATASET


class DataError(ValueError):
    """A dataset that cannot be loaded (missing path, bad files)."""


@dataclass
class Data:
    name: str
    x: Tensor  # (N, ...) training split
    labels: Tensor  # (N,) long
    num_classes: int  # 0: unlabelled
    kind: Literal["vector", "image", "latent"]
    x_test: Tensor | None = None
    labels_test: Tensor | None = None
    meta: dict = field(default_factory=dict)
    #: (batch_size, generator, classes_per_batch) -> a loader with ``.next() -> (x, labels)``, for data whose
    #: training rows are not ``x`` itself (latent moments, streamed shards); None: a ResidentLoader over x
    loader: Callable | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    @property
    def null_label(self) -> int:
        return self.num_classes

    def default_backbone(self) -> dict:
        if self.kind == "vector":
            return {"name": "mlp"}
        return {"name": "dit", "size": "T", "patch": 2}


class ResidentLoader:
    """Random batches straight from device tensors (no per-step loader overhead).

    ``classes_per_batch`` = k (ESC's class-consistent mini-batches): 0 draws the
    rows i.i.d. from the whole set; k ≥ 1 makes every batch k contiguous blocks
    of batch_size/k rows, each block from one class (rows drawn with replacement
    within it). The k classes are drawn in proportion to their frequency,
    without replacement while k ≤ the number of classes present, so the classes
    of one batch are distinct and the plug-in velocity (which mixes only rows of
    the row's own class, components/velocity.py) mixes within one block;
    with more blocks than classes the classes are drawn with replacement. All k
    classes come from one draw on ``generator`` (a CPU generator: no host sync).
    Under data parallelism each rank builds its own loader over its share of
    the groups (:func:`ablate.distributed.local_classes_per_batch`).
    """

    def __init__(self, data: Data, batch_size: int, generator: torch.Generator, classes_per_batch: int = 0):
        k = self.check_classes_per_batch(classes_per_batch, batch_size, data)
        self.data, self.batch_size, self.generator = data, batch_size, generator
        self.classes_per_batch = k
        if k:
            labels = data.labels.cpu()
            order = torch.argsort(labels, stable=True)
            counts = torch.bincount(labels, minlength=data.num_classes)
            self.order, self.counts = order.to(data.x.device), counts
            self.starts = torch.cumsum(counts, 0) - counts
            self.replace = k > int((counts > 0).sum())  # more groups than classes: classes repeat

    @staticmethod
    def check_classes_per_batch(k, batch_size: int, data: Data) -> int:
        """``k`` (``train.classes_per_batch``) validated against a loader's batch and the data's labels."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise DataError(f"train.classes_per_batch must be an integer ≥ 0 (0: i.i.d. batches), got {k!r}")
        if k and data.num_classes == 0:
            raise DataError(f"train.classes_per_batch={k} (same-class groups) needs a labelled dataset; "
                            f"'{data.name}' has no labels (use 0)")
        if k and batch_size % k:
            raise DataError(f"train.classes_per_batch={k} must divide the batch of {batch_size} rows "
                            "(train.batch_size, per rank under train.world_size): each group holds batch/k rows")
        return k

    def indices(self) -> Tensor:
        """(batch_size,) row indices on the data's device.

        Drawn on the CPU generator (checkpointed), copied to a GPU through pinned memory without
        blocking (``ablate.gpu.to_device``): no host sync per batch.
        """
        from ablate.gpu import to_device

        n, dev = len(self.data.x), self.data.x.device
        k = self.classes_per_batch
        if k:
            m = self.batch_size // k
            classes = torch.multinomial(self.counts.double(), k, replacement=self.replace, generator=self.generator)
            size = self.counts[classes]
            u = torch.rand((k, m), generator=self.generator, dtype=torch.float64)
            pos = torch.minimum((u * size[:, None]).long(), size[:, None] - 1)  # uniform in 0..size−1
            return self.order[to_device((self.starts[classes][:, None] + pos).reshape(-1), dev)]
        return to_device(torch.randint(n, (self.batch_size,), generator=self.generator), dev)

    def next(self) -> tuple[Tensor, Tensor]:
        idx = self.indices()
        return self.data.x[idx], self.data.labels[idx]


def make_loader(data: Data, batch_size: int, generator: torch.Generator, classes_per_batch: int = 0):
    """The training loader of ``data``: its own (``data.loader``) or a :class:`ResidentLoader` over ``x``.

    ``classes_per_batch``: k same-class groups per batch (0: i.i.d.), see :class:`ResidentLoader`.
    """
    if data.loader is not None:
        return data.loader(batch_size, generator, classes_per_batch)
    return ResidentLoader(data, batch_size, generator, classes_per_batch)


# -- 2-D toys ---------------------------------------------------------------
def _toy(name: str, points: np.ndarray, device) -> Data:
    x = torch.as_tensor(points, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0).mean()  # unit scale, keeps the aspect ratio
    n_test = len(x) // 5
    return Data(name, x[n_test:].to(device), torch.zeros(len(x) - n_test, dtype=torch.long, device=device), 0,
                "vector", x[:n_test].to(device), torch.zeros(n_test, dtype=torch.long, device=device))


@DATASET.register("checkerboard")
def checkerboard(n: int = 20000, squares: int = 4, seed: int = 0, *, device="cpu") -> Data:
    """2-D checkerboard: uniform on the black squares of a squares×squares board."""
    rng = np.random.default_rng(seed)
    cells = [(i, j) for i in range(squares) for j in range(squares) if (i + j) % 2 == 0]
    pick = rng.integers(len(cells), size=n)
    corner = np.array(cells, dtype=np.float64)[pick]
    return _toy("checkerboard", corner + rng.random((n, 2)), device)


@DATASET.register("gaussian_mixture")
def gaussian_mixture(n: int = 20000, modes: int = 8, radius: float = 4.0, std: float = 0.3, seed: int = 0, *,
                     device="cpu") -> Data:
    """2-D ring of ``modes`` Gaussians of std ``std`` at distance ``radius``."""
    rng = np.random.default_rng(seed)
    ang = 2 * math.pi * rng.integers(modes, size=n) / modes
    centres = radius * np.stack([np.cos(ang), np.sin(ang)], 1)
    return _toy("gaussian_mixture", centres + std * rng.standard_normal((n, 2)), device)


@DATASET.register("moons")
def moons(n: int = 20000, noise: float = 0.05, seed: int = 0, *, device="cpu") -> Data:
    """scikit-learn's two interleaving half circles."""
    from sklearn.datasets import make_moons

    pts, _ = make_moons(n, noise=noise, random_state=seed)
    return _toy("moons", pts, device)


@DATASET.register("spirals")
def spirals(n: int = 20000, turns: float = 1.5, noise: float = 0.05, seed: int = 0, *, device="cpu") -> Data:
    """Two interleaved Archimedean spirals."""
    rng = np.random.default_rng(seed)
    s = np.sqrt(rng.random(n)) * turns * 2 * math.pi
    sign = np.where(rng.random(n) < 0.5, 1.0, -1.0)
    pts = sign[:, None] * np.stack([s * np.cos(s), s * np.sin(s)], 1) / (turns * 2 * math.pi)
    return _toy("spirals", pts + noise * rng.standard_normal((n, 2)), device)


# -- images ---------------------------------------------------------------------
def _images(name, x: np.ndarray, y: np.ndarray, num_classes: int, size: int | None, device,
            x_test=None, y_test=None, kind="image") -> Data:
    """uint8-range or [0, 1] float NCHW arrays → [−1, 1] tensors, optionally resized to size×size."""

    def prep(a):
        t = torch.as_tensor(np.asarray(a), dtype=torch.float32)
        if size is not None and t.shape[-1] != size:
            t = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", antialias=True,
                                                align_corners=False)
        return (t * 2 - 1).clamp(-1, 1).to(device)

    lab = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.long).to(device)  # noqa: E731
    return Data(name, prep(x), lab(y), num_classes, kind,
                None if x_test is None else prep(x_test), None if y_test is None else lab(y_test))


@DATASET.register("digits")
def digits(size: int = 8, test_fraction: float = 0.2, seed: int = 0, *, device="cpu") -> Data:
    """scikit-learn's bundled handwritten digits: 1797 images 1×8×8, 10 classes (optionally resized)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0)[:, None].astype(np.float32)
    perm = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    te, tr = perm[:n_test], perm[n_test:]
    return _images("digits", x[tr], d.target[tr], 10, size, device, x[te], d.target[te])


def _need_dir(path: str, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise DataError(f"{what}: directory '{p}' does not exist (data.path); nothing is downloaded")
    return p


@DATASET.register("image_folder")
def image_folder(path: str = "", size: int = 32, *, device="cpu") -> Data:
    """Images under ``path``/<class>/*.png|jpg (one folder per class, sorted) or directly under ``path``."""
    from PIL import Image

    root = _need_dir(path, "image_folder")
    exts = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    pairs = ([(f, i) for i, c in enumerate(classes) for f in sorted((root / c).iterdir()) if f.suffix.lower() in exts]
             if classes else [(f, 0) for f in sorted(root.iterdir()) if f.suffix.lower() in exts])
    if not pairs:
        raise DataError(f"image_folder: no images ({', '.join(sorted(exts))}) under '{root}'")
    imgs = [np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BICUBIC)) for f, _ in pairs]
    x = np.stack(imgs).transpose(0, 3, 1, 2) / 255.0
    return _images("image_folder", x, [c for _, c in pairs], len(classes), None, device)


@DATASET.register("cifar10")
def cifar10(path: str = "~/data/cifar-10-batches-py", *, device="cpu") -> Data:
    """CIFAR-10 from the python pickles at ``path`` (data_batch_1..5, test_batch); never downloads.

    The batches are pickles, and unpickling runs whatever a file names: they are read with an unpickler that
    builds numpy arrays and plain containers only (what the official files hold) and refuses anything else.
    """
    import codecs

    root = _need_dir(path, "cifar10")
    try:
        from numpy._core import multiarray as _ma, numeric as _nu
    except ImportError:  # numpy 1
        from numpy.core import multiarray as _ma, numeric as _nu

    def latin1(text, encoding="latin1", errors="strict"):  # protocol-2 pickles write bytes as _codecs.encode
        if encoding.lower().replace("-", "") != "latin1" or not isinstance(text, str):
            raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
        return codecs.encode(text, "latin1", errors)

    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): latin1}
    for mod in ("numpy.core", "numpy._core"):
        allowed[(f"{mod}.multiarray", "_reconstruct")] = _ma._reconstruct  # ndarray.__reduce__ (protocols 2-4)
        allowed[(f"{mod}.multiarray", "scalar")] = _ma.scalar  # numpy integer labels
        if hasattr(_nu, "_frombuffer"):
            allowed[(f"{mod}.numeric", "_frombuffer")] = _nu._frombuffer  # ndarray.__reduce_ex__(5)

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) in allowed:
                return allowed[(module, name)]
            raise DataError(f"cifar10: '{self.file_name}' wants to load {module}.{name}, which a CIFAR-10 batch "
                            f"never holds: refused (a pickle can run code; only numpy arrays, lists and dicts are "
                            f"read)")

        def persistent_load(self, pid):
            raise DataError(f"cifar10: '{self.file_name}' holds a persistent reference: refused")

    def field(d, key, f):
        for k in (key, key.encode()):  # str keys (read with latin1, as written by Python 2) or bytes keys
            if k in d:
                return d[k]
        raise DataError(f"cifar10: '{f}' has no '{key}' entry; not a CIFAR-10 python batch")

    def load(names):
        xs, ys = [], []
        for n in names:
            f = root / n
            if not f.is_file():
                raise DataError(f"cifar10: missing file '{f}'")
            with open(f, "rb") as fh:
                u = Unpickler(fh, encoding="latin1")
                u.file_name = str(f)
                try:
                    d = u.load()
                except DataError:
                    raise
                except Exception as exc:  # noqa: BLE001 - truncated or not a pickle
                    raise DataError(f"cifar10: cannot read '{f}': {type(exc).__name__}: {exc}") from None
            if not isinstance(d, dict):
                raise DataError(f"cifar10: '{f}' holds a {type(d).__name__}, not a CIFAR-10 batch (a dict)")
            data, labels = field(d, "data", f), field(d, "labels", f)
            if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
                    and data.shape[1] == 3 * 32 * 32):
                raise DataError(f"cifar10: '{f}': data must be a uint8 array (N, 3072), got "
                                f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
            labels = list(labels) if isinstance(labels, (list, tuple, np.ndarray)) else None
            if (labels is None or len(labels) != len(data)
                    or not all(isinstance(v, (int, np.integer)) and 0 <= v < 10 for v in labels)):
                raise DataError(f"cifar10: '{f}': labels must be {len(data)} integers in 0..9")
            xs.append(data.reshape(-1, 3, 32, 32))
            ys.extend(int(v) for v in labels)
        return np.concatenate(xs) / 255.0, np.asarray(ys)

    x, y = load([f"data_batch_{i}" for i in range(1, 6)])
    xt, yt = load(["test_batch"])
    return _images("cifar10", x, y, 10, None, device, xt, yt)


def load_data(spec: dict, device="cpu") -> Data:
    spec = dict(spec)
    name = spec.pop("name", None)
    data = DATASET.build(name, spec, device=device)
    data.meta["spec"] = {"name": name, **DATASET.resolve(name, spec)}  # identifies the data in caches
    return data


from ablate import latents as _latents  # noqa: E402,F401  (registers the 'latents' dataset; imports this module)
