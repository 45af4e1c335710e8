"""Reading every supported checkpoint layout into one form, `Weights` or `CLIPWeights` (sau.weights.form).

Inputs (the layout is recognised from what is on disk; paths are real ones, demo names are resolved by the
entry points, sau.load and the command-line tools):
- a sau bundle (sau.weights.bundle);
- a CompVis / Stability single file (.safetensors, .ckpt, .pt, .bin), SD 1.x or 2.x, Lightning-wrapped or flat,
  with or without EMA weights. Its keys are sau's own module names, so reading it is mostly reading a config
  from tensor shapes (or from the metadata of a file sau wrote);
- a diffusers folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/), whose config.json files say what
  shapes cannot (head counts, activation, prediction type, pad token);
- a CLIP model for scoring: a transformers CLIPModel folder or single file, or OpenAI's original names.
Every input is checked against the model its config builds: missing, unexpected and mis-shaped keys are listed.

What a malformed or hostile input gets, whatever its layout: a CheckpointError, one line naming the file, before
any weight is loaded into a model; never an IndexError or ZeroDivisionError from arithmetic on its shapes. In order:
- every tensor read has no dimension of size 0 and at most MAX_RANK dimensions (check_tensor_shapes);
- every tensor the config is inferred from has the rank the inference indexes (SIZE_TENSOR_RANKS);
- what still does not fit while the config is inferred or its model is built (on the meta device) is named (_fits);
- that model then lists every missing, unexpected and mis-shaped key (_check_complete).
A pickle (.ckpt, .bin) is read by sau.weights.safe_pickle: plain data only, and no code run.

    weights = read("v1-5-pruned-emaonly.safetensors")
    sd = load_model("stable-diffusion-2-1-base/")             # a StableDiffusion, converted in memory
Writing, and file-to-file conversion, are sau.weights.write's.
"""
import json
import re
import types
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open

from sau.common.cli import parse_lora
from sau.common.files import load_safetensors
from sau.common.state import CheckpointError, _listing, add_prefix, check_state_dict, strip_prefix
from sau.models.clip import CLIPModel, infer_text_config, infer_vision_config
from sau.models.config import (TEXT_PREFIXES, UNET_PREFIX, VAE_PREFIX, ModelConfig, ScheduleConfig, TextConfig, UNetConfig,
                               VAEConfig, VisionConfig, _dataclass_from_dict)
from sau.models.pipeline import StableDiffusion
from sau.models.tokenizer import OPENAI_VOCAB_FILE, Tokenizer
from sau.models.unet import infer_unet_config
from sau.models.vae import infer_vae_config
from sau.weights.bundle import BUNDLE_FORMATS, is_bundle, read_bundle
from sau.weights.form import SAU_CONFIG, CLIPWeights, Weights
from sau.weights.layouts.clip import openai_clip_to_hf, openclip_text_to_hf
from sau.weights.layouts.unet import unet_from_diffusers
from sau.weights.lora import merge_lora, read_lora
from sau.weights.layouts.vae import vae_from_diffusers
from sau.weights.safe_pickle import load_pickled_checkpoint

MODEL_PREFIXES = (UNET_PREFIX, VAE_PREFIX, "cond_stage_model.")
EMA_PREFIX = "model_ema."
# LDM's noise schedule, stored with the weights; the ModelConfig's schedule rebuilds it.
SCHEDULE_BUFFERS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "lvlb_weights"}
WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")

MAX_RANK = 4  # no SD or CLIP weight has more dimensions (convs have 4)
# The tensors a config is inferred from (by key pattern), with the ranks the inference indexes them with: convs
# are 4-D, linears and embeddings 2-D, a transformer's proj_in either. Checked before any size is read, so a
# wrong rank is named with its key rather than met as an IndexError. Any prefix may come before the CLIP names.
SIZE_TENSOR_RANKS = [(re.compile(pattern), ranks) for pattern, ranks in [
    (r"model\.diffusion_model\.(input_blocks\.0\.0|input_blocks\.\d+\.0\.out_layers\.3|out\.2)\.weight", (4,)),
    (r"model\.diffusion_model\.middle_block\.1\.transformer_blocks\.0\.attn2\.to_k\.weight", (2,)),
    (r"model\.diffusion_model\.middle_block\.1\.proj_in\.weight", (2, 4)),
    (r"first_stage_model\.(encoder\.conv_in|encoder\.down\.\d+\.block\.0\.conv1|decoder\.conv_in|decoder\.conv_out"
     r"|post_quant_conv)\.weight", (4,)),
    (r"(.+\.)?(token_embedding\.weight|positional_embedding|position_embedding\.weight|mlp\.c_fc\.weight"
     r"|mlp\.fc1\.weight|text_projection|text_projection\.weight|visual_projection\.weight|visual\.proj)", (2,)),
    (r"(.+\.)?(patch_embedding\.weight|visual\.conv1\.weight)", (4,)),
]]


