"""Encode an image folder into latent shards: ``python -m ablate.encode IMAGE_FOLDER OUT_DIR --vae PATH``.

    python -m ablate.encode /data/imagenet/train /data/in256_latents --vae /models/sd-vae-ft-ema --flip
    python -m ablate.train meanflow data.name=latents data.path=/data/in256_latents data.vae=/models/sd-vae-ft-ema

Images are ``IMAGE_FOLDER/<class>/**/*.png|jpg|…`` (labels: the sorted
sub-folder names, as torchvision's ImageFolder) or directly in IMAGE_FOLDER
(unlabelled). Each is centre-cropped and resized to ``--resolution`` (ADM's
preprocessing, PIL only), scaled to [−1, 1] and encoded by a diffusers
``AutoencoderKL`` loaded from a local folder. The image order is shuffled
(``--seed``) before sharding, so every shard is a random sample of all classes:
a streaming loader that mixes a few shards at a time still sees every class.

Each shard ``shard_NNNNN.pt`` holds ``--shard-size`` images (twice as many rows
with ``--flip``: each image, then its mirror image):

- ``--store moments``: {mean, logvar: (n, C, H, W), labels, index, flipped: (n,)},
  sampled each time a row is served (the ``latents`` dataset, ablate/latents.py);
- ``--store samples``: {latents: (n, C, H, W), labels, index, flipped}, one posterior sample.

``index`` is the image's line in ``files.txt``. ``meta.json`` records count,
classes, shape, the VAE's scaling/shift factor, format, the shards and the
settings; ``"complete": true`` once every shard exists. Shards are written to a
temporary file and renamed, so an interruption leaves only whole shards and the
same command resumes without redoing them. Bad input is one message and exit
status 2, before anything is written.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def make_parser() -> argparse.ArgumentParser:
    from ablate.cli import help_parser

    p = help_parser("python -m ablate.encode", __doc__, defaults=True)  # the docstring, markup rendered plainly
    p.add_argument("image_folder", help="IMAGE_FOLDER/<class>/*.png|jpg (or images directly inside)")
    p.add_argument("out_dir", help="where the shards, meta.json and files.txt go (resumed if it holds an encode)")
    p.add_argument("--vae", required=True, help="a local diffusers AutoencoderKL folder (nothing is downloaded)")
    p.add_argument("--resolution", type=int, default=256, help="centre crop size in pixels")
    p.add_argument("--shard-size", type=int, default=2000, help="images per shard")
    p.add_argument("--store", choices=("moments", "samples"), default="moments",
                   help="posterior mean/logvar (sampled when loaded) or one sample")
    p.add_argument("--flip", action="store_true", help="also encode each image's mirror image (twice the rows)")
    p.add_argument("--batch-size", type=int, default=32, help="images per VAE forward")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="storage precision")
    p.add_argument("--seed", type=int, default=0, help="image order over shards, and the samples' noise")
    p.add_argument("--workers", type=int, default=8, help="threads decoding images")
    return p


if __name__ == "__main__":  # --help is answered before numpy and torch load (ablate/cli.py)
    from ablate.cli import early_help

    early_help(make_parser)

import numpy as np  # noqa: E402
import torch  # noqa: E402

EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
META, FILES = "meta.json", "files.txt"


class EncodeError(ValueError):
    """Bad input to the encoder (missing/empty folder, conflicting output folder, unreadable image)."""


def list_images(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """(files, labels, classes): one folder per class (sorted names, recursive inside) or images directly in root."""
    if not root.is_dir():
        raise EncodeError(f"image folder '{root}' does not exist")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    is_image = lambda f: f.is_file() and f.suffix.lower() in EXTS  # noqa: E731
    if classes:
        per_class = [sorted(f for f in (root / c).rglob("*") if is_image(f)) for c in classes]
        files = [f for found in per_class for f in found]
        labels = [i for i, found in enumerate(per_class) for _ in found]
    else:
        files = sorted(f for f in root.iterdir() if is_image(f))
        labels = [0] * len(files)
    if not files:
        raise EncodeError(f"no images ({', '.join(EXTS)}) under '{root}'")
    return files, labels, classes


def center_crop(img, size: int) -> np.ndarray:
    """ADM's centre crop (Dhariwal & Nichol 2021; DiT, MeanFlow): (size, size, 3) uint8.

    Halve with a box filter while the short side is ≥ 2·size (cheap and
    alias-free), resize the short side to ``size`` (bicubic), crop the centre.
    """
    from PIL import Image

    img = img.convert("RGB")
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(max(size, round(s * scale)) for s in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def load_image(path: Path, size: int) -> torch.Tensor:
    """The preprocessed image as a (3, size, size) float tensor in [−1, 1]."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            arr = center_crop(img, size)
    except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
        raise EncodeError(f"cannot read image '{path}': {exc}") from exc
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


