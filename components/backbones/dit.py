"""DiT (Peebles & Xie 2023) with adaLN-Zero, built on timm's ViT layers.

Conditioning c = emb(t) + emb(step) + emb(y) (DESIGN §3); the step is t − r
(MeanFlow / ESC) or the shortcut paper's log2 level. Attention is timm's,
which uses fused SDPA.

``forward_with_tangent`` is forward-mode AD written out for the JVP targets
(MeanFlow, sCT): the primal is the ordinary forward (with gradient, fused
attention), the tangent a no-grad pass over the rows that need it, reusing the
primal's activations; weight tangents are zero and never computed.
"""
from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from timm.layers import Attention, Mlp, PatchEmbed, build_sincos2d_pos_embed
from torch import Tensor, nn

from components.backbones.embeddings import Conditioning, linear_tangent, select_head, silu_tangent, zero_module
from components.registry import BACKBONE

# (depth, hidden size, heads) of DiT-S/B/L/XL; T (tiny) is a CPU-sized model for the small-data studies.
SIZES = {"T": (4, 128, 4), "S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


# Tangent rules (forward-mode derivatives) of the ops below; primals detached, under no_grad. Where the
# Jacobian is diagonal or symmetric (GELU, LayerNorm, softmax) its product with the tangent is what the
# op's backward kernel computes, so that one fused kernel is used.
def _modulate_tangent(x, dx, scale, dshift, dscale):
    return torch.addcmul(dshift[:, None], x, dscale[:, None]).addcmul_(dx, 1 + scale[:, None])


def _gated_residual_tangent(dx, gate, dgate, branch, dbranch):
    """Tangent of x + g·f: dx + dg·f + g·df."""
    return torch.addcmul(dx, dgate[:, None], branch).addcmul_(gate[:, None], dbranch)


def _layer_norm_tangent(x: Tensor, dx: Tensor, eps: float) -> Tensor:
    """x̂ = (x − μ)/σ over the last dim: dx̂ = (dx − mean(dx) − x̂·mean(x̂·dx))/σ (a symmetric Jacobian)."""
    shape, x = x.shape[-1:], x.contiguous()
    _, mean, rstd = torch.native_layer_norm(x, shape, None, None, eps)
    return torch.ops.aten.native_layer_norm_backward(dx, x, shape, mean, rstd, None, None, [True, False, False])[0]


def _gelu_tanh_tangent(x: Tensor, dx: Tensor) -> Tensor:
    """GELU(x) = x/2·(1 + tanh(k(x + c x³))): dx·GELU′(x)."""
    return torch.ops.aten.gelu_backward(dx, x, approximate="tanh")


def _attention_tangent(qkv: Tensor, dqkv: Tensor, heads: int, scale: float) -> Tensor:
    """O = softmax(s·QKᵀ)V: dO = dP·V + P·dV, dP = P ⊙ (dS − Σ_j P dS), dS = s·(dQ Kᵀ + Q dKᵀ)."""
    b, n, _ = qkv.shape
    q, k, v = qkv.reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4).contiguous().unbind(0)
    dq, dk, dv = dqkv.reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4).contiguous().unbind(0)
    p = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    ds = (dq @ k.transpose(-2, -1) + q @ dk.transpose(-2, -1)) * scale
    dp = torch.ops.aten._softmax_backward_data(ds, p, -1, p.dtype)
    return (dp @ v + p @ dv).transpose(1, 2).reshape(b, n, -1)


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

    def _attention(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """timm's ``Attention.forward`` (no q/k norm, gate or dropout), also returning its qkv projection."""
        at = self.attn
        b, n, _ = x.shape
        qkv = at.qkv(x)
        q, k, v = qkv.reshape(b, n, 3, at.num_heads, at.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if at.fused_attn:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = ((q * at.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return at.proj(o.transpose(1, 2).reshape(b, n, at.attn_dim)), qkv

    def forward_with_tangent(self, x: Tensor, c: Tensor, dx: Tensor, dc: Tensor,
                             pick: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        """(``forward(x, c)``, its tangent along (dx, dc)); ``pick`` takes a primal's tangent rows, detached."""
        s1, sc1, g1, s2, sc2, g2 = self.ada(c).chunk(6, dim=1)
        n1 = self.norm1(x)
        a, qkv = self._attention(_modulate(n1, s1, sc1))
        x1 = x + g1[:, None] * a
        n2 = self.norm2(x1)
        f1 = self.mlp.fc1(_modulate(n2, s2, sc2))
        m = self.mlp.fc2(self.mlp.act(f1))
        out = x1 + g2[:, None] * m
        with torch.no_grad():
            ds1, dsc1, dg1, ds2, dsc2, dg2 = linear_tangent(self.ada[-1], silu_tangent(pick(c), dc)).chunk(6, dim=1)
            dh = _modulate_tangent(pick(n1), _layer_norm_tangent(pick(x), dx, self.norm1.eps), pick(sc1), ds1, dsc1)
            dqkv = linear_tangent(self.attn.qkv, dh)
            da = linear_tangent(self.attn.proj, _attention_tangent(pick(qkv), dqkv, self.attn.num_heads,
                                                                   self.attn.scale))
            dx1 = _gated_residual_tangent(dx, pick(g1), dg1, pick(a), da)
            dh = _modulate_tangent(pick(n2), _layer_norm_tangent(pick(x1), dx1, self.norm2.eps), pick(sc2), ds2, dsc2)
            dm = linear_tangent(self.mlp.fc2, _gelu_tanh_tangent(pick(f1), linear_tangent(self.mlp.fc1, dh)))
            dout = _gated_residual_tangent(dx1, pick(g2), dg2, pick(m), dm)
        return out, dout


@BACKBONE.register("dit", slug=lambda kw: f"dit_{kw['size'].lower()}{kw['patch']}")
class DiT(nn.Module):
    """Diffusion transformer for (C, H, W) inputs; sizes T/S/B/L/XL, patch 2/4/8.

    ``depth``, ``hidden``, ``heads`` override the size's values when set. Attachable after
    construction (no new options, so designs keep their ids): scalar inputs (:meth:`add_input`, given as
    ``cond={name: (B,)}`` and added to c) and output heads (:meth:`add_head`, chosen with ``head=name``:
    a zero-initialised copy of the final adaLN modulation and linear layer on the shared trunk).
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
        self.heads = nn.ModuleDict()  # attached output heads; empty: no parameters, no RNG draws

    def add_input(self, name: str, default: float = 0.0) -> None:
        self.cond.add_input(name, default)

    def add_head(self, name: str) -> None:
        if name not in self.heads:
            hidden, out = self.head.in_features, self.head.out_features
            self.heads[name] = zero_module(lambda: nn.ModuleDict(dict(
                ada=nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden)), head=nn.Linear(hidden, out))),
                self.head.weight)

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

    def forward(self, z: Tensor, r: Tensor, t: Tensor, y: Tensor, cond: dict[str, Tensor] | None = None,
                head: str | None = None) -> Tensor:
        ada, out = self.ada, self.head
        if head is not None:
            ada, out = select_head(self.heads, head)["ada"], select_head(self.heads, head)["head"]
        x = self.embed(z) + self.pos.to(z.dtype)
        c = self.cond(r, t, y, cond)
        for blk in self.blocks:
            x = blk(x, c)
        shift, scale = ada(c).chunk(2, dim=1)
        x = out(_modulate(self.norm(x), shift, scale))
        return self._unpatchify(x)

    def forward_with_tangent(self, z: Tensor, r: Tensor, t: Tensor, y: Tensor, dz: Tensor, dr: Tensor, dt: Tensor,
                             rows: Tensor | None = None, cond: dict[str, Tensor] | None = None,
                             head: str | None = None) -> tuple[Tensor, Tensor]:
        """(u_θ(z, r, t, y), its tangent along (dz, dr, dt) on ``rows``): forward-mode AD written out.

        u (B, C, H, W) is ``forward``'s output, with gradient. The tangent (m, C, H, W) is taken on the
        rows ``rows`` (an index (m,); None: all B) under no_grad; dz (m, C, H, W), dr and dt (m,) are the
        tangents of those rows (``cond``'s inputs have none). Equal to ``torch.func.jvp`` of ``forward``.
        """
        def pick(a: Tensor) -> Tensor:
            return a.detach() if rows is None else a.detach()[rows]

        ada, last = self.ada, self.head
        if head is not None:
            ada, last = select_head(self.heads, head)["ada"], select_head(self.heads, head)["head"]
        x = self.embed(z) + self.pos.to(z.dtype)
        c = self.cond(r, t, y, cond)
        with torch.no_grad():
            p = self.embed.proj  # patch embedding: a strided convolution, flattened (timm's PatchEmbed)
            dx = F.conv2d(dz, p.weight, None, p.stride, p.padding, p.dilation, p.groups).flatten(2).mT.contiguous()
            dc = self.cond.tangent(pick(r), pick(t), dr, dt)
        for blk in self.blocks:
            x, dx = blk.forward_with_tangent(x, c, dx, dc, pick)
        shift, scale = ada(c).chunk(2, dim=1)
        n = self.norm(x)
        out = last(_modulate(n, shift, scale))
        with torch.no_grad():
            dshift, dscale = linear_tangent(ada[-1], silu_tangent(pick(c), dc)).chunk(2, dim=1)
            dn = _layer_norm_tangent(pick(x), dx, self.norm.eps)
            dout = linear_tangent(last, _modulate_tangent(pick(n), dn, pick(scale), dshift, dscale))
        return self._unpatchify(out), self._unpatchify(dout)

    def _unpatchify(self, x: Tensor) -> Tensor:
        c, p, (gh, gw) = self.data_shape[0], self.patch, self.grid
        x = x.reshape(x.shape[0], gh, gw, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(x.shape[0], c, gh * p, gw * p)
