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

A pickle can also set attributes on the objects it is allowed to build (BUILD, or the `state` of a Parameter
or tensor), and an instance attribute shadows a method: an OrderedDict whose `items` is a callable the pickle
chose would have the converter call it. torch's own weights_only loader allows that on OrderedDicts, tensors
and Parameters. So, whichever loader read a file, `load_pickled_checkpoint` guarantees:
- sau calls nothing the pickle set, and a file that sets any attribute (but the `_metadata` torch's
  state_dict() writes on its OrderedDicts), or backward hooks, is refused. The safe unpickler refuses before
  setting it; torch's loader has set it by then, and calls nothing but its allow-list either way;
- the result is plain data, rebuilt with unbound methods: dicts (str and int keys only: Lightning's class keys
  are dropped), lists, tuples (torch.Size too), fresh torch.Tensors with no grad, numbers, strings, bytes, None,
  dtypes and devices. Stubs and anything else become None;
- containers nest at most MAX_DEPTH deep, so no input can exhaust the recursion limit, and a container the
  pickle shares is rebuilt once, so shared references cannot blow up the work.
Every refusal is a CheckpointError, one line naming the file. Only tensors are taken from the result, so
what is dropped from the metadata loses nothing the converter needs.
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

MAX_DEPTH = 100  # containers within containers; a Lightning checkpoint nests about 6 deep
# Immutable values with no attributes to set: kept as they are.
PLAIN_VALUES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)
# The one attribute torch itself pickles on an allowed object: Module.state_dict() records each module's
# version in `_metadata` on the OrderedDict it returns. It is dropped with the rest of the OrderedDict.
TORCH_ATTRIBUTES = {"_metadata"}


class UnsafePickle(pickle.UnpicklingError):
    """The pickle names something that can run code; the message is that name."""


class SetsAttributes(pickle.UnpicklingError):
    """The pickle sets attributes on an object it is allowed to build; the message is the object's type."""


class TooDeep(pickle.UnpicklingError):
    """The pickle nests containers deeper than MAX_DEPTH (or in a cycle through a tuple)."""


def _is_empty_state(state):
    """Whether a pickled `state` sets nothing: torch writes None, {} or a (dict, slots) pair of those for an object
    with no Python attributes."""
    parts = state if type(state) is tuple and len(state) == 2 else (state,)
    return all(part is None or (type(part) in DICT_TYPES and len(part) == 0) for part in parts)


# Refused rather than dropped: torch never pickles attributes on these objects (but `_metadata`), so a file
# that carries some was made to, and the user should hear that it is not what it claims. Refusing also
# happens before a single attribute is set, where dropping them would first let the pickle set them.
def _refuse_state(state, owner):
    if not _is_empty_state(state):
        raise SetsAttributes(owner)


def _rebuild_from_type_v2(func, new_type, args, state):
    """torch's pickle wrapper for tensor subclasses, reduced to its plain tensor: `func` must be a rebuilder,
    and `state` (the attributes it would set) empty."""
    if func not in TENSOR_REBUILDERS.values():
        raise UnsafePickle(f"{getattr(func, '__name__', func)} inside a tensor")
    _refuse_state(state, "tensor")
    return func(*args)


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    """torch's Parameter rebuild without the setattr its `state` asks for: a pickle with any state is refused."""
    _refuse_state(state, "Parameter")
    return torch._utils._rebuild_parameter(data, requires_grad, backward_hooks)


class _OrderedDict(collections.OrderedDict):
    """What SafeUnpickler builds for an OrderedDict. The unpickler's BUILD calls `__setstate__` where one
    exists, and this one refuses any attribute but torch's `_metadata` (which it drops): without it BUILD
    would fill `__dict__`, and a second BUILD would call a `__setstate__` the first one had set."""

    def __setstate__(self, state):
        if not (state is None or (type(state) is dict and set(state) <= TORCH_ATTRIBUTES)):
            raise SetsAttributes("OrderedDict")


DICT_TYPES = (dict, collections.OrderedDict, _OrderedDict)  # exact types: a dict subclass from a pickle is a stub

TENSOR_REBUILDERS = {"_rebuild_tensor": torch._utils._rebuild_tensor,
                     "_rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
                     "_rebuild_parameter": torch._utils._rebuild_parameter,
                     "_rebuild_parameter_with_state": _rebuild_parameter_with_state}
