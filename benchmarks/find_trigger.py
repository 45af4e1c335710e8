"""The trigger-agnostic chain's cost: detection and localization on a 220-prompt log (the demo, CPU):

    python -m benchmarks.find_trigger [--repeats 3] [--out benchmarks/find_trigger.json]

Runs sau.find_trigger.find_trigger on the shipped hidden-trigger model (demo/pixel-hidden) and its log.txt
(200 clean and 20 triggered prompts) `repeats` times after one warm-up run, and reports the median, minimum and
maximum wall time, split into its steps: fitting the detector on the 100 reference prompts, scoring the log,
localizing. Every run must find the same trigger (the run is deterministic); the table says which it found.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from sau import load
from sau.common import cli
from sau.common.files import DEMO_DIR
from sau.common.prompts import read_prompts
from sau.find_trigger import find_trigger, reference_prompts
from sau.models.tokenizer import readable

from .harness import machine, publish

STEPS = ("fitting", "scoring", "localizing")  # find_trigger announces each step as it starts it


def one_run(sd, log, reference):
    """Seconds per step of one find_trigger run, and what it found."""
    marks = []
    def say(message):
        marks.append((message.split()[0], time.perf_counter()))
    start = time.perf_counter()
    finding = find_trigger(sd, log, reference, say=say)
    end = time.perf_counter()
    starts = [t for word, t in marks if word in ("fitting", "scoring")] + [marks[-1][1], end]
    return dict(zip(STEPS, [b - a for a, b in zip(starts, starts[1:])]), total=end - start), finding


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.find_trigger", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=cli.positive_int, default=3)
    p.add_argument("--out", default="benchmarks/find_trigger.json")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    started = time.time()
    sd = load(DEMO_DIR / "pixel-hidden")
    log, reference = read_prompts(DEMO_DIR / "pixel-hidden" / "log.txt"), reference_prompts(sd)
    one_run(sd, log, reference)  # warm-up
    runs, found = [], set()
    for _ in range(args.repeats):
        seconds, finding = one_run(sd, log, reference)
        runs.append(seconds)
        found.add((finding.trigger, len(finding.flagged), finding.localized))
    rows = [{"step": step, **{k: f(r[step] for r in runs) for k, f in
                              (("median_s", statistics.median), ("min_s", min), ("max_s", max))}}
            for step in (*STEPS, "total")]
    trigger, flagged, localized = sorted(found)[0]
    text = (f"find_trigger on demo/pixel-hidden's log ({len(log)} prompts), {args.repeats} runs after a warm-up, "
            f"{torch.get_num_threads()} threads; found `{readable(trigger)}` ({flagged} flagged, {localized} "
            f"localized){'' if len(found) == 1 else ' -- runs differed: ' + repr(found)}\n\n"
            "| step | median s | min s | max s |\n|---|--:|--:|--:|\n"
            + "\n".join(f"| {r['step']} | {r['median_s']:.1f} | {r['min_s']:.1f} | {r['max_s']:.1f} |" for r in rows))
    publish({"machine": machine(), "log_prompts": len(log), "reference_prompts": len(reference),
             "repeats": args.repeats, "runs": runs, "rows": rows, "found": readable(trigger),
             "wall_s": time.time() - started}, text, Path(args.out))


if __name__ == "__main__":
    cli.run(main)
