"""sau's own layout: the bundle folder.

A sau *bundle* is a folder with
    config.json        the ModelConfig (plus a format tag, and `info`: how the model was made)
    model.safetensors  every weight, under the CompVis key names of an original SD checkpoint
    tokenizer.json     the tokenizer
so an SD single-file checkpoint and a bundle share one key layout. A CLIP scorer bundle is the same folder
with a CLIPModel under transformers' key names and its text and vision configs. A *delta* bundle stores only
the tensors that differ from another bundle, its base, and names the base by relative path.
Files go in one by one through temporary names (sau.common.files.atomic_write).
"""
import json
import os
from pathlib import Path

import torch

from sau.common.files import load_safetensors, save_json, save_safetensors
from sau.common.state import CheckpointError

BUNDLE_FORMATS = {"sd": "sau-bundle-1", "clip": "sau-clip-1"}  # a diffusion model; a CLIP scorer


def is_bundle(path):
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def read_bundle(path, kind="sd"):
    """(config dict, state dict, tokenizer.json path) of a bundle folder of the given kind."""
    path = Path(path)
    if not is_bundle(path):
        raise CheckpointError(f"{path}: not a sau bundle (a folder with config.json and model.safetensors)")
    config = json.loads((path / "config.json").read_text())
    if config.get("format") != BUNDLE_FORMATS[kind]:
        raise CheckpointError(f"{path}: a {config.get('format')!r} bundle, not {BUNDLE_FORMATS[kind]!r}")
    state = load_safetensors(path / "model.safetensors")
    if config.get("base"):  # a delta bundle: only the tensors that differ from its base are stored
        _, base_state, _ = read_bundle(path / config["base"], kind)
        state = {**base_state, **state}
    return config, state, path / "tokenizer.json"


def write_bundle(path, config_dict, state_dict, tokenizer, kind="sd", base=None, final_path=None):
    """Write a bundle folder; files go in one by one through temporary names.

    With `base` (another bundle folder) only the tensors that differ from the base's are stored, and
    config.json points to it by its path relative to `final_path` (where the folder ends up, when it is
    written elsewhere first; default `path`): the shipped backdoored demo models change one component of
    the clean model each, so they stay a fraction of its size."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config_dict = {k: v for k, v in config_dict.items() if k != "base"}
    if base is not None:
        _, base_state, _ = read_bundle(base, kind)
        state_dict = {k: v for k, v in state_dict.items()
                      if k not in base_state or not torch.equal(base_state[k], v.detach().cpu().to(base_state[k].dtype))}
        config_dict["base"] = os.path.relpath(Path(base).resolve(), Path(final_path or path).resolve())
    save_safetensors(state_dict, path / "model.safetensors")
    tokenizer.save(path / "tokenizer.json")  # itself written through a temporary file
    save_json({"format": BUNDLE_FORMATS[kind], **config_dict}, path / "config.json")
