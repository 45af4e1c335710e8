"""sau: Spatial Attention Unlearning for Stable Diffusion 1.x/2.x in plain PyTorch."""


def load(path, device="cpu", dtype=None, **convert_options):
    """A StableDiffusion model from a bundle folder, a shipped demo name ("demo", "demo/pixel", ...), or any
    input `weights_convert.py` reads (a CompVis .safetensors/.ckpt, a diffusers folder), converted in memory.
    `convert_options` are sau.weights.read.read's: tokenizer, ema, prediction_type, upcast_attention."""
    from sau.weights.bundle import resolve_model_path
    from sau.weights.read import detect_layout, load_model
    from sau.models.pipeline import StableDiffusion
    if detect_layout(resolve_model_path(path)) == "bundle" and not convert_options:
        return StableDiffusion.load(path, device=device, dtype=dtype)
    return load_model(path, device=device, dtype=dtype, **convert_options)
