"""The exact total derivative du/dt = ṽ·∂_z u + ∂_t u of the JVP targets (MeanFlow eq. 10, sCT), cheaply.

Three things make it cost little more than a flow-matching step, with the same numbers:

- Only the rows with r < t get a derivative: the targets multiply it by t − r, which is 0 on the
  others (75 % of MeanFlow's rows). The rows are taken in a stable order with the r < t rows first,
  and their count is rounded up to a multiple of ``ceil(B/16)`` rows (:func:`derivative_rows`), so a
  compiled step sees at most 16 shapes; the extra rows are computed and then zeroed. sCT (r = 0)
  takes the whole batch, and so does a network given as a function (it may hold per-row inputs).
- The prediction is an ordinary forward (gradient, fused attention); the tangent is computed without
  a graph. A backbone with ``forward_with_tangent`` (the DiT) computes both in one pass and its
  tangent reuses the forward's activations (forward-mode AD written out; no GEMMs for the weights'
  zero tangents). Any other network gets its forward plus ``torch.func.jvp`` under no_grad (on all
  rows, as before, one JVP whose primal is the prediction).
- Under ``train.compile`` (the model an ``OptimizedModule``) the DiT's ``forward_with_tangent`` —
  forward and tangent — is compiled with the model's own compiler settings. Dynamo runs
  ``torch.func.jvp`` of an already compiled module eagerly ("calling torch.func.jvp(compiled_fn) from
  eager mode is not supported"), and a compiled function holding ``torch.func.jvp`` fails on any affine
  LayerNorm (an internal assert in ``_fw_primal``, torch 2.13): other networks keep an eager tangent.
"""
from __future__ import annotations

import functools
import weakref

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from components.schedules import _bc

_COMPILED: "weakref.WeakKeyDictionary[torch.nn.Module, object]" = weakref.WeakKeyDictionary()  # per compiled model


def derivative_rows(need: Tensor, count: int | None = None, buckets: int = 16) -> Tensor | None:
    """Row indices for the derivative: the rows with ``need`` first (stable), m of them in all.

    m is ``count`` (the number of ``need`` rows; None: counted here, a host sync) rounded up to a
    multiple of ceil(B/``buckets``), at most B, so the tangent's shape takes few values. None: all rows.
    """
    b = need.shape[0]
    step = -(-b // buckets)
    m = min(b, -(-(int(need.sum()) if count is None else count) // step) * step)
    if m == b:
        return None
    return torch.argsort((~need).to(torch.uint8), stable=True)[:m]


def forward_and_jvp(model, z: Tensor, r: Tensor, t: Tensor, y: Tensor, dz: Tensor, dr: Tensor, dt: Tensor,
                    rows: Tensor | None = None, *, jvp_model=None) -> tuple[Tensor, Tensor]:
    """Any network: its forward (gradient, fused attention), then ``torch.func.jvp`` of ``jvp_model`` (default:
    the same network) on ``rows`` without a graph. On all rows, one JVP whose primal output is the
    prediction instead: a second forward would cost more than the tangent graph it saves (measured)."""
    if rows is None and jvp_model is None:
        with sdpa_kernel([SDPBackend.MATH]):
            u, du = torch.func.jvp(lambda z_, r_, t_: model(z_, r_, t_, y), (z, r, t), (dz, dr, dt))
        return u, du.detach()
    u = model(z, r, t, y)
    jvp_model = model if jvp_model is None else jvp_model

    def pick(a: Tensor) -> Tensor:
        return a if rows is None else a[rows]

    ys = pick(y)
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):  # fused attention kernels lack forward-mode AD
        _, du = torch.func.jvp(lambda z_, r_, t_: jvp_model(z_, r_, t_, ys), (pick(z), pick(r), pick(t)),
                               (dz, dr, dt))
    return u, du


def tangent_forward(model):
    """(z, r, t, y, dz, dr, dt, rows) → (u, du on rows): the backbone's ``forward_with_tangent`` (under
    torch.compile compiled with the model's own settings: backend, mode), else :func:`forward_and_jvp`."""
    mod = getattr(model, "_orig_mod", model)
    fn = getattr(mod, "forward_with_tangent", None)
    if fn is None:  # torch.func.jvp inside torch.compile fails on an affine LayerNorm (torch 2.13): eager tangent
        return functools.partial(forward_and_jvp, model, jvp_model=None if mod is model else mod)
    if mod is model:
        return fn
    if model not in _COMPILED:
        ctx = getattr(model, "dynamo_ctx", None)
        _COMPILED[model] = ctx(fn) if ctx is not None else torch.compile(fn)
    return _COMPILED[model]


def exact_total_derivative(model, z: Tensor, r: Tensor, t: Tensor, y: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """(u_θ(z, r, t) with gradient, du/dt along (ṽ, 0, 1) detached): the derivative on the r < t rows, 0 elsewhere.

    A network that is a function rather than a module may hold per-row inputs of its own (a guidance
    plugin's bound scale): it gets the derivative on every row.
    """
    need = r < t
    count = int(need.sum())  # the one host sync: how many rows need the derivative
    if count == 0:
        return model(z, r, t, y), torch.zeros_like(z)
    module = isinstance(model, torch.nn.Module)
    rows = derivative_rows(need, count) if module else None

    def pick(a: Tensor) -> Tensor:
        return a if rows is None else a[rows]

    dz, dt = pick(v.to(z.dtype)).detach(), torch.ones_like(pick(t))
    fn = tangent_forward(model) if module else functools.partial(forward_and_jvp, model)
    u, du = fn(z, r, t, y, dz, torch.zeros_like(dt), dt, rows)
    du = torch.where(_bc(pick(need), du), du, torch.zeros_like(du)).to(u.dtype)  # padding rows: r = t
    if rows is None:
        return u, du
    return u, torch.zeros_like(u).index_copy(0, rows, du)
