"""Throughput under torchrun: evaluation images per second and SAU unlearning steps per second at 1 and 2
processes (one thread each) on the demo world, and bf16 (eager, and with torch.compile) evaluation generation
against fp32 eager; generation alone at SD 1.5 size with --model sd1.

    python -m benchmarks.scale                           # the README's demo rows (about 8 minutes on 2 cores)
    python -m benchmarks.scale --quick                   # a smoke run: fewer images and steps
    python -m benchmarks.scale --device cuda             # per GPU count, 1..all, where CUDA is there
    python -m benchmarks.scale --model sd1               # generation at SD 1.5 size (random weights, 256 px)

Each configuration is one fresh launch (plain python for 1 process, `torchrun --standalone` for more), repeated
--repeats times with the configurations interleaved; the table gives medians (min-max). Inside a launch the
model is loaded and warmed up untimed (a compiled model compiles there), then the timed work runs between two
barriers: evaluation generation is sau.evaluation.metrics.generate_batched on 200 prompts in the evaluation's
chunks of 100 (shared out by chunk), unlearning is sau.method.unlearn_unet with the default recipe (global batch
8, split across processes). With --model sd1 the generation rows run on a UNet, text encoder and VAE of SD 1.5's
topology with random weights (benchmarks.memory.build): 2 everyday prompts, one a chunk, 10 steps at 256 x 256
pixels, where the kernels are large enough for the CPU's bf16 matrix units to show (about 15 minutes on 2 cores).
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
# Per model: prompts, chunk, denoising steps, image side in pixels (None: the model's own)
SETTINGS = {"demo": (200, CHUNK, 25, None), "sd1": (2, 1, 10, 256)}
QUICK = {"demo": (16, 8, 5), "sd1": (2, 1, 2)}  # a smoke run's prompts, chunk and steps


# --- inside one launch ------------------------------------------------------------------------------------

def measure_generation(model, prompts, steps, dtype, compiled, chunk=CHUNK, side=None):
    """Images per second of generate_batched, after an untimed warm-up on a chunk of other prompts."""
    from sau import distributed
    from sau.evaluation.metrics import generate_batched
    from sau.models.compile import compile_model
    sd, captions = generation_model(model, prompts + chunk, getattr(torch, dtype))
    if compiled:
        compile_model(sd.unet)
    size = {"height": side, "width": side}
    generate_batched(sd, captions[-chunk:], list(range(chunk)), batch_size=chunk, steps=2, **size)  # warm-up
    distributed.barrier()
    started = time.perf_counter()
    generate_batched(sd, captions[:prompts], list(range(prompts)), batch_size=chunk, steps=steps, **size)
    distributed.barrier()
    return prompts / (time.perf_counter() - started)


def generation_model(model, n, dtype):
    """The model to generate with and n prompts for it: the demo's evaluation captions, or everyday prompts for
    SD 1.5's topology with random weights."""
    import sau
    from sau.evaluation.prompts import DEFAULT_PROMPTS
    from sau.world import shapes
    if model == "demo":
        return sau.load("demo", dtype=dtype), shapes.eval_prompts(n, seed=99)[0]
    from .memory import build
    return build(model).to(dtype), (DEFAULT_PROMPTS * n)[:n]


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
        rate = measure_generation(args.model, args.prompts, args.steps, args.dtype, args.compile, args.chunk, args.side)
    else:
        rate = measure_unlearning(args.unlearn_steps)
    if distributed.is_main():
        print("RESULT " + json.dumps({"rate": rate}), flush=True)


# --- the launcher -----------------------------------------------------------------------------------------

def launch(processes, work, args, dtype="float32", compiled=False):
    """One fresh launch of the worker; its measured rate."""
    flags = ["--worker", work, "--model", args.model, "--prompts", str(args.prompts), "--chunk", str(args.chunk),
             "--steps", str(args.steps), "--unlearn-steps", str(args.unlearn_steps), "--dtype", dtype, "--threads",
             str(args.threads), "--device", args.device] + (["--compile"] if compiled else [])
    flags += ["--side", str(args.side)] if args.side else []
    return harness.launch("benchmarks.scale", flags, processes, args.threads, work)["rate"]


