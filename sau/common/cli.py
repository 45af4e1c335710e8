"""What the four command-line tools share: their parser, their dtype names, and one error path.

Every bad input, whether argparse or the library finds it, ends the same way: one line `error: <message>` on
stderr and exit status 2, never a traceback. Ctrl-C exits 130; the runs' checkpoints are already on disk.
"""
import argparse
import math
import os
import re
import sys
from pathlib import Path

import torch

from sau import distributed
from sau.common.training import NonFiniteLoss

# The precisions a user can name, in torch's own words (`torch.bfloat16` is `--dtype bfloat16`).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# What the library raises for input it cannot use; the checkpoint readers' CheckpointError is a ValueError.
# OSError covers the file system's refusals (permissions, a file where a folder should be, a full disk): its
# message names the path.
USER_ERRORS = (NonFiniteLoss, ValueError, KeyError, OSError)


def fail(message):
    """Stop on bad input: one line on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class Parser(argparse.ArgumentParser):
    """argparse with the tools' error form (argparse's own prints the usage first) and their docstring layout.
    Subcommands' parsers are of this class too: add_subparsers makes them with type(self)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message):
        fail(message)


def comma_list(text):
    """An argparse type: "a,b c" -> ["a", "b", "c"]."""
    return [item for item in text.replace(",", " ").split() if item]


def _number(kind, least, above=False, what=None):
    """An argparse type: a finite number of `kind` that is at least `least` (above=True: more than it)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") \
                from None
        if not math.isfinite(value) or value < least or (above and value == least):
            raise argparse.ArgumentTypeError(f"must be {what}, not {text}")
        return value
    parse.__name__ = what  # argparse names the type in its own messages
    return parse


positive_int = _number(int, 1, what="an integer >= 1")  # steps, batch sizes, prompt counts
natural_int = _number(int, 0, what="an integer >= 0")  # seeds
positive_float = _number(float, 0, above=True, what="a finite number > 0")  # learning rates, guidance scales
non_negative_float = _number(float, 0, what="a finite number >= 0")  # loss weights, eta


def parse_lora(text):
    """"FILE[:SCALE]" -> (Path, scale); scale 1 when none is given. A scale that is not finite is refused."""
    path, _, tail = text.rpartition(":")
    if path and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?(nan|inf|infinity)", tail, re.I):
        scale = float(tail)
        if not math.isfinite(scale):
            raise ValueError(f"the LoRA scale in {text!r} is not a finite number")
        return Path(path), scale
    return Path(text), 1.0


def lora_arg(text):
    """An argparse type for --lora FILE[:SCALE]."""
    try:
        return parse_lora(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def check_numbers(lr=None, **counts):
    """The same rules for library callers, who skip the parser: counts at least 1 and a finite learning rate
    above 0 (None: the default), each named as its flag; a ValueError otherwise."""
    for name, value in counts.items():
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, not {value}")
    if lr is not None and not 0 < lr < math.inf:  # nan fails both comparisons
        raise ValueError(f"--lr must be a finite number > 0, not {lr}")


def device(name):
    """An argparse type: a torch device name this machine has, else the one-line error instead of a traceback
    at the first tensor moved."""
    try:
        chosen = torch.device(name)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{name!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if chosen.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{name!r}: sau runs on cpu, cuda or mps")
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{name!r}: no CUDA device on this machine")
    if chosen.type == "cuda" and (chosen.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{name!r}: no Apple GPU (MPS) on this machine")
    return name


def check_dtype(dtype, device_name):
    """float16 on a CPU is refused before any work: CPUs have few float16 kernels (slow, some missing) and
    float16 overflows in training; bfloat16 is the CPU's half precision."""
    if dtype == "float16" and torch.device(device_name).type == "cpu":
        raise ValueError("--dtype float16 needs a GPU: on a CPU it is slow and overflows in training; use "
                         "float32, or bfloat16")


def launch_flags(parser, fsdp=False):
    """The flags the commands share under torchrun (sau.distributed); --fsdp where a command trains the UNet."""
    parser.add_argument("--backend", choices=list(distributed.BACKENDS), help="torchrun's process group (default: "
                        "gloo on the CPU, nccl on CUDA)")
    if fsdp:
        parser.add_argument("--fsdp", action="store_true", help="under torchrun, shard the trained UNet, its "
                            "gradients and optimizer state across the processes (FSDP), for a training state "
                            "that does not fit one device")


def run(main):
    """Run main(); user errors print one line and exit 2, Ctrl-C exits 130 (checkpoints are already on disk).
    Under torchrun every failure, a bug included, is one line naming the rank (sau.distributed), and the rank
    exits at once: torchrun then stops the others, which would otherwise wait for it in their next collective."""
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to resume", file=sys.stderr)
        sys.exit(130)
    except USER_ERRORS as e:
        if distributed.world_size() > 1:
            stop_rank(one_line(e), 2)
        fail(one_line(e))
    except Exception as e:
        if distributed.world_size() > 1:
            stop_rank(f"{type(e).__name__}: {one_line(e)}", 1)
        raise


def stop_rank(message, status):
    """End this rank now: one line, then exit without the process group's teardown (it would wait for peers)."""
    distributed.let_rank_zero_report()
    sys.stdout.flush()
    print(f"error: {distributed.failure_line(message)}", file=sys.stderr, flush=True)
    os._exit(status)


def one_line(error):
    """An exception's message as one line. A KeyError's str() is the repr of its key, quotes included: its
    argument is the message."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    if isinstance(error, UnicodeDecodeError):
        message = f"not UTF-8 text ({error.reason} at byte {error.start})"
    return str(message).splitlines()[0] if str(message).strip() else type(error).__name__
