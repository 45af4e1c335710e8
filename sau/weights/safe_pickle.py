"""Reading `.ckpt` / `.bin` files (pickles) without running the code a pickle can carry.

A pickle names functions and classes by module path and calls them while it loads, so a malicious
`.ckpt` can call `os.system`. `torch.load(weights_only=True)` accepts only tensors and plain containers,
which is tried first. Lightning checkpoints (most original SD `.ckpt` files) also hold Lightning
objects, e.g. the ModelCheckpoint callback class used as a dict key, and fail that check. For them a
second unpickler runs under torch.load's own storage handling, with its own rule for every name:
- what rebuilds tensors and plain values is allowed (a short list, below);
- a name from a module that runs code or touches the system (`os`, `subprocess`, most builtins...)
  refuses the whole file;
- any other name becomes an inert stub class that keeps its arguments: never imported, never called.
Only tensors are taken from the result, so stubs in the metadata lose nothing the converter needs.
"""
import builtins
import collections
import pickle
import types
import zipfile

import torch

from sau.common.state import CheckpointError

# Top-level modules whose names in a checkpoint mean it wants to run code or reach the system.
REFUSED_MODULES = {"os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "importlib", "runpy", "pty",
                   "code", "codeop", "ctypes", "pickle", "_pickle", "marshal", "types", "webbrowser", "platform",
                   "multiprocessing", "threading", "signal", "io", "pathlib", "tempfile", "urllib", "http",
                   "inspect", "pdb", "timeit", "functools", "operator", "asyncio", "commands", "popen2"}
SAFE_BUILTINS = {"set", "frozenset", "bytearray", "bytes", "str", "int", "float", "complex", "bool", "slice",
                 "list", "tuple", "dict", "object"}
DTYPES = {name: value for name, value in vars(torch).items() if isinstance(value, torch.dtype)}


def _rebuild_from_type_v2(func, new_type, args, state):
    """torch's pickle wrapper for tensor subclasses, reduced to its plain tensor: `func` must be a rebuilder."""
    if func not in TENSOR_REBUILDERS:
        raise UnsafePickle(f"{getattr(func, '__name__', func)} inside a tensor")
    return func(*args)


TENSOR_REBUILDERS = {torch._utils._rebuild_tensor, torch._utils._rebuild_tensor_v2, torch._utils._rebuild_parameter,
                     torch._utils._rebuild_parameter_with_state}
ALLOWED = {("collections", "OrderedDict"): collections.OrderedDict,
           ("torch", "Size"): torch.Size,
           ("torch", "device"): torch.device,
           ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
           **{("torch._utils", f.__name__): f for f in TENSOR_REBUILDERS},
           **{("torch", name): dtype for name, dtype in DTYPES.items()},
           **{("builtins", name): getattr(builtins, name) for name in SAFE_BUILTINS}}


class UnsafePickle(pickle.UnpicklingError):
    """The pickle names something that can run code; the message is that name."""


class Stub:
    """Stands in for a class a checkpoint names (a Lightning callback, an argparse.Namespace...):
    keeps whatever pickle hands it and does nothing else."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.items = args, kwargs, []

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):  # pickled dict subclasses
        self.items.append((key, value))

    def append(self, value):  # pickled list subclasses
        self.items.append(value)

    def extend(self, values):
        self.items.extend(values)


class SafeUnpickler(pickle.Unpickler):
    stubs = {}  # one stub class per name, so a class used as a dict key stays one key

    def find_class(self, module, name):
        module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)  # protocol 2 spellings
        if (module, name) in ALLOWED:
            return ALLOWED[(module, name)]
        if module == "builtins" or module.split(".")[0] in REFUSED_MODULES:
            raise UnsafePickle(f"{module}.{name}")
        key = (module, name)
        if key not in self.stubs:
            self.stubs[key] = type(name, (Stub,), {"__module__": module, "__qualname__": name})
        return self.stubs[key]


# What torch.load calls a pickle module: it subclasses `Unpickler` and adds storage handling to it.
SAFE_PICKLE_MODULE = types.SimpleNamespace(__name__="sau.safe_pickle", Unpickler=SafeUnpickler,
                                           load=lambda f, **kwargs: SafeUnpickler(f, **kwargs).load())


def _is_torchscript(path):
    """TorchScript archives (OpenAI's original CLIP .pt files) hold code that torch.load would run."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())


def load_pickled_checkpoint(path):
    """The object in a torch.save file, read without running code; CheckpointError if that is impossible."""
    path = str(path)
    if _is_torchscript(path):
        raise CheckpointError(f"{path}: a TorchScript archive, which holds code; it is not read. Save its "
                              "state_dict() as .safetensors or .pt with the tool that made it")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # Lightning objects, or not a checkpoint at all: the allow-list decides
        pass
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=SAFE_PICKLE_MODULE, mmap=False)
    except UnsafePickle as e:
        raise CheckpointError(f"{path}: refused, its pickle calls {e}, which can run code; nothing was run") from None
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None
