"""Orchestration: designs, training, evaluation, sweeps and tracking for one-step diffusion ablations."""
__version__ = "0.1.0"
