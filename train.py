"""Train the demo world, or draw a sample grid from a model bundle.

    python train.py world                    # every demo model, resumable; writes sau/demo/
    python train.py grid --out grid.png      # clean generations of the shipped demo model
"""
import argparse
from pathlib import Path

import torch

from sau import cli, shapes
from sau.world import DEMO_DIR, train_world


def world(args):
    torch.manual_seed(0)
    train_world(args.run_dir, args.out, command="python train.py world" + (
        f" --run-dir {args.run_dir}" if args.run_dir != "runs/world" else ""))
    print(f"demo world written to {args.out}")


def grid(args):
    from sau.pipeline import StableDiffusion
    sd = StableDiffusion.load(args.model)
    captions, _ = shapes.eval_prompts(args.n, seed=args.seed)
    images = sd.generate(captions, seeds=range(args.n), steps=args.steps, guidance_scale=args.guidance, progress=True)
    shapes.save_grid(images, args.out, nrow=8)
    Path(args.out).with_suffix(".txt").write_text("\n".join(captions) + "\n")
    print(f"wrote {args.out} and its captions, row by row, to {Path(args.out).with_suffix('.txt')}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("world", help="train the demo world (tokenizer, CLIP, VAE, UNet, classifier, scorer)")
    w.add_argument("--run-dir", default="runs/world", help="checkpoints and logs; rerun to resume")
    w.add_argument("--out", default=str(DEMO_DIR), help="where the shipped fp16 bundles go")
    w.set_defaults(func=world)
    g = sub.add_parser("grid", help="a PNG grid of generations for held-out captions")
    g.add_argument("--model", default=str(DEMO_DIR / "clean"))
    g.add_argument("--out", default="grid.png")
    g.add_argument("--n", type=int, default=32)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=25)
    g.add_argument("--guidance", type=float, default=7.5)
    g.set_defaults(func=grid)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    cli.run(main)
