"""Conditioning embeddings shared by the backbones: emb(t) + emb(step) + emb(y)."""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

StepEmbedding = Literal["difference", "log2"]


def sinusoidal(x: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Transformer sinusoidal features of a (B,) tensor (DDPM / DiT convention)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
    args = x.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ScalarEmbedder(nn.Module):
    """Sinusoidal features of a scalar (scaled by ``scale``), then a 2-layer MLP (DiT's TimestepEmbedder)."""

    def __init__(self, hidden: int, freq_dim: int = 256, scale: float = 1000.0):
        super().__init__()
        self.freq_dim, self.scale = freq_dim, scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(sinusoidal(x * self.scale, self.freq_dim).to(self.mlp[0].weight.dtype))


def step_feature(r: Tensor, t: Tensor, kind: StepEmbedding) -> Tensor:
    """The scalar a network sees for the step d = t − r.

    ``difference``: d itself (MeanFlow / ESC: emb(t) + emb(t − r)).
    ``log2``: the shortcut paper's log2 step level, −log2(d) clamped to [0, 16]
    (d = 1 → 0, d = 1/128 → 7); d = 0 (instantaneous velocity) maps to 17.
    """
    d = t - r
    if kind == "difference":
        return d
    level = -torch.log2(d.clamp_min(2.0 ** -16)).clamp(0.0, 16.0)
    return torch.where(d > 0, level, torch.full_like(d, 17.0)) / 17.0


class Conditioning(nn.Module):
    """c = emb(t) + emb(step) + emb(y), labels 0..K−1 plus the null label K.

    ``time_scale`` multiplies t before the sinusoidal features. The default is 1
    (c_noise(t) = t), not DiT's 1000: the MeanFlow/consistency targets take
    ∂u/∂t by JVP, and a 1000× time scale makes that derivative, hence the
    target, blow up (Lu & Song 2025, sCM §4); flow matching is indifferent.
    """

    def __init__(self, hidden: int, num_classes: int, step_embedding: StepEmbedding = "difference",
                 time_scale: float = 1.0):
        super().__init__()
        self.step_embedding = step_embedding
        self.t_embed = ScalarEmbedder(hidden, scale=time_scale)
        self.d_embed = ScalarEmbedder(hidden, scale=time_scale)
        self.y_embed = nn.Embedding(num_classes + 1, hidden)

    def forward(self, r: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return self.t_embed(t) + self.d_embed(step_feature(r, t, self.step_embedding)) + self.y_embed(y)
