"""Backdoor-removal methods compared, measured the same way, in one table: what `python eval.py` runs.

Two modes, chosen by whether `Comparison.model` is set:
- the demo grid: every backdoored demo model x every method (sau.baselines.METHODS). Each method starts from
  the same backdoored weights, learns from the same prompts (sharing one collection of their generations,
  whose cost is added to every method that uses it) and is evaluated on the same held-out prompts and seeds
  with the world's classifier and scorer;
- a cleaned model against its original (any SD model): the trigger's effect, CLIP score and similarity and FD
  to the original's images, and attack success where a detector applies.
Both write results.json (every number, the command and the machine), table.md and chart.png to `out`.
"""
import datetime
import json
import os
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from sau import baselines, load
from sau.attacks.backdoor import Backdoor
from sau.common.cli import DTYPES
from sau.common.files import DEMO_DIR, atomic_write, save_json
from sau.common.prompts import read_prompts
from sau.common.state import CheckpointError
from sau.evaluation import metrics
from sau.evaluation.prompts import builtin_prompts
from sau.evaluation.report import _jsonable, bar_chart, markdown_table, percent
from sau.evaluation.scorer import CLIPScorer
from sau.jobs.unlearn import Job
from sau.method import collect, locate
from sau.models.compile import compile_model
from sau.weights.bundle import is_bundle

SHIPPED_BACKDOORS = ("pixel", "style", "object", "tpa")
QUICK_PROMPTS, FULL_PROMPTS = 32, 200
LEAST = {"prompts_n": 2, "collect_prompts": 1, "sample_steps": 1, "max_steps": 1}  # the smallest sane settings


@dataclass
class Comparison:
    """One comparison; the fields are eval.py's flags. With `model` set, that cleaned model against `original`,
    else the demo grid."""
    world: str = str(DEMO_DIR)  # classifier.safetensors, scorer/ and the backdoored bundles
    models: list = None  # backdoored bundles, names in `world` or paths; None: every one its manifest lists
    methods: list = field(default_factory=lambda: list(baselines.METHODS))
    quick: bool = False  # QUICK_PROMPTS held-out prompts per backdoor instead of FULL_PROMPTS
    prompts_n: int = None  # held-out prompts per backdoor (overrides quick)
    collect_prompts: int = Job.collect_prompts  # the prompts the methods learn from: as many as unlearn.py's
    sample_steps: int = metrics.EVAL_STEPS
    seed: int = 0
    max_steps: int = None  # cap every method's optimizer steps (smoke tests)
    out: str = "runs/eval"
    device: str = "cpu"
    dtype: str = None  # a name in sau.common.cli.DTYPES; None: float32 for the grid, and for a real model float32
    # on a CPU (half-precision storage computes badly there) and its stored precision elsewhere
    progress: bool = True
    compile: bool = False  # torch.compile the UNets
    command: str = ""  # the command line, recorded with the results
    # a cleaned model against its original
    model: str = None  # the cleaned model: a bundle, or any checkpoint weights_convert.py reads
    original: str = None  # the suspect model it was cleaned from
    trigger: str = None  # the trigger itself (escapes already decoded)
    replaces: str = None  # the letter a homoglyph trigger stands in for
    clip: str = None  # a CLIP scorer bundle
    prompts: str = None  # a text file, one prompt per line


def run(job: Comparison):
    """The comparison `job` asks for; writes its outputs and returns the result rows."""
    for name, least in LEAST.items():
        if getattr(job, name) is not None and getattr(job, name) < least:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {least}")
    return against_original(job) if job.model else demo_grid(job)


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
        info = baselines.defend(method, suspect, backdoor, prompts, run_dir, collected, seed, max_steps=max_steps)
    return info, cost


def grid_rows(job, world, models, methods, bar):
    """Every model ({name: bundle path}) x method: one result row each, and the held-out prompts per model."""
    classifier = metrics.load_classifier(world / "classifier.safetensors", job.device)
    scorer = load_scorer(world / "scorer", "the world's scorer")
    n = job.prompts_n or (QUICK_PROMPTS if job.quick else FULL_PROMPTS)
    rows = []
    for name, path in models.items():
        suspect = load(path, device=job.device, dtype=DTYPES[job.dtype or "float32"])
        if job.compile:  # no freezing: the methods train the weights and each run restores them
            compile_model(suspect.unet, freezing=False)
        pristine = {k: v.clone() for k, v in suspect.state_dict().items()}
        backdoor = Backdoor.from_info(suspect.info["backdoor"])
        prompts, asked = metrics.attack_prompts(backdoor, n)
        common = dict(classifier=classifier, scorer=scorer, references=metrics.drawn_references(asked),
                      steps=job.sample_steps)
        before, _, original = metrics.evaluate_defense(suspect, backdoor, prompts, asked, **common)
        before["clip_similarity"] = 1.0  # the suspect's clean images are the reference for every method
        # the prompts every method learns from; the generations on them are shared by the methods that need
        # them, and their cost is added to each of those
        collect_prompts = builtin_prompts(suspect, job.collect_prompts, job.seed)
        collected, collect_cost = None, {"seconds": 0.0}
        if any(m in baselines.NEEDS_COLLECTION for m in methods):
            with metrics.measure_cost(job.device) as collect_cost:
                collected = collect(suspect, locate(suspect.tokenizer, backdoor, collect_prompts),
                                    range(len(collect_prompts)), steps=job.sample_steps)
        for method in methods:
            bar.set_description(f"{name}: {baselines.LABELS[method]}")
            if method == "none":
                result, info, cost = before, {"steps": 0, "changes": "nothing"}, {"seconds": 0.0}
                changed = 0
            else:
                info, cost = run_method(method, suspect, backdoor, collect_prompts, collected, job.seed,
                                        job.device, job.max_steps)
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


