from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from components.backbones.embeddings import Conditioning, select_head, zero_module
from components.registry import BACKBONE


@BACKBONE.register("mlp", slug=lambda kw: f"mlp{kw['depth']}x{kw['width']}")
class MLP(nn.Module):
    """Residual MLP for vectors (2-D toys): u = MLP(z, emb(t) + emb(t − r) + emb(y)).

    Each block: h ← h + W₂·SiLU(W₁·SiLU(LN(h) ⊙ (1 + scale(c)) + shift(c))).

    Attachable after construction (no new options, so designs keep their ids): scalar inputs
    (:meth:`add_input`, given as ``cond={name: (B,)}``) and output heads (:meth:`add_head`, chosen with
    ``head=name``; a copy of the output layer, zero-initialised) that share the trunk.
    """

    def __init__(self, width: int = 256, depth: int = 4,
                 step_embedding: Literal["difference", "log2"] = "difference", time_scale: float = 1.0, *,
                 data_shape=(2,), num_classes: int = 0):
        super().__init__()
        self.data_shape = tuple(data_shape)
        dim = math.prod(self.data_shape)
        self.cond = Conditioning(width, num_classes, step_embedding, time_scale)
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(dict(norm=nn.LayerNorm(width, elementwise_affine=False),
                               mod=nn.Linear(width, 2 * width),
                               ff=nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))))
            for _ in range(depth)
        )
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, dim))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)
        self.heads = nn.ModuleDict()  # attached output heads; empty: no parameters, no RNG draws

    def add_input(self, name: str, default: float = 0.0) -> None:
        self.cond.add_input(name, default)

    def add_head(self, name: str) -> None:
        if name not in self.heads:
            width, dim = self.out[-1].in_features, self.out[-1].out_features
            self.heads[name] = zero_module(lambda: nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, dim)),
                                           self.out[-1].weight)

    def forward(self, z: Tensor, r: Tensor, t: Tensor, y: Tensor, cond: dict[str, Tensor] | None = None,
                head: str | None = None) -> Tensor:
        out = self.out if head is None else select_head(self.heads, head)
        c = torch.nn.functional.silu(self.cond(r, t, y, cond))
        h = self.inp(z.reshape(z.shape[0], -1))
        for blk in self.blocks:
            shift, scale = blk["mod"](c).chunk(2, dim=1)
            h = h + blk["ff"](torch.nn.functional.silu(blk["norm"](h) * (1 + scale) + shift))
        return out(h).reshape(z.shape)
