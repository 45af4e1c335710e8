"""Saved weights: bundles, every Stable Diffusion layout in and out, the safe unpickler."""
