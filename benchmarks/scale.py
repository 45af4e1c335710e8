"""Throughput under torchrun on the demo world: evaluation images per second and SAU unlearning steps per
second at 1 and 2 processes (one thread each), and bf16 + torch.compile evaluation generation against fp32 eager.

    python -m benchmarks.scale                           # the README's table (about 10 minutes on 2 cores)
    python -m benchmarks.scale --quick                   # a smoke run: fewer images and steps
    python -m benchmarks.scale --device cuda             # per GPU count, 1..all, where CUDA is there

Each configuration is one fresh launch (plain python for 1 process, `torchrun --standalone` for more), repeated
--repeats times with the configurations interleaved; the table gives medians (min-max). Inside a launch the
model is loaded and warmed up untimed (a compiled model compiles there), then the timed work runs between two
barriers: evaluation generation is sau.evaluation.metrics.generate_batched on 200 prompts in the evaluation's
chunks of 100 (shared out by chunk), unlearning is sau.method.unlearn_unet with the default recipe (global batch
8, split across processes).
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from sau.common.files import save_json

from . import harness
from .harness import machine

CHUNK = 100  # prompts per generation chunk, the unit processes share: the evaluation's (generate_batched's default)


# --- inside one launch ------------------------------------------------------------------------------------

def measure_generation(prompts, steps, dtype, compiled, chunk=CHUNK):
    """Images per second of generate_batched on the demo model, after an untimed warm-up."""
    import sau
    from sau import distributed
    from sau.evaluation.metrics import generate_batched
    from sau.models.compile import compile_model
    from sau.world import shapes
    sd = sau.load("demo", dtype=getattr(torch, dtype))
    if compiled:
        compile_model(sd.unet)
    captions, _ = shapes.eval_prompts(prompts + chunk, seed=99)
    generate_batched(sd, captions[-chunk:], list(range(chunk)), batch_size=chunk, steps=steps)  # warm-up
    distributed.barrier()
    started = time.perf_counter()
    generate_batched(sd, captions[:prompts], list(range(prompts)), batch_size=chunk, steps=steps)
    distributed.barrier()
    return prompts / (time.perf_counter() - started)


def measure_unlearning(unlearn_steps, collect_prompts=16):
    """Optimizer steps per second of SAU's UNet route (default recipe) on demo/pixel, after collecting untimed."""
    import sau
    from sau import distributed
    from sau.attacks.backdoor import Backdoor
    from sau.evaluation.prompts import builtin_prompts
    from sau.method import RECIPES, collect, locate, unlearn_unet
    sd = sau.load("demo/pixel")
    backdoor = Backdoor.from_info(sd.info["backdoor"])
    prompts = builtin_prompts(sd, collect_prompts, 0)
    collected = collect(sd, locate(sd.tokenizer, backdoor, prompts), range(collect_prompts), steps=10)
    recipe = replace(RECIPES["default"], pool_prompts=0)
    with tempfile.TemporaryDirectory() as scratch:
        unlearn_unet(sd, collected, replace(recipe, steps=1), Path(scratch) / "warm", progress=False)  # warm-up
        distributed.barrier()
        started = time.perf_counter()
        unlearn_unet(sd, collected, replace(recipe, steps=unlearn_steps), Path(scratch) / "timed", progress=False)
        distributed.barrier()
    return unlearn_steps / (time.perf_counter() - started)


def worker(args):
    from sau import distributed
    distributed.prepare(args.device)
    torch.set_num_threads(args.threads)
    if args.worker == "generate":
        rate = measure_generation(args.prompts, args.steps, args.dtype, args.compile, args.chunk)
    else:
        rate = measure_unlearning(args.unlearn_steps)
    if distributed.is_main():
        print("RESULT " + json.dumps({"rate": rate}), flush=True)


# --- the launcher -----------------------------------------------------------------------------------------

def launch(processes, work, args, dtype="float32", compiled=False):
    """One fresh launch of the worker; its measured rate."""
    flags = ["--worker", work, "--prompts", str(args.prompts), "--chunk", str(args.chunk), "--steps", str(args.steps),
             "--unlearn-steps", str(args.unlearn_steps), "--dtype", dtype, "--threads", str(args.threads),
             "--device", args.device] + (["--compile"] if compiled else [])
    return harness.launch("benchmarks.scale", flags, processes, args.threads, work)["rate"]


