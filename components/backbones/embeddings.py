"""Conditioning embeddings shared by the backbones: emb(t) + emb(step) + emb(y).

Each piece also has its tangent (forward-mode derivative along a direction of (r, t)), written out so a
backbone's ``forward_with_tangent`` can take the JVP of the MeanFlow / sCT targets without
``torch.func.jvp``'s overhead (zero weight tangents computed as real GEMMs). Tangent functions run under
no_grad on detached primals.
"""
from __future__ import annotations

import math
import zlib
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

StepEmbedding = Literal["difference", "log2"]


def _frequencies(dim: int, max_period: float, device) -> Tensor:
    half = dim // 2
    return torch.exp(-math.log(max_period) * torch.arange(half, device=device, dtype=torch.float32) / half)


def sinusoidal(x: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Transformer sinusoidal features of a (B,) tensor (DDPM / DiT convention)."""
    args = x.float()[:, None] * _frequencies(dim, max_period, x.device)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def sinusoidal_tangent(x: Tensor, dx: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Tangent of ``sinusoidal`` along dx: (−sin a, cos a)·da, a = x·ω."""
    freqs = _frequencies(dim, max_period, x.device)[None]
    args, dargs = x.float()[:, None] * freqs, dx.float()[:, None] * freqs
    return torch.cat([-torch.sin(args) * dargs, torch.cos(args) * dargs], dim=1)


def linear_tangent(layer: nn.Linear, dx: Tensor) -> Tensor:
    """Tangent of W·x + b along dx: W·dx. The weights' tangents are zero, so no GEMM is spent on them."""
    return F.linear(dx, layer.weight)


def silu_tangent(x: Tensor, dx: Tensor) -> Tensor:
    """Tangent of SiLU(x) = x·σ(x) along dx: σ(x)·(1 + x·(1 − σ(x)))·dx (an elementwise derivative,
    so the backward kernel computes it)."""
    return torch.ops.aten.silu_backward(dx, x)


class ScalarEmbedder(nn.Module):
    """Sinusoidal features of a scalar (scaled by ``scale``), then a 2-layer MLP (DiT's TimestepEmbedder)."""

    def __init__(self, hidden: int, freq_dim: int = 256, scale: float = 1000.0):
        super().__init__()
        self.freq_dim, self.scale = freq_dim, scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(sinusoidal(x * self.scale, self.freq_dim).to(self.mlp[0].weight.dtype))

    def tangent(self, x: Tensor, dx: Tensor) -> Tensor:
        """Tangent of ``forward`` at x along dx (B,)."""
        dtype = self.mlp[0].weight.dtype
        h = self.mlp[0](sinusoidal(x * self.scale, self.freq_dim).to(dtype))
        dh = linear_tangent(self.mlp[0], sinusoidal_tangent(x * self.scale, dx * self.scale, self.freq_dim).to(dtype))
        return linear_tangent(self.mlp[2], silu_tangent(h, dh))


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


def step_feature_tangent(r: Tensor, t: Tensor, dr: Tensor, dt: Tensor, kind: StepEmbedding) -> Tensor:
    """Tangent of ``step_feature`` along (dr, dt) ((B,) scalars: torch.func.jvp costs nothing here)."""
    if kind == "difference":
        return dt - dr
    return torch.func.jvp(lambda r_, t_: step_feature(r_, t_, kind), (r, t), (dr, dt))[1]


def zero_module(factory, like: Tensor) -> nn.Module:
    """A module attached after construction (an input embedding's or an output head's layers): built
    without moving the global RNG, its linear layers zeroed (it starts as a no-op), on ``like``'s device."""
    with torch.random.fork_rng(devices=[]):
        module = factory()
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module.to(device=like.device, dtype=like.dtype)


def select_head(heads: nn.ModuleDict, name: str) -> nn.Module:
    """The attached output head ``name`` (a backbone's ``forward(..., head=name)``)."""
    if name not in heads:
        raise ValueError(f"the network has no output head '{name}' (attached: {sorted(heads) or 'none'})")
    return heads[name]


class Conditioning(nn.Module):
    """c = emb(t) + emb(step) + emb(y) + Σ_k emb_k(cond[k]), labels 0..K−1 plus the null label K.

    ``time_scale`` multiplies t before the sinusoidal features. The default is 1
    (c_noise(t) = t), not DiT's 1000: the MeanFlow/consistency targets take
    ∂u/∂t by JVP, and a 1000× time scale makes that derivative, hence the
    target, blow up (Lu & Song 2025, sCM §4); flow matching is indifferent.

    Extra scalar inputs (e.g. the guidance scale that a guidance plugin feeds the
    network) are attached after construction with :meth:`add_input`. A network
    without them has exactly the parameters, initial weights and outputs it had
    before inputs existed; an attached input starts with a zero output layer, so
    the network is initially the same function of (z, r, t, y). Inputs given but not
    attached are ignored (such a network is the model without them); an attached
    input that is not given takes its default (e.g. the unguided scale).
    """

    def __init__(self, hidden: int, num_classes: int, step_embedding: StepEmbedding = "difference",
                 time_scale: float = 1.0):
        super().__init__()
        self.step_embedding = step_embedding
        self.t_embed = ScalarEmbedder(hidden, scale=time_scale)
        self.d_embed = ScalarEmbedder(hidden, scale=time_scale)
        self.y_embed = nn.Embedding(num_classes + 1, hidden)
        self.extra = nn.ModuleDict()  # attached inputs; empty: no parameters, no RNG draws
        self.defaults: dict[str, float] = {}

    def add_input(self, name: str, default: float = 0.0) -> None:
        """Attach a scalar input ``name`` (idempotent), ``default`` where a call does not give it. Its weights
        come from a generator seeded by the name alone: attaching never moves the global RNG and gives
        the same start in every design."""
        if name in self.extra:
            return
        self.defaults[name] = float(default)
        ref = self.t_embed.mlp[0].weight
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(zlib.crc32(name.encode()))
            emb = ScalarEmbedder(ref.shape[0], self.t_embed.freq_dim, self.t_embed.scale)
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
        nn.init.zeros_(emb.mlp[2].weight)  # starts as a no-op: c is unchanged until it learns
        nn.init.zeros_(emb.mlp[2].bias)
        self.extra[name] = emb.to(device=ref.device, dtype=ref.dtype)

    def forward(self, r: Tensor, t: Tensor, y: Tensor, cond: dict[str, Tensor] | None = None) -> Tensor:
        c = self.t_embed(t) + self.d_embed(step_feature(r, t, self.step_embedding)) + self.y_embed(y)
        for name, emb in self.extra.items():
            x = cond.get(name) if cond is not None else None
            c = c + emb(torch.full_like(t, self.defaults[name]) if x is None else x)
        return c

    def tangent(self, r: Tensor, t: Tensor, dr: Tensor, dt: Tensor) -> Tensor:
        """Tangent of c along (dr, dt); the label embedding and the attached inputs (constants) have none."""
        d = step_feature(r, t, self.step_embedding)
        dd = step_feature_tangent(r, t, dr, dt, self.step_embedding)
        return self.t_embed.tangent(t, dt) + self.d_embed.tangent(d, dd)
