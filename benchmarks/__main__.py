"""sau against diffusers on this machine: SD1.5-size random weights, the same tensors in both.

    python -m benchmarks --json runs/benchmarks/cpu.json              # the README's CPU table
    python -m benchmarks --sizes 32 --dtype bfloat16 --repeats 7
    python -m benchmarks --compile --cases forward captured           # both UNets under torch.compile
    python -m benchmarks --quick                                      # tiny models, seconds (the test's run)

Prints a Markdown table (medians of interleaved runs after a warm-up, peak memory per call, how far the two
outputs differ) and the issue's checks, and writes all of it, with every timing, as JSON.
"""
import argparse
import sys
import time

import torch

from sau.common import cli
from sau.models.config import sd1, tiny

from .cases import CASES, DTYPES, benchmark
from .harness import machine, publish, table

QUICK_SIZES = (8, 16)  # latents of the tiny model (its UNet halves once)


def checks(rows):
    """The issue's acceptance numbers, read off the rows (measurements, not tests)."""
    def find(case, size, dtype):
        return next((r for r in rows if r["case"] == case and r["size"] == size and r["dtype"] == dtype), None)
    out = []
    sizes = sorted({r["size"] for r in rows if r["case"] == "unet forward"})
    for size in sizes:
        r = find("unet forward", size, "float32")
        if r:
            out.append({"check": f"fp32 UNet forward at {size}x{size}: sau/diffusers time", "value": r["ratio"],
                        "limit": "<= 1.00", "pass": r["ratio"] <= 1.0})
    if sizes:
        size = sizes[-1]
        for dtype in DTYPES:
            plain, captured = find("unet forward", size, dtype), find("unet forward, attn2 captured", size, dtype)
            if plain and captured:
                overhead = captured["sau_s"] / plain["sau_s"] - 1
                out.append({"check": f"{dtype} capture of all attn2 layers at {size}x{size}: sau overhead",
                            "value": overhead, "limit": "<= 0.10", "pass": overhead <= 0.10})
    for size in sizes:
        fp32, bf16 = find("unet forward", size, "float32"), find("unet forward", size, "bfloat16")
        if fp32 and bf16:
            speedup = fp32["sau_s"] / bf16["sau_s"]
            out.append({"check": f"bf16 UNet forward at {size}x{size}: speed-up over fp32", "value": speedup,
                        "limit": ">= 1.8", "pass": speedup >= 1.8})
            out.append({"check": f"bf16 UNet forward at {size}x{size}: relative error against fp32",
                        "value": bf16["vs_fp32_rel_err"], "limit": "< 2e-2", "pass": bf16["vs_fp32_rel_err"] < 2e-2})
    return out


def report_text(report):
    lines = [table(report["rows"]), ""]
    for c in report["checks"]:
        lines.append(f"- {c['check']}: {c['value']:.3g} ({c['limit']}: {'yes' if c['pass'] else 'NO'})")
    return "\n".join(lines)


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", help="latent sizes (default 32 64; --quick: 8 16)")
    p.add_argument("--repeats", type=int, help="timed runs per implementation and row (default 5; --quick: 1)")
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["float32", "bfloat16"])
    p.add_argument("--sample-steps", type=int, default=20, help="DDIM steps of the sampling row")
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="which rows (default: all)")
    p.add_argument("--compile", action="store_true", help="compile both UNets (inductor, freezing)")
    p.add_argument("--quick", action="store_true", help="a tiny model of the same topology: seconds, for tests")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--json", help="write the report here (default runs/benchmarks/cpu[-compile|-quick].json)")
    args = p.parse_args(argv)
    args.sizes = args.sizes or (list(QUICK_SIZES) if args.quick else [32, 64])
    args.repeats = args.repeats or (1 if args.quick else 5)
    if args.repeats < 1 or args.sample_steps < 1 or any(s < 1 for s in args.sizes):
        raise ValueError("--repeats, --sample-steps and --sizes must be positive")
    factor = 2 if args.quick else 8  # how often each UNet halves its latents
    if any(s % factor for s in args.sizes):
        raise ValueError(f"latent sizes must be multiples of {factor} for this model")
    suffix = "-quick" if args.quick else "-compile" if args.compile else ""
    args.json = args.json or f"runs/benchmarks/cpu{suffix}.json"
    return args


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    config = tiny() if args.quick else sd1()
    rows = benchmark(config, args.dtype, args.sizes, args.repeats, args.sample_steps, compiled=args.compile,
                     cases=args.cases, progress=lambda line: print(line, file=sys.stderr, flush=True))
    command = "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {"command": command.strip(), "machine": machine(), "model": "tiny" if args.quick else "sd1 (SD1.5 size)",
              "compiled": args.compile, "repeats": args.repeats, "rows": rows, "checks": checks(rows),
              "wall_s": time.time() - started}
    publish(report, report_text(report), args.json)
    return report


if __name__ == "__main__":
    cli.run(main)
