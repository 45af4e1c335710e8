"""Measure backdoor removal: the evaluation protocol on the demo world, SAU's ablation, or any cleaned model.

    python eval.py                        # the protocol: every demo backdoor x every method, tuned on `tune`,
                                          # reported on `test` and `ood` over 3 seeds (sau/jobs/protocol.py)
    python eval.py --quick                # the same grid, 1 seed, each method's default, 16 prompts (a smoke run)
    python eval.py --models pixel,tpa --methods none,uce,sau_default --out runs/eval-small
    python eval.py --ablation --seeds 3   # SAU's parts switched off one by one (sau/jobs/ablation.py)
    python eval.py --detect               # trigger-agnostic detection and localization (sau/jobs/detection.py)
    python eval.py --model CLEANED --original SUSPECT --trigger TEXT --clip CLIP --prompts FILE

The protocol writes protocol.md, results.json and chart.png to --out, and keeps every run in --out/cells, so a
rerun resumes. Methods: none (the backdoored model as shipped), uce, esd_x, esd_x_prompt, concept_ablation
(sau/baselines.py), sau_paper, sau_default (sau/method.py's two recipes).
"""
import sys
from pathlib import Path

from sau import distributed
from sau.baselines import METHODS
from sau.common import cli
from sau.common.files import DEMO_DIR
from sau.common.prompts import MAX_PROMPTS, decode_escapes
from sau.jobs import ablation, compare, detection, protocol

QUICK = {"seeds": 1, "prompts_n": 16, "tune_n": 16, "sweep": False, "max_steps": 150}  # under 10 min on 2 cores


def main():
    p = cli.Parser(description=__doc__)
    p.add_argument("--world", default=str(DEMO_DIR), help="the demo world folder: classifier.safetensors, scorer/ "
                   "and the backdoored bundles (default: the shipped sau/demo)")
    p.add_argument("--models", type=cli.comma_list, help="backdoored bundles, names in --world or paths, comma "
                   "separated (default: every backdoor the world's manifest lists)")
    p.add_argument("--methods", type=cli.comma_list, default=list(METHODS), help="comma separated, from "
                   + ", ".join(METHODS))
    p.add_argument("--seeds", type=cli.positive_int, default=3, help="unlearning seeds per reported cell (default 3)")
    p.add_argument("--splits", type=cli.comma_list, default=["test", "ood"], help="reported splits: test, ood")
    p.add_argument("--prompts-n", type=cli.positive_int, help="prompts per reported split and backdoor (default "
                   f"{protocol.Protocol.prompts_n})")
    p.add_argument("--tune-n", type=cli.positive_int, default=protocol.Protocol.tune_n, help="tune prompts per backdoor for "
                   "each method's sweep")
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 seed, 16 prompts per split, no sweep "
                   "(each method's default setting), at most 150 optimizer steps")
    p.add_argument("--collect-prompts", type=cli.positive_int, default=protocol.Protocol.collect_prompts,
                   help="prompts whose generations the methods learn from")
    p.add_argument("--sample-steps", type=cli.positive_int, default=protocol.Protocol.sample_steps)
    p.add_argument("--max-steps", type=cli.positive_int, help="cap every method's optimizer steps (smoke tests; the tables "
                   "then say so)")
    p.add_argument("--out", help="output folder (default: runs/eval, runs/ablation)")
    p.add_argument("--device", type=cli.device, default="cpu")
    p.add_argument("--dtype", choices=list(cli.DTYPES), help="compute precision (default: float32; a real model "
                   "on a GPU: its stored precision)")
    p.add_argument("--no-progress", action="store_true")
    parts = p.add_argument_group("the SAU ablation (--ablation)")
    parts.add_argument("--ablation", action="store_true", help="SAU's default recipe with each part switched off")
    parts.add_argument("--variants", type=cli.comma_list, default=list(ablation.VARIANTS),
                       help="comma separated, from " + ", ".join(ablation.VARIANTS))
    detecting = p.add_argument_group("trigger-agnostic detection (--detect)")
    detecting.add_argument("--detect", action="store_true", help="the detectors of sau/detect.py on every demo "
                           "backdoor, fitted on clean tune prompts, the clean model as the negative control")
    real_model = p.add_argument_group("a cleaned model against its original (any SD model)")
    real_model.add_argument("--model", help="the cleaned model (bundle, or any checkpoint weights_convert.py reads)")
    real_model.add_argument("--original", help="the suspect model it was cleaned from")
    real_model.add_argument("--trigger", help=r"the trigger (\uXXXX escapes allowed)")
    real_model.add_argument("--replaces", help="the letter a homoglyph trigger stands in for")
    real_model.add_argument("--clip", help="a CLIP scorer bundle (weights_convert.py converts a CLIP model)")
    real_model.add_argument("--prompts", help="a text file, one prompt per line")
    real_model.add_argument("--max-prompts", type=cli.positive_int, default=MAX_PROMPTS, help="refuse a --prompts "
                            f"file with more prompts than this (default {MAX_PROMPTS})")
    real_model.add_argument("--compile", action="store_true", help="torch.compile the UNets (see the README's "
                            "Performance)")
    cli.launch_flags(p)
    o = vars(p.parse_args())
    o["progress"], o["command"] = not o.pop("no_progress"), "python " + " ".join([Path(sys.argv[0]).name,
                                                                                  *sys.argv[1:]])
    cli.check_dtype(o["dtype"], o["device"])
    distributed.prepare(o["device"], o.pop("backend"))  # torchrun: each process generates its share of the images
    o["device"] = distributed.device_for(o["device"])
    if o["model"]:
        return compare.run(comparison(o))
    refuse(o, ("original", "trigger", "replaces", "clip", "prompts", "max_prompts", "compile"),
           "applies only with --model")
    if o["detect"]:
        refuse(o, ("methods", "variants", "ablation", "seeds", "max_steps", "quick"), "does not apply to --detect")
        return detection.run(detection_job(o))
    if o["ablation"]:
        refuse(o, ("methods", "tune_n"), "does not apply to --ablation")
        return ablation.run(ablation_job(o))
    refuse(o, ("variants",), "applies only with --ablation")
    protocol.run(protocol_job(o))


