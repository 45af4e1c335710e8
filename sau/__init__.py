"""sau: Spatial Attention Unlearning for Stable Diffusion 1.x/2.x in plain PyTorch."""


def load(name_or_path, device="cpu", dtype=None, **read_options):
    """A StableDiffusion model from a bundle folder, a shipped demo name ("demo", "demo/pixel", ...), or any
    input `weights_convert.py` reads (a CompVis .safetensors/.ckpt, a diffusers folder), read in memory.
    The name is resolved here, once; `read_options` are sau.weights.read.read's: tokenizer, ema,
    prediction_type, upcast_attention. Weights keep their stored dtype unless `dtype` is given (fp16 on a CPU
    computes in fp32)."""
    from sau.common.files import resolve_model_path
    from sau.weights.read import load_model
    return load_model(resolve_model_path(name_or_path), device=device, dtype=dtype, **read_options)
