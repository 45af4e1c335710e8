"""sau: Spatial Attention Unlearning for Stable Diffusion 1.x/2.x in plain PyTorch."""


def load(path, device="cpu", dtype=None):
    """A StableDiffusion model from a bundle folder or a shipped demo name ("demo", "demo/pixel", ...)."""
    from .pipeline import StableDiffusion
    return StableDiffusion.load(path, device=device, dtype=dtype)
