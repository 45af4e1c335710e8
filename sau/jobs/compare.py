"""A cleaned model against its original (`python eval.py --model M --original O ...`), for any SD model: the
trigger's effect, CLIP score and similarity and FD to the original's images, and attack success where a
detector applies. Writes results.json (every number, the command and the machine), table.md and chart.png to
`out`. Also the input checks the demo-world jobs share (sau/jobs/protocol.py, sau/jobs/ablation.py).
"""
import datetime
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from sau import distributed, load
from sau.attacks.backdoor import Backdoor
from sau.common.cli import DTYPES
from sau.common.files import atomic_write, save_json
from sau.common.prompts import MAX_PROMPTS, read_prompts
from sau.common.state import CheckpointError
from sau.evaluation import metrics
from sau.evaluation.report import _jsonable, bar_chart, markdown_table, percent
from sau.evaluation.scorer import CLIPScorer
from sau.models.compile import compile_model
from sau.weights.bundle import is_bundle

SHIPPED_BACKDOORS = ("pixel", "style", "object", "tpa")
NO_TRIGGER_STRING = ("semantic",)


@dataclass
class Comparison:
    """A cleaned model against its original; the fields are eval.py's flags."""
    model: str  # the cleaned model: a bundle, or any checkpoint weights_convert.py reads
    original: str = None  # the suspect model it was cleaned from
    trigger: str = None  # the trigger itself (escapes already decoded)
    replaces: str = None  # the letter a homoglyph trigger stands in for
    clip: str = None  # a CLIP scorer bundle
    prompts: str = None  # a text file, one prompt per line
    prompts_n: int = None  # use only the first n prompts
    max_prompts: int = MAX_PROMPTS  # refuse a prompts file with more
    sample_steps: int = metrics.EVAL_STEPS
    out: str = "runs/eval"
    device: str = "cpu"
    dtype: str = None  # a name in sau.common.cli.DTYPES; None: float32 on a CPU (half-precision storage computes
    # badly there) and the model's stored precision elsewhere
    progress: bool = True
    compile: bool = False  # torch.compile the UNets
    command: str = ""  # the command line, recorded with the results


def run(job: Comparison):
    """The comparison `job` asks for; writes its outputs and returns the result rows."""
    for name in ("prompts_n", "sample_steps"):
        if getattr(job, name) is not None and getattr(job, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    return against_original(job)


# --- inputs -----------------------------------------------------------------------------------------------------

def resolve_backdoored(world, name):
    """A backdoored bundle: a name in the world folder (pixel, style...) or a path; it must record its backdoor."""
    path = next((p for p in (Path(world) / name, Path(name)) if is_bundle(p)), None)
    if path is None:
        raise FileNotFoundError(f"no backdoored model {name!r} in {world} (nor a bundle at that path)")
    if not recorded_backdoor(path):
        raise ValueError(f"{path} records no backdoor; eval.py compares the removal of known backdoors")
    return path


def default_models(world, stringless=False):
    """The backdoors the world's manifest lists, else the shipped names present; not those without a trigger
    string (the semantic one), which no removal method here can be given, unless `stringless` (trigger-agnostic
    detection needs no string)."""
    manifest = Path(world) / "MANIFEST.json"
    names = list(json.loads(manifest.read_text()).get("backdoors", {})) if manifest.is_file() else []
    names = names or [n for n in SHIPPED_BACKDOORS if is_bundle(Path(world) / n)]
    has_string = lambda n: recorded_backdoor(Path(world) / n).get("attack") not in NO_TRIGGER_STRING
    names = [n for n in names if stringless or has_string(n)]
    if not names:
        raise FileNotFoundError(f"{world} holds no backdoored models; train them with `python train.py backdoors`")
    return names


def recorded_backdoor(path):
    """The backdoor a bundle's config records ({} if none or no bundle)."""
    config = Path(path) / "config.json"
    return json.loads(config.read_text()).get("info", {}).get("backdoor", {}) if config.is_file() else {}


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
    """Where a result was measured; under torchrun also how many processes made it (threads are per process)."""
    processes = {"processes": distributed.world_size()} if distributed.world_size() > 1 else {}
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(), **processes,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


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
    prompts = read_prompts(job.prompts, job.max_prompts)[:job.prompts_n or None]
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
    rows, reference = [], None
    for label, sd in (("original", original), ("cleaned", cleaned)):  # each generation shows its progress bar
        with metrics.measure_cost(job.device) as cost:
            result, _, clean = metrics.evaluate_defense(sd, backdoor, prompts, scorer=scorer, original=reference,
                                                        references=reference, steps=job.sample_steps,
                                                        progress=job.progress and label)
        reference = clean if reference is None else reference
        info = sd.info.get("unlearned", {})
        rows.append({"model": label, "path": str(job.model if label == "cleaned" else job.original),
                     "backdoor": backdoor.info(), "method": label, "label": label, **result,
                     "clip_similarity": result.get("clip_similarity", 1.0), "steps": info.get("steps", "n/a"),
                     "changes": info.get("site", "n/a" if label == "cleaned" else "nothing"),
                     "seconds": cost["seconds"], "peak_memory_mb": cost["peak_memory_mb"],
                     "memory_scope": cost["memory_scope"]})
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


COLUMNS = [("model", lambda r: r["label"]), ("attack success", lambda r: percent(r["asr"])),
           ("target w/o trigger", lambda r: percent(r.get("clean_target_rate"))),
           ("trigger effect", lambda r: number(r.get("trigger_effect"))),
           ("CLIP score", lambda r: number(r.get("clip_score"), 2)),
           ("CLIP sim. to original", lambda r: number(r.get("clip_similarity"))),
           ("FD to original", lambda r: number(r.get("frechet"), 4)), ("changes", lambda r: str(r["changes"])),
           ("steps", lambda r: str(r["steps"])), ("time (s)", lambda r: f"{r['seconds']:.1f}"),
           ("peak mem. (MB)", lambda r: number(r.get("peak_memory_mb"), 0))]


def write_outputs(job, rows, n, title, panels, groups, series):
    """results.json (every number, the command and the machine), table.md and chart.png in job.out."""
    out = Path(job.out)
    chart = [(panel_title, {g: {r["label"]: r.get(key) for r in rows} for g in groups}, *axis)
             for panel_title, key, *axis in panels]
    results = {"command": job.command, "machine": machine(), "prompts": n, "sample_steps": job.sample_steps,
               "rows": rows}
    save_json(_jsonable(results), out / "results.json")
    table = markdown_table(rows, COLUMNS)
    m = results["machine"]
    text = (f"# {title}\n\n`{job.command}`, on {m['processor']} ({m['cpus']} CPUs, {m['threads']} torch thread"
            f"{'s' if m['threads'] > 1 else ''}, torch {m['torch']}), {m['date']}.\n\n{table}\n\n![chart](chart.png)\n")
    atomic_write(out / "table.md", lambda tmp: Path(tmp).write_text(text))
    bar_chart(groups, series, chart, out / "chart.png", title=title)
    print(table)
    print(f"wrote {out}/table.md, results.json, chart.png")
