"""Estimators of the instantaneous velocity ṽ(z_t, t) used as a regression signal.

- conditional: v(z_t | x, ε) = α'(t)·x + σ'(t)·ε (flow matching, DESIGN §2).
- plug-in (ESC, Lin, Hu et al. 2026): the posterior-weighted mix of the
  conditional velocities of the batch's images x_j,
      v̂(z_t) = Σ_j w_j · v(z_t | x_j),   w ∝ exp(−‖z_t − α x_j‖² / 2σ²),
  restricted to images with the row's label. Since v(z_t | x_j) is affine in
  x_j, v̂ = α'·x̄ + σ'·(z_t − α·x̄)/σ with x̄ = Σ_j w_j x_j (one B×B matmul).
"""
from __future__ import annotations

import torch
from torch import Tensor

from components.schedules import Schedule, _bc


def conditional_velocity(schedule: Schedule, x: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    return schedule.velocity(x, eps, t)


def plugin_velocity(schedule: Schedule, z: Tensor, x: Tensor, t: Tensor,
                    labels: Tensor | None = None, unconditional: Tensor | None = None) -> Tensor:
    """Posterior-mean velocity of z (B, ...) under the empirical batch distribution of x (B, ...).

    With ``labels`` (B,), row i mixes only images of its own label, except rows
    flagged ``unconditional`` (dropped labels), which mix the whole batch.
    """
    b = x.shape[0]
    dt = torch.promote_types(x.dtype, torch.float32)  # never below fp32 (bf16 logits overflow)
    zf, xf = z.reshape(b, -1).to(dt), x.reshape(b, -1).to(dt)
    a, s = schedule.alpha(t).to(dt), schedule.sigma(t).to(dt)
    # ‖z_i − a_i x_j‖² = ‖z_i‖² − 2 a_i z_i·x_j + a_i² ‖x_j‖²; the ‖z_i‖² term cancels in the softmax.
    logits = (2 * a[:, None] * (zf @ xf.T) - a[:, None] ** 2 * (xf * xf).sum(1)[None, :]) / (2 * s[:, None] ** 2)
    if labels is not None:
        other = labels[:, None] != labels[None, :]
        if unconditional is not None:
            other = other & ~unconditional[:, None]
        logits = logits.masked_fill(other, float("-inf"))
    w = torch.softmax(logits, dim=1)
    x_bar = (w @ xf).reshape(x.shape).to(x.dtype)
    eps_bar = (z - _bc(schedule.alpha(t), z) * x_bar) / _bc(schedule.sigma(t), z)
    return schedule.velocity(x_bar, eps_bar, t)