DEFAULTS = {"methods": list(METHODS), "tune_n": protocol.Protocol.tune_n, "variants": list(ablation.VARIANTS), "seeds": 3,
            "max_prompts": MAX_PROMPTS}


def refuse(options, names, why):
    """Flags that the chosen mode would ignore: one clear error instead."""
    given = [name for name in names if options[name] not in (None, False, DEFAULTS.get(name))]
    if given:
        raise ValueError(f"--{given[0].replace('_', '-')} {why}")


def comparison(o):
    return compare.Comparison(model=o["model"], original=o["original"], replaces=o["replaces"], clip=o["clip"],
                              trigger=None if o["trigger"] is None else decode_escapes(o["trigger"]),
                              prompts=o["prompts"], max_prompts=o["max_prompts"], prompts_n=o["prompts_n"], sample_steps=o["sample_steps"],
                              out=o["out"] or compare.Comparison.out, device=o["device"], dtype=o["dtype"],
                              progress=o["progress"], compile=o["compile"], command=o["command"])


def protocol_job(o):
    quick = QUICK if o["quick"] else {}
    seeds = quick.get("seeds", o["seeds"])
    return protocol.Protocol(world=o["world"], models=o["models"], methods=o["methods"], seeds=seeds,
                             splits=o["splits"], prompts_n=o["prompts_n"] or quick.get("prompts_n",
                                                                                       protocol.Protocol.prompts_n),
                             tune_n=quick["tune_n"] if quick and o["tune_n"] == DEFAULTS["tune_n"] else o["tune_n"],
                             sweep=quick.get("sweep", True),
                             collect_prompts=o["collect_prompts"], sample_steps=o["sample_steps"],
                             max_steps=o["max_steps"] or quick.get("max_steps"),
                             out=o["out"] or protocol.Protocol.out, device=o["device"],
                             dtype=o["dtype"] or "float32", progress=o["progress"], command=o["command"])


def detection_job(o):
    return detection.Detection(world=o["world"], models=o["models"], splits=o["splits"],
                               prompts_n=o["prompts_n"] or detection.Detection.prompts_n, tune_n=o["tune_n"],
                               sample_steps=o["sample_steps"], out=o["out"] or detection.Detection.out,
                               device=o["device"], dtype=o["dtype"] or "float32", progress=o["progress"],
                               command=o["command"])


def ablation_job(o):
    quick = QUICK if o["quick"] else {}
    return ablation.Ablation(world=o["world"], models=o["models"], variants=o["variants"],
                             seeds=quick.get("seeds", o["seeds"]), splits=o["splits"],
                             prompts_n=o["prompts_n"] or quick.get("prompts_n", ablation.Ablation.prompts_n),
                             collect_prompts=o["collect_prompts"], sample_steps=o["sample_steps"],
                             max_steps=o["max_steps"], out=o["out"] or ablation.Ablation.out, device=o["device"],
                             dtype=o["dtype"] or "float32", progress=o["progress"], command=o["command"])


if __name__ == "__main__":
    cli.run(main)
