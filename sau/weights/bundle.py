"""sau's own layout: the bundle folder.

A sau *bundle* is a folder with
    config.json        the ModelConfig (plus a format tag, and `info`: how the model was made)
    model.safetensors  every weight, under the CompVis key names of an original SD checkpoint
    tokenizer.json     the tokenizer
so an SD single-file checkpoint and a bundle share one key layout. A CLIP scorer bundle is the same folder
with a CLIPModel under transformers' key names and its text and vision configs.

A *delta* bundle stores only the tensors that differ from another bundle, its base. Its config.json records
    "base"         where the base is: "demo/<name>" for a shipped demo model (a folder of sau/demo) seen from a
                   delta outside sau/demo, found in sau/demo wherever sau is installed, so moving the delta or
                   reinstalling sau does not lose it; otherwise the path relative to the delta's own folder
                   ("../clean" for the shipped variants), which holds when the two move together.
    "base_sha256"  the sha256 of the base's model.safetensors file when the delta was written. A base that is
                   itself a delta records its own base's hash, so a whole chain is checked link by link.
read_bundle refuses a missing base, a base whose hash differs (it was replaced: the delta would silently become
another model) and a chain that comes back to a bundle already in it, each in one line. Deltas written before
base_sha256 existed (the shipped sau/demo variants) load unchecked. base_chain and bundles_using tell the
writers (sau.weights.write) which folders other bundles need, so that no write replaces a delta's base.
Files go in one by one through temporary names (sau.common.files.atomic_write).
"""
import hashlib
import json
import os
from pathlib import Path

import torch

from sau.common.files import DEMO_DIR, load_safetensors, save_json, save_safetensors
from sau.common.state import CheckpointError

BUNDLE_FORMATS = {"sd": "sau-bundle-1", "clip": "sau-clip-1"}  # a diffusion model; a CLIP scorer
DEMO_PREFIX = "demo/"  # a recorded base under this prefix lives in DEMO_DIR
SCAN_DEPTH, SCAN_LIMIT = 2, 2000  # how deep and how many folders bundles_using looks at: a writer's check stays fast
HASH_CHUNK = 1 << 20


def is_bundle(path):
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def read_config(path):
    """A bundle folder's config.json as a dict."""
    file = Path(path) / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: not a bundle config (a JSON object)")
    return config


def read_bundle(path, kind="sd"):
    """(config dict, state dict, tokenizer.json path) of a bundle folder of the given kind. A delta's tensors go
    on top of its bases'; the whole chain is checked (formats, hashes, no cycle) before any tensor is loaded."""
    path = Path(path)
    config = _checked_config(path, kind)
    chain = base_chain(path)
    for delta, base in zip([path, *chain], chain):
        _checked_config(base, kind)
        check_base_hash(delta, base)
    state = {}
    for folder in reversed([path, *chain]):  # the farthest base first, each delta's tensors over it
        state.update(load_safetensors(folder / "model.safetensors"))
    return config, state, path / "tokenizer.json"


def _checked_config(path, kind):
    if not is_bundle(path):
        raise CheckpointError(f"{path}: not a sau bundle (a folder with config.json and model.safetensors)")
    config = read_config(path)
    if config.get("format") != BUNDLE_FORMATS[kind]:
        raise CheckpointError(f"{path}: a {config.get('format')!r} bundle, not {BUNDLE_FORMATS[kind]!r}")
    return config


def base_location(path):
    """The resolved folder a bundle's config.json names as its base; None for a whole bundle or a non-bundle."""
    if not is_bundle(path):
        return None
    recorded = read_config(path).get("base")
    if not recorded:
        return None
    if not isinstance(recorded, str):
        raise CheckpointError(f"{Path(path) / 'config.json'}: its base must be a path, not {recorded!r}")
    if recorded.startswith(DEMO_PREFIX):
        return (Path(DEMO_DIR) / recorded[len(DEMO_PREFIX):]).resolve()
    return (Path(path).resolve() / recorded).resolve()


def base_chain(path):
    """The resolved base folders of a bundle, nearest first ([] for a whole bundle or a non-bundle). Refuses a
    missing base, and a chain that comes back to a bundle already in it: following it would never end."""
    seen = [Path(path).resolve()]
    while (base := base_location(seen[-1])) is not None:
        if base in seen:
            raise CheckpointError(f"{path}: its base chain comes back to {base} (a bundle cannot be its own base, "
                                  "directly or through others)")
        if not is_bundle(base):
            raise CheckpointError(f"{seen[-1]}: its base {base} is missing (no sau bundle there); "
                                  "the delta cannot load without it")
        seen.append(base)
    return seen[1:]