def configurations(args):
    """(label, processes, work, dtype, compiled) of every row."""
    counts = [1, 2] if args.device == "cpu" else list(range(1, torch.cuda.device_count() + 1))
    unit = "process" if args.device == "cpu" else "GPU"
    def units(n):
        return f"{n} {unit}" + ("" if n == 1 else "es" if unit == "process" else "s")
    rows = [(f"evaluation generation, fp32, {units(n)}", n, "generate", "float32", False) for n in counts]
    if args.model == "demo":
        rows += [(f"SAU unlearning (default recipe), {units(n)}", n, "unlearn", "float32", False) for n in counts]
    if args.device == "cpu":
        rows.append(("evaluation generation, bf16 eager, 1 process", 1, "generate", "bfloat16", False))
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
    eager = rate["evaluation generation, bf16 eager, 1 process"] / rate["evaluation generation, fp32, 1 process"]
    out.append({"check": "evaluation generation, bf16 eager / fp32 eager (reported)", "value": eager, "limit": "-",
                "pass": None})
    if "SAU unlearning (default recipe), 2 processes" in rate:
        unlearn = (rate["SAU unlearning (default recipe), 2 processes"]
                   / rate["SAU unlearning (default recipe), 1 process"])
        out.append({"check": "SAU unlearning, 2 processes / 1 (reported)", "value": unlearn, "limit": "-",
                    "pass": None})
    return out


def markdown(summary, found, args, info):
    lines = [f"`{command_line(args)}`, {info['cpu']} ({info['cores']} "
             f"cores, {args.threads} thread per process), torch {info['torch']}, {info['date'][:10]}; medians of "
             f"{args.repeats} launches (min-max).", "",
             "| configuration | rate | unit |", "|---|---|---|"]
    for r in summary:
        unit = "images/s" if r["work"] == "generate" else "steps/s"
        lines.append(f"| {r['configuration']} | {r['median']:.4g} ({r['min']:.4g}-{r['max']:.4g}) | {unit} |")
    lines += ["", "| check | value | limit | pass |", "|---|---|---|---|"]
    verdict = {None: "-", True: "yes", False: "NO"}
    lines += [f"| {c['check']} | {c['value']:.2f}x | {c['limit']} | {verdict[c['pass']]} |" for c in found]
    return "\n".join(lines) + "\n"


def command_line(args):
    """The command that reproduces this table."""
    return ("python -m benchmarks.scale" + ("" if args.model == "demo" else f" --model {args.model}")
            + (" --quick" if args.quick else ""))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(SETTINGS), default="demo", help="demo: the evaluation's model and its "
                   "unlearning; sd1: generation alone, at SD 1.5 size with random weights")
    p.add_argument("--prompts", type=int, help="prompts generated per launch (demo 200, sd1 2)")
    p.add_argument("--chunk", type=int, help="prompts per generation chunk (demo: the evaluation's 100; sd1 1)")
    p.add_argument("--steps", type=int, help="denoising steps per image (demo 25, sd1 10)")
    p.add_argument("--side", type=int, help=argparse.SUPPRESS)
    p.add_argument("--unlearn-steps", type=int, default=20, help="timed optimizer steps per launch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="a smoke run, 1 repeat: demo 16 prompts in chunks of 8, 5 "
                   "denoising steps, 4 unlearning steps; sd1 2 prompts, 2 steps")
    p.add_argument("--json", help="default runs/benchmarks/scale[-sd1][-quick].json")
    p.add_argument("--worker", choices=["generate", "unlearn"], help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    prompts, chunk, steps, side = SETTINGS[args.model]
    args.prompts, args.chunk, args.steps = args.prompts or prompts, args.chunk or chunk, args.steps or steps
    args.side = side
    if args.quick:
        (args.prompts, args.chunk, args.steps), args.unlearn_steps, args.repeats = QUICK[args.model], 4, 1
    if args.prompts % (2 * args.chunk):
        p.error(f"--prompts must be a multiple of 2 x --chunk ({2 * args.chunk}), so that 2 processes share it evenly")
    summary = run(args)
    found, info = checks(summary, args.device), machine()
    text = markdown(summary, found, args, info)
    print(text)
    path = Path(args.json or f"runs/benchmarks/scale{'' if args.model == 'demo' else '-' + args.model}"
                f"{'-quick' if args.quick else ''}.json")
    save_json({"command": command_line(args), "machine": info,
               "args": vars(args), "rows": summary, "checks": found, "markdown": text}, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
