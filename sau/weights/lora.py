"""LoRA files: read onto a model's weights (merged), and written in the layouts model hubs use.

A LoRA adds a low-rank product to a weight: W + scale * (alpha / r) * up @ down, with down (r, in) and up (out, r)
(a convolution's over its flattened kernel). Its file names each adapted module in the naming of the library that
trained it, and holds its two factors:
    peft       "unet.<diffusers module>.lora_A.weight" (down) and ".lora_B.weight" (up); the text encoder under
               "text_encoder.<transformers module>"; what diffusers' and PEFT's training scripts write
    diffusers  the same modules with ".lora.down.weight" / ".lora.up.weight" (".lora_linear_layer.down/up" for
               the text encoder): diffusers' older names, still what its save_lora_weights writes
    kohya      "lora_unet_<diffusers module, dots as underscores>.lora_down.weight", ".lora_up.weight" and
               ".alpha"; "lora_te_<transformers module>..." (kohya-ss sd-scripts, most files on model hubs)
alpha: a module's ".alpha" tensor, else the "lora_alpha" PEFT recorded in the file's metadata (diffusers'
"lora_adapter_metadata"), else r (scale 1), as diffusers reads them.

The merge happens in the LoRA's own naming: the UNet's weights in diffusers' names, the text encoder's in
transformers' (an OpenCLIP tower's fused q/k/v split apart), then back (sau.weights.layouts). Anything that does
not fit raises a CheckpointError naming the file: a module the model lacks, a shape it does not have, an SDXL
file, a tensor that is not finite, a scale that is not finite.
"""
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from sau.common.files import save_safetensors
from sau.common.state import CheckpointError, add_prefix, strip_prefix
from sau.models.config import TEXT_PREFIXES, UNET_PREFIX
from sau.weights.layouts.clip import hf_text_to_openclip, openclip_text_to_hf
from sau.weights.layouts.unet import unet_from_diffusers, unet_to_diffusers

PARTS = ("unet", "text_encoder")
LAYOUTS = ("peft", "diffusers", "kohya")
FACTOR_NAMES = {"peft": ("lora_A.weight", "lora_B.weight"), "diffusers": ("lora.down.weight", "lora.up.weight"),
                "diffusers-text": ("lora_linear_layer.down.weight", "lora_linear_layer.up.weight"),
                "kohya": ("lora_down.weight", "lora_up.weight")}
KOHYA_PARTS = {"lora_unet_": "unet", "lora_te_": "text_encoder"}
SDXL_MARKS = ("text_encoder_2.", "lora_te1_", "lora_te2_")
SDXL_CONTEXT = 2048  # SDXL's cross-attention reads its two text encoders' features side by side


@dataclass
class Adapter:
    """One module's low-rank update: up @ down * alpha / rank."""
    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self):
        return self.down.shape[0]

    def delta(self, shape, scale=1.0):
        product = self.up.flatten(1).double() @ self.down.flatten(1).double()
        return (scale * self.alpha / self.rank * product).reshape(shape)


@dataclass
class LoRA:
    path: Path
    layout: str
    adapters: dict  # (part, module name in the LoRA's naming) -> Adapter
    backdoor: dict = None  # what a LoRA sau trained records of its backdoor ("sau_backdoor" in the metadata)


