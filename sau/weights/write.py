"""Writing a Stable Diffusion model in the ecosystem's formats, and the form every input is read into.

`Weights` is a model between layouts: its ModelConfig, its state dict under CompVis keys (a bundle's layout)
and its tokenizer; `CLIPWeights` a CLIP scoring model under transformers' CLIPModel keys. `write` makes
- a sau bundle (config.json, model.safetensors, tokenizer.json);
- one CompVis .safetensors file, the single-file layout other SD tools load (A1111, ComfyUI, diffusers'
  from_single_file), with sau's exact config in its metadata so that reading it back loses nothing;
- a diffusers StableDiffusionPipeline folder that `from_pretrained` loads offline.
Outputs are made under a temporary name beside their path and renamed into place.
"""
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from sau.weights.bundle import (TEXT_PREFIXES, UNET_PREFIX, VAE_PREFIX, CheckpointError, add_prefix, atomic_write,
                         load_strict, save_json, save_safetensors, strip_prefix, write_bundle)
from sau.models.clip import CLIPModel
from sau.models.config import ModelConfig, TextConfig, VisionConfig
from sau.weights.layouts.clip import hf_text_to_openclip, openclip_text_to_hf
from sau.weights.layouts.unet import unet_to_diffusers
from sau.weights.layouts.vae import vae_to_diffusers
from sau.evaluation.scorer import CLIPScorer
from sau.models.tokenizer import BOS_TOKEN, EOS_TOKEN, Tokenizer

HF_TEXT = TEXT_PREFIXES["clip"]  # cond_stage_model.transformer.text_model.
OPENCLIP_TEXT = TEXT_PREFIXES["openclip"]  # cond_stage_model.model.
SAU_CONFIG = "sau_config"  # metadata key of a CompVis export: the exact config, which shapes alone cannot give
DIFFUSERS_WEIGHTS = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                     "text_encoder": "model.safetensors"}
DIFFUSERS_VERSION = "0.30.0"
FORMATS = ("bundle", "compvis", "diffusers")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Weights:
    """A Stable Diffusion model between layouts: config, CompVis-keyed state dict, tokenizer."""
    config: ModelConfig
    state: dict
    tokenizer: Tokenizer
    info: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)  # what the user should know, e.g. an assumed prediction type


@dataclass
class CLIPWeights:
    """A CLIP scoring model between layouts, under transformers' CLIPModel keys."""
    text: TextConfig
    vision: VisionConfig
    state: dict
    tokenizer: Tokenizer
    info: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


def cast(weights, dtype):
    """The same weights with floating-point tensors in `dtype` (None: as stored)."""
    if dtype is None:
        return weights
    return replace(weights, state={k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.state.items()})


def write(weights, path, to="bundle"):
    """Write `weights` to `path` as a bundle folder, one CompVis .safetensors file, or a diffusers folder.
    The output is made under a temporary name beside `path` and renamed into place."""
    if to not in FORMATS:
        raise ValueError(f"unknown output format {to!r}; choose one of {', '.join(FORMATS)}")
    if isinstance(weights, CLIPWeights):
        if to != "bundle":
            raise CheckpointError("a CLIP model converts to a scorer bundle only (--to bundle)")
        return _write_output(path, lambda tmp: _write_scorer(weights, tmp))
    if to == "compvis":
        metadata = {"format": "pt", SAU_CONFIG: json.dumps(weights.config.to_dict())}
        return _write_output(path, lambda tmp: save_safetensors(compvis_state(weights), tmp, metadata=metadata))
    if to == "diffusers":
        return _write_output(path, lambda tmp: write_diffusers(weights, tmp))
    config = {**weights.config.to_dict(), "info": weights.info}
    return _write_output(path, lambda tmp: write_bundle(tmp, config, weights.state, weights.tokenizer))


def _write_output(path, write_to):
    """write_to(tmp) makes the output at a temporary path beside `path`; it is then renamed into place. An
    output being replaced (--force) is moved aside first and removed only once the new one is in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        write_to(work / path.name)
        if path.exists() or path.is_symlink():
            os.replace(path, work / (path.name + ".replaced"))
        os.replace(work / path.name, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path


def _write_scorer(weights, path):
    with torch.device("meta"):
        clip = CLIPModel(weights.text, weights.vision)
    clip = clip.to_empty(device="cpu")
    load_strict(clip, weights.state, "CLIP model")
    CLIPScorer(clip, weights.tokenizer).save(path, dtype=next(iter(weights.state.values())).dtype)


def compvis_state(weights):
    """The state dict other SD tools load: the bundle's, except that an OpenCLIP tower under HF names (a
    diffusers SD2 text encoder) goes back under OpenCLIP names, where those tools look for SD2's."""
    text = weights.config.text
    if not (text.kind == "clip" and text.activation == "gelu"):
        return dict(weights.state)
    state = {k: v for k, v in weights.state.items() if not k.startswith(HF_TEXT)}
    return {**state, **add_prefix(hf_text_to_openclip(strip_prefix(weights.state, HF_TEXT)), OPENCLIP_TEXT)}