def configurations(args):
    """(label, processes, work, dtype, compiled) of every row."""
    counts = [1, 2] if args.device == "cpu" else list(range(1, torch.cuda.device_count() + 1))
    unit = "process" if args.device == "cpu" else "GPU"
    def units(n):
        return f"{n} {unit}" + ("" if n == 1 else "es" if unit == "process" else "s")
    rows = [(f"evaluation generation, fp32, {units(n)}", n, "generate", "float32", False) for n in counts]
    rows += [(f"SAU unlearning (default recipe), {units(n)}", n, "unlearn", "float32", False) for n in counts]
    if args.device == "cpu":
        rows.append(("evaluation generation, bf16 + compile, 1 process", 1, "generate", "bfloat16", True))
    return rows


def run(args):
    rows = configurations(args)
    rates = {label: [] for label, *_ in rows}
    for repeat in range(args.repeats):
        for label, processes, work, dtype, compiled in rows[::1 if repeat % 2 == 0 else -1]:  # alternate the order
            rates[label].append(launch(processes, work, args, dtype, compiled))
            print(f"  {label}: {rates[label][-1]:.3f}/s", file=sys.stderr, flush=True)
    summary = [{"configuration": label, "processes": processes, "work": work, "median": statistics.median(rates[label]),
                "min": min(rates[label]), "max": max(rates[label]), "rates": rates[label]}
               for label, processes, work, *_ in rows]
    return summary


def checks(summary, device):
    """The issue's numbers: ratios of medians measured in this run."""
    rate = {r["configuration"]: r["median"] for r in summary}
    if device != "cpu":
        return []
    out = []
    two = rate["evaluation generation, fp32, 2 processes"] / rate["evaluation generation, fp32, 1 process"]
    out.append({"check": "evaluation generation, 2 processes / 1", "value": two, "limit": ">= 1.8", "pass": two >= 1.8})
    compiled = rate["evaluation generation, bf16 + compile, 1 process"] / rate["evaluation generation, fp32, 1 process"]
    out.append({"check": "evaluation generation, bf16 + compile / fp32 eager", "value": compiled, "limit": ">= 2",
                "pass": compiled >= 2})
    unlearn = rate["SAU unlearning (default recipe), 2 processes"] / rate["SAU unlearning (default recipe), 1 process"]
    out.append({"check": "SAU unlearning, 2 processes / 1 (reported)", "value": unlearn, "limit": "-", "pass": None})
    return out


def markdown(summary, found, args, info):
    lines = [f"`python -m benchmarks.scale{' --quick' if args.quick else ''}`, {info['cpu']} ({info['cores']} "
             f"cores, {args.threads} thread per process), torch {info['torch']}, {info['date'][:10]}; medians of "
             f"{args.repeats} launches (min-max).", "",
             "| configuration | rate | unit |", "|---|---|---|"]
    for r in summary:
        unit = "images/s" if r["work"] == "generate" else "steps/s"
        lines.append(f"| {r['configuration']} | {r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f}) | {unit} |")
    lines += ["", "| check | value | limit | pass |", "|---|---|---|---|"]
    verdict = {None: "-", True: "yes", False: "NO"}
    lines += [f"| {c['check']} | {c['value']:.2f}x | {c['limit']} | {verdict[c['pass']]} |" for c in found]
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=200, help="evaluation prompts generated per launch")
    p.add_argument("--chunk", type=int, default=CHUNK, help="prompts per generation chunk (default: the evaluation's)")
    p.add_argument("--steps", type=int, default=25, help="denoising steps per image")
    p.add_argument("--unlearn-steps", type=int, default=20, help="timed optimizer steps per launch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="16 prompts in chunks of 8, 5 denoising steps, 4 unlearning "
                   "steps, 1 repeat")
    p.add_argument("--json", help="default runs/benchmarks/scale[-quick].json")
    p.add_argument("--worker", choices=["generate", "unlearn"], help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.quick:
        args.prompts, args.chunk, args.steps, args.unlearn_steps, args.repeats = 16, 8, 5, 4, 1
    if args.prompts % (2 * args.chunk):
        p.error(f"--prompts must be a multiple of 2 x --chunk ({2 * args.chunk}), so that 2 processes share it evenly")
    summary = run(args)
    found, info = checks(summary, args.device), machine()
    text = markdown(summary, found, args, info)
    print(text)
    path = Path(args.json or f"runs/benchmarks/scale{'-quick' if args.quick else ''}.json")
    save_json({"command": "python -m benchmarks.scale" + (" --quick" if args.quick else ""), "machine": info,
               "args": vars(args), "rows": summary, "checks": found, "markdown": text}, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
