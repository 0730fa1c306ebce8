"""Decoding latent samples to images before feature extraction (latent datasets only).

The decoder is diffusers' ``AutoencoderKL`` (optional extra ``vae``), loaded
from a local folder (``data.vae``) with ``local_files_only=True``: nothing is
downloaded. A latent dataset's tensors are ``scale`` × (the VAE's latents −
its ``shift_factor``, if any), so a sample z decodes as ``vae.decode(z / scale + shift)``.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor


class VAEError(ValueError):
    pass


@lru_cache(maxsize=4)
def load_vae(path: str, device: str = "cpu", what: str = "data.vae"):
    """A frozen diffusers ``AutoencoderKL`` from the local folder ``path`` (``what`` names the setting in errors)."""
    if not Path(path).expanduser().is_dir():
        raise VAEError(f"VAE folder '{path}' does not exist ({what}); the VAE is loaded from a local folder only "
                       "(a diffusers AutoencoderKL saved with save_pretrained), nothing is downloaded")
    try:
        from diffusers import AutoencoderKL
    except ImportError as exc:
        raise VAEError("the VAE needs diffusers: pip install -e '.[vae]'") from exc
    try:
        vae = AutoencoderKL.from_pretrained(str(Path(path).expanduser()), local_files_only=True,
                                            use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise VAEError(f"cannot load an AutoencoderKL from '{path}' ({what}): {exc}") from exc
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def to_images(data, x: Tensor, batch_size: int = 64) -> Tensor:
    """Data-space samples → images in [−1, 1] (decoded through the VAE for latent data)."""
    if data.kind != "latent":
        return x
    path = data.meta.get("vae")
    if not path:
        raise VAEError(f"latent dataset at '{data.meta.get('path')}' has no decoder: set data.vae to a local "
                       "AutoencoderKL folder to evaluate image metrics")
    vae = load_vae(str(path), str(x.device))
    scale = float(data.meta.get("scale", 1.0))
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)  # SD3/FLUX VAEs: z = (latent − shift)·scale
    out = [vae.decode((x[i:i + batch_size] / scale + shift).to(vae.dtype)).sample.float()
           for i in range(0, len(x), batch_size)]
    return torch.cat(out).clamp(-1, 1)
