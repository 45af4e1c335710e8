"""A Stable Diffusion model: tokenizer, text encoder, UNet, VAE and noise schedule, and text -> image.

    sd = sau.load("path/to/bundle")                     # or sau.load("demo/pixel"), a CompVis file, a diffusers folder
    images = sd.generate(["a red circle"], seeds=[0])   # (batch, 3, H, W) in [-1, 1]
    save_images(images, "out")

Its parts keep their CompVis names (UNET_PREFIX, VAE_PREFIX, TEXT_PREFIXES), the key layout of an original SD
checkpoint and of a sau bundle; sau.weights reads and writes every other layout.
"""
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from sau.common.files import atomic_write
from sau.common.state import add_prefix, load_strict, strip_prefix
from sau.models.clip import build_text_encoder
from sau.models.config import TEXT_PREFIXES, UNET_PREFIX, VAE_PREFIX, ModelConfig
from sau.models.ddim import NoiseSchedule, ddim_sample, guided_model_fn, initial_noise, seed_generators
from sau.models.tokenizer import Tokenizer
from sau.models.unet import UNet
from sau.models.vae import AutoencoderKL, to_pixels

# The CompVis names of the pipeline's parts: the key prefixes of an original SD checkpoint (and of a bundle)


class StableDiffusion(nn.Module):
    def __init__(self, config: ModelConfig, tokenizer: Tokenizer):
        super().__init__()
        self.stored_dtype = None  # set when loaded from stored weights
        self.config = config
        self.tokenizer = tokenizer
        self.text_encoder = build_text_encoder(config.text)
        self.unet = UNet(config.unet)
        self.vae = AutoencoderKL(config.vae)
        self.schedule = NoiseSchedule(config.schedule)
        self.info = {}  # free-form provenance, saved in config.json

    @property
    def device(self):
        return next(self.unet.parameters()).device

    @property
    def dtype(self):
        return next(self.unet.parameters()).dtype

    # --- weights in the CompVis layout -------------------------------------------------------

    def _parts(self):
        return {UNET_PREFIX: self.unet, VAE_PREFIX: self.vae, TEXT_PREFIXES[self.config.text.kind]: self.text_encoder}

    def compvis_state_dict(self):
        state = {}
        for prefix, module in self._parts().items():
            state.update(add_prefix(module.state_dict(), prefix))
        return state

    def load_compvis_state_dict(self, state_dict):
        for prefix, module in self._parts().items():
            load_strict(module, strip_prefix(state_dict, prefix), what=prefix.rstrip("."))

    @classmethod
    def from_weights(cls, weights, device="cpu", dtype=None):
        """The model saved weights describe (sau.weights.form.Weights: config, state under CompVis keys, tokenizer,
        info), on `device`. The weights keep their stored dtype unless `dtype` is given, except that fp16 on a
        CPU computes in fp32; `stored_dtype` remembers what they were saved in."""
        with torch.device("meta"):
            model = cls(weights.config, weights.tokenizer)
        stored_dtype = next(iter(weights.state.values())).dtype
        if dtype is None and stored_dtype == torch.float16 and torch.device(device).type == "cpu":
            dtype = torch.float32  # fp16 is a storage format on CPUs: computing in it there is slow and lossy
        model = model.to_empty(device=device).to(dtype or stored_dtype)
        model.load_compvis_state_dict(weights.state)
        model.schedule = NoiseSchedule(weights.config.schedule)  # rebuilt: under the meta device it held no values
        model.info = dict(weights.info or {})
        model.stored_dtype = stored_dtype  # what the weights were saved in, whatever they compute in here
        return model.eval()

    # --- text -> image -------------------------------------------------------------------------

    def encode_text(self, prompts):
        ids = self.tokenizer(prompts).to(self.device)
        return self.text_encoder(ids)

    def latent_shape(self, height=None, width=None):
        height = height or self.config.image_size
        width = width or self.config.image_size
        down = self.config.latent_downsample
        if height % down or width % down:
            raise ValueError(f"image size {height}x{width} must be a multiple of {down}")
        return (self.config.unet.in_channels, height // down, width // down)

    @torch.no_grad()
    def generate(self, prompts, seeds, steps=25, guidance_scale=7.5, eta=0.0, negative_prompt="",
                 height=None, width=None, callback=None, progress=False, decode=True):
        """Images (batch, 3, H, W) in [-1, 1], or final latents when decode=False.
        Image i depends only on prompts[i] and seeds[i], and on the batch it is in only through float rounding
        (a batch of another size runs other kernels: differences near 1e-5)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        context = self.encode_text(prompts)
        uncond = self.encode_text([negative_prompt] * len(prompts)) if guidance_scale != 1 else None
        generators = seed_generators(seeds)
        x = initial_noise(self.latent_shape(height, width), generators, dtype=self.dtype, device=self.device)
        model_fn = guided_model_fn(self.unet, context, uncond, guidance_scale)
        latents = ddim_sample(model_fn, x, self.schedule, num_steps=steps, eta=eta, generators=generators,
                              callback=callback, progress=progress)
        return self.vae.decode(latents) if decode else latents


def to_uint8(images):
    """(batch, 3, H, W) in [-1, 1] -> (batch, H, W, 3) uint8 numpy, as image files and PIL hold them: the one
    conversion sau's PNGs, grids and image caches go through."""
    return to_pixels(images.detach().cpu(), uint8=True).permute(0, 2, 3, 1).numpy()


def from_uint8(pixels):
    """The inverse: (..., H, W, 3) uint8 (numpy or torch, e.g. an image file's pixels) -> (..., 3, H, W) float32
    in [-1, 1]."""
    return torch.as_tensor(pixels).float().movedim(-1, -3) / 127.5 - 1


def save_images(images, folder, prefix="image"):
    """Save each image as folder/prefix_0000.png; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, array in enumerate(to_uint8(images)):
        path = folder / f"{prefix}_{i:04d}.png"
        atomic_write(path, lambda tmp, a=array: Image.fromarray(a).save(tmp, format="PNG"))
        paths.append(path)
    return paths