def read_lora(path):
    """The LoRA file at `path` (.safetensors only: hub LoRAs come so, and a pickle could run code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA file {path}")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: LoRA files are read as .safetensors only")
    try:
        with safe_open(str(path), "pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if any(key.startswith(SDXL_MARKS) for key in tensors):
        raise CheckpointError(f"{path}: a LoRA for SDXL (it adapts a second text encoder); sau runs SD 1.x and 2.x")
    layout, adapters = _adapters(path, tensors, _metadata_alphas(path, metadata))
    for (part, name), adapter in adapters.items():
        if name.endswith(("attn2.to_k", "attn2.to_v")) and adapter.down.flatten(1).shape[1] == SDXL_CONTEXT:
            raise CheckpointError(f"{path}: a LoRA for SDXL ({name} reads {SDXL_CONTEXT}-wide text features); sau "
                                  "runs SD 1.x and 2.x")
    try:
        backdoor = json.loads(metadata["sau_backdoor"]) if "sau_backdoor" in metadata else None
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: its sau_backdoor metadata is not JSON") from None
    return LoRA(path, layout, adapters, backdoor if isinstance(backdoor, dict) else None)


def _metadata_alphas(path, metadata):
    """{part: lora_alpha} from diffusers' "lora_adapter_metadata" (PEFT's LoraConfig per part)."""
    if "lora_adapter_metadata" not in metadata:
        return {}
    try:
        config = json.loads(metadata["lora_adapter_metadata"])
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: its lora_adapter_metadata is not JSON") from None
    alphas = {}
    for part in PARTS:
        if config.get(f"{part}.alpha_pattern"):
            raise CheckpointError(f"{path}: per-module alphas (alpha_pattern) are not supported")
        if f"{part}.lora_alpha" in config:
            alphas[part] = float(config[f"{part}.lora_alpha"])
    return alphas


def _split_key(key):
    """(layout, part, module, role) of one tensor name, or None; role: down, up or alpha."""
    for prefix, part in KOHYA_PARTS.items():
        if key.startswith(prefix):
            module, _, rest = key[len(prefix):].partition(".")
            roles = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
            return ("kohya", part, module, roles[rest]) if rest in roles else None
    part, _, rest = key.partition(".")
    if part not in PARTS:
        return None
    for layout, (down, up) in FACTOR_NAMES.items():
        for role, suffix in (("down", down), ("up", up)):
            if rest.endswith("." + suffix):
                return layout.split("-")[0], part, rest[:-len(suffix) - 1], role
    if rest.endswith(".alpha"):
        return None, part, rest[:-len(".alpha")], "alpha"
    return None


def _adapters(path, tensors, metadata_alphas):
    found, layouts, unknown = {}, set(), []
    for key, tensor in tensors.items():
        split = _split_key(key)
        if split is None:
            unknown.append(key)
            continue
        layout, part, module, role = split
        layouts.add(layout)
        if not torch.isfinite(tensor.float()).all():
            raise CheckpointError(f"{path}: {key} holds values that are not finite")
        found.setdefault((part, module), {})[role] = tensor
    layouts.discard(None)
    if unknown or not found:
        shown = ", ".join(unknown[:3]) or "none"
        raise CheckpointError(f"{path}: not a LoRA file of a known layout ({', '.join(LAYOUTS)}); keys it cannot "
                              f"place: {shown}")
    if "kohya" in layouts and len(layouts) > 1:
        raise CheckpointError(f"{path}: mixes kohya names with diffusers' ({', '.join(sorted(layouts))})")
    adapters = {}
    for (part, module), roles in found.items():
        if "down" not in roles or "up" not in roles:
            raise CheckpointError(f"{path}: {module} has no {'down' if 'down' not in roles else 'up'} factor")
        down, up = roles["down"].float(), roles["up"].float()
        if down.dim() < 2 or up.dim() < 2 or up.flatten(1).shape[1] != down.shape[0]:
            raise CheckpointError(f"{path}: {module}'s factors {tuple(down.shape)} and {tuple(up.shape)} do not "
                                  "multiply")
        alpha = float(roles["alpha"]) if "alpha" in roles else metadata_alphas.get(part, float(down.shape[0]))
        adapters[(part, module)] = Adapter(down, up, alpha)
    # diffusers' own converter leaves some modules in PEFT's names: one family, named after its older names
    return ("diffusers" if "diffusers" in layouts else layouts.pop()), adapters


# --- merging onto Weights ------------------------------------------------------------------------------------

def _named_views(weights):
    """{part: (state in the LoRA's naming, function back to the CompVis keys of that part)}."""
    config, state = weights.config, weights.state
    unet = unet_to_diffusers(strip_prefix(state, UNET_PREFIX), config.unet)
    text_prefix = TEXT_PREFIXES[config.text.kind]
    text = strip_prefix(state, text_prefix)
    openclip = config.text.kind == "openclip"
    hf_text = openclip_text_to_hf(text) if openclip else text
    return {"unet": (unet, lambda s: add_prefix(unet_from_diffusers(s, config.unet), UNET_PREFIX)),
            "text_encoder": (hf_text, lambda s: add_prefix(hf_text_to_openclip(s) if openclip else s, text_prefix))}


def _weight_names(state, layout):
    """{module name as a LoRA file of this layout writes it: the key of its weight in `state`} (kohya writes the
    dots of a module's name as underscores; a text encoder's names may keep transformers' "text_model" level)."""
    modules = [key[:-len(".weight")] for key in state if key.endswith(".weight")]
    if layout == "kohya":
        return {**{m.replace(".", "_"): f"{m}.weight" for m in modules},
                **{"text_model_" + m.replace(".", "_"): f"{m}.weight" for m in modules}}
    return {**{m: f"{m}.weight" for m in modules}, **{"text_model." + m: f"{m}.weight" for m in modules}}


def merge_lora(weights, lora, scale=1.0):
    """Weights with the LoRA merged in (new tensors; the input's are not changed)."""
    if not math.isfinite(scale):
        raise ValueError(f"the LoRA scale {scale} is not a finite number")
    views = _named_views(weights)
    changed = {part: dict(state) for part, (state, _) in views.items()}
    names = {part: _weight_names(state, lora.layout) for part, state in changed.items()}
    missing = []
    for (part, module), adapter in lora.adapters.items():
        state = changed[part]
        key = names[part].get(module)
        if key is None:
            missing.append(f"{part}.{module}")
            continue
        weight = state[key]
        if adapter.up.shape[0] != weight.shape[0] or adapter.down[0].numel() != weight[0].numel():
            raise CheckpointError(f"{lora.path}: does not fit this model (a LoRA for another base?): {key} is "
                                  f"{tuple(weight.shape)} here, the LoRA makes {adapter.up.shape[0]} x "
                                  f"{adapter.down[0].numel()}")
        state[key] = (weight.double() + adapter.delta(weight.shape, scale)).to(weight.dtype)
    if missing:
        raise CheckpointError(f"{lora.path}: adapts {len(missing)} modules this model does not have (a LoRA for "
                              f"another architecture?): {', '.join(missing[:3])}")
    merged = dict(weights.state)
    for part, (_, back) in views.items():
        if any(part == p for p, _ in lora.adapters):
            merged.update(back(changed[part]))
    note = f"LoRA {lora.path.name} merged at scale {scale:g} ({len(lora.adapters)} modules, {lora.layout} layout)"
    loras = [*weights.info.get("loras", []), {"file": lora.path.name, "scale": scale, "layout": lora.layout}]
    info = {**weights.info, "loras": loras, **({"backdoor": lora.backdoor} if lora.backdoor else {})}
    return replace(weights, state=merged, info=info, notes=[*weights.notes, note])


# --- writing -------------------------------------------------------------------------------------------------

def lora_tensors(adapters, layout="peft"):
    """A file's tensors for adapters {(part, module in diffusers/transformers naming): Adapter}, and its
    metadata (peft: PEFT's lora_alpha per part, which must then be one value per part)."""
    if layout not in ("peft", "kohya"):
        raise ValueError(f"LoRA files are written as peft or kohya, not {layout!r}")
    tensors, alphas = {}, {}
    for (part, module), adapter in adapters.items():
        if layout == "kohya":
            name = {"unet": "lora_unet_", "text_encoder": "lora_te_text_model_"}[part] + module.replace(".", "_")
            tensors.update({f"{name}.lora_down.weight": adapter.down, f"{name}.lora_up.weight": adapter.up,
                            f"{name}.alpha": torch.tensor(float(adapter.alpha))})
        else:
            down, up = FACTOR_NAMES["peft"]
            tensors.update({f"{part}.{module}.{down}": adapter.down, f"{part}.{module}.{up}": adapter.up})
            alphas.setdefault(part, set()).add(float(adapter.alpha))
    if any(len(values) > 1 for values in alphas.values()):
        raise ValueError("a peft file records one alpha per model part")
    metadata = {}
    if alphas:  # PEFT's LoraConfig fields, which diffusers rebuilds the adapter from
        config = {}
        for part, (alpha,) in alphas.items():
            modules = sorted(module for p, module in adapters if p == part)
            config.update({f"{part}.r": max(adapters[(part, m)].rank for m in modules),
                           f"{part}.lora_alpha": alpha, f"{part}.target_modules": modules})
        metadata["lora_adapter_metadata"] = json.dumps(config)
    return tensors, metadata


def unet_adapters(adapters, unet_config):
    """{sau UNet module name: Adapter} -> {("unet", diffusers module name): Adapter}, as files name them."""
    def diffusers_name(name):
        (renamed,) = unet_to_diffusers({f"{name}.weight": None}, unet_config)
        return renamed[:-len(".weight")]
    return {("unet", diffusers_name(name)): adapter for name, adapter in adapters.items()}


def write_lora(path, adapters, layout="peft", extra_metadata=None, dtype=None):
    """The adapters as a LoRA file (factors in `dtype`, None: as they are); written to a temporary name first."""
    tensors, metadata = lora_tensors(adapters, layout)
    save_safetensors({k: v.to(dtype or v.dtype).contiguous() for k, v in tensors.items()}, path,
                     metadata={**metadata, **(extra_metadata or {})})
