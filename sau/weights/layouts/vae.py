"""VAE key map between the CompVis layout (sau's module names) and diffusers' AutoencoderKL.

The renaming rules below turn every CompVis key of a model built from the config into its diffusers key; the
table they make is read in both directions, so the two conversions are exact inverses by construction.
Besides names, the mid attention's projections change shape: 1x1 convs [C, C, 1, 1] in CompVis,
linear layers [C, C] in diffusers.
"""
import re

import torch

from sau.models.vae import AutoencoderKL

ATTENTION_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
ATTENTION_PROJECTION = re.compile(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def diffusers_key(key, levels):
    """The diffusers name of one CompVis VAE key, for a VAE with `levels` resolutions."""
    rules = [
        (r"^(encoder|decoder)\.mid\.block_(\d+)\.",
         lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}."),
        (r"^(encoder|decoder)\.mid\.attn_1\.(\w+)\.",
         lambda m: f"{m[1]}.mid_block.attentions.0.{ATTENTION_NAMES[m[2]]}."),
        (r"^encoder\.down\.(\d+)\.block\.", lambda m: f"encoder.down_blocks.{m[1]}.resnets."),
        (r"^encoder\.down\.(\d+)\.downsample\.", lambda m: f"encoder.down_blocks.{m[1]}.downsamplers.0."),
        # diffusers numbers decoder blocks in running order (lowest resolution first), CompVis by resolution.
        (r"^decoder\.up\.(\d+)\.block\.", lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.resnets."),
        (r"^decoder\.up\.(\d+)\.upsample\.",
         lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0."),
        (r"\.nin_shortcut\.", lambda m: ".conv_shortcut."),
        (r"^(encoder|decoder)\.norm_out\.", lambda m: f"{m[1]}.conv_norm_out."),
    ]
    for pattern, replace in rules:
        key = re.sub(pattern, replace, key)
    return key


def key_table(cfg):
    """{CompVis key: diffusers key} for every tensor of a VAE with this config."""
    with torch.device("meta"):  # names and shapes only: nothing is allocated
        keys = AutoencoderKL(cfg).state_dict().keys()
    return {key: diffusers_key(key, len(cfg.ch_mult)) for key in keys}


def _check_known(sd, known, layout):
    leftovers = sorted(set(sd) - set(known))
    if leftovers:
        raise KeyError(f"{len(leftovers)} keys are not part of a {layout} VAE with this config: {leftovers}")


def vae_to_diffusers(sd, cfg):
    """A CompVis-layout VAE state dict (no `first_stage_model.` prefix) in diffusers' layout."""
    table = key_table(cfg)
    _check_known(sd, table, "CompVis")
    out = {}
    for key, value in sd.items():
        if ATTENTION_PROJECTION.search(key) and value.ndim == 4:
            value = value.reshape(value.shape[:2])  # 1x1 conv -> linear
        out[table[key]] = value
    return out


def vae_from_diffusers(sd, cfg):
    """A diffusers AutoencoderKL state dict in the CompVis layout that sau's AutoencoderKL loads."""
    table = {diffusers: compvis for compvis, diffusers in key_table(cfg).items()}
    _check_known(sd, table, "diffusers")
    out = {}
    for key, value in sd.items():
        compvis = table[key]
        if ATTENTION_PROJECTION.search(compvis) and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)  # linear -> 1x1 conv
        out[compvis] = value
    return out