def unsupported(where, what):
    return CheckpointError(f"{where}: {what} are not supported yet (only Stable Diffusion 1.x and 2.x text-to-image)")


def _reason(error):
    """An exception's message without the quotes KeyError adds: its first line, or its type's name."""
    text = str(error.args[0]) if error.args else ""
    return next((line for line in text.splitlines() if line.strip()), type(error).__name__)


def _printable(key):
    """A key as a one-line message can show it: a key is whatever string a file holds."""
    return key if key.isprintable() else repr(key)


def check_tensor_shapes(where, tensors):
    """Refuse, in one line naming `where` and the key, a tensor no SD or CLIP weight has: a dimension of size 0,
    more than MAX_RANK dimensions, or another rank than the one config inference reads it with."""
    for key, value in tensors.items():
        shape = tuple(value.shape)
        if 0 in shape or len(shape) > MAX_RANK:
            raise CheckpointError(f"{where}: tensor {_printable(key)} has shape {shape}; no Stable Diffusion or CLIP "
                                  f"weight has an empty dimension or more than {MAX_RANK}")
        ranks = next((ranks for pattern, ranks in SIZE_TENSOR_RANKS if pattern.fullmatch(key)), None)
        if ranks and len(shape) not in ranks:
            raise CheckpointError(f"{where}: tensor {_printable(key)} has shape {shape}; SD and CLIP models have it "
                                  + " or ".join(f"{rank}-D" for rank in ranks))


