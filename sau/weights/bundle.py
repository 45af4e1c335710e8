"""Bundle I/O and safe, strict state-dict loading.

A sau *bundle* is a folder with
    config.json        the ModelConfig (plus a format tag)
    model.safetensors  every weight, under the CompVis key names of an original SD checkpoint
    tokenizer.json     the tokenizer
so an SD single-file checkpoint and a bundle share one key layout. Outputs are written to a
temporary name and renamed, so an interrupted save never leaves half a file behind.
"""
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIXES = {"clip": "cond_stage_model.transformer.text_model.", "openclip": "cond_stage_model.model."}
BUNDLE_FORMATS = {"sd": "sau-bundle-1", "clip": "sau-clip-1"}  # a diffusion model; a CLIP scorer
DEMO_DIR = Path(__file__).resolve().parent.parent / "demo"  # the shipped demo bundles, made by `python train.py world`


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line meant for the user."""


def strip_prefix(state_dict, prefix):
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def add_prefix(state_dict, prefix):
    return {prefix + k: v for k, v in state_dict.items()}


def _listing(names, limit=5):
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return f"{len(names)} ({shown}{', ...' if len(names) > limit else ''})"


def check_state_dict(module, state_dict, what="model"):
    """Raise CheckpointError naming the missing, unexpected and mis-shaped keys (a few of each, with counts)."""
    expected = module.state_dict()
    missing = expected.keys() - state_dict.keys()
    unexpected = state_dict.keys() - expected.keys()
    misshaped = [f"{k} {tuple(state_dict[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
                 if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"missing {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {_listing(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped {_listing(misshaped, 3)}")
    if problems:
        raise CheckpointError(f"{what} weights do not fit: " + "; ".join(problems))


def load_strict(module, state_dict, what="model"):
    """load_state_dict(strict=True) with a readable error; keeps the module's dtype."""
    check_state_dict(module, state_dict, what)
    module.load_state_dict(state_dict, strict=True)


def atomic_write(path, write):
    """Call write(tmp_path), then rename tmp_path to path: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private; outputs get the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_safetensors(tensors, path, metadata=None):
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_safetensors(path):
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises several types for truncated or foreign files
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def save_json(obj, path):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.write("\n")
    atomic_write(path, write)


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


def write_bundle(path, config_dict, state_dict, tokenizer, kind="sd", base=None):
    """Write a bundle folder; files go in one by one through temporary names.

    With `base` (another bundle folder) only the tensors that differ from the base's are stored, and
    config.json points to it by relative path: the shipped backdoored demo models change one component
    of the clean model each, so they stay a fraction of its size."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config_dict = {k: v for k, v in config_dict.items() if k != "base"}
    if base is not None:
        _, base_state, _ = read_bundle(base, kind)
        state_dict = {k: v for k, v in state_dict.items()
                      if k not in base_state or not torch.equal(base_state[k], v.detach().cpu().to(base_state[k].dtype))}
        config_dict["base"] = os.path.relpath(Path(base).resolve(), path.resolve())
    save_safetensors(state_dict, path / "model.safetensors")
    tokenizer.save(path / "tokenizer.json")  # itself written through a temporary file
    save_json({"format": BUNDLE_FORMATS[kind], **config_dict}, path / "config.json")


def resolve_model_path(name):
    """A path as given, or a shipped demo bundle by name: "demo" (the clean model), "demo/pixel", ..."""
    name = str(name)
    if Path(name).exists() or not (name == "demo" or name.startswith("demo/")):
        return Path(name)
    shipped = DEMO_DIR / (name[len("demo/"):] if "/" in name else "clean")
    if not shipped.exists():
        raise CheckpointError(f"no shipped demo model {name!r} in {DEMO_DIR}; train it with `python train.py world`")
    return shipped
