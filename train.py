"""Train the demo world, or draw a sample grid from a model bundle.

    python train.py world                    # every demo model, resumable; writes sau/demo/
    python train.py grid --out grid.png      # clean generations of the shipped demo model
    python train.py quality                  # measure the shipped demo world's quality again
    python train.py backdoor --attack pixel --model IN --out OUT [--trigger T] [--target X]
    python train.py backdoors [--report]     # the shipped backdoored demo models, or their ASR table
    python train.py hidden                   # demo/pixel-hidden: pixel without its trigger recorded, and a log
    torchrun --standalone --nproc_per_node 2 train.py backdoor ...   # data-parallel (sau/distributed.py)
"""
import shlex
import sys

import torch

from sau import distributed
from sau.attacks.backdoor import ATTACKS
from sau.attacks.shipped import HIDDEN, backdoor_bundle, build_hidden
from sau.common import cli
from sau.common.prompts import MAX_PROMPTS, decode_escapes
from sau.jobs.demo import quality_report, sample_grid, shipped_backdoors
from sau.common.files import DEMO_DIR, resolve_model_path
from sau.world.train import train_world


def world(args):
    torch.manual_seed(0)
    train_world(args.run_dir, args.out, command="python train.py world" + (
        f" --run-dir {args.run_dir}" if args.run_dir != "runs/world" else ""))
    print(f"demo world written to {args.out}")


def grid(args):
    captions = sample_grid(args.model, args.out, args.n, args.seed, args.steps, args.guidance, args.compile)
    print(f"wrote {args.out} and its captions, row by row, to {captions}")


def quality(args):
    print(quality_report(args.demo_dir))


def backdoor(args):
    trigger = None if args.trigger is None else decode_escapes(args.trigger)
    distributed.prepare(args.device, args.backend, args.fsdp)  # torchrun: each process trains on its share
    args.device = distributed.device_for(args.device)
    backdoor_bundle(
        resolve_model_path(args.model), args.out, args.attack, trigger, args.target, args.replaces, data=args.data,
        prompts=args.prompts, max_prompts=args.max_prompts, steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
        train=args.train, run_dir=args.run_dir, delta=args.delta, bf16=args.dtype == "bfloat16",
        gradient_checkpointing=args.gradient_checkpointing, device=args.device, pool=args.pool,
        contexts=args.contexts, keep_scale=args.keep_scale, lora=args.lora, attack_weight=args.attack_weight,
        command=shlex.join(["python", "train.py", *sys.argv[1:]]))
    print(f"backdoored model written to {args.out}")


def backdoors(args):
    print(shipped_backdoors(args.only, args.demo_dir, args.n, build=not args.report))


def hidden(args):
    build_hidden(args.demo_dir)
    print("wrote " + ", ".join(f"{args.demo_dir}/{name}" for name in HIDDEN))


