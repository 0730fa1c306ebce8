"""Sample grids as PNG (PIL only): image tiles, or a scatter plot for 2-D points."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def image_grid(x: torch.Tensor, nrow: int | None = None, min_tile: int = 32) -> Image.Image:
    """(N, C, H, W) in [−1, 1] → one RGB image, small tiles upscaled (nearest) to ≥ ``min_tile`` px."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    n, c, h, w = x.shape
    if c == 1:
        x = x.expand(n, 3, h, w)
    elif c != 3:
        x = x[:, :3] if c > 3 else torch.cat([x, x[:, :1].expand(n, 3 - c, h, w)], 1)
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    ncol = int(math.ceil(n / nrow))
    pad = 1
    grid = torch.full((3, ncol * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = x[i]
    img = Image.fromarray(grid.permute(1, 2, 0).numpy())
    scale = max(1, min_tile // h)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def scatter(points: torch.Tensor, reference: torch.Tensor | None = None, size: int = 384) -> Image.Image:
    """2-D samples (blue) over reference data (grey), on a common square frame."""
    pts = points.detach().float().cpu().numpy()
    ref = None if reference is None else reference.detach().float().cpu().numpy()
    frame = ref if ref is not None else pts
    lo, hi = np.percentile(frame, 0.5, axis=0), np.percentile(frame, 99.5, axis=0)
    span = float((hi - lo).max()) * 1.3 + 1e-6
    mid = (lo + hi) / 2
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)

    def plot(a, colour):
        uv = ((a - mid) / span + 0.5) * size
        for u, v in uv[np.isfinite(uv).all(1)]:
            draw.point((float(u), float(size - v)), fill=colour)

    if ref is not None:
        plot(ref, (190, 190, 190))
    plot(pts, (31, 119, 180))
    return img


def save_samples(x: torch.Tensor, path: str | Path, reference: torch.Tensor | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = scatter(x, reference) if x.dim() == 2 else image_grid(x)
    tmp = path.with_suffix(".tmp.png")
    img.save(tmp)
    tmp.replace(path)
    return path