ALLOWED = {("collections", "OrderedDict"): _OrderedDict,
           ("torch", "Size"): torch.Size,
           ("torch", "device"): torch.device,
           ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
           **{("torch._utils", name): f for name, f in TENSOR_REBUILDERS.items()},
           **{("torch", name): dtype for name, dtype in DTYPES.items()},
           **{("builtins", name): getattr(builtins, name) for name in SAFE_BUILTINS}}


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


# ---------------------------------------------------------------------------------------------------
# The loaded object, rebuilt as plain data

def plain_data(obj):
    """`obj` rebuilt from plain containers, fresh tensors and values (see the module docstring); SetsAttributes
    for an allowed object that carries attributes, TooDeep past MAX_DEPTH. Every method is called unbound on an
    exact type, so nothing an instance carries is looked up, let alone called."""
    return _plain(obj, {}, 0)


def _plain(obj, memo, depth):
    kind = type(obj)
    if kind in PLAIN_VALUES:
        return obj
    if id(obj) in memo:  # shared (or cyclic) containers are rebuilt once: a pickle's memo cannot blow up the work
        return memo[id(obj)]
    if depth > MAX_DEPTH:
        raise TooDeep()
    if kind in DICT_TYPES:
        return _plain_dict(obj, memo, depth)
    if kind is list:
        out = memo[id(obj)] = []
        for value in list.__iter__(obj):
            out.append(_plain(value, memo, depth + 1))
        return out
    if kind in (tuple, torch.Size):  # a tuple inside its own cycle recurses until TooDeep: only a pickle makes one
        out = tuple(_plain(value, memo, depth + 1) for value in tuple.__iter__(obj))
    elif kind in (torch.Tensor, torch.nn.Parameter):
        out = _plain_tensor(obj)
    else:
        out = None  # a stub, a set, a slice...: nothing the converter reads
    memo[id(obj)] = out
    return out


def _plain_dict(obj, memo, depth):
    if type(obj) is not dict:  # an OrderedDict has a __dict__; a dict has none
        _refuse_attributes(obj, "OrderedDict", allowed=TORCH_ATTRIBUTES)
    out = memo[id(obj)] = {}
    for key, value in dict.items(obj):
        if type(key) in (str, int):  # Lightning keys its callbacks by class; only tensors are read anyway
            out[key] = _plain(value, memo, depth + 1)
    return out


def _plain_tensor(tensor):
    """A fresh torch.Tensor on the same storage: no Python attributes, no hooks, no grad."""
    _refuse_attributes(tensor, type(tensor).__name__)
    hooks = torch.Tensor._backward_hooks.__get__(tensor)  # the C getter itself: an instance cannot shadow it
    if not _is_empty_state(hooks):
        raise SetsAttributes(f"{type(tensor).__name__} (backward hooks)")  # torch never pickles hooks
    return torch.Tensor.detach(tensor)


def _refuse_attributes(obj, owner, allowed=()):
    """SetsAttributes, naming a few, if `obj` carries instance attributes other than `allowed`."""
    names = [repr(name)[:40] for name in object.__getattribute__(obj, "__dict__") if name not in allowed]
    if names:
        raise SetsAttributes(f"{owner} ({', '.join(sorted(names)[:3])}{', ...' if len(names) > 3 else ''})")


# ---------------------------------------------------------------------------------------------------
# Loading

def _is_torchscript(path):
    """TorchScript archives (OpenAI's original CLIP .pt files) hold code that torch.load would run."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())


def load_pickled_checkpoint(path):
    """The object in a torch.save file as plain data (see the module docstring), read without running code;
    CheckpointError if that is impossible or the file is refused."""
    path = str(path)
    if _is_torchscript(path):
        raise CheckpointError(f"{path}: a TorchScript archive, which holds code; it is not read. Save its "
                              "state_dict() as .safetensors or .pt with the tool that made it")
    try:
        return plain_data(_load(path))
    except UnsafePickle as e:
        raise CheckpointError(f"{path}: refused, its pickle calls {e}, which can run code; nothing was run") from None
    except SetsAttributes as e:
        raise CheckpointError(f"{path}: refused, its pickle sets attributes on a {e}; nothing was run") from None
    except TooDeep:
        raise CheckpointError(f"{path}: refused, its pickle nests containers more than {MAX_DEPTH} deep; "
                              "nothing was run") from None


def _load(path):
    """torch.load's weights_only loader, else SafeUnpickler under torch.load's storage handling."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # Lightning objects, or not a checkpoint at all: the allow-list decides
        pass
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=SAFE_PICKLE_MODULE, mmap=False)
    except (UnsafePickle, SetsAttributes):
        raise
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None
