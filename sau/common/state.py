"""Strict state-dict handling: prefixes on and off, and loading that names every key that does not fit.

A checkpoint that does not fit its model is the most common user error with weights; `load_strict` turns
PyTorch's multi-line report into one line that lists a few missing, unexpected and mis-shaped keys with counts.
"""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line meant for the user."""


def strip_prefix(state_dict, prefix):
    """The entries under `prefix`, with the prefix removed (others are left out)."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def add_prefix(state_dict, prefix):
    return {prefix + k: v for k, v in state_dict.items()}


def _listing(names, limit=5):
    """"3 (a, b, c)": a count and the first few names, sorted, for one-line messages."""
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
