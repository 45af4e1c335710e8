"""What the four command-line tools share: their parser, their dtype names, and one error path.

Every bad input, whether argparse or the library finds it, ends the same way: one line `error: <message>` on
stderr and exit status 2, never a traceback. Ctrl-C exits 130; the runs' checkpoints are already on disk.
"""
import argparse
import sys

import torch

from sau.common.training import NonFiniteLoss

# The precisions a user can name, in torch's own words (`torch.bfloat16` is `--dtype bfloat16`).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# What the library raises for input it cannot use; the checkpoint readers' CheckpointError is a ValueError.
USER_ERRORS = (NonFiniteLoss, ValueError, FileNotFoundError, FileExistsError, KeyError)


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


def device(name):
    """An argparse type: a torch device name this machine has, else the one-line error instead of a traceback
    at the first tensor moved."""
    try:
        kind = torch.device(name).type
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{name!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{name!r}: no CUDA device on this machine")
    return name


def run(main):
    """Run main(); user errors print one line and exit 2, Ctrl-C exits 130 (checkpoints are already on disk)."""
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to resume", file=sys.stderr)
        sys.exit(130)
    except USER_ERRORS as e:
        fail(str(e).strip("'\"").splitlines()[0] if str(e) else type(e).__name__)
