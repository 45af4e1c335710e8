"""The GPU benchmark, one command, a few minutes on one CUDA GPU (SD1.5 size, random weights):

    python -m benchmarks.gpu --json runs/benchmarks/gpu.json

1. the CPU table's rows (python -m benchmarks), in bf16 at 64x64 latents, sau against diffusers;
2. sampling throughput: 50 DDIM steps with guidance at 64x64 (512 px images), images per second, both;
3. SAU unlearning runs of 35 steps on 12 triggered prompts collected (25 steps each, with their cross-attention
   maps): the `paper` recipe as `unlearn.py --recipe paper` runs it after inversion (whole-UNet AdamW on the
   attention loss), then the `default` recipe (attn2 parameters, three terms, a frozen teacher copy);
and the peak GPU memory of each. `--quick --device cpu` runs the same script on a tiny model in seconds,
which is how it is checked where there is no GPU.
"""
import argparse
import json
import sys
import tempfile
import time

import torch

from sau.common import cli
from sau.attacks.backdoor import Backdoor
from sau.evaluation.prompts import DEFAULT_PROMPTS
from sau.models.config import sd1, tiny
from sau.method import RECIPES, collect, locate, unlearn_unet

from .cases import DTYPES, Setting, dtype_rows, inputs, reference_models, runners_for, sau_model, tokenizer_for
from .harness import MIB, highest_cuda_mib, interleaved, machine, publish, rel_err, table

TRIGGER = "mignneko"  # a trigger word from the literature; any tokenizer spells it, so no vocabulary is assumed


def peak_reset(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device):
    return torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda" else None


def throughput(runners, config, size, batch, steps, dtype, device, repeats):
    """Images per second of guided sampling (UNet batch 2 * batch) plus decoding, both implementations."""
    x, _, context = inputs(config, 2 * batch, size, dtype, device, seed=3)
    x_T, cond, uncond = x[:batch], context[batch:], context[:batch]
    fns = {r.name: torch.no_grad()(lambda r=r: r.sample(x_T, cond, uncond, steps)) for r in runners}
    results = interleaved(fns, repeats, device)
    out = {"batch": batch, "steps": steps, "size": size, "rel_diff": rel_err(results["sau"]["output"],
                                                                            results["diffusers"]["output"])}
    for name, r in results.items():
        out[f"{name}_images_per_s"] = batch / r["median_s"]
        out[f"{name}_peak_mib"] = r["peak_mib"]
    return out


def sau_run(pipe, config, dtype, device, steps, collect_steps, recipe):
    """Locate + collect + unlearning with one recipe on a sau model sharing the reference's weights (it trains
    them in place, so these runs come last)."""
    config, tokenizer = tokenizer_for(config)
    sd = sau_model(pipe, config, tokenizer)
    backdoor = Backdoor.make("pixel", trigger=TRIGGER)
    peak_reset(device)
    started = time.perf_counter()
    collected = collect(sd, locate(sd.tokenizer, backdoor, DEFAULT_PROMPTS), seeds=range(len(DEFAULT_PROMPTS)), steps=collect_steps)
    collected_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as run_dir:
        started = time.perf_counter()
        trainer = unlearn_unet(sd, collected, RECIPES[recipe], run_dir, steps=steps, progress=False)
        total_s = time.perf_counter() - started
        log = (trainer.log_path.read_text().strip().splitlines() or ["{}"])[-1]
    last = json.loads(log)
    return {"prompts": len(collected.prompts), "collect_steps": collect_steps, "collect_s": collected_s,
            "unlearn_steps": trainer.steps, "unlearn_train_s": last.get("elapsed_s"),
            "unlearn_with_checkpoint_s": total_s, "final_loss": last.get("loss"), "peak_mib": peak_mib(device),
            "dtype": str(dtype).removeprefix("torch."), "recipe": recipe}


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    p.add_argument("--size", type=int, help="latent size (default 64; --quick: 16)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=8, help="images per sampling batch for the throughput")
    p.add_argument("--quick", action="store_true", help="a tiny model: the self-check without a GPU")
    p.add_argument("--json", default="runs/benchmarks/gpu.json")
    args = p.parse_args(argv)
    args.size = args.size or (16 if args.quick else 64)
    # The counts; a quick run shrinks them too, since it only checks that every part runs.
    steps = (4, 4, 4, 4) if args.quick else (20, 50, 25, 35)
    args.table_steps, args.sample_steps, args.collect_steps, args.unlearn_steps = steps
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("no CUDA device here; this is the GPU script (--quick --device cpu checks it on a CPU)")
    return args


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    started = time.time()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    config = tiny() if args.quick else sd1()
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    say(f"building the models ({'tiny' if args.quick else 'SD1.5 size'}) on {device}")
    pipe = reference_models(config)
    pipe.to(device)
    runners = runners_for(pipe, config, dtype, compiled=False)
    peak_reset(device)
    setting = Setting(runners, config, args.dtype, args.repeats, device)
    rows = dtype_rows(setting, [args.size], args.size, args.table_steps, {}, progress=say)
    say(table(rows))
    say("sampling throughput")
    sampling = throughput(runners, config, args.size, args.batch, args.sample_steps, dtype, device,
                          max(2, args.repeats // 2))
    # weights included: the most allocated at once since the models were built
    table_peak = max(highest_cuda_mib(), peak_mib(device)) if device.type == "cuda" else None
    del runners, setting
    unlearning = {}
    for recipe in ("paper", "default"):
        say(f"SAU run, {recipe} recipe")
        unlearning[recipe] = sau_run(pipe, config, dtype, device, args.unlearn_steps, args.collect_steps, recipe)
    report = {"command": "python -m benchmarks.gpu " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": machine(), "model": "tiny" if args.quick else "sd1 (SD1.5 size)", "device": str(device),
              "rows": rows, "sampling": sampling, "sau_runs": unlearning, "table_peak_mib": table_peak,
              "wall_s": time.time() - started}
    publish(report, summary(report), args.json)
    return report


def summary(report):
    """The table, the throughput and the SAU runs, as the README shows them."""
    sampling = report["sampling"]
    mib = lambda v: f"{v:.0f} MiB" if v is not None else "n/a (CPU)"  # noqa: E731
    return "\n".join([
        table(report["rows"]), "",
        f"- sampling, {sampling['steps']} DDIM steps with guidance, batch {sampling['batch']}, {sampling['size']}x"
        f"{sampling['size']} latents: sau {sampling['sau_images_per_s']:.2f} images/s, diffusers "
        f"{sampling['diffusers_images_per_s']:.2f} images/s",
        *[f"- SAU run ({u['dtype']}, {u['recipe']} recipe): collect {u['prompts']} prompts x {u['collect_steps']} "
          f"steps in {u['collect_s']:.1f} s; unlearn {u['unlearn_steps']} steps in {u['unlearn_train_s']} s "
          f"({u['unlearn_with_checkpoint_s']:.1f} s with the final checkpoint); peak GPU memory {mib(u['peak_mib'])}"
          for u in report["sau_runs"].values()],
        f"- peak GPU memory during the table and the sampling runs, weights included: {mib(report['table_peak_mib'])}"])


if __name__ == "__main__":
    cli.run(main)
