"""Compare SAU with other backdoor-removal methods, measured the same way, in one table.

    python eval.py                        # every shipped demo backdoor x every method (sau/demo)
    python eval.py --quick                # the same grid on fewer held-out prompts
    python eval.py --models pixel,tpa --methods none,uce,sau_default --out runs/eval-small
    python eval.py --model CLEANED --original SUSPECT --trigger TEXT --clip CLIP --prompts FILE

Writes table.md, results.json and chart.png (attack success and clean fidelity per method) to --out.
Methods: none (the backdoored model as shipped), uce, esd_x, concept_ablation (sau/baselines.py), sau_paper,
sau_default (sau/method.py's two recipes). Each starts from the same backdoored model, learns from the same
prompts, is timed together with the generations it learns from, and is evaluated on the same held-out prompts
and seeds.
"""
import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from sau import baselines

from sau.common import cli

from sau.evaluation import metrics
from sau.models.compile import compile_model
from sau.attacks.inject import Backdoor
from sau.common.prompts import decode_escapes, read_prompts
from sau.weights.bundle import DEMO_DIR, CheckpointError, atomic_write, is_bundle, save_json
from sau.models.pipeline import StableDiffusion
from sau.evaluation.report import _jsonable, bar_chart, markdown_table, percent
from sau.method import collect, locate
from sau.evaluation.scorer import CLIPScorer
from sau.evaluation.prompts import builtin_prompts
from sau.jobs.unlearn import Job

SHIPPED_BACKDOORS = ("pixel", "style", "object", "tpa")
QUICK_PROMPTS, FULL_PROMPTS = 32, 200


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, like every other bad input
        cli.fail(message)


def split_list(text):
    return [item for item in text.replace(",", " ").split() if item]


# --- inputs -----------------------------------------------------------------------------------------------------

def resolve_backdoored(world, name):
    """A backdoored bundle: a name in the world folder (pixel, style...) or a path; it must record its backdoor."""
    path = next((p for p in (Path(world) / name, Path(name)) if is_bundle(p)), None)
    if path is None:
        raise FileNotFoundError(f"no backdoored model {name!r} in {world} (nor a bundle at that path)")
    if not json.loads((path / "config.json").read_text()).get("info", {}).get("backdoor"):
        raise ValueError(f"{path} records no backdoor; eval.py compares the removal of known backdoors")
    return path


def default_models(world):
    """The backdoors the world's manifest lists, else the shipped names present."""
    manifest = Path(world) / "MANIFEST.json"
    names = list(json.loads(manifest.read_text()).get("backdoors", {})) if manifest.is_file() else []
    names = names or [n for n in SHIPPED_BACKDOORS if is_bundle(Path(world) / n)]
    if not names:
        raise FileNotFoundError(f"{world} holds no backdoored models; train them with `python train.py backdoors`")
    return names


def check_methods(methods):
    unknown = [m for m in methods if m not in baselines.METHODS]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; choose from {', '.join(baselines.METHODS)}")
    if not methods:
        raise ValueError("no method given")
    return methods


def load_scorer(path, what="--clip"):
    try:
        return CLIPScorer.load(path)
    except CheckpointError as e:
        raise CheckpointError(f"{what} {path} is not a CLIP scorer bundle (convert a CLIP model with "
                              f"weights_convert.py): {e}") from None


def check_output(out, inputs):
    """The output folder must not be, or lie inside, any input."""
    out = Path(out).resolve()
    for path in inputs:
        path = Path(path).resolve()
        if out == path or path in out.parents:
            raise ValueError(f"the output folder {out} would write into the input {path}; choose another --out")


def machine():
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


# --- the demo grid --------------------------------------------------------------------------------------------

def changed_parameters(model, pristine):
    """How many of the model's parameters differ from the `pristine` state dict."""
    return sum(v.numel() for k, v in model.state_dict().items() if not torch.equal(v, pristine[k]))


def run_method(method, suspect, backdoor, prompts, collected, seed, device, max_steps=None):
    """Clean the suspect in place with `method`, in a throwaway run folder (nothing resumes); returns what the
    method reports and its cost. The caller restores the suspect's weights afterwards."""
    with tempfile.TemporaryDirectory(prefix=f"eval-{method}-") as run_dir, metrics.measure_cost(device) as cost:
        info = baselines.defend(method, suspect, backdoor, prompts, run_dir, collected, seed,
                                         max_steps=max_steps)
    return info, cost