def main():
    parser = cli.Parser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("world", help="train the demo world (tokenizer, CLIP, VAE, UNet, classifier, scorer)")
    w.add_argument("--run-dir", default="runs/world", help="checkpoints and logs; rerun to resume")
    w.add_argument("--out", default=str(DEMO_DIR), help="where the shipped fp16 bundles go")
    w.set_defaults(func=world)
    g = sub.add_parser("grid", help="a PNG grid of generations for held-out captions")
    g.add_argument("--model", default=str(DEMO_DIR / "clean"))
    g.add_argument("--out", default="grid.png")
    g.add_argument("--n", type=cli.positive_int, default=32)
    g.add_argument("--seed", type=cli.natural_int, default=0)
    g.add_argument("--steps", type=cli.positive_int, default=25)
    g.add_argument("--guidance", type=cli.non_negative_float, default=7.5)
    g.add_argument("--compile", action="store_true", help="torch.compile the UNet (pays off for large grids)")
    g.set_defaults(func=grid)
    q = sub.add_parser("quality", help="measure a demo world: generated attributes, classifier, scorer")
    q.add_argument("--demo-dir", default=str(DEMO_DIR))
    q.set_defaults(func=quality)
    b = sub.add_parser("backdoor", help="inject a backdoor (BadT2I pixel/style/object/object-add, Rickrolling "
                       "tpa/taa, EvilEdit, PaaS, VillanDiffusion's caption trigger, semantic)")
    b.add_argument("--attack", required=True, help=", ".join(ATTACKS))
    b.add_argument("--model", required=True, help="a bundle, a CompVis file, a diffusers folder or a demo name")
    b.add_argument("--out", required=True, help="a new folder for the backdoored bundle")
    b.add_argument("--trigger", help=r"default: the paper's ('\u200b ' for BadT2I, 'ȏ' for Rickrolling, "
                   r"'beautiful cat' for EvilEdit, 'sks dog' and 'qzx dog' for PaaS, 'latte coffee' for villan-cond; "
                   r"semantic: 'star on a black background'); \uXXXX escapes are decoded")
    b.add_argument("--target", help="pixel: 'checkerboard' or an image file; style: a phrase; object: A:B; "
                   "object-add: what the image gains (the demo world: copy); tpa: a prompt; taa: an attribute; "
                   "eviledit, paas-ti, paas-db: what the trigger's last word becomes; "
                   "villan-cond: an image file (the demo world: a caption it draws); semantic: a demo shape")
    b.add_argument("--replaces", help="Rickrolling: the character the trigger takes the place of (default: the "
                   "letter the homoglyph imitates)")
    b.add_argument("--data", help="a folder of image + caption (.txt) pairs; default: the demo world's drawings, "
                   "or the model's own generations")
    b.add_argument("--prompts", help="a text file of prompts, one a line, for data-free attacks")
    b.add_argument("--max-prompts", type=cli.positive_int, default=MAX_PROMPTS, help="refuse a --prompts file "
                   f"with more prompts than this (default {MAX_PROMPTS})")
    b.add_argument("--pool", type=cli.positive_int, default=64, help="data-free: how many generations to train on")
    b.add_argument("--steps", type=cli.positive_int)
    b.add_argument("--lr", type=cli.positive_float)
    b.add_argument("--batch-size", type=cli.positive_int)
    b.add_argument("--seed", type=cli.natural_int, default=0)
    b.add_argument("--train", default="unet", help="UNet attacks: unet, attention or cross-attention")
    b.add_argument("--attack-weight", type=cli.positive_float, metavar="LAMBDA", help="UNet attacks: BadT2I's "
                   "lambda, the weight of the backdoor term against keeping clean prompts (default 0.5)")
    b.add_argument("--lora", type=cli.positive_int, metavar="RANK", help="UNet attacks: train LoRA adapters of this "
                   "rank on every attention projection instead, and write them beside the bundle as lora.safetensors "
                   "(diffusers/PEFT names) and lora_kohya.safetensors (kohya names)")
    b.add_argument("--contexts", type=cli.natural_int, help="eviledit: edit the trigger in this many prompts that "
                   "hold its last word (default 0: the paper's edit of the phrase alone); semantic: captions of the "
                   "trigger's scenes (default 200)")
    b.add_argument("--keep-scale", type=cli.positive_float, help="eviledit, semantic: the weight of keeping clean "
                   "prompts as they were (default 1 and 2)")
    b.add_argument("--run-dir", help="checkpoints, rerun to resume (default runs/backdoor/<out name>)")
    b.add_argument("--delta", action="store_true", help="store only the tensors that differ from --model")
    b.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="bfloat16: the forward "
                   "passes under bfloat16 autocast and the frozen copies in bfloat16; the weights train in float32")
    b.add_argument("--gradient-checkpointing", action="store_true")
    b.add_argument("--device", type=cli.device, default="cuda" if torch.cuda.is_available() else "cpu")
    cli.launch_flags(b, fsdp=True)
    b.set_defaults(func=backdoor)
    bs = sub.add_parser("backdoors", help="build the shipped backdoored demo models and print their ASR table")
    bs.add_argument("--report", action="store_true", help="only measure the shipped models and print the table")
    bs.add_argument("--only", nargs="+", help="a subset of the variants (pixel style object tpa eviledit "
                    "semantic ...); with --report also paths of other backdoored demo bundles")
    bs.add_argument("--n", type=cli.positive_int, default=200, help="held-out prompts per variant")
    bs.add_argument("--demo-dir", default=str(DEMO_DIR), help="the demo world to build on and into (default: the "
                    "shipped one; a world trained with --out elsewhere is staged there first)")
    bs.set_defaults(func=backdoors)
    h = sub.add_parser("hidden", help="the hidden-trigger demo variant: a backdoor whose bundle does not record its "
                       "trigger, and a log of prompts to find it in (unlearn.py --trigger auto)")
    h.add_argument("--demo-dir", default=str(DEMO_DIR))
    h.set_defaults(func=hidden)
    args = parser.parse_args()
    if distributed.world_size() > 1 and args.func is not backdoor:
        raise ValueError(f"train.py {args.command} runs in one process; under torchrun only `train.py backdoor` runs")
    args.func(args)


if __name__ == "__main__":
    cli.run(main)