def diffusers_state_dicts(weights):
    """{"unet", "vae", "text_encoder": state dict} in diffusers / transformers names (classic `text_model.` level).
    The text encoder keeps only the layers SD conditions on: diffusers' SD2 encoder has 23 of OpenCLIP's 24."""
    cfg = weights.config
    layers = cfg.text.layers - cfg.text.skip_last_layers
    if cfg.text.kind == "openclip":
        text = openclip_text_to_hf(strip_prefix(weights.state, OPENCLIP_TEXT), num_layers=layers)
    else:
        text = {k: v for k, v in strip_prefix(weights.state, HF_TEXT).items()
                if not (k.startswith("encoder.layers.") and int(k.split(".")[2]) >= layers)}
    text = {k: v for k, v in text.items() if k not in ("text_projection.weight", "logit_scale")}
    return {"unet": unet_to_diffusers(strip_prefix(weights.state, UNET_PREFIX), cfg.unet),
            "vae": vae_to_diffusers(strip_prefix(weights.state, VAE_PREFIX), cfg.vae),
            "text_encoder": add_prefix(text, "text_model.")}


def diffusers_configs(config):
    """The config.json of each diffusers component, and the scheduler's (DDIM as SD samples)."""
    u, v, t, s = config.unet, config.vae, config.text, config.schedule
    levels = len(u.channel_mult)
    channels = [u.model_channels * m for m in u.channel_mult]
    attention = [2 ** i in u.attention_resolutions for i in range(levels)]
    version = {"_diffusers_version": DIFFUSERS_VERSION}
    latent_size = config.image_size // 2 ** (len(v.ch_mult) - 1)
    unet = {"_class_name": "UNet2DConditionModel", **version, "sample_size": latent_size,
            "in_channels": u.in_channels, "out_channels": u.out_channels, "block_out_channels": channels,
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
            "layers_per_block": u.num_res_blocks, "cross_attention_dim": u.context_dim,
            "attention_head_dim": u.num_heads if u.num_heads > 0 else [c // u.num_head_channels for c in channels],
            "transformer_layers_per_block": u.transformer_depth, "use_linear_projection": u.use_linear_in_transformer,
            "upcast_attention": u.upcast_attention, "norm_num_groups": u.norm_groups, "norm_eps": 1e-5,
            "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu", "downsample_padding": 1}
    vae = {"_class_name": "AutoencoderKL", **version, "in_channels": v.in_channels, "out_channels": v.out_channels,
           "block_out_channels": [v.ch * m for m in v.ch_mult], "layers_per_block": v.num_res_blocks,
           "down_block_types": ["DownEncoderBlock2D"] * len(v.ch_mult),
           "up_block_types": ["UpDecoderBlock2D"] * len(v.ch_mult), "latent_channels": v.z_channels,
           "norm_num_groups": v.norm_groups, "act_fn": "silu", "sample_size": config.image_size,
           "scaling_factor": v.scale_factor}
    text = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": t.vocab_size,
            "hidden_size": t.width, "intermediate_size": t.mlp_width, "num_attention_heads": t.heads,
            "num_hidden_layers": t.layers - t.skip_last_layers, "max_position_embeddings": t.max_positions,
            "hidden_act": t.activation, "layer_norm_eps": 1e-5, "projection_dim": t.projection_dim or t.width,
            "bos_token_id": t.bos_id, "eos_token_id": t.eos_id, "pad_token_id": t.pad_id}
    scheduler = {"_class_name": "DDIMScheduler", **version, "num_train_timesteps": s.num_train_timesteps,
                 "beta_start": s.beta_start, "beta_end": s.beta_end, "beta_schedule": "scaled_linear",
                 "prediction_type": s.prediction_type, "clip_sample": False, "set_alpha_to_one": False,
                 "steps_offset": 1, "timestep_spacing": "leading"}
    return {"unet": unet, "vae": vae, "text_encoder": text, "scheduler": scheduler}


def write_diffusers(weights, folder):
    """A StableDiffusionPipeline folder (no safety checker) that diffusers loads offline."""
    folder = Path(folder)
    configs = diffusers_configs(weights.config)
    for part, state in diffusers_state_dicts(weights).items():
        save_safetensors(state, folder / part / DIFFUSERS_WEIGHTS[part])
        save_json(configs[part], folder / part / "config.json")
    save_json(configs["scheduler"], folder / "scheduler" / "scheduler_config.json")
    write_hf_tokenizer(weights.tokenizer, folder / "tokenizer")
    save_json({"_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
               "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
               "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
               "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
               "vae": ["diffusers", "AutoencoderKL"]}, folder / "model_index.json")


def write_hf_tokenizer(tokenizer, folder):
    """vocab.json, merges.txt and the two small JSON files transformers' CLIPTokenizer reads."""
    folder = Path(folder)
    vocab = tokenizer.backend.get_vocab()
    merges = json.loads(tokenizer.backend.to_str())["model"]["merges"]
    lines = [m if isinstance(m, str) else " ".join(m) for m in merges]
    save_json(dict(sorted(vocab.items(), key=lambda item: item[1])), folder / "vocab.json")

    def write_merges(tmp):
        Path(tmp).write_text("#version: 0.2\n" + "".join(line + "\n" for line in lines), encoding="utf-8")
    atomic_write(folder / "merges.txt", write_merges)
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN,
               "pad_token": tokenizer.backend.id_to_token(tokenizer.pad_id)}
    save_json(special, folder / "special_tokens_map.json")
    save_json({**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": tokenizer.max_length,
               "do_lower_case": True, "errors": "replace"}, folder / "tokenizer_config.json")


def save_model(model, path, to="bundle", dtype=None):
    """Write a StableDiffusion as a bundle, a CompVis file or a diffusers folder (e.g. in its input's format)."""
    weights = Weights(model.config, model.compvis_state_dict(), model.tokenizer, info=dict(model.info))
    return write(cast(weights, dtype), path, to)