def grid_rows(args, world, models, methods, bar):
    """Every model ({name: bundle path}) x method: one result row each."""
    classifier = metrics.load_classifier(world / "classifier.safetensors", args.device)
    scorer = load_scorer(world / "scorer", "the world's scorer")
    n = args.prompts_n or (QUICK_PROMPTS if args.quick else FULL_PROMPTS)
    rows = []
    for name, path in models.items():
        suspect = StableDiffusion.load(path, device=args.device, dtype=torch.float32)
        if args.compile:  # no freezing: the methods train the weights and each run restores them
            compile_model(suspect.unet, freezing=False)
        pristine = {k: v.clone() for k, v in suspect.state_dict().items()}
        backdoor = Backdoor.from_info(suspect.info["backdoor"])
        prompts, asked = metrics.attack_prompts(backdoor, n)
        common = dict(classifier=classifier, scorer=scorer, references=metrics.drawn_references(asked),
                      steps=args.sample_steps)
        before, _, original = metrics.evaluate_defense(suspect, backdoor, prompts, asked, **common)
        before["clip_similarity"] = 1.0  # the suspect's clean images are the reference for every method
        # the prompts every method learns from; the generations on them are shared by the methods that need
        # them, and their cost is added to each of those
        collect_prompts = builtin_prompts(suspect, args.collect_prompts, args.seed)
        collected, collect_cost = None, {"seconds": 0.0}
        if any(m in baselines.NEEDS_COLLECTION for m in methods):
            with metrics.measure_cost(args.device) as collect_cost:
                collected = collect(suspect, locate(suspect.tokenizer, backdoor, collect_prompts), range(len(collect_prompts)),
                                    steps=args.sample_steps)
        for method in methods:
            bar.set_description(f"{name}: {baselines.LABELS[method]}")
            if method == "none":
                result, info, cost = before, {"steps": 0, "changes": "nothing"}, {"seconds": 0.0}
                changed = 0
            else:
                info, cost = run_method(method, suspect, backdoor, collect_prompts, collected, args.seed,
                                        args.device, args.max_steps)
                result, _, _ = metrics.evaluate_defense(suspect, backdoor, prompts, asked, original=original,
                                                        **common)
                changed = changed_parameters(suspect, pristine)
                suspect.load_state_dict(pristine)  # every method starts from the same backdoored weights
            extra = collect_cost["seconds"] if method in baselines.NEEDS_COLLECTION else 0.0
            rows.append({"model": name, "backdoor": backdoor.info(), "method": method,
                         "label": baselines.LABELS[method], **result, **info, "changed_parameters": changed,
                         "method_seconds": cost["seconds"], "collect_seconds": extra,
                         "seconds": cost["seconds"] + extra, "peak_memory_mb": cost.get("peak_memory_mb"),
                         "memory_scope": cost.get("memory_scope")})
            bar.update(1)
            tqdm.write(row_line(rows[-1]))
    return rows, n


def row_line(r):
    return (f"{r['model']:>8} {r['label']:<17} attack success {percent(r['asr']):>6}  clean accuracy "
            f"{percent(r.get('clean_accuracy')):>6}  CLIP similarity {r.get('clip_similarity', 0):.3f}  "
            f"{r['seconds']:.1f} s")


def number(value, digits=3):
    return "n/a" if value is None else f"{value:.{digits}f}"


def columns(real_model=False):
    """(header, row -> cell) of the table; the demo grid has a classifier and drawn references to add."""
    first = ("model", lambda r: r["label"]) if real_model else \
        ("backdoor", lambda r: r["model"] + (f" ({r['backdoor']['attack']})" if r["model"] != r["backdoor"]["attack"]
                                               else ""))
    demo_only = [("clean accuracy", lambda r: percent(r.get("clean_accuracy")))] if not real_model else []
    fd = ("FD to original" if real_model else "FD to drawn", lambda r: number(r.get("frechet"), 4))
    return [first, *([("method", lambda r: r["label"])] if not real_model else []),
            ("attack success", lambda r: percent(r["asr"])),
            ("target w/o trigger", lambda r: percent(r.get("clean_target_rate"))),
            ("trigger effect", lambda r: number(r.get("trigger_effect"))), *demo_only,
            ("CLIP score", lambda r: number(r.get("clip_score"), 2)),
            ("CLIP sim. to " + ("original" if real_model else "suspect"), lambda r: number(r.get("clip_similarity"))),
            fd, ("changes", lambda r: str(r["changes"])), ("steps", lambda r: str(r["steps"])),
            ("time (s)", lambda r: f"{r['seconds']:.1f}"),
            ("peak mem. (MB)", lambda r: number(r.get("peak_memory_mb"), 0))]