@contextmanager
def _fits(where, what="tensor shapes do not fit an SD layout"):
    """Inference and model building do arithmetic on sizes and keys; on an input they do not fit, what that
    raises becomes one line naming `where`. CheckpointErrors pass as they are."""
    try:
        yield
    except CheckpointError:
        raise
    except KeyError as e:  # a bare key is a missing one; anything longer is a message (a layout's key maps)
        reason = _reason(e)
        raise CheckpointError(f"{where}: {reason if ' ' in reason else 'missing key ' + reason}") from None
    except ValueError as e:  # the inference's own messages ("not a Stable Diffusion UNet: ...")
        raise CheckpointError(f"{where}: {_reason(e)}") from None
    except (IndexError, ZeroDivisionError, RuntimeError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{where}: {what} ({_reason(e)})") from None


# ---------------------------------------------------------------------------------------------------
# Reading

def detect_layout(path):
    """'bundle', 'scorer' (a CLIP scorer bundle), 'diffusers', 'clip' (a transformers CLIP folder) or 'file'."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_file():
        return "file"
    fmt = _read_json(path / "config.json").get("format") if is_bundle(path) else None
    if fmt in BUNDLE_FORMATS.values():
        return "scorer" if fmt == BUNDLE_FORMATS["clip"] else "bundle"
    if (path / "model_index.json").is_file() or (path / "unet").is_dir():
        return "diffusers"
    if (path / "config.json").is_file() and _read_json(path / "config.json").get("model_type") == "clip":
        return "clip"
    raise CheckpointError(f"{path}: a folder that is neither a sau bundle, a diffusers model nor a CLIP model")


def read(path, tokenizer=None, ema=False, prediction_type=None, upcast_attention=None, lora=()):
    """Weights (or CLIPWeights) from any supported input; `tokenizer` is a path used when the input has none.
    Every input is checked against the model its config builds; one that was converted records where from.
    `lora`: LoRA files merged in, in order, each "FILE[:SCALE]" or (file, scale) (sau.weights.lora)."""
    path = Path(path)
    layout = detect_layout(path)
    if ema and layout != "file":
        raise CheckpointError("--ema picks the EMA weights of a CompVis single file; this input has none")
    has_tokenizer = layout in ("bundle", "scorer", "clip") or (layout == "diffusers" and (path / "tokenizer").is_dir())
    notes = [f"{path} has its own tokenizer; --tokenizer is not used"] if tokenizer and has_tokenizer else []
    readers = {"bundle": _read_bundle, "scorer": _read_scorer_bundle, "diffusers": _read_diffusers,
               "clip": _read_clip_folder, "file": _read_file}
    weights = readers[layout](path, tokenizer_path=tokenizer, ema=ema, prediction_type=prediction_type)
    weights.notes = notes + weights.notes
    # A bundle is read as sau wrote it: nothing was converted, and its tokenizer is the one saved with it (a
    # small one may serve a larger embedding table); other inputs are checked against their tokenizer.
    converted = layout not in ("bundle", "scorer")
    if converted:
        weights.info = {**weights.info, "converted_from": {"layout": layout, "name": path.name}}
    if isinstance(weights, CLIPWeights):
        if lora:
            raise CheckpointError(f"{path}: a CLIP model; LoRA files go onto Stable Diffusion models")
        _check_clip(weights, path, tokenizer=converted)
        return weights
    weights = _override(weights, prediction_type, upcast_attention)
    _check_complete(weights, path, tokenizer=converted)
    for item in lora:
        file, scale = parse_lora(str(item)) if isinstance(item, (str, Path)) else item
        weights = merge_lora(weights, read_lora(file), scale)
    return weights


def _read_bundle(path, **_):
    config_dict, state, tokenizer_path = read_bundle(path)
    check_tensor_shapes(path, state)
    with _fits(path / "config.json", "not a sau model config"):
        config = ModelConfig.from_dict(config_dict)
    tokenizer = Tokenizer.from_file(tokenizer_path, pad_id=config.text.pad_id)
    return Weights(config, state, tokenizer, info=dict(config_dict.get("info", {})))


def _read_scorer_bundle(path, **_):
    config, state, tokenizer_path = read_bundle(path, kind="clip")
    check_tensor_shapes(path, state)
    with _fits(path / "config.json", "not a sau CLIP config"):
        text = _dataclass_from_dict(TextConfig, config["text"])
        vision = _dataclass_from_dict(VisionConfig, config["vision"])
    return CLIPWeights(text, vision, state,
                       Tokenizer.from_file(tokenizer_path, pad_id=text.pad_id))


def _read_file(path, tokenizer_path=None, ema=False, prediction_type=None):
    tensors, metadata = read_tensor_file(path)
    if any(k.startswith(("conditioner.embedders.", UNET_PREFIX + "label_emb.")) for k in tensors):
        raise unsupported(path, "SDXL checkpoints")
    if UNET_PREFIX + "input_blocks.0.0.weight" in tensors:
        return _compvis_weights(path, tensors, metadata, tokenizer_path, ema, prediction_type)
    if "visual.class_embedding" in tensors or "vision_model.embeddings.class_embedding" in tensors:
        return _clip_weights(path, tensors, {}, None, tokenizer_path)
    raise CheckpointError(f"{path}: not a Stable Diffusion 1.x/2.x or CLIP checkpoint "
                          "(no model.diffusion_model.*, vision_model.* or visual.* weights)")


def read_tensor_file(path):
    """(tensors, metadata) of a .safetensors file or a torch.save pickle (read without running code, as plain
    data). A Lightning checkpoint's tensors sit under `state_dict`, possibly nested. Every tensor's shape is
    checked (check_tensor_shapes)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        tensors = load_safetensors(path)
        check_tensor_shapes(path, tensors)
        with safe_open(str(path), "pt") as f:
            return tensors, f.metadata() or {}
    obj = load_pickled_checkpoint(path)  # plain dicts and tensors: no method here is one the pickle chose
    step = obj.get("global_step") if isinstance(obj, dict) else None
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    check_tensor_shapes(path, tensors)
    return tensors, ({"global_step": str(step)} if isinstance(step, int) else {})


# --- CompVis single files ---------------------------------------------------------------------------

def _compvis_weights(path, tensors, metadata, tokenizer_path, ema, prediction_type):
    state, notes = _model_tensors(path, tensors, ema)
    channels = state[UNET_PREFIX + "input_blocks.0.0.weight"].shape[1]  # 4-D: check_tensor_shapes saw to it
    if channels == 9:
        raise unsupported(path, "inpainting checkpoints (9 UNet input channels)")
    with _fits(path):
        state, converted_openclip = _normalise_text_tower(state)
    if SAU_CONFIG in metadata:  # written by sau: the config is exact
        with _fits(path, "its sau config does not describe a model"):
            config = ModelConfig.from_dict(json.loads(metadata[SAU_CONFIG]))
    else:
        config = _infer_config(path, state, converted_openclip)
        if config.family == "sd2":
            config, note = _sd2_schedule(config, prediction_type, metadata.get("global_step"))
            notes += [note] if note else []
    tokenizer = _fallback_tokenizer(config.text, tokenizer_path, path)
    return Weights(config, state, tokenizer, notes=notes)


def _model_tensors(path, tensors, ema):
    """The model's tensors (EMA UNet weights in place of the trained ones with `ema`) and notes;
    schedule buffers and position ids are dropped, anything else unknown is an error."""
    state = {k: v for k, v in tensors.items() if k.startswith(MODEL_PREFIXES) and not k.endswith("position_ids")}
    unknown = [k for k in tensors if not k.startswith((*MODEL_PREFIXES, EMA_PREFIX)) and k not in SCHEDULE_BUFFERS]
    if unknown:
        raise CheckpointError(f"{path}: unexpected keys, not part of an SD 1.x/2.x model: {_listing(unknown)}")
    has_ema = any(k.startswith(EMA_PREFIX + "diffusion_model") for k in tensors)
    if not ema:
        return state, [f"{path} also holds EMA weights; --ema uses them"] if has_ema else []
    # LDM's LitEma names a parameter by its path under `model.` with the dots removed
    flat = {k: EMA_PREFIX + k[len("model."):].replace(".", "") for k in state if k.startswith(UNET_PREFIX)}
    missing = [k for k, f in flat.items() if f not in tensors]
    if len(missing) == len(flat):
        raise CheckpointError(f"{path}: holds no EMA weights (model_ema.*); run without --ema")
    if missing:
        raise CheckpointError(f"{path}: EMA weights are missing for {_listing(missing)}")
    return {**state, **{k: tensors[f] for k, f in flat.items()}}, []


def _normalise_text_tower(state):
    """Text keys as a bundle has them. Older SD1 files lack the `text_model.` level. An OpenCLIP tower without
    `text_projection` is one that diffusers cut down (its last block dropped): it is kept under HF names and
    run whole, as diffusers runs it. Returns (state, whether that conversion happened)."""
    root, hf_prefix, openclip_prefix = "cond_stage_model.transformer.", TEXT_PREFIXES["clip"], TEXT_PREFIXES["openclip"]
    state = {hf_prefix + k[len(root):] if k.startswith(root) and not k.startswith(hf_prefix) else k: v
             for k, v in state.items()}
    openclip = strip_prefix(state, openclip_prefix)
    if not openclip or "text_projection" in openclip:
        return state, False
    rest = {k: v for k, v in state.items() if not k.startswith(openclip_prefix)}
    hf = {k: v for k, v in openclip_text_to_hf(openclip).items() if k != "logit_scale"}
    return {**rest, **add_prefix(hf, hf_prefix)}, True


def _infer_config(path, state, converted_openclip):
    openclip = any(k.startswith(TEXT_PREFIXES["openclip"]) for k in state)
    text_prefix = TEXT_PREFIXES["openclip" if openclip else "clip"]
    for part, prefix in (("UNet", UNET_PREFIX), ("VAE", VAE_PREFIX), ("text encoder", text_prefix)):
        if not any(k.startswith(prefix) for k in state):
            raise CheckpointError(f"{path}: missing the {part} (no {prefix}* weights)")
    with _fits(path):
        unet = infer_unet_config(strip_prefix(state, UNET_PREFIX))
        vae = infer_vae_config(strip_prefix(state, VAE_PREFIX))
        text = infer_text_config(strip_prefix(state, text_prefix))
    if converted_openclip:  # OpenCLIP's activation and padding, whatever its width
        text = replace(text, activation="gelu", pad_id=0)
    family = "sd2" if text.kind == "openclip" or text.activation == "gelu" else "sd1"
    return ModelConfig(family=family, unet=unet, vae=vae, text=text)


def _sd2_schedule(config, prediction_type, global_step):
    """SD 2.x comes as 512 px epsilon models and 768 px v-prediction models (with upcast attention), and a
    checkpoint does not say which. Unless told, assume 768-v as diffusers does, except at 2-base's training
    step count (875000). Returns (config, a note when it was a guess)."""
    note = None
    if prediction_type is None:
        base = global_step == "875000"
        prediction_type = "epsilon" if base else "v_prediction"
        note = ("SD 2.x at training step 875000: assumed the 512 px base model (epsilon prediction); if it is a "
                "768-v model, pass --prediction-type v_prediction" if base else
                "SD 2.x: assumed the 768 px v-prediction model; for a 512 px base model pass --prediction-type epsilon")
    v = prediction_type == "v_prediction"
    return replace(config, schedule=replace(config.schedule, prediction_type=prediction_type),
                   unet=replace(config.unet, upcast_attention=v), image_size=768 if v else 512), note


# --- diffusers folders ------------------------------------------------------------------------------

def _read_diffusers(folder, tokenizer_path=None, **_):
    index = _read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    if (folder / "text_encoder_2").exists() or "XL" in index.get("_class_name", ""):
        raise unsupported(folder, "SDXL pipelines")
    configs, parts = {}, {}
    for part in ("unet", "vae", "text_encoder"):
        if not (folder / part / "config.json").is_file():
            raise CheckpointError(f"{folder}: a diffusers folder needs {part}/config.json")
        configs[part] = _read_json(folder / part / "config.json")
        parts[part] = _read_component(folder / part)
    with _fits(folder, "its config.json files do not describe an SD 1.x/2.x model"):
        unet = unet_config_from_diffusers(configs["unet"], folder / "unet")
        vae = vae_config_from_diffusers(configs["vae"])
        text = _text_config_from_diffusers(configs["text_encoder"], parts["text_encoder"], folder)
    if (folder / "tokenizer").is_dir():
        tokenizer = Tokenizer.from_file(folder / "tokenizer", max_length=text.max_positions)
        text = replace(text, pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
    else:
        tokenizer = _fallback_tokenizer(text, tokenizer_path, folder)
    with _fits(folder, "its config.json files do not describe an SD 1.x/2.x model"):
        config = ModelConfig(family="sd2" if text.activation == "gelu" else "sd1", unet=unet, vae=vae, text=text,
                             schedule=_schedule_from_diffusers(folder),
                             image_size=configs["unet"].get("sample_size", 64) * 2 ** (len(vae.ch_mult) - 1))
    with _fits(folder):
        state = compvis_from_diffusers(parts, config)
    return Weights(config, state, tokenizer)


def _text_config_from_diffusers(hf_config, state, folder):
    """Shapes give the sizes; transformers' config.json the activation and heads (a diffusers SD2 encoder is
    OpenCLIP's, cut to the 23 layers SD uses, under HF names: gelu, run whole)."""
    with _fits(folder / "text_encoder"):
        text = infer_text_config({k: v for k, v in state.items() if not k.endswith("position_ids")})
    return replace(text, activation=hf_config.get("hidden_act", text.activation), skip_last_layers=0,
                   heads=hf_config.get("num_attention_heads", text.heads))


def compvis_from_diffusers(parts, config):
    """CompVis keys for diffusers' {"unet", "vae", "text_encoder": state dict}, the inverse of
    `diffusers_state_dicts` (the text encoder stays under HF names, with or without the `text_model.` level)."""
    text = {k.removeprefix("text_model."): v for k, v in parts["text_encoder"].items()
            if not k.endswith("position_ids")}
    return {**add_prefix(unet_from_diffusers(parts["unet"], config.unet), UNET_PREFIX),
            **add_prefix(vae_from_diffusers(parts["vae"], config.vae), VAE_PREFIX),
            **add_prefix(text, TEXT_PREFIXES["clip"])}


def unet_config_from_diffusers(c, where="unet"):
    """A UNetConfig from diffusers' UNet2DConditionModel config. diffusers' `attention_head_dim` counts heads
    (a historical misnomer): one number for all levels means fixed heads (SD1), a list with one head width
    means fixed head channels (SD2)."""
    if c.get("in_channels", 4) == 9:
        raise unsupported(where, "inpainting UNets (9 input channels)")
    if c.get("addition_embed_type") or c.get("class_embed_type"):
        raise unsupported(where, "UNets with class or added embeddings (SDXL, upscalers)")
    channels = list(c["block_out_channels"])
    levels, width = len(channels), channels[0]
    heads = c.get("num_attention_heads") or c.get("attention_head_dim") or 8
    heads = [heads] * levels if isinstance(heads, int) else list(heads)
    head_widths = {ch // h for ch, h in zip(channels, heads)}
    if len(set(heads)) == 1:
        head_args = dict(num_heads=heads[0], num_head_channels=-1)
    elif len(head_widths) == 1:
        head_args = dict(num_heads=-1, num_head_channels=head_widths.pop())
    else:
        raise unsupported(where, f"attention heads {heads}, neither fixed in number nor in width,")
    depth = c.get("transformer_layers_per_block", 1)
    if not isinstance(depth, int):
        if len(set(depth)) != 1:
            raise unsupported(where, f"transformer depths that differ per level ({depth})")
        depth = depth[0]
    return UNetConfig(
        in_channels=c.get("in_channels", 4), out_channels=c.get("out_channels", 4), model_channels=width,
        channel_mult=tuple(ch // width for ch in channels), num_res_blocks=c.get("layers_per_block", 2),
        attention_resolutions=tuple(2 ** i for i in reversed(range(levels))
                                    if c["down_block_types"][i].startswith("CrossAttn")),
        transformer_depth=depth, context_dim=c.get("cross_attention_dim", 768),
        use_linear_in_transformer=c.get("use_linear_projection", False), norm_groups=c.get("norm_num_groups", 32),
        upcast_attention=bool(c.get("upcast_attention", False)), **head_args)


def vae_config_from_diffusers(c):
    channels = list(c.get("block_out_channels", (64,)))
    return VAEConfig(in_channels=c.get("in_channels", 3), out_channels=c.get("out_channels", 3), ch=channels[0],
                     ch_mult=tuple(ch // channels[0] for ch in channels), num_res_blocks=c.get("layers_per_block", 1),
                     z_channels=c.get("latent_channels", 4), embed_dim=c.get("latent_channels", 4),
                     norm_groups=c.get("norm_num_groups", 32), scale_factor=c.get("scaling_factor", 0.18215))


def _schedule_from_diffusers(folder):
    path = folder / "scheduler" / "scheduler_config.json"
    c = _read_json(path) if path.is_file() else {}
    if c.get("beta_schedule", "scaled_linear") != "scaled_linear" or c.get("trained_betas"):
        raise unsupported(path, f"noise schedules other than scaled_linear ({c.get('beta_schedule')!r})")
    return ScheduleConfig(num_train_timesteps=c.get("num_train_timesteps", 1000),
                          beta_start=c.get("beta_start", 0.00085),
                          beta_end=c.get("beta_end", 0.012), prediction_type=c.get("prediction_type", "epsilon"))


def _read_component(folder):
    """The tensors of one diffusers / transformers model folder: safetensors first, then a pickle; sharded or not."""
    for stem in WEIGHT_STEMS:
        for name in (f"{stem}.safetensors", f"{stem}.safetensors.index.json", f"{stem}.fp16.safetensors",
                     f"{stem}.bin", f"{stem}.bin.index.json", f"{stem}.fp16.bin"):
            path = folder / name
            if not path.is_file():
                continue
            if not name.endswith(".index.json"):
                return read_tensor_file(path)[0]
            tensors = {}
            for shard in sorted(set(_read_json(path)["weight_map"].values())):
                tensors.update(read_tensor_file(folder / shard)[0])
            return tensors
    raise CheckpointError(f"{folder}: no weights ({WEIGHT_STEMS[0]}.safetensors or model.safetensors)")


# --- CLIP models for scoring ------------------------------------------------------------------------

def _read_clip_folder(folder, **_):
    return _clip_weights(folder, _read_component(folder), _read_json(folder / "config.json"),
                         Tokenizer.from_file(folder), None)


def _clip_weights(where, tensors, config, tokenizer, tokenizer_path):
    """CLIPWeights from transformers CLIPModel or OpenAI names; config.json (if any) gives activations and heads."""
    with _fits(where, "tensor shapes do not fit a CLIP layout"):
        if "visual.class_embedding" in tensors:
            tensors = openai_clip_to_hf(tensors)
        state = {k: v for k, v in tensors.items() if not k.endswith("position_ids")}
        text = infer_text_config(strip_prefix(state, "text_model."))
        text = replace(text, projection_dim=state["text_projection.weight"].shape[0])
        vision = infer_vision_config(state)
        text_json, vision_json = config.get("text_config") or {}, config.get("vision_config") or {}
        text = replace(text, activation=text_json.get("hidden_act", text.activation),
                       heads=text_json.get("num_attention_heads", text.heads))
        vision = replace(vision, activation=vision_json.get("hidden_act", vision.activation),
                         heads=vision_json.get("num_attention_heads", vision.heads))
    tokenizer = tokenizer or _fallback_tokenizer(text, tokenizer_path, "this CLIP model")
    return CLIPWeights(replace(text, pad_id=tokenizer.pad_id), vision, state, tokenizer)


# --- tokenizer, overrides, checks ---------------------------------------------------------------------

def _fallback_tokenizer(text_cfg, tokenizer_path, source):
    """For an input without a tokenizer: --tokenizer PATH, else OpenAI's vocabulary from the open_clip_torch wheel."""
    if tokenizer_path is not None:
        return Tokenizer.from_file(tokenizer_path, pad_id=text_cfg.pad_id, max_length=text_cfg.max_positions)
    try:
        return Tokenizer.openai(pad_id=text_cfg.pad_id, max_length=text_cfg.max_positions)
    except FileNotFoundError:
        how = (f"pass --tokenizer PATH (a tokenizer.json, a vocab.json with merges.txt beside it, or OpenAI's "
               f"{OPENAI_VOCAB_FILE}), or install the open_clip_torch wheel, which ships the last "
               "(`pip install --no-deps open_clip_torch`)")
        raise CheckpointError(f"{source} holds no tokenizer: {how}") from None


def _override(weights, prediction_type, upcast_attention):
    config = weights.config
    if prediction_type is not None:
        config = replace(config, schedule=replace(config.schedule, prediction_type=prediction_type))
    if upcast_attention is not None:
        config = replace(config, unet=replace(config.unet, upcast_attention=upcast_attention))
    return replace(weights, config=config)


def _check_tokenizer(tokenizer, text_cfg, path):
    if tokenizer.vocab_size != text_cfg.vocab_size:
        raise CheckpointError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens, the text encoder "
                              f"{text_cfg.vocab_size}; pass the model's own with --tokenizer")


def _check_complete(weights, path, tokenizer=True):
    """Every key the config's model has, with its shape, and nothing else; a readable list otherwise."""
    if tokenizer:
        _check_tokenizer(weights.tokenizer, weights.config.text, path)
    with _fits(path, "the config read from it builds no model"), torch.device("meta"):
        model = StableDiffusion(weights.config, weights.tokenizer)
    check_state_dict(types.SimpleNamespace(state_dict=model.compvis_state_dict), weights.state, what=str(path))


def _check_clip(weights, path, tokenizer=True):
    if tokenizer:
        _check_tokenizer(weights.tokenizer, weights.text, path)
    with _fits(path, "the config read from it builds no CLIP model"), torch.device("meta"):
        model = CLIPModel(weights.text, weights.vision)
    check_state_dict(model, weights.state, what=str(path))


# ---------------------------------------------------------------------------------------------------
# A model from any input

def load_model(path, device="cpu", dtype=None, **read_options):
    """A StableDiffusion from any supported input (a real path; sau.load also takes demo names), read in memory.
    `read_options` are read's: tokenizer, ema, prediction_type, upcast_attention."""
    weights = read(path, **read_options)
    if isinstance(weights, CLIPWeights):
        raise CheckpointError(f"{path}: a CLIP model, not Stable Diffusion; load it with "
                              "sau.evaluation.scorer.CLIPScorer")
    return StableDiffusion.from_weights(weights, device, dtype)


def _read_json(path):
    """A JSON object from a file (every config and index is one); CheckpointError otherwise."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return obj
