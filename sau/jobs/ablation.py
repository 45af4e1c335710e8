"""SAU's ablation (`python eval.py --ablation`): which of the method's parts change the outcome.

Each variant is the `default` recipe with one part switched off, at equal steps, unlearned with several seeds
(the seed draws the collection prompts, the pool and every batch) on every demo backdoor, and measured on the
reported splits (`test`, `ood`; sau/evaluation/splits.py). Attention on/off x mask on/off x eta {0, 1} has six
distinct cells, not eight: without the attention term there is no mask to switch. `invert` is the default recipe
after the trigger's inversion, the reconstruction of the paper's "latent space manipulation". Names:
no-mask (M = ones), no-attention (a = 0), eta0 (the distillation target is the clean prediction itself), and
their combinations.

    out/
      cells/BACKDOOR--VARIANT--SEED.json   one unlearning, measured; a rerun skips the cells already there
      ablation.md, ablation.json           rates pooled over seeds with 95% Wilson intervals, the per-seed
                                           counts, and exact McNemar tests of each variant against `default`
"""
import json
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from sau import load
from sau.attacks.backdoor import Backdoor
from sau.common.cli import DTYPES
from sau.common.files import atomic_write, cached_json, save_json
from sau.evaluation import metrics
from sau.evaluation.prompts import builtin_prompts
from sau.evaluation.report import _jsonable, markdown_table, percent
from sau.evaluation.splits import split_prompts
from sau.evaluation.statistics import paired_comparison, rate_from_outcomes
from sau.jobs.compare import machine
from sau.jobs.protocol import DemoRun, check_reported_splits, mean, open_run, outcomes
from sau.method import RECIPES, remove_backdoor

# name -> (overrides of the `default` recipe, invert first, the variant it differs from in one part: its p-value
# is against that one). `default` has no spatial mask since the ablation showed none of its effect; `mask` puts
# it back, and `mask-invert` is the recipe `--invert` was measured with before that.
VARIANTS = {
    "default": ({}, False, None),
    "mask": ({"spatial_mask": True}, False, "default"),
    "no-attention": ({"attention_weight": 0.0}, False, "default"),
    "eta0": ({"negative_guidance": 0.0}, False, "default"),
    "mask-eta0": ({"spatial_mask": True, "negative_guidance": 0.0}, False, "eta0"),
    "no-attention-eta0": ({"attention_weight": 0.0, "negative_guidance": 0.0}, False, "eta0"),
    "invert": ({}, True, "default"),
    "mask-invert": ({"spatial_mask": True}, True, "mask"),
}
# The text-encoder route (Rickrolling) has none of these parts: only `default` runs there.
TEXT_ROUTE_VARIANTS = ("default",)


@dataclass
class Ablation(DemoRun):
    variants: list = field(default_factory=lambda: list(VARIANTS))
    prompts_n: int = 200  # prompts per split and backdoor
    out: str = "runs/ablation"


def run(job: Ablation):
    """Every (backdoor, variant, seed) cell, then the table. Returns the table's rows."""
    check(job)
    settings = {"world": str(Path(job.world).resolve()), "splits": job.splits, "prompts_n": job.prompts_n,
                "collect_prompts": job.collect_prompts, "sample_steps": job.sample_steps, "max_steps": job.max_steps,
                "dtype": job.dtype}
    with open_run(job, settings) as (world, paths):
        names = list(paths)
        classifier = metrics.load_classifier(world / "classifier.safetensors", job.device)
        cells = [(name, variant, seed) for name in names for variant in job.variants for seed in range(job.seeds)]
        bar = tqdm(total=len(cells), desc="ablation", disable=not job.progress, dynamic_ncols=True)
        results, suspects = {}, {}

        def suspect(name):  # measured once per backdoor, and only if one of its cells is still to run
            if name not in suspects:
                suspects[name] = measure_suspect(job, name, paths[name], classifier)
            return suspects[name][0]

        for name, variant, seed in cells:
            results[name, variant, seed] = cached_json(cell_path(job, name, variant, seed), lambda: _jsonable(
                run_cell(job, paths[name], suspect(name), variant, seed, classifier)))
            bar.update(1)
        bar.close()
        for name in names:  # the backdoored model itself, the row every variant starts from
            stored = cell_path(job, name, "none")
            if name not in suspects and stored.is_file():
                results[name, "none", 0] = json.loads(stored.read_text())
            else:  # measured in this run: as saved (the file is rank 0's to write under torchrun)
                measured = suspects.get(name) or measure_suspect(job, name, paths[name], classifier)
                results[name, "none", 0] = measured[1]
        rows = table_rows(job, names, results)
        write_outputs(job, rows, results)
    return rows