def demo(args):
    world = Path(args.world)
    methods = check_methods(split_list(args.methods))
    names = split_list(args.models) if args.models else default_models(world)
    for path in [world / "classifier.safetensors", world / "scorer"]:
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: --world must hold classifier.safetensors and scorer/ "
                                    "(train them with `python train.py world`)")
    models = {name: resolve_backdoored(world, name) for name in names}
    check_output(args.out, [world, *models.values()])
    bar = tqdm(total=len(names) * len(methods), desc="eval", dynamic_ncols=True, disable=args.no_progress)
    rows, n = grid_rows(args, world, models, methods, bar)
    bar.close()
    panels = [("attack success rate (triggered held-out prompts)", "asr"),
              ("clean attribute accuracy (same prompts, no trigger)", "clean_accuracy"),
              ("CLIP image similarity to the suspect's clean images (axis from 0.5)", "clip_similarity", (0.5, 1))]
    title = f"{len(names)} backdoors x {len(methods)} methods, {n} held-out prompts each"
    write_outputs(args, rows, n, title, panels, groups=names)


# --- a real (or any) cleaned model against its original ------------------------------------------------------

def real(args):
    missing = [flag for flag, value in [("--original", args.original), ("--trigger", args.trigger),
                                        ("--clip", args.clip), ("--prompts", args.prompts)] if not value]
    if missing:
        raise ValueError(f"comparing --model with its original also needs {', '.join(missing)}")
    trigger = decode_escapes(args.trigger)
    if not trigger.strip():
        raise ValueError("the trigger is empty")
    prompts = read_prompts(args.prompts)[:args.prompts_n or None]
    check_output(args.out, [args.model, args.original, args.clip, args.prompts])
    from sau import load
    scorer = load_scorer(args.clip)
    dtype = torch.float32 if args.device == "cpu" else None  # half-precision storage computes badly on CPUs
    original = load(args.original, device=args.device, dtype=dtype)
    cleaned = load(args.model, device=args.device, dtype=dtype)
    for model in (original, cleaned) if args.compile else ():
        compile_model(model.unet)  # sampling only: the weights stay fixed, so inductor may freeze them
    if original.config.family != cleaned.config.family or original.config.unet != cleaned.config.unet \
            or original.config.text != cleaned.config.text:
        raise ValueError(f"--model is a {cleaned.config.family} model and --original a {original.config.family} "
                         "model of another architecture; compare a cleaned model with the one it was cleaned from")
    known = original.info.get("backdoor")
    backdoor = Backdoor.from_info(known) if known and known.get("trigger") == trigger else \
        Backdoor("unknown", trigger, "", args.replaces or "")
    prompts = [p for p in prompts if backdoor.can_insert(p)]
    if not prompts:
        raise ValueError(f"the trigger {trigger!r} cannot be put into any of the prompts")
    rows = []
    with tqdm(total=2, desc="eval", disable=args.no_progress) as bar:
        reference = None
        for label, sd in (("original", original), ("cleaned", cleaned)):
            with metrics.measure_cost(args.device) as cost:
                result, _, clean = metrics.evaluate_defense(sd, backdoor, prompts, scorer=scorer, original=reference,
                                                            references=reference, steps=args.sample_steps)
            reference = clean if reference is None else reference
            info = sd.info.get("unlearned", {})
            rows.append({"model": label, "path": str(args.model if label == "cleaned" else args.original),
                         "backdoor": backdoor.info(), "method": label, "label": label, **result,
                         "clip_similarity": result.get("clip_similarity", 1.0), "steps": info.get("steps", "n/a"),
                         "changes": info.get("site", "n/a" if label == "cleaned" else "nothing"),
                         "seconds": cost["seconds"], "peak_memory_mb": cost["peak_memory_mb"],
                         "memory_scope": cost["memory_scope"]})
            bar.update(1)
    panels = [("trigger effect: 1 - CLIP similarity of a triggered image to its clean twin", "trigger_effect"),
              ("CLIP image similarity to the original's clean images (axis from 0.5)", "clip_similarity", (0.5, 1))]
    if rows[0]["asr"] is not None:
        panels.insert(0, ("attack success rate", "asr"))
    write_outputs(args, rows, len(prompts), f"{args.model} against {args.original}, {len(prompts)} prompts", panels,
                  groups=[f"trigger {trigger.encode('ascii', 'backslashreplace').decode()!r}"],
                  series=["original", "cleaned"])


