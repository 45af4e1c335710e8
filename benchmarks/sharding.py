"""Memory per process of SAU's UNet training at full SD size, in one process, in 2 under DDP and in 2 under --fsdp:
where sharding the UNet's training state starts to matter.

    python -m benchmarks.sharding --json runs/benchmarks/sharding.json        # SD1.5 size (about 15 min, 2 cores)
    python -m benchmarks.sharding --models tiny                                # seconds

Random weights, bf16, the model's default latents (SD1.5: 64x64), the default recipe with --params all (every UNet
weight trains, as the paper's recipe does; with attn2 only the trained state is a tenth of it), a global batch of 2,
2 optimizer steps (AdamW's state appears at the first). Each configuration is a fresh launch; each process reports
the peak of its resident memory during unlearning over what it held before (sau's benchmarks.harness), and the
row gives the largest over processes. What stays whole on every process: the model being cleaned; what --fsdp
splits: the trained copy's weights, gradients and optimizer state, and the frozen copy (the teacher).
"""
import argparse
import json
import os
import sys
import tempfile
from dataclasses import replace

import torch

from sau.common.files import save_json

from . import harness
from .harness import machine, peak_memory, resident_mib
from .memory import MODELS, TRIGGER, build

CONFIGURATIONS = {"one": ("1 process", 1, False), "ddp": ("2 processes, DDP", 2, False),
                  "fsdp": ("2 processes, --fsdp", 2, True)}
BATCH = 2


def one_launch(model, steps):
    """Inside a launch: build, collect, unlearn; this rank's memory, gathered to every rank."""
    from sau import distributed
    from sau.attacks.backdoor import Backdoor
    from sau.evaluation.prompts import DEFAULT_PROMPTS
    from sau.method import RECIPES, collect, locate, unlearn_unet
    sd = build(model)
    prompts = [f"{TRIGGER} {p}" for p in DEFAULT_PROMPTS[:BATCH]]
    with torch.no_grad():
        collected = collect(sd, locate(sd.tokenizer, Backdoor.make("pixel", trigger=TRIGGER), prompts),
                            seeds=range(BATCH), steps=2)
    recipe = replace(RECIPES["default"], batch_size=BATCH, params="all", pool_prompts=0)
    resident = resident_mib()
    with tempfile.TemporaryDirectory() as run_dir:
        _, added = peak_memory(lambda: unlearn_unet(sd, collected, recipe, run_dir, steps=steps, progress=False),
                               "cpu")
    mine = {"rank": distributed.rank(), "resident_mib": resident, "added_mib": added,
            "unet_params": sum(p.numel() for p in sd.unet.parameters())}
    return distributed.gather_chunks({distributed.rank(): mine})


def launch(model, processes, fsdp, steps):
    """One fresh launch (the cores shared out among its processes): every process's memory."""
    flags = ["--launch", model, str(steps)] + (["--fsdp"] if fsdp else [])
    threads = max(1, (os.cpu_count() or 2) // processes)
    return harness.launch("benchmarks.sharding", flags, processes, threads, model)


def main():
    p = argparse.ArgumentParser(prog="python -m benchmarks.sharding", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="sd1", help="comma separated, from " + ", ".join(MODELS))
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--configurations", default=",".join(CONFIGURATIONS),
                   help="comma separated, from " + ", ".join(CONFIGURATIONS) + " (default: all)")
    p.add_argument("--json", default="runs/benchmarks/sharding.json")
    p.add_argument("--launch", nargs=2, metavar=("MODEL", "STEPS"), help=argparse.SUPPRESS)
    p.add_argument("--fsdp", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.launch:
        from sau import distributed
        distributed.prepare("cpu", fsdp=args.fsdp)
        ranks = one_launch(args.launch[0], int(args.launch[1]))
        if distributed.is_main():
            print("RESULT " + json.dumps(ranks), flush=True)
        return
    rows = []
    for model in args.models.split(","):
        for label, processes, fsdp in (CONFIGURATIONS[c] for c in args.configurations.split(",")):
            ranks = launch(model, processes, fsdp, args.steps)
            rows.append({"model": model, "configuration": label, "ranks": ranks,
                         "added_mib": max(r["added_mib"] for r in ranks),
                         "total_mib": max(r["resident_mib"] + r["added_mib"] for r in ranks)})
            print(f"  {model}, {label}: +{rows[-1]['added_mib']:.0f} MiB per process", file=sys.stderr, flush=True)
    lines = ["| model | configuration | UNet parameters | resident before (MiB) | added by unlearning, per process "
             "(MiB) | total per process (MiB) |", "|---|---|---|---|---|---|"]
    for r in rows:
        resident = max(x["resident_mib"] for x in r["ranks"])
        lines.append(f"| {r['model']} | {r['configuration']} | {r['ranks'][0]['unet_params'] / 1e6:.0f}M | "
                     f"{resident:.0f} | {r['added_mib']:.0f} | {r['total_mib']:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    save_json({"command": "python -m benchmarks.sharding " + " ".join(sys.argv[1:]), "machine": machine(),
               "batch": BATCH, "steps": args.steps, "rows": rows, "markdown": text}, args.json)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