@torch.no_grad()
def encode_batch(vae, x: torch.Tensor, store: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Images (n, 3, R, R) in [−1, 1] → {'mean', 'logvar'} or {'latents'} (n, C, R/f, R/f), float32 on the CPU."""
    post = vae.encode(x.to(vae.device, vae.dtype)).latent_dist
    mean, logvar = post.mean.float().cpu(), post.logvar.float().cpu()  # logvar clamped by diffusers to [−30, 20]
    if store == "moments":
        return {"mean": mean, "logvar": logvar}
    eps = torch.randn(mean.shape, generator=generator)  # drawn on the CPU: the same shard on any device
    return {"latents": mean + torch.exp(0.5 * logvar) * eps}


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError as exc:
        raise EncodeError(f"--device {spec!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EncodeError(f"--device {spec}: CUDA is not available")
    return dev


def _atomic_write(path: Path, write) -> None:
    """``write(file)`` into a temporary sibling, fsync, rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    _atomic_write(path, lambda fh: fh.write(json.dumps(obj, indent=2).encode()))


def encode(image_dir, out_dir, vae: str, *, resolution: int = 256, shard_size: int = 2000, store: str = "moments",
           flip: bool = False, batch_size: int = 32, device: str = "auto", dtype: str = "float32", seed: int = 0,
           workers: int = 8, progress: bool = True) -> dict:
    """Encode ``image_dir`` into shards under ``out_dir`` (resuming a previous run); returns meta.json's content."""
    from tqdm import tqdm

    from ablate.vae import load_vae

    image_dir, out_dir = Path(image_dir).expanduser(), Path(out_dir).expanduser()
    if resolution < 8 or shard_size < 1 or batch_size < 1 or store not in ("moments", "samples") \
            or dtype not in ("float32", "float16"):
        raise EncodeError("need --resolution ≥ 8, --shard-size ≥ 1, --batch-size ≥ 1, --store moments|samples, "
                          "--dtype float32|float16")
    files, labels, classes = list_images(image_dir)
    rel = [f.relative_to(image_dir).as_posix() for f in files]
    settings = {"resolution": resolution, "shard_size": shard_size, "format": store, "flip": flip, "dtype": dtype,
                "seed": seed, "vae": str(Path(vae).expanduser().resolve()), "images": len(files),
                "files_sha256": hashlib.sha256("".join(f"{r}\t{y}\n" for r, y in zip(rel, labels)).encode()).hexdigest()}
    if (out_dir / META).is_file():
        old = json.loads((out_dir / META).read_text()).get("settings", {})
        diff = sorted(k for k in settings if old.get(k) != settings[k])
        if diff:
            raise EncodeError(f"'{out_dir}' holds an encode with other settings or images (differ: {', '.join(diff)}); "
                              "use another OUT_DIR or delete it")
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise EncodeError(f"'{out_dir}' exists, is not empty and holds no {META}: not an encode folder to resume")
    dev = _device(device)
    model = load_vae(str(vae), str(dev), what="--vae")  # a clear VAEError before anything is written
    # a seeded shuffle: every shard mixes all classes, and a resumed run plans the same shards
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()
    n_shards = math.ceil(len(files) / shard_size)
    rows_per_image = 2 if flip else 1
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(out_dir / FILES, lambda fh: fh.write("".join(f"{r}\n" for r in rel).encode()))
    base = {"format": store, "images": len(files), "count": len(files) * rows_per_image, "classes": classes,
            "num_classes": len(classes), "resolution": resolution, "flip": flip, "files": FILES,
            "scaling_factor": float(getattr(model.config, "scaling_factor", 1.0) or 1.0),
            "shift_factor": float(getattr(model.config, "shift_factor", None) or 0.0), "settings": settings,
            "version": 1}
    _write_json(out_dir / META, {**base, "complete": False})
    names = [f"shard_{k:05d}.pt" for k in range(n_shards)]
    todo = [k for k in range(n_shards) if not (out_dir / names[k]).is_file()]
    done_images = len(files) - sum(len(order[k * shard_size:(k + 1) * shard_size]) for k in todo)
    shape = None
    bar = tqdm(total=len(files), initial=done_images, unit="img", desc=f"encode {image_dir.name}",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    store_dtype = getattr(torch, dtype)
    with ThreadPoolExecutor(max(1, workers)) as pool, bar:
        for k in todo:
            idx = order[k * shard_size:(k + 1) * shard_size]
            g = torch.Generator().manual_seed(seed * 1_000_003 + k)  # samples: reproducible per shard
            parts: list[dict] = []
            for i in range(0, len(idx), batch_size):
                chunk = idx[i:i + batch_size]
                x = torch.stack(list(pool.map(lambda j: load_image(files[j], resolution), chunk)))
                if flip:  # each image, then its mirror image
                    x = torch.stack([x, x.flip(-1)], 1).reshape(-1, *x.shape[1:])
                parts.append(encode_batch(model, x, store, g))
                bar.update(len(chunk))
            shard = {key: torch.cat([p[key] for p in parts]).to(store_dtype) for key in parts[0]}
            ids = torch.tensor(idx, dtype=torch.long).repeat_interleave(rows_per_image)
            shard.update(labels=torch.tensor([labels[j] for j in idx], dtype=torch.long).repeat_interleave(
                rows_per_image), index=ids, flipped=torch.arange(len(ids)) % rows_per_image == 1)
            _atomic_write(out_dir / names[k], lambda fh: torch.save(shard, fh))
            shape = list(next(iter(parts[0].values())).shape[1:])
    if shape is None:  # everything was already there: read the shape of one shard
        d = torch.load(out_dir / names[0], map_location="cpu", weights_only=True, mmap=True)
        shape = list((d["mean"] if "mean" in d else d["latents"]).shape[1:])
    shards = [{"file": names[k], "rows": len(order[k * shard_size:(k + 1) * shard_size]) * rows_per_image}
              for k in range(n_shards)]
    meta = {**base, "shape": shape, "shards": shards, "complete": True}
    _write_json(out_dir / META, meta)
    return meta


def main(argv: list[str] | None = None) -> int:
    from ablate.vae import VAEError

    args = make_parser().parse_args(argv)
    try:
        meta = encode(args.image_folder, args.out_dir, args.vae, resolution=args.resolution,
                      shard_size=args.shard_size, store=args.store, flip=args.flip, batch_size=args.batch_size,
                      device=args.device, dtype=args.dtype, seed=args.seed, workers=args.workers)
    except (EncodeError, VAEError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished shards are kept and the same command resumes", file=sys.stderr)
        return 130
    print(f"encoded {meta['images']} images ({meta['count']} rows, {len(meta['shards'])} shards, "
          f"{meta['format']} {tuple(meta['shape'])}) -> {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
