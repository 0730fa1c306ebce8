"""Feature extractors for FID/KID/precision-recall (DESIGN §6), behind the ``feature_extractor`` registry.

Each registered extractor is also a torch-fidelity extractor (registered in
torch-fidelity's own registry and created with its ``create_feature_extractor``);
the statistics and distances come from torch-fidelity too. Ours only decide
*which* features:

- ``inception``: torch-fidelity's ``inception-v3-compat`` (the standard FID
  network), from a local weights file only; nothing is downloaded.
- ``classifier``: the penultimate layer of a small CNN trained
  deterministically on the dataset's own train split, cached on disk under a
  hash of everything that shaped it, with its held-out accuracy recorded.
  Serves any labelled image dataset (digits by default).
- ``raw``: the coordinates themselves (2-D toys): the Fréchet distance between
  Gaussians fitted to the points, exact for Gaussian data.
- ``dinov2``: the CLS token (1024-d) of timm's DINOv2 ViT-L/14
  (``vit_large_patch14_dinov2.lvd142m``), built with ``pretrained=False`` and
  loaded from a local weights file only; the Fréchet distance on these features
  is FD-DINOv2 (Stein et al., NeurIPS 2023). Default file:
  ``$TORCH_HOME/hub/checkpoints/vit_large_patch14_dinov2.lvd142m.pth`` (i.e.
  ``torch.hub.get_dir()/checkpoints``), else ``eval.extractor.weights=PATH``
  (a ``.pth`` state dict, timm's or the original facebookresearch/dinov2 one,
  or a ``.safetensors`` file). Preprocessing as DINOv2 expects: uint8 → [0, 1],
  resize to 224×224 bicubic (antialiased), ImageNet mean/std.

Images enter every extractor as 8-bit (N, C, H, W) tensors, i.e. exactly what
a saved PNG would hold; vectors enter as float.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch_fidelity
from torch import Tensor, nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor

from components.registry import Registry

FEATURE_EXTRACTOR = Registry("feature_extractor", facts=("data", "cache_dir"))
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # the name torch-fidelity's download would use
DINOV2_MODEL = "vit_large_patch14_dinov2.lvd142m"  # timm's name of the FD-DINOv2 network (ViT-L/14)
DINOV2_FILE = f"{DINOV2_MODEL}.pth"  # its default file under torch.hub.get_dir()/checkpoints
DINOV2_SIZE = 224  # the resolution FD-DINOv2 feeds the network (16×16 patches of 14 pixels)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RESIZE = {  # what each torch-fidelity extractor does to the uint8 images before its network (provenance)
    "inception-v3-compat": "grey→RGB; 299×299 bilinear inside torch-fidelity's inception-v3-compat",
    "ablate-dinov2": f"grey→RGB; {DINOV2_SIZE}×{DINOV2_SIZE} bicubic (antialiased), ImageNet mean/std",
}


class FeatureError(ValueError):
    """A feature extractor that cannot be built here (missing weights, unlabelled data, ...)."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else $ABLATE_CACHE, else ~/.cache/ablate."""
    root = cache_dir or os.environ.get("ABLATE_CACHE") or Path.home() / ".cache" / "ablate"
    return Path(root).expanduser()


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def to_uint8(x: Tensor) -> Tensor:
    """[−1, 1] images → uint8 [0, 255], as a PNG would store them."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# -- torch-fidelity extractor classes ------------------------------------------------
class RawFeatures(FeatureExtractorBase):
    """Identity features: the flattened input (float64, so Gaussian FIDs are exact to rounding)."""

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)

    @staticmethod
    def get_provided_features_list():
        return ("raw",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "raw"

    @staticmethod
    def can_be_compiled():
        return False

    def forward(self, x):
        return (x.reshape(x.shape[0], -1).double(),)


class SmallCNN(nn.Module):
    """conv3×3 ×3 (the second with stride 2) → global average pool → ``width`` features → logits."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width // 2, 3, padding=1), nn.GELU(),
            nn.Conv2d(width // 2, width, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1), nn.GELU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(width, num_classes)

    def forward(self, x_uint8: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.body(x_uint8.float() / 127.5 - 1.0)
        return feats, self.head(feats)


class ClassifierFeatures(FeatureExtractorBase):
    """A :class:`SmallCNN` loaded (``weights_only=True``) from ``feature_extractor_weights_path``."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise FeatureError("the classifier extractor needs feature_extractor_weights_path")
        state = torch.load(feature_extractor_weights_path, map_location="cpu", weights_only=True)
        m = state["meta"]
        with torch.random.fork_rng(devices=[]):  # building must not move the caller's global RNG
            self.net = SmallCNN(m["in_channels"], m["num_classes"], m["width"])
        self.net.load_state_dict(state["model"])

    @staticmethod
    def get_provided_features_list():
        return ("penultimate", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "penultimate"

    @staticmethod
    def can_be_compiled():
        return False

    def forward(self, x):
        feats, logits = self.net(x)
        out = {"penultimate": feats, "logits": logits}
        return tuple(out[f] for f in self.features_list)


def load_state_file(path: str | os.PathLike) -> dict:
    """A plain tensor state dict from ``.safetensors`` or a ``torch.save`` file (``weights_only=True``)."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means "not a plain state dict"
        raise FeatureError(f"'{path}' is not a plain tensor state dict ({exc})") from exc
    for key in ("state_dict", "model"):  # checkpoints that wrap the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise FeatureError(f"'{path}' does not hold a state dict")
    return state


class DINOv2Features(FeatureExtractorBase):
    """timm's DINOv2 ViT (``pretrained=False``) loaded from a local file; features: the final-norm CLS token.

    Input: uint8 (N, 3, H, W); → [0, 1] → ``DINOV2_SIZE``² bicubic (antialiased) → ImageNet mean/std. The
    network keeps its checkpoint's position grid (518² for lvd142m) and interpolates it to 224² per call
    (``dynamic_img_size``), as DINOv2's own ``interpolate_pos_encoding`` does.
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, model_name=DINOV2_MODEL,
                 model_kwargs=None, **kwargs):
        super().__init__(name, features_list)
        import timm
        from timm.models.vision_transformer import checkpoint_filter_fn

        if feature_extractor_weights_path is None:
            raise FeatureError("the dinov2 extractor needs feature_extractor_weights_path")
        with torch.random.fork_rng(devices=[]):  # building must not move the caller's global RNG
            self.net = timm.create_model(model_name, pretrained=False, num_classes=0, dynamic_img_size=True,
                                         **dict(model_kwargs or {}))
        state = load_state_file(feature_extractor_weights_path)
        state = checkpoint_filter_fn(state, self.net)  # original dinov2 keys → timm's; resamples pos_embed
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        missing, unexpected = self.net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise FeatureError(f"'{feature_extractor_weights_path}' does not fit {model_name}: missing "
                               f"{list(missing)[:5]}, unexpected {list(unexpected)[:5]}")
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @staticmethod
    def get_provided_features_list():
        return ("cls",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "cls"

    @staticmethod
    def can_be_compiled():
        return False

    def preprocess(self, x: Tensor) -> Tensor:
        if x.dtype != torch.uint8:
            raise FeatureError(f"dinov2 features take uint8 images, got {x.dtype}")
        x = x.float() / 255.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != (DINOV2_SIZE, DINOV2_SIZE):
            x = nn.functional.interpolate(x, size=(DINOV2_SIZE, DINOV2_SIZE), mode="bicubic", align_corners=False,
                                          antialias=True).clamp(0, 1)
        return (x - self.mean) / self.std

    def forward(self, x):
        tokens = self.net.forward_features(self.preprocess(x))
        return (tokens[:, 0].double(),)  # the CLS token after the final norm (float64: exact statistics)


for _name, _cls in (("ablate-raw", RawFeatures), ("ablate-classifier", ClassifierFeatures),
                    ("ablate-dinov2", DINOv2Features)):
    if _name not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(_name, _cls)


# -- what evaluation uses ---------------------------------------------------------------
@dataclass
class Extractor:
    """A built feature extractor and its provenance (recorded with every metric it produces)."""

    fidelity_name: str  # name in torch-fidelity's registry
    layer: str
    input: str  # "uint8" (images) or "float" (vectors)
    provenance: dict
    fidelity_kwargs: dict = field(default_factory=dict)
    resize: str = "none"  # what happens to the images between uint8 and the network (provenance)
    _module: FeatureExtractorBase | None = None

    @property
    def id(self) -> str:
        return digest(self.provenance)

    def module(self, device: torch.device) -> FeatureExtractorBase:
        if self._module is None:
            self._module = create_feature_extractor(self.fidelity_name, [self.layer], cuda=False, verbose=False,
                                                    **self.fidelity_kwargs)
        return self._module.to(device)

    @torch.no_grad()
    def __call__(self, x: Tensor, batch_size: int = 500) -> Tensor:
        """Features (N, D) on the CPU of data-space samples x (images in [−1, 1] or vectors)."""
        if self.input == "uint8":
            if x.dim() != 4:
                raise FeatureError(f"{self.provenance['name']} features need images (N, C, H, W), got {tuple(x.shape)}")
            x = to_uint8(x)
            if self.fidelity_name in ("inception-v3-compat", "ablate-dinov2") and x.shape[1] != 3:
                x = x[:, :1].expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]
        mod = self.module(x.device)
        return torch.cat([mod(x[i:i + batch_size])[0].cpu() for i in range(0, len(x), batch_size)])


@FEATURE_EXTRACTOR.register("raw")
def raw(*, data=None, cache_dir=None) -> Extractor:
    """The raw coordinates (2-D toys): FID is then the exact Fréchet distance of the fitted Gaussians."""
    return Extractor("ablate-raw", "raw", "float", {"name": "raw"})


@FEATURE_EXTRACTOR.register("inception")
def inception(weights: str = "", *, data=None, cache_dir=None) -> Extractor:
    """torch-fidelity's inception-v3-compat (standard FID, pool3 2048-d) from a local weights file."""
    path = Path(weights).expanduser() if weights else Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if not path.is_file():
        raise FeatureError(
            f"Inception-v3 weights not found at '{path}' and nothing is downloaded here. Put torch-fidelity's "
            f"'{INCEPTION_FILE}' there (or set eval.extractor.weights=PATH), or use eval.extractor=classifier")
    try:  # torch-fidelity loads with weights_only=False; admit only a file that is plain tensors
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means "not a plain state dict"
        raise FeatureError(f"'{path}' is not a plain tensor state dict ({exc})") from exc
    return Extractor("inception-v3-compat", "2048", "uint8",
                     {"name": "inception", "file": path.name, "sha": _file_sha(path)},
                     {"feature_extractor_weights_path": str(path)}, resize=RESIZE["inception-v3-compat"])


@FEATURE_EXTRACTOR.register("dinov2")
def dinov2(weights: str = "", model: str = DINOV2_MODEL, model_kwargs: dict | None = None, *, data=None,
           cache_dir=None) -> Extractor:
    """FD-DINOv2's features: the CLS token (1024-d) of DINOv2 ViT-L/14 from a local weights file.

    ``weights``: the file (default ``torch.hub.get_dir()/checkpoints/<model>.pth``, i.e. under
    $TORCH_HOME/hub/checkpoints); ``model``: the timm architecture and ``model_kwargs`` overrides of it
    (the tests use a one-block ViT-S/14)."""
    default = Path(torch.hub.get_dir()) / "checkpoints" / f"{model}.pth"
    path = Path(weights).expanduser() if weights else default
    if not path.is_file():
        raise FeatureError(
            f"DINOv2 weights not found at '{path}' and nothing is downloaded here. Put the state dict of timm's "
            f"'{model}' (or facebookresearch/dinov2's dinov2_vitl14_pretrain.pth) there as '{default}' (or set "
            f"eval.extractor.weights=PATH / eval.fd_dinov2.weights=PATH), or use another eval.extractor")
    load_state_file(path)  # a plain tensor file, checked before anything is recorded
    kw = dict(model_kwargs or {})
    prov = {"name": "dinov2", "model": model, "file": path.name, "sha": _file_sha(path)}
    if kw:
        prov["model_kwargs"] = kw
    return Extractor("ablate-dinov2", "cls", "uint8", prov,
                     {"feature_extractor_weights_path": str(path), "model_name": model, "model_kwargs": kw},
                     resize=RESIZE["ablate-dinov2"])


@FEATURE_EXTRACTOR.register("classifier")
def classifier(width: int = 64, epochs: int = 80, lr: float = 2e-3, batch_size: int = 128, seed: int = 0, *,
               data=None, cache_dir=None) -> Extractor:
    """Penultimate features of a small CNN trained on the dataset's train split (cached; accuracy recorded)."""
    if data is None or data.num_classes == 0 or data.kind == "vector":
        raise FeatureError("classifier features need a labelled image (or latent) dataset"
                           + (f"; '{data.name}' is not one" if data is not None else ""))
    settings = dict(data=data.meta.get("spec", {"name": data.name}), width=width, epochs=epochs, lr=lr,
                    batch_size=batch_size, seed=seed, arch="SmallCNN-v1")
    path = cache_root(cache_dir) / "classifiers" / f"{digest(settings)}.pt"
    if not path.is_file():
        train_classifier(data, path, width=width, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                         settings=settings)
    meta = torch.load(path, map_location="cpu", weights_only=True)["meta"]
    return Extractor("ablate-classifier", "penultimate", "uint8",
                     {"name": "classifier", "weights": path.stem, "test_accuracy": round(meta["test_accuracy"], 4)},
                     {"feature_extractor_weights_path": str(path)})


@torch.enable_grad()  # callers may be under no_grad
def train_classifier(data, path: Path, *, width: int, epochs: int, lr: float, batch_size: int, seed: int,
                     settings: dict) -> dict:
    """Deterministic CPU training (fixed seed, fixed batch order); writes {model, meta} atomically."""
    from ablate.vae import to_images

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny CNN: one thread is fastest, and immune to oversubscription
    try:
        return _train_classifier(data, path, width=width, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                                 settings=settings)
    finally:
        torch.set_num_threads(threads)


def _train_classifier(data, path: Path, *, width, epochs, lr, batch_size, seed, settings) -> dict:
    from tqdm import tqdm

    from ablate.vae import to_images

    g = torch.Generator().manual_seed(seed)
    x, y = to_uint8(to_images(data, data.x).cpu()), data.labels.cpu()
    if data.x_test is not None and data.labels_test is not None:
        xt, yt = to_uint8(to_images(data, data.x_test).cpu()), data.labels_test.cpu()
    else:  # hold out a tenth of the train split
        perm = torch.randperm(len(x), generator=g)
        cut = max(1, len(x) // 10)
        xt, yt, x, y = x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = SmallCNN(x.shape[1], data.num_classes, width)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * -(-len(x) // batch_size))
    for _ in tqdm(range(epochs), desc=f"feature classifier ({data.name})", leave=False):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            xb = x[idx]
            # ±1-pixel shifts: the generated samples are not centred exactly like the data
            dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            loss = nn.functional.cross_entropy(net(xb)[1], y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        acc = float((net(xt)[1].argmax(1) == yt).float().mean())
    meta = dict(in_channels=int(x.shape[1]), num_classes=int(data.num_classes), width=width, test_accuracy=acc,
                test_count=int(len(xt)), settings=json.dumps(settings, sort_keys=True, default=str))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"model": net.state_dict(), "meta": meta}, tmp)
    os.replace(tmp, path)
    (path.with_suffix(".json")).write_text(json.dumps(meta, indent=2))
    return meta


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def default_extractor(data) -> str:
    """raw for vectors; the dataset classifier for small labelled images; Inception otherwise."""
    if data.kind == "vector":
        return "raw"
    if data.kind == "image" and data.num_classes and data.x.shape[-1] < 32:
        return "classifier"
    return "inception"


def build_extractor(spec, data, cache_dir=None) -> Extractor:
    """``spec``: "auto", a name, or {"name": ..., **options}."""
    if isinstance(spec, str):
        spec = {"name": spec}
    spec = dict(spec)
    name = spec.pop("name", "auto")
    if name == "auto":
        name = default_extractor(data)
    return FEATURE_EXTRACTOR.build(name, spec, data=data, cache_dir=cache_dir)