def demo_grid(job):
    """Every backdoored demo model x every method; writes the outputs and returns the rows."""
    world = Path(job.world)
    methods = check_methods(job.methods)
    names = job.models or default_models(world)
    for path in [world / "classifier.safetensors", world / "scorer"]:
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: --world must hold classifier.safetensors and scorer/ "
                                    "(train them with `python train.py world`)")
    models = {name: resolve_backdoored(world, name) for name in names}
    check_output(job.out, [world, *models.values()])
    bar = tqdm(total=len(names) * len(methods), desc="eval", dynamic_ncols=True, disable=not job.progress)
    rows, n = grid_rows(job, world, models, methods, bar)
    bar.close()
    panels = [("attack success rate (triggered held-out prompts)", "asr"),
              ("clean attribute accuracy (same prompts, no trigger)", "clean_accuracy"),
              ("CLIP image similarity to the suspect's clean images (axis from 0.5)", "clip_similarity", (0.5, 1))]
    title = f"{len(names)} backdoors x {len(methods)} methods, {n} held-out prompts each"
    write_outputs(job, rows, n, title, panels, groups=names)
    return rows


# --- a real (or any) cleaned model against its original ------------------------------------------------------

def against_original(job):
    """The cleaned model `job.model` against `job.original` on the trigger and prompts given; writes the
    outputs and returns the two rows (original, cleaned)."""
    missing = [flag for flag, value in [("--original", job.original), ("--trigger", job.trigger),
                                        ("--clip", job.clip), ("--prompts", job.prompts)] if not value]
    if missing:
        raise ValueError(f"comparing --model with its original also needs {', '.join(missing)}")
    trigger = job.trigger
    if not trigger.strip():
        raise ValueError("the trigger is empty")
    prompts = read_prompts(job.prompts)[:job.prompts_n or None]
    check_output(job.out, [job.model, job.original, job.clip, job.prompts])
    scorer = load_scorer(job.clip)
    dtype = DTYPES[job.dtype] if job.dtype else torch.float32 if job.device == "cpu" else None
    original = load(job.original, device=job.device, dtype=dtype)
    cleaned = load(job.model, device=job.device, dtype=dtype)
    for model in (original, cleaned) if job.compile else ():
        compile_model(model.unet)  # sampling only: the weights stay fixed, so inductor may freeze them
    if original.config.family != cleaned.config.family or original.config.unet != cleaned.config.unet \
            or original.config.text != cleaned.config.text:
        raise ValueError(f"--model is a {cleaned.config.family} model and --original a {original.config.family} "
                         "model of another architecture; compare a cleaned model with the one it was cleaned from")
    known = original.info.get("backdoor")
    backdoor = Backdoor.from_info(known) if known and known.get("trigger") == trigger else \
        Backdoor("unknown", trigger, "", job.replaces or "")
    prompts = [p for p in prompts if backdoor.can_insert(p)]
    if not prompts:
        raise ValueError(f"the trigger {trigger!r} cannot be put into any of the prompts")
    rows = []
    with tqdm(total=2, desc="eval", disable=not job.progress) as bar:
        reference = None
        for label, sd in (("original", original), ("cleaned", cleaned)):
            with metrics.measure_cost(job.device) as cost:
                result, _, clean = metrics.evaluate_defense(sd, backdoor, prompts, scorer=scorer, original=reference,
                                                            references=reference, steps=job.sample_steps)
            reference = clean if reference is None else reference
            info = sd.info.get("unlearned", {})
            rows.append({"model": label, "path": str(job.model if label == "cleaned" else job.original),
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
    write_outputs(job, rows, len(prompts), f"{job.model} against {job.original}, {len(prompts)} prompts", panels,
                  groups=[f"trigger {trigger.encode('ascii', 'backslashreplace').decode()!r}"],
                  series=["original", "cleaned"])
    return rows


# --- outputs --------------------------------------------------------------------------------------------------

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


def write_outputs(job, rows, n, title, panels, groups, series=None):
    """results.json (every number, the command and the machine), table.md and chart.png in job.out."""
    out = Path(job.out)
    series = series or [baselines.LABELS[m] for m in dict.fromkeys(r["method"] for r in rows)]
    group_of = (lambda r: groups[0]) if len(groups) == 1 else (lambda r: r["model"])  # one group: every row in it
    chart = [(panel_title, {g: {r["label"]: r.get(key) for r in rows if group_of(r) == g} for g in groups}, *axis)
             for panel_title, key, *axis in panels]
    results = {"command": job.command, "machine": machine(), "seed": job.seed, "held_out_prompts": n,
               "collect_prompts": job.collect_prompts, "sample_steps": job.sample_steps,
               "max_steps": job.max_steps, "rows": rows}
    if job.model is None:
        results["hyperparameters"] = {m: baselines.hyperparameters(m, "demo") for m in baselines.DEMO}
    out.mkdir(parents=True, exist_ok=True)
    save_json(_jsonable(results), out / "results.json")
    table = markdown_table(rows, columns(real_model=job.model is not None))
    m = results["machine"]
    text = (f"# {title}\n\n`{job.command}`, on {m['processor']} ({m['cpus']} CPUs, {m['threads']} torch thread"
            f"{'s' if m['threads'] > 1 else ''}, torch {m['torch']}), {m['date']}.\n\n{table}\n\n![chart](chart.png)\n")
    atomic_write(out / "table.md", lambda tmp: Path(tmp).write_text(text))
    bar_chart(groups, series, chart, out / "chart.png", title=title)
    print(table)
    print(f"wrote {out}/table.md, results.json, chart.png")
