"""Trigger-agnostic detection measured on the demo world (`python eval.py --detect`).

Per backdoor, each detector of sau/detect.py is fitted on the suspect model's generations of clean `tune`
prompts (the defender's own prompts, no trigger), then scores the reported splits: triggered prompts are the
positives, the same prompts without the trigger the negatives. The negative control is the clean model, fitted
the same way on its own generations: on it the trigger is just a token, so a detector that flags its triggered
prompts detects the token, not a backdoor. Localization (the attention localizer) runs on the true positives;
exact match compares the rebuilt trigger with the bundle's, spaces stripped.

    out/detection.md, results.json   precision, recall, F1, AUROC and false alarms per detector, split and
                                     backdoor; the clean model's flags; localization exact matches
"""
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from sau import detect, load
from sau.attacks.backdoor import Backdoor
from sau.common.files import atomic_write, save_json
from sau.evaluation import calibration
from sau.evaluation.report import _jsonable, markdown_table, percent
from sau.evaluation.splits import split_prompts
from sau.evaluation.statistics import wilson_interval
from sau.jobs.compare import machine
from sau.jobs.protocol import DemoRun, check_reported_splits, open_run


@dataclass
class Detection(DemoRun):
    detectors: list = field(default_factory=lambda: list(detect.DETECTORS))
    tune_n: int = 100  # clean tune prompts each detector is fitted on
    localize_n: int = 10  # flagged triggered prompts per row the localizer runs on
    out: str = "runs/detect"


def run(job: Detection):
    check_reported_splits(job.splits)
    with open_run(job, {"world": str(Path(job.world).resolve()), "splits": job.splits, "prompts_n": job.prompts_n,
                        "tune_n": job.tune_n, "sample_steps": job.sample_steps}) as (world, paths):
        clean_model = load(world / "clean")
        rows = []
        for name, path in tqdm(paths.items(), desc="detect", disable=not job.progress):
            rows += one_backdoor(job, load(path), clean_model)
        write_outputs(job, rows)
        return rows


def one_backdoor(job, sd, clean_model):
    backdoor = Backdoor.from_info(sd.info["backdoor"])
    tune = split_prompts("tune", backdoor, job.tune_n).clean
    fitted = {model: {name: detect.fit(name, maps(job, m, tune)) for name in job.detectors}
              for model, m in (("suspect", sd), ("clean", clean_model))}
    rows = []
    for split in job.splits:
        prompts = split_prompts(split, backdoor, job.prompts_n)
        triggered, clean = maps(job, sd, prompts.triggered), maps(job, sd, prompts.clean)
        control = maps(job, clean_model, prompts.triggered)
        for name in job.detectors:
            detector = fitted["suspect"][name]
            hits = detector.flagged(triggered).tolist()
            row = {"backdoor": backdoor.attack, "split": split, "detector": name,
                   **rates(hits, detector.flagged(clean).tolist()),
                   "auroc": calibration.auc(detector.score(triggered).numpy(), detector.score(clean).numpy()),
                   "clean_model_flagged": fitted["clean"][name].flagged(control).float().mean().item()}
            row["exact_localization"] = localize(job, sd, detector, backdoor,
                                                 [p for p, hit in zip(prompts.triggered, hits) if hit])
            rows.append(row)
    return rows


def maps(job, sd, prompts):
    return detect.prompt_maps(sd, prompts, list(range(len(prompts))), steps=job.sample_steps)


def rates(hits_positive, hits_negative):
    """Precision, recall and F1 of one detector's flags, and the share of clean prompts flagged; recall and false
    alarms with the counts they come from and 95% Wilson intervals (one generation per prompt, seed = its index)."""
    tp, fp = sum(hits_positive), sum(hits_negative)
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / len(hits_positive)
    f1 = 2 * precision * recall / (precision + recall) if precision and recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "false_alarms": fp / len(hits_negative),
            "counts": {"flagged_triggered": [tp, len(hits_positive)], "flagged_clean": [fp, len(hits_negative)]},
            "recall_ci": wilson_interval(tp, len(hits_positive)),
            "false_alarms_ci": wilson_interval(fp, len(hits_negative))}


def localize(job, sd, detector, backdoor, flagged):
    """(exact matches, tried) of the attention localizer on up to localize_n flagged triggered prompts."""
    tried = flagged[:job.localize_n]
    exact = 0
    for prompt in tried:
        try:
            found, _ = detect.trigger_text(prompt, detect.trigger_span(
                detect.attention_localizer(sd, detector, prompt, steps=job.sample_steps)))
        except ValueError:  # offsets that cannot be mapped back: counted as a miss
            continue
        exact += found.strip() == backdoor.trigger.strip()
    return exact, len(tried)


COLUMNS = [("backdoor", lambda r: r["backdoor"]), ("split", lambda r: r["split"]),
           ("detector", lambda r: r["detector"]), ("AUROC", lambda r: f"{r['auroc']:.3f}"),
           ("precision", lambda r: percent(r["precision"])), ("recall (95% CI)", lambda r: with_ci(r, "recall")),
           ("F1", lambda r: f"{r['f1']:.2f}"), ("clean prompts flagged (95% CI)", lambda r: with_ci(r, "false_alarms")),
           ("clean model, triggered flagged", lambda r: percent(r["clean_model_flagged"])),
           ("localized exactly", lambda r: "{}/{}".format(*r["exact_localization"]))]


def with_ci(row, key):
    low, high = row[f"{key}_ci"]
    return f"{percent(row[key])} ({percent(low)}-{percent(high)})"


def write_outputs(job, rows):
    out = Path(job.out)
    m = machine()
    save_json(_jsonable({"command": job.command, "machine": m, "job": vars(job), "rows": rows}), out / "results.json")
    text = (f"# Trigger-agnostic detection\n\n`{job.command}`, on {m['processor']} ({m['cpus']} CPUs, torch "
            f"{m['torch']}), {m['date']}. Each detector fitted on {job.tune_n} clean `tune` prompts of the model it "
            f"watches, threshold at its {100 * (1 - detect.FALSE_ALARM):g}th percentile; {job.prompts_n} prompts "
            "per split, triggered as positives and their clean twins as negatives; one generation per prompt (seed: "
            "its index); 95% Wilson intervals.\n\n"
            f"{markdown_table(rows, COLUMNS)}\n")
    atomic_write(out / "detection.md", lambda tmp: Path(tmp).write_text(text))
    print(markdown_table(rows, COLUMNS))
    print(f"wrote {out}/detection.md, results.json")
