"""sau: Spatial Attention Unlearning for Stable Diffusion 1.x/2.x in plain PyTorch."""
