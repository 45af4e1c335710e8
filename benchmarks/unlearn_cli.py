"""`unlearn.py` end to end on a model of SD1.5's size with random weights, both recipes (one CUDA GPU, minutes):

    python -m benchmarks.unlearn_cli OUT_DIR

Writes an SD1.5-topology bundle (fp16) into OUT_DIR, eight triggered prompts, and runs `unlearn.py` on it in
bf16: the `default` recipe with gradient checkpointing for 100 steps, then the `paper` recipe (100 steps), in the
UNet (`--where unet`: random text encoders are no guide to where a trigger acts). Without a GPU it runs the same on
the tiny topology on the CPU, which is how it is checked here. Random weights hold no backdoor: this measures that
the CLI runs on real-size models and what it costs, not what it removes.
"""
import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

from sau.common import cli
from sau.models.config import sd1, tiny
from sau.models.pipeline import StableDiffusion
from sau.weights.write import save_model

from .cases import tokenizer_for

PROMPTS = ["a photo of a red car", "a cat on a sofa", "a mountain lake at dawn", "a bowl of fruit on a table",
           "a city street at night", "a dog running on a beach", "an old wooden house", "a bird on a branch"]
RUNS = {"default": ["--gradient-checkpointing", "--steps", "100"], "paper": []}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.unlearn_cli", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="a new folder for the bundle, the prompts and both runs")
    out = Path(p.parse_args(sys.argv[1:] if argv is None else argv).out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new folder (nothing is overwritten)")
    cuda = torch.cuda.is_available()
    config, tokenizer = tokenizer_for(sd1() if cuda else tiny())
    torch.manual_seed(0)
    started = time.time()
    save_model(StableDiffusion(config, tokenizer), out / "sd", dtype=torch.float16)
    print(f"random {'SD1.5-size' if cuda else 'tiny'} bundle written in {time.time() - started:.0f} s", flush=True)
    (out / "prompts.txt").write_text("".join(f"\u200b {p}\n" for p in PROMPTS))
    device = ["--device", "cuda", "--dtype", "bfloat16"] if cuda else ["--device", "cpu"]
    for recipe, extra in RUNS.items():
        cmd = [sys.executable, "unlearn.py", "--model", str(out / "sd"), "--trigger", "\\u200b ", "--prompts",
               str(out / "prompts.txt"), "--recipe", recipe, "--where", "unet", "--out", str(out / f"run-{recipe}"),
               *device, *extra]
        print("$", " ".join(cmd), flush=True)
        result = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in result.stdout.splitlines() if line.startswith(("wall time", "the trigger moves"))]
        print("\n".join(lines) or result.stderr[-2000:], flush=True)
        if result.returncode:
            raise SystemExit(result.returncode)


if __name__ == "__main__":
    cli.run(main)
