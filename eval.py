"""Compare SAU with other backdoor-removal methods, measured the same way, in one table.

    python eval.py                        # every shipped demo backdoor x every method (sau/demo)
    python eval.py --quick                # the same grid on fewer held-out prompts
    python eval.py --models pixel,tpa --methods none,uce,sau_default --out runs/eval-small
    python eval.py --model CLEANED --original SUSPECT --trigger TEXT --clip CLIP --prompts FILE
    python eval.py --ablation --seeds 3           # SAU's parts switched off one by one (sau/jobs/ablation.py)

Writes table.md, results.json and chart.png (attack success and clean fidelity per method) to --out.
Methods: none (the backdoored model as shipped), uce, esd_x, concept_ablation (sau/baselines.py), sau_paper,
sau_default (sau/method.py's two recipes). Each starts from the same backdoored model, learns from the same
prompts, is timed together with the generations it learns from, and is evaluated on the same held-out prompts
and seeds. The comparison itself is sau/jobs/compare.py.
"""
import sys
from pathlib import Path

from sau.baselines import METHODS
from sau.common import cli
from sau.common.prompts import decode_escapes
from sau.jobs import ablation
from sau.jobs.compare import FULL_PROMPTS, QUICK_PROMPTS, Comparison, run
from sau.common.files import DEMO_DIR


def main():
    p = cli.Parser(description=__doc__)
    p.add_argument("--world", default=str(DEMO_DIR), help="the demo world folder: classifier.safetensors, scorer/ "
                   "and the backdoored bundles (default: the shipped sau/demo)")
    p.add_argument("--models", type=cli.comma_list, help="backdoored bundles, names in --world or paths, comma "
                   "separated (default: every backdoor the world's manifest lists)")
    p.add_argument("--methods", type=cli.comma_list, default=list(METHODS), help="comma separated, from "
                   + ", ".join(METHODS))
    p.add_argument("--quick", action="store_true", help=f"{QUICK_PROMPTS} held-out prompts per backdoor instead "
                   f"of {FULL_PROMPTS}")
    p.add_argument("--prompts-n", type=int, help="held-out prompts per backdoor (overrides --quick)")
    p.add_argument("--collect-prompts", type=int, default=Comparison.collect_prompts, help="prompts the methods "
                   "learn from (default: as many as unlearn.py collects on)")
    p.add_argument("--sample-steps", type=int, default=Comparison.sample_steps)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, help="cap every method's optimizer steps (smoke tests; the table "
                   "then no longer shows the methods' defaults)")
    p.add_argument("--out", default=Comparison.out)
    p.add_argument("--device", type=cli.device, default="cpu")
    p.add_argument("--dtype", choices=list(cli.DTYPES), help="compute precision (default: float32; a real model "
                   "on a GPU: its stored precision)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNets (see the README's Performance)")
    parts = p.add_argument_group("the SAU ablation (--ablation)")
    parts.add_argument("--ablation", action="store_true", help="SAU's default recipe with each part switched off")
    parts.add_argument("--variants", type=cli.comma_list, default=list(ablation.VARIANTS),
                       help="comma separated, from " + ", ".join(ablation.VARIANTS))
    parts.add_argument("--seeds", type=int, default=3, help="unlearning seeds per cell (default 3)")
    parts.add_argument("--splits", type=cli.comma_list, default=["test", "ood"], help="reported splits: test, ood")
    real_model = p.add_argument_group("a cleaned model against its original (any SD model)")
    real_model.add_argument("--model", help="the cleaned model (bundle, or any checkpoint weights_convert.py reads)")
    real_model.add_argument("--original", help="the suspect model it was cleaned from")
    real_model.add_argument("--trigger", help=r"the trigger (\uXXXX escapes allowed)")
    real_model.add_argument("--replaces", help="the letter a homoglyph trigger stands in for")
    real_model.add_argument("--clip", help="a CLIP scorer bundle (weights_convert.py converts a CLIP model)")
    real_model.add_argument("--prompts", help="a text file, one prompt per line")
    options = vars(p.parse_args())
    options["progress"] = not options.pop("no_progress")
    command = "python " + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    parts = {name: options.pop(name) for name in ("ablation", "variants", "seeds", "splits")}
    if parts.pop("ablation"):
        return ablation.run(ablation_job(options, parts, command))
    if options["trigger"] is not None:
        options["trigger"] = decode_escapes(options["trigger"])
    run(Comparison(**options, command=command))


def ablation_job(options, parts, command):
    """The ablation's settings from eval.py's flags; the comparison-only flags must be left alone."""
    alone = ("methods", "model", "original", "trigger", "replaces", "clip", "prompts", "compile")
    given = [f"--{name}" for name in alone if options[name] not in (None, False, list(METHODS))]
    if given:
        raise ValueError(f"{given[0]} does not apply to --ablation")
    n = options["prompts_n"] or (QUICK_PROMPTS if options["quick"] else FULL_PROMPTS)
    return ablation.Ablation(world=options["world"], models=options["models"], variants=parts["variants"],
                             seeds=parts["seeds"], splits=parts["splits"], prompts_n=n,
                             collect_prompts=options["collect_prompts"], sample_steps=options["sample_steps"],
                             max_steps=options["max_steps"], out=options["out"] if options["out"] != Comparison.out
                             else ablation.Ablation.out, device=options["device"],
                             dtype=options["dtype"] or "float32", progress=options["progress"], command=command)


if __name__ == "__main__":
    cli.run(main)