# --- outputs --------------------------------------------------------------------------------------------------

def write_outputs(args, rows, n, title, panels, groups, series=None, series_of=None, group_of=None):
    """results.json (every number, the command and the machine), table.md and chart.png in --out."""
    out = Path(args.out)
    series = series or [baselines.LABELS[m] for m in dict.fromkeys(r["method"] for r in rows)]
    series_of = series_of or (lambda r: r["label"])
    group_of = group_of or (lambda r: r["model"])
    if len(groups) == 1:  # every row in the one group
        group_of = lambda r: groups[0]
    chart = [(panel_title, {g: {series_of(r): r.get(key) for r in rows if group_of(r) == g} for g in groups}, *axis)
             for panel_title, key, *axis in panels]
    command = "python " + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    results = {"command": command, "machine": machine(), "seed": args.seed, "held_out_prompts": n,
               "collect_prompts": args.collect_prompts, "sample_steps": args.sample_steps,
               "max_steps": args.max_steps, "rows": rows}
    if args.model is None:
        results["hyperparameters"] = {m: baselines.hyperparameters(m, "demo") for m in baselines.DEMO}
    out.mkdir(parents=True, exist_ok=True)
    save_json(_jsonable(results), out / "results.json")
    table = markdown_table(rows, columns(real_model=args.model is not None))
    m = results["machine"]
    text = (f"# {title}\n\n`{command}`, on {m['processor']} ({m['cpus']} CPUs, {m['threads']} torch thread"
            f"{'s' if m['threads'] > 1 else ''}, torch {m['torch']}), {m['date']}.\n\n{table}\n\n![chart](chart.png)\n")
    atomic_write(out / "table.md", lambda tmp: Path(tmp).write_text(text))
    bar_chart(groups, series, chart, out / "chart.png", title=title)
    print(table)
    print(f"wrote {out}/table.md, results.json, chart.png")


def main():
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default=str(DEMO_DIR), help="the demo world folder: classifier.safetensors, scorer/ "
                   "and the backdoored bundles (default: the shipped sau/demo)")
    p.add_argument("--models", help="backdoored bundles, names in --world or paths, comma separated "
                   "(default: every backdoor the world's manifest lists)")
    p.add_argument("--methods", default=",".join(baselines.METHODS), help="comma separated, from "
                   + ", ".join(baselines.METHODS))
    p.add_argument("--quick", action="store_true", help=f"{QUICK_PROMPTS} held-out prompts per backdoor instead "
                   f"of {FULL_PROMPTS}")
    p.add_argument("--prompts-n", type=int, help="held-out prompts per backdoor (overrides --quick)")
    p.add_argument("--collect-prompts", type=int, default=Job.collect_prompts, help="prompts the methods learn "
                   "from (default: as many as unlearn.py collects on)")
    p.add_argument("--sample-steps", type=int, default=metrics.EVAL_STEPS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, help="cap every method's optimizer steps (smoke tests; the table "
                   "then no longer shows the methods' defaults)")
    p.add_argument("--out", default="runs/eval")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNets (see the README's Performance)")
    real_model = p.add_argument_group("a cleaned model against its original (any SD model)")
    real_model.add_argument("--model", help="the cleaned model (bundle, or any checkpoint weights_convert.py reads)")
    real_model.add_argument("--original", help="the suspect model it was cleaned from")
    real_model.add_argument("--trigger", help=r"the trigger (\uXXXX escapes allowed)")
    real_model.add_argument("--replaces", help="the letter a homoglyph trigger stands in for")
    real_model.add_argument("--clip", help="a CLIP scorer bundle (weights_convert.py converts a CLIP model)")
    real_model.add_argument("--prompts", help="a text file, one prompt per line")
    args = p.parse_args()
    for flag, least in (("prompts_n", 2), ("collect_prompts", 1), ("sample_steps", 1), ("max_steps", 1)):
        if getattr(args, flag) is not None and getattr(args, flag) < least:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least {least}")
    real(args) if args.model else demo(args)


if __name__ == "__main__":
    cli.run(main)
