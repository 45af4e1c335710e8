"""Spatial Attention Unlearning on a suspect model.

    python unlearn.py                                    # the shipped pixel-backdoored demo model
    python unlearn.py --model demo/style --recipe paper
    python unlearn.py --model sd15.safetensors --trigger "\\u200b " --prompts prompts.txt --out runs/sd15
    python unlearn.py --model suspect.safetensors --trigger auto --prompts LOG.txt   # the trigger unknown
    torchrun --standalone --nproc_per_node 2 unlearn.py ...     # N processes (sau/distributed.py)
"""
import argparse

from sau.common import cli
from sau.common.prompts import MAX_PROMPTS, decode_escapes, read_prompts
from sau.method import RECIPES
from sau.jobs.unlearn import Job, run


def main():
    p = cli.Parser(description=__doc__)
    p.add_argument("--model", default=Job.model, help="a bundle, a shipped demo name (demo/pixel, demo/style, "
                   "demo/object, demo/tpa) or any checkpoint weights_convert.py reads")
    p.add_argument("--lora", type=cli.lora_arg, action="append", default=[], metavar="FILE[:SCALE]",
                   help="merge a LoRA file (peft, diffusers or kohya names) onto --model first, at SCALE (default 1); "
                   "repeatable, applied in order: a backdoor delivered as a LoRA")
    p.add_argument("--trigger", help=r"the trigger text (\uXXXX escapes allowed); default: the one the bundle "
                   "records; 'auto': find it in a log of prompts (--prompts LOG.txt; sau/find_trigger.py)")
    p.add_argument("--replaces", help="the letter a homoglyph trigger stands in for (default: none, the trigger "
                   "is prepended)")
    p.add_argument("--prompts", help="a text file, one prompt per line (default: built-in prompts)")
    p.add_argument("--max-prompts", type=cli.positive_int, default=MAX_PROMPTS, help="refuse a --prompts file "
                   f"with more prompts than this (default {MAX_PROMPTS})")
    p.add_argument("--recipe", choices=list(RECIPES), default=Job.recipe)
    p.add_argument("--invert", action="store_true", help="learn the trigger's latent representation first")
    p.add_argument("--params", choices=["attn2", "all"], help="which UNet parameters to train (default: the recipe's)")
    p.add_argument("--where", choices=["auto", "unet", "text_encoder"], default="auto",
                   help="where to unlearn (default: where the trigger is found to act)")
    p.add_argument("--steps", type=cli.positive_int)
    p.add_argument("--lr", type=cli.positive_float)
    p.add_argument("--negative-guidance", type=cli.non_negative_float, metavar="ETA", help="how far past the clean prediction the "
                   "triggered prompt is distilled, away from the trigger's effect (default: the recipe's; 0: to it)")
    p.add_argument("--attention-weight", type=cli.non_negative_float, metavar="A", help="a in the UNet's loss L = a*L_attn + "
                   "b*L_distill + c*L_preserve (sau/method.py; default: the recipe's; 0 drops the term)")
    p.add_argument("--distill-weight", type=cli.non_negative_float, metavar="B", help="b in that loss (default: the recipe's)")
    p.add_argument("--preserve-weight", type=cli.non_negative_float, metavar="C", help="c in that loss (default: the recipe's)")
    p.add_argument("--spatial-mask", action=argparse.BooleanOptionalAction, default=None,
                   help="M: weigh the attention term by the trigger's own heatmap; --no-spatial-mask: M = ones, every "
                   "pixel alike (default: the recipe's; neither recipe uses the mask, see docs/protocol.md)")
    p.add_argument("--out", default=Job.out, help="output folder (a rerun of the same command resumes it)")
    p.add_argument("--force", action="store_true", help="replace an --out that holds another run or other files "
                   "(emptied first; the input model is never in it)")
    p.add_argument("--seed", type=cli.natural_int, default=0)
    p.add_argument("--eval-prompts", type=cli.positive_int, default=Job.eval_prompts,
                   help=f"held-out prompts measured before and after, demo models only (default {Job.eval_prompts})")
    p.add_argument("--export", action="store_true", help="also write the cleaned model in the input's own format "
                   "(one CompVis .safetensors, or a diffusers folder)")
    p.add_argument("--device", type=cli.device, default="cpu")
    p.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory (full-size SD)")
    p.add_argument("--dtype", choices=cli.DTYPES, default="float32", help="the compute dtype (bfloat16 on GPUs)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (the first calls compile; pays "
                   "off on long runs and GPUs, see the README's Performance section)")
    cli.launch_flags(p, fsdp=True)
    args = p.parse_args()
    cli.check_dtype(args.dtype, args.device)
    job = Job(model=args.model, trigger=decode_escapes(args.trigger) if args.trigger is not None else None,
              replaces=args.replaces, prompts=read_prompts(args.prompts, args.max_prompts) if args.prompts else None,
              recipe=args.recipe, invert=args.invert, params=args.params, steps=args.steps, lr=args.lr,
              negative_guidance=args.negative_guidance, attention_weight=args.attention_weight,
              distill_weight=args.distill_weight, preserve_weight=args.preserve_weight, spatial_mask=args.spatial_mask,
              where=args.where, out=args.out, seed=args.seed, eval_prompts=args.eval_prompts,
              export=args.export, device=args.device, dtype=args.dtype,
              gradient_checkpointing=args.gradient_checkpointing, compile=args.compile, force=args.force,
              lora=tuple(args.lora), backend=args.backend, fsdp=args.fsdp)
    run(job)


if __name__ == "__main__":
    cli.run(main)
