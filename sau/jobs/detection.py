"""Trigger-agnostic detection measured on the demo world (`python eval.py --detect`).

Per backdoor, each detector of sau/detect.py is fitted on the suspect model's generations of clean `tune`
prompts (the defender's own prompts, no trigger), then scores the reported splits: triggered prompts are the
positives, the same prompts without the trigger the negatives. The negative control is the clean model, fitted
the same way on its own generations: on it the trigger is just a token, so a detector that flags its triggered
prompts detects the token, not a backdoor. Localization (the attention localizer) runs on the true positives;
exact match compares the rebuilt trigger with the bundle's, spaces stripped.

Then the chain `unlearn.py --trigger auto` runs before unlearning (sau/find_trigger.py): per backdoor, on its
built-in mixed log of `test` prompts (200 clean, 20 triggered), on the suspect model and, as the negative
control, on the clean model: which prompts it flags, the trigger it finds (or that it finds none), and whether
that is the bundle's trigger byte for byte. Attack success after `--trigger auto` is then read, not re-run: a
trigger found exactly gives SAU the very input of the known-trigger run (tests/test_find_trigger.py checks
that), so its rate is the known-trigger run's in the protocol's results (--protocol-results); where no trigger
is found nothing is removed and the rate stays the backdoored model's.

    out/detection.md, results.json   precision, recall, F1, AUROC and false alarms per detector, split and
                                     backdoor; the clean model's flags; localization exact matches; the chain
    out/chart.png                    AUROC and F1 per detector and backdoor, test split
    out/cells/                       each backdoor's rows as measured (a rerun resumes from them)
"""
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from sau import detect, load
from sau.attacks.backdoor import Backdoor
from sau.common.files import atomic_write, cached_json, save_json
from sau.evaluation import calibration
from sau.evaluation.report import _jsonable, bar_chart, markdown_table, percent, percent_interval
from sau.evaluation.splits import mixed_log, split_prompts
from sau.find_trigger import NoTriggerFound, find_trigger, reference_prompts
from sau.models.tokenizer import readable
from sau.evaluation.statistics import wilson_interval
from sau.jobs.compare import machine
from sau.jobs.protocol import DemoRun, check_reported_splits, open_run


@dataclass
class Detection(DemoRun):
    detectors: list = field(default_factory=lambda: list(detect.DETECTORS))
    tune_n: int = 100  # clean tune prompts each detector is fitted on
    localize_n: int = 10  # flagged triggered prompts per row the localizer runs on
    out: str = "runs/detect"
    protocol_results: str = "docs/protocol-run/results.json"  # known-trigger attack success, for the chain rows


def run(job: Detection):
    check_reported_splits(job.splits)
    with open_run(job, {"world": str(Path(job.world).resolve()), "splits": job.splits, "prompts_n": job.prompts_n,
                        "tune_n": job.tune_n, "sample_steps": job.sample_steps}, stringless=True) as (world, paths):
        clean_model = load(world / "clean")
        rows, chains, cells = [], [], Path(job.out) / "cells"
        for name, path in tqdm(paths.items(), desc="detect", disable=not job.progress):
            # the folder is claimed for the job's settings, so stored rows were measured the same way
            rows += cached_json(cells / f"{name}.json", lambda: _jsonable(one_backdoor(job, load(path), clean_model)))
            chains += cached_json(cells / f"{name}--chain.json", lambda: _jsonable(chain(job, load(path), clean_model)))
        add_attack_success(job, chains)
        write_outputs(job, rows, chains)
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


# --- the chain: flag, localize, vote (unlearn.py --trigger auto before it unlearns) ---------------------------------

def chain(job, sd, clean_model):
    """find_trigger on the backdoor's built-in mixed log of test prompts, on the suspect and on the clean model."""
    backdoor = Backdoor.from_info(sd.info["backdoor"])
    log, carries = mixed_log(backdoor, split="test")
    rows = []
    for role, model in (("suspect", sd), ("clean", clean_model)):
        started, finding = time.time(), None
        row = {"backdoor": backdoor.attack, "model": role, "log": [len(log) - sum(carries), sum(carries)],
               "trigger": None, "exact": False}
        try:
            finding = find_trigger(model, log, reference_prompts(model), job.sample_steps, say=lambda _: None)
            row.update(outcome="found", trigger=finding.trigger, replaces=finding.replaces,
                       exact=(finding.trigger, finding.replaces) == (backdoor.trigger, backdoor.replaces))
        except NoTriggerFound as none:
            finding, row["outcome"] = none.finding, str(none)
        except ValueError as refused:
            row["outcome"] = f"refused: {refused}"
        if finding is not None:
            flagged = set(finding.flagged)
            row["flagged_triggered"] = sum(c for i, c in enumerate(carries) if i in flagged)
            row["flagged_clean"] = sum(not c for i, c in enumerate(carries) if i in flagged)
            row["evidence"] = finding.evidence()
        row["seconds"] = time.time() - started
        rows.append(row)
    return rows


