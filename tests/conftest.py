"""Shared test setup."""
import os

# Never reach the network for model weights (timm/diffusers/torch-fidelity look here).
os.environ["HF_HUB_OFFLINE"] = "1"
