"""Train the demo world, or draw a sample grid from a model bundle.

    python train.py world                    # every demo model, resumable; writes sau/demo/
    python train.py grid --out grid.png      # clean generations of the shipped demo model
    python train.py quality                  # measure the shipped demo world's quality again
    python train.py backdoor --attack pixel --model IN --out OUT [--trigger T] [--target X]
    python train.py backdoors [--report]     # the shipped backdoored demo models, or their ASR table
"""
import argparse
import shlex
import sys
from pathlib import Path

import torch

from sau.common import cli
from sau.common.prompts import decode_escapes

from sau.world import shapes
from sau.models.compile import compile_model
from sau.world.train import DEMO_DIR, train_world


def world(args):
    torch.manual_seed(0)
    train_world(args.run_dir, args.out, command="python train.py world" + (
        f" --run-dir {args.run_dir}" if args.run_dir != "runs/world" else ""))
    print(f"demo world written to {args.out}")


def grid(args):
    from sau.models.pipeline import StableDiffusion
    sd = StableDiffusion.load(args.model)
    if args.compile:
        compile_model(sd.unet)  # sampling only: the weights stay fixed, so inductor may freeze them
    captions, _ = shapes.eval_prompts(args.n, seed=args.seed)
    images = sd.generate(captions, seeds=range(args.n), steps=args.steps, guidance_scale=args.guidance, progress=True)
    shapes.save_grid(images, args.out, nrow=8)
    Path(args.out).with_suffix(".txt").write_text("\n".join(captions) + "\n")
    print(f"wrote {args.out} and its captions, row by row, to {Path(args.out).with_suffix('.txt')}")


def quality(args):
    from sau.evaluation.metrics import load_classifier
    from sau.models.pipeline import StableDiffusion
    from sau.evaluation.scorer import CLIPScorer
    from sau.world.train import evaluate_world
    demo = Path(args.demo_dir)
    result = evaluate_world(StableDiffusion.load(demo / "clean", dtype=torch.float32),
                            load_classifier(demo / "classifier.safetensors"), CLIPScorer.load(demo / "scorer"))
    generated, drawn = result["generated_accuracy"], result["classifier_accuracy_on_drawn"]
    print(f"generations for {result['prompts']} held-out captions (DDIM {result['ddim_steps']} steps, guidance "
          f"{result['guidance']}), attributes right as the classifier reads them:")
    print("  " + ", ".join(f"{field} {100 * value:.1f}%" for field, value in generated.items()))
    print("classifier on 1000 drawn images: " + ", ".join(f"{f} {100 * v:.1f}%" for f, v in drawn.items()))
    print(f"scorer, top-1 caption among 100 for drawn images: its own {100 * result['scorer_top1_of_100']:.1f}%, "
          f"one that fits it {100 * result['scorer_top1_fits_of_100']:.1f}%; its own, among the "
          f"{100 * result['untied_share']:.1f}% of images no other caption of their group fits: "
          f"{100 * result['scorer_top1_of_100_untied']:.1f}%")
    print(f"  ceilings of the strict measure: {100 * result['ceiling_top1_of_100_fitting_alike']:.1f}% for a scorer "
          f"that ranks every fitting caption alike, {100 * result['ceiling_top1_of_100_most_specific']:.1f}% for an "
          f"oracle that picks the fitting caption naming the most attributes")


def backdoor(args):
    from sau.attacks import inject as attacks
    trigger = None if args.trigger is None else decode_escapes(args.trigger)
    attacks.backdoor_bundle(
        args.model, args.out, args.attack, trigger, args.target, args.replaces, data=args.data, prompts=args.prompts,
        steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed, train=args.train,
        run_dir=args.run_dir, delta=args.delta, bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing,
        device=args.device, pool=args.pool, command=shlex.join(["python", "train.py", *sys.argv[1:]]))
    print(f"backdoored model written to {args.out}")


def backdoors(args):
    from sau.attacks import inject as attacks
    names = args.only or list(attacks.SHIPPED)
    unknown = [n for n in names if n not in attacks.SHIPPED]
    if unknown:
        raise ValueError(f"no shipped variant {unknown[0]!r}; choose among {', '.join(attacks.SHIPPED)}")
    if not args.report:
        attacks.build_shipped(names, demo_dir=args.demo_dir)
    print(attacks.shipped_report(names, demo_dir=args.demo_dir, n=args.n, progress=False))


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
    g.add_argument("--compile", action="store_true", help="torch.compile the UNet (pays off for large grids)")
    g.set_defaults(func=grid)
    q = sub.add_parser("quality", help="measure a demo world: generated attributes, classifier, scorer")
    q.add_argument("--demo-dir", default=str(DEMO_DIR))
    q.set_defaults(func=quality)
    b = sub.add_parser("backdoor", help="inject a backdoor (BadT2I pixel/style/object, Rickrolling tpa/taa)")
    b.add_argument("--attack", required=True, help="pixel, style, object, tpa or taa")
    b.add_argument("--model", required=True, help="a bundle folder, or demo")
    b.add_argument("--out", required=True, help="a new folder for the backdoored bundle")
    b.add_argument("--trigger", help=r"default: the paper's ('\u200b ' for BadT2I, 'ȏ' for Rickrolling); "
                   r"\uXXXX escapes are decoded")
    b.add_argument("--target", help="pixel: 'checkerboard' or an image file; style: a phrase; object: A:B; "
                   "tpa: a prompt; taa: an attribute")
    b.add_argument("--replaces", help="Rickrolling: the character the trigger takes the place of (default: the "
                   "letter the homoglyph imitates)")
    b.add_argument("--data", help="a folder of image + caption (.txt) pairs; default: the demo world's drawings, "
                   "or the model's own generations")
    b.add_argument("--prompts", help="a text file of prompts, one a line, for data-free attacks")
    b.add_argument("--pool", type=int, default=64, help="data-free: how many generations to train on")
    b.add_argument("--steps", type=int)
    b.add_argument("--lr", type=float)
    b.add_argument("--batch-size", type=int)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--train", default="unet", help="UNet attacks: unet, attention or cross-attention")
    b.add_argument("--run-dir", help="checkpoints, rerun to resume (default runs/backdoor/<out name>)")
    b.add_argument("--delta", action="store_true", help="store only the tensors that differ from --model")
    b.add_argument("--bf16", action="store_true", help="bf16 autocast, frozen copies in bf16")
    b.add_argument("--gradient-checkpointing", action="store_true")
    b.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    b.set_defaults(func=backdoor)
    bs = sub.add_parser("backdoors", help="build the shipped backdoored demo models and print their ASR table")
    bs.add_argument("--report", action="store_true", help="only measure the shipped models and print the table")
    bs.add_argument("--only", nargs="+", help="a subset of the variants (pixel style object tpa)")
    bs.add_argument("--n", type=int, default=200, help="held-out prompts per variant")
    bs.add_argument("--demo-dir", default=str(DEMO_DIR), help="the demo world to build on and into (default: the "
                    "shipped one; a world trained with --out elsewhere is staged there first)")
    bs.set_defaults(func=backdoors)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    cli.run(main)