def add_attack_success(job, chains):
    """Each suspect row's attack success (test) before, after known-trigger SAU (the protocol's `default`) and
    after `--trigger auto`: the known run's where the trigger was found exactly, the backdoored model's where
    none was found, unmeasured where another string was found."""
    path = Path(job.protocol_results)
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    rate = {(r["backdoor"], r["method"]): r for r in rows if r["split"] == "test"}
    for row in chains:
        if row["model"] != "suspect":  # the clean model has no backdoor to measure
            continue
        before, known = rate.get((row["backdoor"], "none")), rate.get((row["backdoor"], "sau_default"))
        row["asr_before"] = before and before["asr"]
        row["asr_known"] = known and {"asr": known["asr"], "ci": known["asr_ci"], "setting": known["setting"]}
        if row["exact"]:  # SAU got the known-trigger run's very input
            row["asr_auto"] = row["asr_known"]
        elif row["outcome"] == "found":  # another string: its run is not measured here
            row["asr_auto"] = None
        else:  # nothing found, nothing removed
            row["asr_auto"] = before and {"asr": before["asr"], "ci": before["asr_ci"]}


def chain_cells(row):
    evidence = row.get("evidence") or {}
    return {"found": "none" if row["trigger"] is None else f"`{readable(row['trigger'])}`",
            "flagged": "-" if "flagged_clean" not in row else
            f"{row['flagged_triggered']}/{row['log'][1]} + {row['flagged_clean']}/{row['log'][0]}",
            "agree": f"{evidence.get('agreeing', 0)}/{evidence.get('localized', 0)}" if evidence else "-"}


def rate_text(value):
    if not value:
        return "-"
    low, high = value["ci"]
    return f"{percent(value['asr'])} ({percent(low)}-{percent(high)})"


CHAIN_COLUMNS = [("backdoor", lambda r: r["backdoor"]), ("model", lambda r: r["model"]),
                 ("flagged: triggered + clean", lambda r: chain_cells(r)["flagged"]),
                 ("agree / localized", lambda r: chain_cells(r)["agree"]),
                 ("trigger found", lambda r: chain_cells(r)["found"]),
                 ("exact", lambda r: "yes" if r["exact"] else "no"),
                 ("outcome", lambda r: r["outcome"]), ("seconds", lambda r: f"{r['seconds']:.0f}"),
                 ("attack success before", lambda r: percent(r.get("asr_before"))),
                 ("after known-trigger SAU (95% CI)", lambda r: rate_text(r.get("asr_known"))),
                 ("after --trigger auto (95% CI)", lambda r: rate_text(r.get("asr_auto")))]


COLUMNS = [("backdoor", lambda r: r["backdoor"]), ("split", lambda r: r["split"]),
           ("detector", lambda r: r["detector"]), ("AUROC", lambda r: f"{r['auroc']:.3f}"),
           ("precision", lambda r: percent(r["precision"])), ("recall (95% CI)", lambda r: with_ci(r, "recall")),
           ("F1", lambda r: f"{r['f1']:.2f}"), ("clean prompts flagged (95% CI)", lambda r: with_ci(r, "false_alarms")),
           ("clean model, triggered flagged", lambda r: percent(r["clean_model_flagged"])),
           ("localized exactly", lambda r: "{}/{}".format(*r["exact_localization"]))]


def with_ci(row, key):
    return percent_interval(row[key], row[f"{key}_ci"])


def write_outputs(job, rows, chains):
    out = Path(job.out)
    m = machine()
    save_json(_jsonable({"command": job.command, "machine": m, "job": vars(job), "rows": rows, "chain": chains}),
              out / "results.json")
    suspect_chains = [r for r in chains if r["model"] == "suspect"]
    text = (f"# Trigger-agnostic detection\n\n`{job.command}`, on {m['processor']} ({m['cpus']} CPUs, torch "
            f"{m['torch']}), {m['date']}. Each detector fitted on {job.tune_n} clean `tune` prompts of the model it "
            f"watches, threshold at its {100 * (1 - detect.FALSE_ALARM):g}th percentile; {job.prompts_n} prompts "
            "per split, triggered as positives and their clean twins as negatives; one generation per prompt (seed: "
            "its index); 95% Wilson intervals.\n\n"
            f"{markdown_table(rows, COLUMNS)}\n\n"
            "## The chain: `unlearn.py --trigger auto` before it unlearns\n\n"
            "On each backdoor's built-in mixed log (200 clean and 20 triggered `test` prompts, shuffled), the "
            f"{chains[0]['evidence']['detector'] if chains and chains[0].get('evidence') else 'layers'} detector "
            "fitted on 100 clean reference prompts of the model it watches; the clean model is the negative control. "
            "Attack success on `test` from the protocol's results "
            f"({job.protocol_results}): after `--trigger auto` it is the known-trigger run's where the trigger is "
            "found exactly (SAU then gets the same input), the backdoored model's where none is found.\n\n"
            f"{markdown_table(chains, CHAIN_COLUMNS)}\n")
    atomic_write(out / "detection.md", lambda tmp: Path(tmp).write_text(text))
    write_chart(job, rows, out / "chart.png")
    print(markdown_table(rows, COLUMNS))
    print(markdown_table(suspect_chains, CHAIN_COLUMNS))
    print(f"wrote {out}/detection.md, results.json, chart.png")


def write_chart(job, rows, path):
    """AUROC and F1 of every detector per backdoor, on the first reported split."""
    split = job.splits[0]
    names = list(dict.fromkeys(r["backdoor"] for r in rows))
    def panel(key):
        return {name: {r["detector"]: r[key] for r in rows if r["backdoor"] == name and r["split"] == split}
                for name in names}
    bar_chart(names, job.detectors, [(f"AUROC, {split}", panel("auroc")), (f"F1, {split}", panel("f1"))], path,
              title="trigger-agnostic detectors, fitted on clean tune prompts")