def check(job):
    unknown = [v for v in job.variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown ablation term {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    if "default" not in job.variants:
        raise ValueError("the ablation compares every variant with 'default': include it")
    if job.seeds < 1:
        raise ValueError(f"--seeds must be at least 1, not {job.seeds}")
    if job.prompts_n < 2:
        raise ValueError(f"--prompts-n must be at least 2, not {job.prompts_n}")
    check_reported_splits(job.splits)


# --- one cell -------------------------------------------------------------------------------------------------------

def cell_path(job, name, variant, seed=None):
    return Path(job.out) / "cells" / (f"{name}--{variant}" + ("" if seed is None else f"--{seed}") + ".json")


def measure_suspect(job, name, path, classifier):
    """The backdoored model on each split: (its clean images, the reference the variants' drift is measured
    against; its rates, saved as the backdoor's `none` cell and returned as the file holds them)."""
    sd = load(path, device=job.device, dtype=DTYPES[job.dtype])
    backdoor = Backdoor.from_info(sd.info["backdoor"])
    clean_images, cell = {}, {"backdoor": backdoor.info(), "variant": "none", "seed": 0, "site": None,
                              "optimizer_steps": 0, "splits": {}}
    for split in job.splits:
        prompts = split_prompts(split, backdoor, job.prompts_n)  # its own trigger placements (ood)
        cell["splits"][split], _, clean_images[split] = metrics.evaluate_defense(
            sd, prompts.placed(backdoor), prompts.clean, prompts.asked, classifier, steps=job.sample_steps)
    save_json(_jsonable(cell), cell_path(job, name, "none"))
    return clean_images, json.loads(json.dumps(_jsonable(cell), ensure_ascii=False))


def run_cell(job, path, suspect, variant, seed, classifier):
    """Unlearn the backdoor with one variant and seed, and measure it on every split."""
    overrides, invert, _ = VARIANTS[variant]
    sd = load(path, device=job.device, dtype=DTYPES[job.dtype])
    backdoor = Backdoor.from_info(sd.info["backdoor"])
    recipe = replace(RECIPES["default"], **overrides)
    if job.max_steps:
        recipe = replace(recipe, steps=min(recipe.steps, job.max_steps),
                         text_steps=min(recipe.text_steps, job.max_steps))
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="ablation-") as run_dir:
        removal = remove_backdoor(sd, backdoor, builtin_prompts(sd, job.collect_prompts, seed), recipe, run_dir,
                                  invert=invert, seed=seed, steps=recipe.steps if invert else None,
                                  sample_steps=job.sample_steps, progress=False)
    cell = {"backdoor": backdoor.info(), "variant": variant, "seed": seed, "site": removal.site,
            "recipe": vars(recipe), "invert": invert, "optimizer_steps": removal.trainer.steps,
            "seconds": time.time() - started, "splits": {}}
    for split in job.splits:
        prompts = split_prompts(split, backdoor, job.prompts_n)
        result, _, _ = metrics.evaluate_defense(sd, prompts.placed(backdoor), prompts.clean, prompts.asked,
                                                classifier, original=suspect[split],
                                                steps=job.sample_steps)
        cell["splits"][split] = result
    return cell


# --- the table ------------------------------------------------------------------------------------------------------

def compared_with(job, variant):
    """The variant this one differs from in one part (the backdoored model, `none`, against `default`), if it
    ran; None for `default` itself."""
    against = "default" if variant == "none" else VARIANTS[variant][2]
    return against if against in job.variants else None


def table_rows(job, names, results):
    rows, key = [], "triggered_target"
    for name in names:
        for split in job.splits:
            for variant in ["none", *job.variants]:
                # the backdoored model is deterministic: one measurement, paired with every seed of `default`
                cells = [results[name, variant, 0 if variant == "none" else s] for s in range(job.seeds)]
                if variant not in ("none", *TEXT_ROUTE_VARIANTS) and cells[0]["site"] == "text_encoder":
                    continue
                rate = rate_from_outcomes(outcomes(cells[:1] if variant == "none" else cells, split, key))
                against = compared_with(job, variant)
                p_value = None
                if against:
                    reference = [results[name, against, s] for s in range(job.seeds)]
                    p_value = paired_comparison(sum(outcomes(cells, split, key), []),
                                                sum(outcomes(reference, split, key), []))["p_value"]
                rows.append({"backdoor": name, "split": split, "variant": variant, "asr": rate["pooled"],
                             "asr_ci": (rate["low"], rate["high"]),
                             "asr_counts": list(zip(rate["successes"], rate["trials"])),
                             "compared_with": against, "p_value": p_value,
                             "clean_accuracy": mean(c["splits"][split].get("clean_accuracy") for c in cells),
                             "unasked_drift_tvd": mean(c["splits"][split].get("unasked_drift_tvd") for c in cells),
                             "unasked_flip_rate": mean(c["splits"][split].get("unasked_flip_rate") for c in cells),
                             "steps": cells[0]["optimizer_steps"]})
    return rows


COLUMNS = [("backdoor", lambda r: r["backdoor"]), ("split", lambda r: r["split"]),
           ("variant", lambda r: r["variant"]),
           ("attack success (95% CI)", lambda r: f"{percent(r['asr'])} ({percent(r['asr_ci'][0])}-"
                                                 f"{percent(r['asr_ci'][1])})"),
           ("per seed", lambda r: " ".join(f"{k}/{n}" for k, n in r["asr_counts"])),
           ("McNemar p (against)", lambda r: "-" if r["p_value"] is None else
            f"{r['p_value']:.3g} ({r['compared_with']})"),
           ("clean accuracy", lambda r: percent(r["clean_accuracy"])),
           ("unasked drift: TVD / flips", lambda r: "-" if r["unasked_drift_tvd"] is None else
            f"{r['unasked_drift_tvd']:.3f} / {percent(r['unasked_flip_rate'])}"),
           ("steps", lambda r: str(r["steps"]))]


def write_outputs(job, rows, results):
    out = Path(job.out)
    summary = {"command": job.command, "machine": machine(), "seeds": job.seeds, "splits": job.splits,
               "prompts_per_split": job.prompts_n, "max_steps": job.max_steps, "rows": rows,
               "cells": {"--".join(map(str, key)): cell for key, cell in results.items()}}
    save_json(_jsonable(summary), out / "ablation.json")
    table = markdown_table(rows, COLUMNS)
    m = summary["machine"]
    text = (f"# SAU ablation: {job.seeds} seeds, {job.prompts_n} prompts per split\n\n`{job.command}`, on "
            f"{m['processor']} ({m['cpus']} CPUs, torch {m['torch']}), {m['date']}.\n\n{table}\n")
    atomic_write(out / "ablation.md", lambda tmp: Path(tmp).write_text(text))
    print(table)
    print(f"wrote {out}/ablation.md, ablation.json")
