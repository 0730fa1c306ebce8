"""DiT (Peebles & Xie 2023) with adaLN-Zero, built on timm's ViT layers.

Conditioning c = emb(t) + emb(step) + emb(y) (DESIGN §3); the step is t − r
(MeanFlow / ESC) or the shortcut paper's log2 level. Attention is timm's,
which uses fused SDPA; targets that take a JVP switch SDPA to its math path.
"""
from __future__ import annotations

from typing import Literal

import torch
from timm.layers import Attention, Mlp, PatchEmbed, build_sincos2d_pos_embed
from torch import Tensor, nn

from components.backbones.embeddings import Conditioning
from components.registry import BACKBONE

# (depth, hidden size, heads) of DiT-S/B/L/XL; T (tiny) is a CPU-sized model for the small-data studies.
SIZES = {"T": (4, 128, 4), "S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """x ← x + g₁·Attn(mod(LN(x))) ; x ← x + g₂·MLP(mod(LN(x))), with (shift, scale, gate) from c (adaLN-Zero)."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, num_heads=heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        nn.init.zeros_(self.ada[-1].weight)
        nn.init.zeros_(self.ada[-1].bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        s1, sc1, g1, s2, sc2, g2 = self.ada(c).chunk(6, dim=1)
        x = x + g1[:, None] * self.attn(_modulate(self.norm1(x), s1, sc1))
        return x + g2[:, None] * self.mlp(_modulate(self.norm2(x), s2, sc2))


@BACKBONE.register("dit", slug=lambda kw: f"dit_{kw['size'].lower()}{kw['patch']}")
class DiT(nn.Module):
    """Diffusion transformer for (C, H, W) inputs; sizes T/S/B/L/XL, patch 2/4/8.

    ``depth``, ``hidden``, ``heads`` override the size's values when set.
    """

    def __init__(self, size: Literal["T", "S", "B", "L", "XL"] = "S", patch: Literal[2, 4, 8] = 2,
                 step_embedding: Literal["difference", "log2"] = "difference", depth: int | None = None,
                 hidden: int | None = None, heads: int | None = None, mlp_ratio: float = 4.0,
                 time_scale: float = 1.0, *,
                 data_shape=(4, 32, 32), num_classes: int = 0):
        super().__init__()
        if len(data_shape) != 3:
            raise ValueError(f"dit needs (C, H, W) data, got shape {tuple(data_shape)}")
        c, h, w = data_shape
        if h % patch or w % patch:
            raise ValueError(f"dit patch {patch} does not divide the image size {h}×{w}")
        d0, h0, n0 = SIZES[size]
        depth, hidden, heads = depth or d0, hidden or h0, heads or n0
        if hidden % heads:
            raise ValueError(f"dit hidden size {hidden} is not divisible by {heads} heads")
        self.data_shape, self.patch = (c, h, w), patch
        self.embed = PatchEmbed((h, w), patch, c, hidden)
        self.grid = (h // patch, w // patch)
        self.register_buffer("pos", build_sincos2d_pos_embed(list(self.grid), hidden)[None], persistent=False)
        self.cond = Conditioning(hidden, num_classes, step_embedding, time_scale)
        self.blocks = nn.ModuleList(DiTBlock(hidden, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.head = nn.Linear(hidden, patch * patch * c)
        self._init()

    def _init(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.cond.y_embed.weight, std=0.02)
        for emb in (self.cond.t_embed, self.cond.d_embed):
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        for blk in self.blocks:  # adaLN-Zero: every residual branch starts closed
            nn.init.zeros_(blk.ada[-1].weight)
            nn.init.zeros_(blk.ada[-1].bias)
        for m in (self.ada[-1], self.head):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, z: Tensor, r: Tensor, t: Tensor, y: Tensor) -> Tensor:
        x = self.embed(z) + self.pos.to(z.dtype)
        c = self.cond(r, t, y)
        for blk in self.blocks:
            x = blk(x, c)
        shift, scale = self.ada(c).chunk(2, dim=1)
        x = self.head(_modulate(self.norm(x), shift, scale))
        return self._unpatchify(x)

    def _unpatchify(self, x: Tensor) -> Tensor:
        c, p, (gh, gw) = self.data_shape[0], self.patch, self.grid
        x = x.reshape(x.shape[0], gh, gw, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(x.shape[0], c, gh * p, gw * p)
