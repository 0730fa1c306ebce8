"""Backbones u_θ(z, r, t, y) → average velocity, same shape as z."""
from components.backbones import mlp, dit  # noqa: F401
