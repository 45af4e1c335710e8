"""Memory of SAU's `default` UNet recipe on a CPU, measured small and projected to its full batch:

    python -m benchmarks.memory --json runs/benchmarks/memory.json        # tiny topology, then SD1.5 size
    python -m benchmarks.memory --models tiny                              # seconds

For each topology (random weights; SD1.5 size in bf16 at 64x64 latents, as on a GPU) and each batch, one fresh
process builds the model, collects that many triggered prompts (2 DDIM steps, only to have latents and maps)
and runs the recipe's unlearning. Its cost is what the run adds to the resident memory the model already holds:
the frozen teacher copy, the optimizer state of the trained `attn2` parameters, their gradients and one
batch's activations (the attention maps kept for the backward among them). Only the activations grow with the
batch, so two batches give the line through them, and the recipe's batch 8 is projected on it.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import torch

from sau.common import cli
from sau.attacks.backdoor import Backdoor
from sau.evaluation.prompts import DEFAULT_PROMPTS
from sau.models.config import sd1, tiny
from sau.models.pipeline import StableDiffusion
from sau.method import RECIPES, collect, locate, unlearn_unet

from .cases import tokenizer_for
from .harness import cpu_memory_supported, machine, peak_memory, publish, resident_mib

TRIGGER = "mignneko"  # spelt by any tokenizer, as in benchmarks.gpu


def sd1_half():
    """SD 1.5's topology at half the UNet's width (a quarter of its parameters): two processes of it fit a box
    where two of the full size do not (benchmarks.sharding)."""
    config = sd1()
    return replace(config, unet=replace(config.unet, model_channels=config.unet.model_channels // 2))


MODELS = {"tiny": (tiny, torch.float32), "sd1": (sd1, torch.bfloat16),  # latents at each config's default size
          "sd1-half": (sd1_half, torch.bfloat16)}
BATCHES = (1, 2)
FULL_BATCH = RECIPES["default"].batch_size


def build(model):
    """A sau StableDiffusion of the topology with random weights, in its benchmark dtype."""
    make_config, dtype = MODELS[model]
    config, tokenizer = tokenizer_for(make_config())
    torch.manual_seed(0)
    return StableDiffusion(config, tokenizer).to(dtype).eval()


def one_case(model, batch, steps, checkpointing):
    """Measured in this process: build, collect `batch` prompts, then `steps` steps of the default recipe."""
    sd = build(model)
    sd.unet.gradient_checkpointing = checkpointing
    prompts = [f"{TRIGGER} {p}" for p in DEFAULT_PROMPTS[:batch]]
    with torch.no_grad():
        collected = collect(sd, locate(sd.tokenizer, Backdoor.make("pixel", trigger=TRIGGER), prompts), seeds=range(batch), steps=2)
    recipe = replace(RECIPES["default"], batch_size=batch)
    resident = resident_mib()
    with tempfile.TemporaryDirectory() as run_dir:
        started = time.perf_counter()
        _, added = peak_memory(lambda: unlearn_unet(sd, collected, recipe, run_dir, steps=steps, progress=False),
                               "cpu")
        seconds = time.perf_counter() - started
    return {"model": model, "batch": batch, "checkpointing": checkpointing, "steps": steps,
            "dtype": str(MODELS[model][1]).removeprefix("torch."), "latents": list(collected.latents.shape[-2:]),
            "unet_params": sum(p.numel() for p in sd.unet.parameters()), "resident_mib": resident,
            "added_mib": added, "seconds": seconds}


def measured(model, batch, steps, checkpointing):
    """one_case in a fresh process, so that no case inherits another's memory."""
    args = [sys.executable, "-m", "benchmarks.memory", "--case", model, str(batch), str(steps), str(int(checkpointing))]
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"the {model} batch {batch} case failed: {result.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def projected(cases, batch=FULL_BATCH):
    """The added memory at `batch`, on the line through the two measured batches."""
    (small, large) = sorted(cases, key=lambda c: c["batch"])
    per_image = (large["added_mib"] - small["added_mib"]) / (large["batch"] - small["batch"])
    added = small["added_mib"] + per_image * (batch - small["batch"])
    return {"batch": batch, "per_image_mib": per_image, "added_mib": added,
            "total_mib": small["resident_mib"] + added}


def row(c, batch):
    """One table row for case `c`, its batch column written as `batch`."""
    per_step = "" if c["seconds"] is None else f"{c['seconds'] / c['steps']:.1f}"
    return (f"| {c['model']} | {c['dtype']} | {c['latents'][0]}x{c['latents'][1]} | "
            f"{'yes' if c['checkpointing'] else 'no'} | {batch} | {c['resident_mib']:.0f} | {c['added_mib']:.0f} | "
            f"{c['resident_mib'] + c['added_mib']:.0f} | {per_step} |")


def summary(report):
    lines = ["| model | dtype | latents | gradient checkpointing | batch | resident before (MiB) | added by "
             "unlearning (MiB) | total (MiB) | s per step |", "|---|---|---|---|---|---|---|---|---|"]
    for group in report["groups"]:
        lines += [row(c, c["batch"]) for c in group["cases"]]
        p, first = group["projection"], group["cases"][0]
        lines.append(row({**first, "added_mib": p["added_mib"], "seconds": None}, f"**{p['batch']} (projected)**"))
        if "check" in group:
            lines.append(row(group["check"], f"{group['check']['batch']} (measured)"))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,sd1", help="comma separated, from " + ", ".join(MODELS))
    p.add_argument("--steps", type=int, default=2, help="unlearning steps per case (the optimizer state appears "
                   "at the first, so 2 see the steady state)")
    p.add_argument("--checkpointing", action="store_true", help="with gradient checkpointing")
    p.add_argument("--json", default="runs/benchmarks/memory.json")
    p.add_argument("--case", nargs=4, metavar=("MODEL", "BATCH", "STEPS", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.case:  # the child process
        model, batch, steps, checkpointing = args.case
        print(json.dumps(one_case(model, int(batch), int(steps), bool(int(checkpointing)))))
        return None
    if not cpu_memory_supported():
        raise ValueError("this benchmark reads the process's resident peak from Linux's /proc, which is not here")
    models = args.models.split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}")
    started = time.time()
    groups = []
    for model in models:
        print(f"{model}: batches {', '.join(map(str, BATCHES))}", file=sys.stderr, flush=True)
        cases = [measured(model, b, args.steps, args.checkpointing) for b in BATCHES]
        group = {"cases": cases, "projection": projected(cases)}
        if model == "tiny":  # small enough to measure at the full batch too: the projection's own check
            group["check"] = measured(model, FULL_BATCH, args.steps, args.checkpointing)
        groups.append(group)
    report = {"command": "python -m benchmarks.memory " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": machine(), "groups": groups, "wall_s": time.time() - started}
    publish(report, summary(report), args.json)
    return report


if __name__ == "__main__":
    cli.run(main)
