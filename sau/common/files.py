"""Writing files so that readers never see half of one, and the places sau's own files live.

Every output goes to a temporary name beside its path and is renamed into place: an interrupted save leaves
the old file or none, never a truncated one. Under torchrun only rank 0 writes (sau.distributed): every rank
computes the same results, and the others' writes are skipped here. Also here: the shipped demo folder and the
names it is known by.
Who owns a run folder (its claim and its lock): sau/common/run_folder.py.
"""
import json
import os
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

from sau import distributed
from sau.common.state import CheckpointError

DEMO_DIR = Path(__file__).resolve().parent.parent / "demo"  # the shipped demo bundles, made by `python train.py world`


def atomic_write(path, write):
    """Call write(tmp_path), then rename tmp_path to path: readers never see a partial file. Does nothing on a
    torchrun rank other than 0."""
    if not distributed.is_main():
        return
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


def save_json(obj, path, flat_lists=False):
    """`obj` as indented JSON; flat_lists=True writes each list of plain values on one line (a results file's
    per-prompt outcomes take a third of the room that way)."""
    text = _indented(json.loads(json.dumps(obj)), "") if flat_lists else json.dumps(obj, indent=2, ensure_ascii=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))


def _indented(value, pad):
    """json.dumps(value, indent=2), except that a list holding no list or dict stays on one line."""
    inner = pad + "  "
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(k, ensure_ascii=False)}: {_indented(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return "[\n" + ",\n".join(inner + _indented(v, inner) for v in value) + f"\n{pad}]"
    return json.dumps(value, ensure_ascii=False)


def cached_json(path, measure):
    """A resumable run's stored piece: the JSON at `path`, made first from measure() (JSON-ready) if it is
    missing. A fresh result is returned as the file holds it (through JSON), so a fresh result and a resumed one
    are the same data, on every torchrun rank."""
    path = Path(path)
    if path.is_file():
        return json.loads(path.read_text())
    value = measure()
    save_json(value, path)
    return json.loads(json.dumps(value, ensure_ascii=False))


def resolve_model_path(name):
    """A path as given, or a shipped demo model by name: "demo" (the clean model), "demo/pixel", ...
    The entry points (sau.load, the command-line tools) call this once; everything below takes real paths."""
    name = str(name)
    if Path(name).exists() or not (name == "demo" or name.startswith("demo/")):
        return Path(name)
    shipped = DEMO_DIR / (name[len("demo/"):] if "/" in name else "clean")
    if not shipped.exists():
        raise CheckpointError(f"no shipped demo model {name!r} in {DEMO_DIR}; train it with `python train.py world`")
    return shipped
