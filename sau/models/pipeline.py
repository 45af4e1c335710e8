"""A Stable Diffusion model bundle: tokenizer, text encoder, UNet, VAE and noise schedule, and text -> image.

    sd = StableDiffusion.load("path/to/bundle")
    images = sd.generate(["a red circle"], seeds=[0])   # (batch, 3, H, W) in [-1, 1]
    save_images(images, "out")
"""
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from sau.weights.bundle import (TEXT_PREFIXES, UNET_PREFIX, VAE_PREFIX, add_prefix, atomic_write, load_strict,
                         read_bundle, resolve_model_path, strip_prefix, write_bundle)
from sau.models.clip import build_text_encoder
from sau.models.config import ModelConfig
from sau.models.ddim import NoiseSchedule, ddim_sample, guided_model_fn, initial_noise, seed_generators
from sau.models.tokenizer import Tokenizer
from sau.models.unet import UNet
from sau.models.vae import AutoencoderKL


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
    def load(cls, path, device="cpu", dtype=None):
        """Load a bundle folder (or a shipped demo model by name, e.g. "demo/pixel"); weights keep their
        stored dtype unless `dtype` is given (fp16 on a CPU runs in fp32). Other layouts: `sau.load` converts them."""
        config_dict, state_dict, tokenizer_path = read_bundle(resolve_model_path(path))
        config = ModelConfig.from_dict(config_dict)
        tokenizer = Tokenizer.from_file(tokenizer_path, pad_id=config.text.pad_id)
        return cls.from_compvis(config, state_dict, tokenizer, device, dtype, info=config_dict.get("info", {}))

    @classmethod
    def from_compvis(cls, config, state_dict, tokenizer, device="cpu", dtype=None, info=None):
        """A model from weights under CompVis keys (a bundle's state dict), keeping their dtype unless `dtype`."""
        with torch.device("meta"):
            model = cls(config, tokenizer)
        stored_dtype = next(iter(state_dict.values())).dtype
        if dtype is None and stored_dtype == torch.float16 and torch.device(device).type == "cpu":
            dtype = torch.float32  # fp16 is a storage format on CPUs: computing in it there is slow and lossy
        model = model.to_empty(device=device).to(dtype or stored_dtype)
        model.load_compvis_state_dict(state_dict)
        model.schedule = NoiseSchedule(config.schedule)  # rebuilt: under the meta device it held no values
        model.info = dict(info or {})
        model.stored_dtype = stored_dtype  # what the weights were saved in, whatever they compute in here
        return model.eval()

    def save(self, path, dtype=None, base=None):
        """Write a bundle folder; with `base`, store only the tensors that differ from that bundle.
        `self.info` (e.g. how a backdoor was made, how it was removed) goes into config.json."""
        state = self.compvis_state_dict()
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        write_bundle(path, {**self.config.to_dict(), "info": self.info}, state, self.tokenizer, base=base)

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
        Image i depends only on prompts[i] and seeds[i], not on the batch it is in."""
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
    """(batch, 3, H, W) in [-1, 1] -> (batch, H, W, 3) uint8 numpy."""
    pixels = ((images.detach().float().cpu() + 1) / 2).clamp(0, 1)
    return (pixels.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


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
