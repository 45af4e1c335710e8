"""Running under torchrun: every rank-aware decision sau makes, in one place.

    torchrun --standalone --nproc_per_node 2 unlearn.py ...      # N processes, one per GPU (or CPU share)
    python unlearn.py ...                                         # one process, no process group at all

torchrun starts N copies of the same command and tells each its RANK and WORLD_SIZE. Every copy runs the same
code on the same inputs, so they stay in step without messages; they meet only where work is split:

    generation   prompts are cut into the same chunks a single process generates, and rank r takes chunks
                 r, r + N, ...; every rank then receives every chunk (`map_chunks`). An image depends only
                 on its prompt, seed and chunk, so the result equals one process's bit for bit, whatever N is.
    training     the recipe's global batch is drawn in full on every rank from the step's seed, then rank r
                 keeps its rows (`my_rows`); DistributedDataParallel averages the gradients. So N ranks make the
                 updates one process makes, up to the order of float summation. With --fsdp the trained copy of
                 the UNet is sharded instead (FSDP2's fully_shard): each rank holds 1/N of its parameters,
                 gradients and optimizer state, and of the frozen teacher's weights; the result is gathered
                 back into the model at the end.
    writing      only rank 0 writes files and prints (`is_main`); the others' stdout is silenced at start.

The process group starts on first use (gloo on the CPU, nccl on CUDA), so every refusal of bad input comes
before any process group work. A rank that fails prints one line naming itself and the cause and exits;
torchrun then stops the others (sau.common.cli.run).
"""
import copy
import datetime
import os
import re
import sys
import time
import warnings

import torch
import torch.distributed as dist

BACKENDS = ("gloo", "nccl")
TIMEOUT = datetime.timedelta(minutes=30)  # a collective that waits this long has lost a peer for good
REFUSAL_GRACE_S = 10  # how long a rank other than 0 leaves rank 0 to report a refusal they share


def launched():
    """True inside a torchrun launch (it sets RANK and WORLD_SIZE), even with one process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def world_size():
    return int(os.environ["WORLD_SIZE"]) if launched() else 1


def rank():
    return int(os.environ["RANK"]) if launched() else 0


def local_rank():
    return int(os.environ.get("LOCAL_RANK", 0)) if launched() else 0


def is_main():
    """The one process that writes files and prints."""
    return rank() == 0


def backend_for(device, asked=None):
    """gloo for the CPU, nccl for CUDA, unless `asked`; nccl without CUDA is refused."""
    backend = asked or ("nccl" if str(device).startswith("cuda") else "gloo")
    if backend not in BACKENDS:
        raise ValueError(f"unknown process group backend {backend!r}; choose {', '.join(BACKENDS)}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("the nccl backend needs CUDA, and this machine has no CUDA device; use gloo (the default on "
                         "the CPU)")
    return backend


def device_for(device):
    """A rank's own device: `cuda` becomes cuda:LOCAL_RANK under torchrun (one GPU per process)."""
    if launched() and str(device) == "cuda":
        return f"cuda:{local_rank()}"
    return device


_settings = {"backend": "gloo", "fsdp": False}


def prepare(device="cpu", backend=None, fsdp=False):
    """Check the launch against the command's settings, before anything is loaded: ValueError on bad input.
    Silences the stdout and warnings of ranks other than 0. The process group itself starts on first use."""
    if fsdp and not launched():
        raise ValueError("--fsdp shards the UNet across processes: launch with torchrun --nproc_per_node N")
    _settings["backend"] = backend_for(device, backend)
    _settings["fsdp"] = fsdp
    if launched() and not is_main():  # messages from rank 0 only; errors still reach stderr
        sys.stdout = open(os.devnull, "w")
        warnings.filterwarnings("ignore")


def check_divides(global_batch, what="the batch"):
    """Refuse a world size that does not split `global_batch` evenly (each rank keeps an equal share, so the
    average of the ranks' gradients is the global batch's gradient)."""
    n = world_size()
    if global_batch % n:
        raise ValueError(f"{n} processes cannot split {what} of {global_batch} evenly; launch a number of processes "
                         f"that divides {global_batch}")


def group():
    """Start the process group on first use."""
    if not dist.is_initialized():
        if _settings["backend"] == "nccl":
            torch.cuda.set_device(local_rank())
        dist.init_process_group(_settings["backend"], timeout=TIMEOUT)


def barrier():
    if world_size() > 1:
        group()
        dist.barrier()


# --- generation: chunks -----------------------------------------------------------------------------------

def chunks(n, size):
    """The chunks (slices) a single process cuts n items into."""
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def my_chunks(n, size):
    """(index, slice) of the chunks this rank computes: every N-th, starting at its rank."""
    return [(i, part) for i, part in enumerate(chunks(n, size)) if i % world_size() == rank()]


def my_share(n, size):
    """How many of the n items this rank computes (a progress bar's total)."""
    return sum(part.stop - part.start for _, part in my_chunks(n, size))