def content_hash(folder):
    """sha256 of a bundle's model.safetensors, read in chunks: seconds for a multi-GB SD file, no tensor loaded.
    Only this file: a base that is a delta pins its own base by the hash it records."""
    digest = hashlib.sha256()
    with open(Path(folder) / "model.safetensors", "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_base_hash(delta, base):
    """Refuse a delta whose base is no longer the bundle it was written against (when it recorded a hash)."""
    recorded = read_config(delta).get("base_sha256")
    if recorded and recorded != content_hash(base):
        raise CheckpointError(f"{delta}: its base {base} changed since the delta was written (content hash "
                              "differs); restore the base it was made from, or write the delta again against this one")


def base_reference(base, delta):
    """What a delta bundle at `delta` records as its base `base`: "demo/<name>" for a shipped demo model seen from
    outside the demo folder, else the path relative to the delta's folder (see the module docstring)."""
    base, delta, demo = Path(base).resolve(), Path(delta).resolve(), Path(DEMO_DIR).resolve()
    if base == delta or delta in base.parents:  # writing the delta would replace its own base
        raise ValueError(f"{base} is where its delta goes, or inside it; a bundle cannot be its own base")
    if demo in base.parents and demo not in delta.parents:
        return DEMO_PREFIX + base.relative_to(demo).as_posix()
    return Path(os.path.relpath(base, delta)).as_posix()


def bundles_using(path, root, depth=SCAN_DEPTH, limit=SCAN_LIMIT):
    """(bundle, base) for each bundle among root's subfolders down to `depth` levels (hidden ones skipped, at
    most `limit` folders looked at) whose base chain holds `path` or a folder inside it: what writing over
    `path` would change. Bundles elsewhere are not seen (a writer's `protect` covers those)."""
    target = Path(path).resolve()
    found = []
    for folder in _subfolders(Path(root), depth, limit):
        for base in _bases_as_far_as_they_go(folder):
            if base == target or target in base.parents:
                found.append((folder, base))
                break
    return found


def _subfolders(root, depth, limit):
    """root's non-hidden subfolders, breadth first, down to `depth` levels and at most `limit` of them."""
    level, count = [root], 0
    for _ in range(depth):
        below = []
        for parent in level:
            try:  # scandir knows folders from files without a stat call each: a folder of images costs little
                with os.scandir(parent) as entries:
                    children = sorted(parent / e.name for e in entries if not e.name.startswith(".") and e.is_dir())
            except OSError:  # unreadable, or gone meanwhile
                continue
            for child in children:
                if count >= limit:
                    return
                count += 1
                yield child
                below.append(child)
        level = below


def _bases_as_far_as_they_go(folder):
    """base_chain for a scan: a broken bundle nearby (missing base, cycle) still counts on the base it names."""
    try:
        return base_chain(folder)
    except (CheckpointError, OSError):
        try:
            return [b for b in [base_location(folder)] if b is not None]
        except (CheckpointError, OSError):
            return []


def write_bundle(path, config_dict, state_dict, tokenizer, kind="sd", base=None, final_path=None):
    """Write a bundle folder; files go in one by one through temporary names.

    With `base` (another bundle folder) only the tensors that differ from the base's are stored, and
    config.json records the base's location as seen from `final_path` (where the folder ends up, when it is
    written elsewhere first; default `path`) and its content hash: the shipped backdoored demo models change
    one component of the clean model each, so they stay a fraction of its size."""
    path = Path(path)
    config_dict = {k: v for k, v in config_dict.items() if k not in ("base", "base_sha256")}
    if base is not None:
        config_dict["base"] = base_reference(base, final_path or path)  # refuses a base inside the delta first
        _checked_config(Path(base), kind)
        # hashed before it is read: a base replaced in between then fails the check on loading, never loads wrong
        config_dict["base_sha256"] = content_hash(base)
        _, base_state, _ = read_bundle(base, kind)
        state_dict = {k: v for k, v in state_dict.items()
                      if k not in base_state or not torch.equal(base_state[k], v.detach().cpu().to(base_state[k].dtype))}
    path.mkdir(parents=True, exist_ok=True)
    save_safetensors(state_dict, path / "model.safetensors")
    tokenizer.save(path / "tokenizer.json")  # itself written through a temporary file
    save_json({"format": BUNDLE_FORMATS[kind], **config_dict}, path / "config.json")


def input_fingerprint(path):
    """A cheap fingerprint of a model input (a file, or a folder with a delta bundle's bases): sha256 over each of
    its files' path, size and modification time in nanoseconds. Not a hash of the weights, which would read
    gigabytes at every start: a weights file that is rewritten or replaced gets a new size or mtime, so a run's
    claim changes; a copy or a `touch` changes it too, which only costs a refusal (another --out, or --force)."""
    listing = [(str(f), st.st_size, st.st_mtime_ns) for f in model_files(path) for st in [f.stat()]]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def model_files(path):
    """The files a model input is read from: the file itself, or every file under the folder and under each of
    a delta bundle's bases. Resolved paths, so the inputs can be compared with an output. A broken base chain
    adds nothing here: loading the model says what is wrong with it."""
    path = Path(path).resolve()
    if not path.is_dir():
        return [path] if path.exists() else []
    try:
        bases = base_chain(path)
    except CheckpointError:
        bases = []
    return [f for folder in [path, *bases] for f in sorted(folder.rglob("*")) if f.is_file()]
