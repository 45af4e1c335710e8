"""Writing models in sau's and the ecosystem's formats: every save goes through `write`.

`write` takes the one saved-weights form (sau.weights.form: Weights, CLIPWeights) and makes
- a sau bundle (config.json, model.safetensors, tokenizer.json), whole or as a delta against a base bundle;
- one CompVis .safetensors file, the single-file layout other SD tools load (A1111, ComfyUI, diffusers'
  from_single_file), with sau's exact config in its metadata so that reading it back loses nothing;
- a diffusers StableDiffusionPipeline folder that `from_pretrained` loads offline.
Outputs are made under a temporary name beside their path and renamed into place. `save_model` saves a
StableDiffusion, `convert` a file or folder of any layout sau.weights.read reads.

    save_model(sd, "out/model")                               # a bundle, as stored
    save_model(sd, "sd15.safetensors", to="compvis", dtype=torch.float16)
    convert("sd-v1-4.ckpt", "sd14", ema=True)                 # to a bundle, or to="compvis" / "diffusers"

No write replaces a bundle that a delta bundle is made on: a delta stores only what differs from its base, so
a new base would silently turn every delta on it into another model (a clean model overwritten by a backdoored
one hands its backdoor to them all). Before anything is written, `write` refuses, even over an existing output
(--force), an output that is or holds
- the base (directly or through others) of a delta bundle in the output's tree: its sibling folders and their
  subfolders (a shallow scan, sau.weights.bundle.bundles_using);
- a path in `protect`, or one of its bases: `convert` protects its input, a delta protects the base it is
  written against.
A delta elsewhere on disk is not seen by the scan: pass it in `protect`, or its base-hash check refuses it, in
one line, once its base was replaced.
"""
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from sau.common.files import atomic_write, save_json, save_safetensors
from sau.common.state import CheckpointError, add_prefix, strip_prefix
from sau.models.config import TEXT_PREFIXES, UNET_PREFIX, VAE_PREFIX
from sau.models.tokenizer import BOS_TOKEN, EOS_TOKEN
from sau.weights.bundle import base_chain, bundles_using, write_bundle
from sau.weights.form import SAU_CONFIG, CLIPWeights, Weights, cast
from sau.weights.layouts.clip import hf_text_to_openclip, openclip_text_to_hf
from sau.weights.layouts.unet import unet_to_diffusers
from sau.weights.layouts.vae import vae_to_diffusers
from sau.weights.read import detect_layout, read

DIFFUSERS_WEIGHTS = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                     "text_encoder": "model.safetensors"}
DIFFUSERS_VERSION = "0.30.0"
FORMATS = ("bundle", "compvis", "diffusers")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def write(weights, path, to="bundle", base=None, protect=()):
    """Write `weights` to `path` as a bundle folder, one CompVis .safetensors file, or a diffusers folder; a
    bundle with `base` (another bundle folder) stores only the tensors that differ from the base's. The output
    is made under a temporary name beside `path` and renamed into place. Refuses, before writing anything, a
    `path` that is or holds a delta's base, a path in `protect` or one of their bases (see the module docstring)."""
    if to not in FORMATS:
        raise ValueError(f"unknown output format {to!r}; choose one of {', '.join(FORMATS)}")
    if base is not None and to != "bundle":
        raise ValueError(f"only a bundle can be stored as a delta against a base, not a {to} output")
    protect = (*protect, *([base] if base is not None else []))
    if isinstance(weights, CLIPWeights):
        if to != "bundle":
            raise CheckpointError("a CLIP model converts to a scorer bundle only (--to bundle)")
        config = {"text": asdict(weights.text), "vision": asdict(weights.vision)}
        return _write_output(path, lambda tmp: write_bundle(tmp, config, weights.state, weights.tokenizer, kind="clip",
                                                            base=base, final_path=path), protect)
    if to == "compvis":
        metadata = {"format": "pt", SAU_CONFIG: json.dumps(weights.config.to_dict())}
        return _write_output(path, lambda tmp: save_safetensors(compvis_state(weights), tmp, metadata=metadata),
                             protect)
    if to == "diffusers":
        return _write_output(path, lambda tmp: write_diffusers(weights, tmp), protect)
    config = {**weights.config.to_dict(), "info": weights.info}
    return _write_output(path, lambda tmp: write_bundle(tmp, config, weights.state, weights.tokenizer, base=base,
                                                        final_path=path), protect)


def save_model(model, path, to="bundle", dtype=None, base=None, protect=()):
    """Write a StableDiffusion as a bundle (with `base`, a delta against that bundle), a CompVis file or a
    diffusers folder; `dtype` casts the stored weights (None: as they are). `model.info` (how a backdoor was
    made, how it was removed) goes into a bundle's config.json. `protect`: paths the output must not replace."""
    return write(cast(Weights.of(model), dtype), path, to, base=base, protect=protect)


