"""Key maps for CLIP towers: OpenCLIP / OpenAI names <-> Hugging Face names.

OpenCLIP's text tower (SD2) and OpenAI's original CLIP use the same names: `token_embedding`,
`positional_embedding`, `transformer.resblocks.N.{ln_1, attn, ln_2, mlp.c_fc, mlp.c_proj}`, `ln_final`,
`text_projection` (a [width, proj] matrix used as x @ P). Their attention is nn.MultiheadAttention, whose
q, k and v projections sit stacked by rows in `in_proj_weight`. Hugging Face splits them into
`self_attn.{q,k,v}_proj` and stores projections as Linear weights, i.e. transposed.

The maps are rules: a table of renamed prefixes for the few top-level names, and one rule for every block.
Split, merged and transposed tensors are fresh copies, so the result can be saved with safetensors.
"""
import torch

# Inside one residual block: OpenCLIP/OpenAI prefix -> HF prefix (in_proj is split apart, see below)
BLOCK_TO_HF = {"ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.", "mlp.c_fc.": "mlp.fc1.", "mlp.c_proj.": "mlp.fc2.",
               "attn.out_proj.": "self_attn.out_proj."}

# Top-level names; a name ending in "." renames a prefix, any other renames one exact key.
TEXT_TO_HF = {"token_embedding.weight": "embeddings.token_embedding.weight",
              "positional_embedding": "embeddings.position_embedding.weight",
              "ln_final.": "final_layer_norm.",
              "text_projection": "text_projection.weight",
              "logit_scale": "logit_scale"}  # not part of an HF text model; kept so the map loses nothing
VISION_TO_HF = {"conv1.weight": "vision_model.embeddings.patch_embedding.weight",
                "class_embedding": "vision_model.embeddings.class_embedding",
                "positional_embedding": "vision_model.embeddings.position_embedding.weight",
                "ln_pre.": "vision_model.pre_layrnorm.",
                "ln_post.": "vision_model.post_layernorm.",
                "proj": "visual_projection.weight"}
TRANSPOSED = {"text_projection", "proj"}  # x @ P in OpenAI/OpenCLIP, a Linear weight (P^T) in HF

RESBLOCKS = "transformer.resblocks."
OPENAI_METADATA = ("input_resolution", "context_length", "vocab_size")  # scalars in OpenAI's JIT files
QKV = ("q", "k", "v")


def _rename(name, table):
    for old, new in table.items():
        if name == old or (old.endswith(".") and name.startswith(old)):
            return new + name[len(old):]
    raise KeyError(f"no rule to convert the CLIP key {name!r}")


def _block_to_hf(name, value):
    """One block's (name, tensor) -> list of HF (name, tensor); names relative to the block."""
    if name.startswith("attn.in_proj_"):
        kind = name.removeprefix("attn.in_proj_")  # weight or bias
        return [(f"self_attn.{p}_proj.{kind}", t.clone()) for p, t in zip(QKV, value.chunk(3, dim=0))]
    return [(_rename(name, BLOCK_TO_HF), value)]


def _tower_to_hf(sd, table, layers_prefix, num_layers=None):
    """Convert one tower (keys relative to it) with a top-level table; blocks go under `layers_prefix`."""
    out = {}
    for name, value in sd.items():
        if name.startswith(RESBLOCKS):
            index, rest = name[len(RESBLOCKS):].split(".", 1)
            if num_layers is not None and int(index) >= num_layers:
                continue
            for hf_name, tensor in _block_to_hf(rest, value):
                out[f"{layers_prefix}{index}.{hf_name}"] = tensor
        else:
            out[_rename(name, table)] = value.t().contiguous() if name in TRANSPOSED else value
    return out


def openclip_text_to_hf(sd, num_layers=None) -> dict:
    """OpenCLIP text tower (keys under `cond_stage_model.model.`, prefix removed) -> HF `CLIPTextModel` names,
    plus `text_projection.weight` and `logit_scale` when present. `num_layers` drops later blocks (the
    diffusers SD2 text encoder keeps 23 of 24)."""
    return _tower_to_hf(sd, TEXT_TO_HF, "encoder.layers.", num_layers)


def hf_text_to_openclip(sd) -> dict:
    """HF text model names (with or without the `text_model.` level) -> OpenCLIP text tower names."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items() if not k.endswith("position_ids")}
    from_hf = {new: old for old, new in TEXT_TO_HF.items()}
    block_from_hf = {new: old for old, new in BLOCK_TO_HF.items()}
    layers = "encoder.layers."
    out = {}
    for name, value in sd.items():
        if not name.startswith(layers):
            openclip_name = _rename(name, from_hf)
            out[openclip_name] = value.t().contiguous() if openclip_name in TRANSPOSED else value
            continue
        index, rest = name[len(layers):].split(".", 1)
        attn_part, _, kind = rest.partition("_proj.")
        if attn_part in ("self_attn.q", "self_attn.k", "self_attn.v"):
            if attn_part == "self_attn.q":  # q, k and v are merged once, when q comes by
                parts = [sd[f"{layers}{index}.self_attn.{p}_proj.{kind}"] for p in QKV]
                out[f"{RESBLOCKS}{index}.attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
            continue
        out[f"{RESBLOCKS}{index}.{_rename(rest, block_from_hf)}"] = value
    return out


def openai_clip_to_hf(sd) -> dict:
    """An original OpenAI CLIP state dict (`visual.*` and the text tower) -> transformers `CLIPModel` names."""
    visual = {k.removeprefix("visual."): v for k, v in sd.items() if k.startswith("visual.")}
    text = {k: v for k, v in sd.items() if not k.startswith("visual.") and k not in OPENAI_METADATA}
    out = _tower_to_hf(visual, VISION_TO_HF, "vision_model.encoder.layers.")
    for name, value in openclip_text_to_hf(text).items():
        top_level = name in ("text_projection.weight", "logit_scale")  # CLIPModel keeps these beside the towers
        out[name if top_level else "text_model." + name] = value
    return out