def map_chunks(n, size, work):
    """[work(chunk) for every chunk of n items], as one process makes it: this rank runs `work` on its chunks, and
    every rank receives them all. `work` takes a slice and returns CPU tensors or plain data."""
    return gather_chunks({i: work(part) for i, part in my_chunks(n, size)})


def gather_chunks(mine):
    """Every rank's {chunk index: result}, merged, in chunk order: the list a single process would have made."""
    if world_size() == 1:
        return [result for _, result in sorted(mine.items())]
    group()
    everyone = [None] * world_size()
    dist.all_gather_object(everyone, mine)
    merged = {i: result for part in everyone for i, result in part.items()}
    return [merged[i] for i in sorted(merged)]


# --- training: rows of the global batch ---------------------------------------------------------------------

def my_rows(global_batch):
    """This rank's rows of a global batch drawn in full on every rank (check_divides has refused uneven splits)."""
    n = global_batch // world_size()
    return slice(rank() * n, (rank() + 1) * n)


def global_mean(values, global_count):
    """The mean over the whole global batch of per-element values, as this rank's share of it: DDP averages the
    ranks' gradients, so each share is sum * N / global_count. One process: values.mean(), unchanged."""
    if world_size() == 1:
        return values.mean()
    return values.sum() * world_size() / global_count


def data_parallel(module):
    """`module` wrapped in DistributedDataParallel under torchrun (its trainable parameters must be set), else
    itself. Call the wrapper for the forward passes; hooks and state stay on `module`."""
    if world_size() == 1:
        return module
    group()
    device = next(module.parameters()).device
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)


def training_copy(module):
    """(trained, forward): the module a training loop updates and the one it calls. One process: `module`, twice.
    Under torchrun: `module` and its DDP wrapper; with --fsdp a sharded copy of it, twice (finish_training puts
    the trained weights back into `module`). Set the trainable parameters first."""
    if world_size() == 1:
        return module, module
    if not _settings["fsdp"]:
        return module, data_parallel(module)
    sharded = _shard_by_block(copy.deepcopy(module))
    return sharded, sharded


def shard_frozen(module):
    """With --fsdp, a frozen module (a teacher) sharded as the trained copy is: each rank holds 1/N of its
    weights, and each block is gathered only while it runs. Otherwise `module` itself."""
    if world_size() == 1 or not _settings["fsdp"]:
        return module
    return _shard_by_block(module)


def _shard_by_block(module):
    """FSDP2's fully_shard on each UNet block, then on the whole."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    group()
    mesh = init_device_mesh(next(module.parameters()).device.type, (world_size(),))
    for name, block in module.named_modules():  # each UNet block its own unit: gathered only while it runs
        if re.fullmatch(r"(input_blocks|output_blocks)\.\d+|middle_block", name):
            fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def finish_training(module, trained):
    """After training a copy from training_copy: its full weights back into `module` (every rank takes part)."""
    if trained is not module:
        module.load_state_dict(full_state(trained))


def is_sharded(module):
    from torch.distributed.fsdp import FSDPModule
    return isinstance(module, FSDPModule)


def full_state(module):
    """The full state dict of a sharded module, on every rank (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))


def full_training_state(modules, optimizer):
    """A checkpoint of sharded modules: their full weights and the optimizer's full state keyed by parameter
    name (a collective; the same file a resumed run reads whatever its number of ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    holder = torch.nn.ModuleDict(modules)
    return {"modules": {name: full_state(m) for name, m in modules.items()},
            "optimizer_by_name": get_optimizer_state_dict(holder, optimizer,
                                                          options=StateDictOptions(full_state_dict=True))}


def load_full_training_state(modules, optimizer, state):
    """Resume sharded (or plain) modules and their optimizer from a full_training_state checkpoint."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True)
    for name, module in modules.items():
        set_model_state_dict(module, state["modules"][name], options=options)
    set_optimizer_state_dict(torch.nn.ModuleDict(modules), optimizer, state["optimizer_by_name"], options=options)


def mean_over_ranks(values):
    """A float tensor averaged over ranks (the loss a log line reports); unchanged in one process."""
    if world_size() == 1:
        return values
    group()
    on = torch.device("cuda", local_rank()) if _settings["backend"] == "nccl" else torch.device("cpu")
    values = values.detach().to(on, torch.float32)
    dist.all_reduce(values)
    return (values / world_size()).cpu()


def failure_line(message):
    """The one line a failing rank prints: which rank, and why."""
    return message if world_size() == 1 else f"rank {rank()} failed: {message}"


def let_rank_zero_report():
    """Before the process group starts, every rank checks the same input and meets the same refusal at about
    the same moment; the line should be rank 0's, whichever rank gets there first. So a rank other than 0
    waits a little: torchrun stops it as soon as rank 0 exits. If it is still alive afterwards, the failure was
    its own (a file missing on its node), and it reports it."""
    if world_size() > 1 and not is_main() and not dist.is_initialized():
        time.sleep(REFUSAL_GRACE_S)