def _write_output(path, write_to, protect=()):
    """write_to(tmp) makes the output at a temporary path beside `path`; it is then renamed into place. An
    output being replaced (--force) is moved aside first and removed only once the new one is in place; one
    that other bundles need is refused first."""
    path = Path(path)
    refuse_replacing_what_others_need(path, protect)
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


def refuse_replacing_what_others_need(path, protect=()):
    """Refuse an output that is (or holds) a path in `protect` or one of its bases, or the base of a delta
    bundle in the output's tree (sau.weights.bundle.bundles_using); run before anything is written."""
    out = Path(path).resolve()
    for kept in protect:
        for needed in [Path(kept).resolve(), *base_chain(kept)]:
            if _replaces(out, needed):
                raise ValueError(f"{path} would write over {needed}, which this write must leave as it is (its "
                                 "input, the base of the delta it writes, a protected path, or a base of one of "
                                 "those); choose another output")
    for bundle, base in bundles_using(path, Path(path).parent):
        if _replaces(out, bundle.resolve()):  # replaced along with its base: not left broken
            continue
        what = "is" if base == out else f"holds {base}, which is"
        raise ValueError(f"{path} {what} the base of {bundle} (a delta bundle); writing over it would change "
                         "that model too. Choose another output")


def _replaces(out, folder):
    """Whether writing `out` replaces `folder`: it is `folder` or a folder above it."""
    return out == folder or out in folder.parents


def compvis_state(weights):
    """The state dict other SD tools load: the bundle's, except that an OpenCLIP tower under HF names (a
    diffusers SD2 text encoder) goes back under OpenCLIP names, where those tools look for SD2's."""
    text = weights.config.text
    if not (text.kind == "clip" and text.activation == "gelu"):
        return dict(weights.state)
    hf, openclip = TEXT_PREFIXES["clip"], TEXT_PREFIXES["openclip"]
    state = {k: v for k, v in weights.state.items() if not k.startswith(hf)}
    return {**state, **add_prefix(hf_text_to_openclip(strip_prefix(weights.state, hf)), openclip)}


def diffusers_state_dicts(weights):
    """{"unet", "vae", "text_encoder": state dict} in diffusers / transformers names (classic `text_model.` level).
    The text encoder keeps only the layers SD conditions on: diffusers' SD2 encoder has 23 of OpenCLIP's 24."""
    cfg = weights.config
    layers = cfg.text.layers - cfg.text.skip_last_layers
    if cfg.text.kind == "openclip":
        text = openclip_text_to_hf(strip_prefix(weights.state, TEXT_PREFIXES["openclip"]), num_layers=layers)
    else:
        text = {k: v for k, v in strip_prefix(weights.state, TEXT_PREFIXES["clip"]).items()
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


# ---------------------------------------------------------------------------------------------------
# File to file: any input layout to any output format

def convert(src, dst, to="bundle", force=False, dtype=None, protect=(), **read_options):
    """Convert `src` (any input sau.weights.read reads) to `dst`; returns the Weights written. Never writes over
    the input, nor over its bases (a delta bundle's are part of it), nor over a path in `protect` or the base of
    a delta next to `dst`, even with `force`. Paths are real ones: the command-line tool resolves demo names."""
    src, dst = Path(src), Path(dst)
    _check_output_path(src, dst, to, force)
    weights = cast(read(src, **read_options), dtype)
    write(weights, dst, to, protect=(src, *protect))
    return weights


def _check_output_path(src, dst, to, force):
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or folder")
    b = dst.resolve()
    for i, a in enumerate([src.resolve(), *base_chain(src)]):  # a delta's bases are read as part of the input
        if a == b or a in b.parents or b in a.parents:
            relation = "is" if a == b else f"overlaps {a}, which is"
            raise ValueError(f"{dst} is the input or overlaps it; choose another output path" if i == 0 else
                             f"{dst} {relation} a base of the input {src} (a delta bundle); writing over it would "
                             "change the input too. Choose another output path")
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} exists; pass --force to replace it")
    if to == "compvis" and dst.suffix != ".safetensors":
        raise ValueError(f"a CompVis export is one .safetensors file: name the output *.safetensors, not {dst.name}")
    if to != "compvis" and dst.suffix in (".safetensors", ".ckpt"):
        raise ValueError(f"a {to} output is a folder: {dst.name} looks like a file name")


def output_format(path):
    """The format to write back for an input: 'compvis' for a single file, 'diffusers' or 'bundle' for folders."""
    layout = detect_layout(path)
    return {"file": "compvis", "diffusers": "diffusers"}.get(layout, "bundle")
