"""Find an unknown trigger in a log of prompts: the chain from detection to the trigger SAU then removes.

A defender holds a suspect model and a log of what its users asked for, some of which may carry a trigger they
do not know. The chain, each step from sau/detect.py:

1. fit:      a detector on the suspect model's generations of the defender's own clean prompts (`reference`);
             no backdoored example is used;
2. flag:     every log prompt generated once and scored; those above the detector's threshold are flagged;
3. localize: the highest-scoring flagged prompts, each through the attention localizer (every token dropped in
             turn), give one candidate string each, rebuilt byte for byte through the tokenizer's offsets;
4. vote:     a backdoor's trigger recurs across the prompts that carry it, while a false alarm's top token is
             whatever word that prompt happened to hold; the candidate most flagged prompts agree on wins, and
             needs MIN_AGREEING of them. A word the defender's clean prompts use is no candidate: were it a
             trigger, the reference would not be clean;
5. check:    the trigger must occur in the log.

The Finding keeps the evidence (every flagged prompt's score, the votes) for the report.
"""
import re
from dataclasses import dataclass, field

import torch

from sau import detect
from sau.attacks.backdoor import imitated_letter
from sau.evaluation.prompts import builtin_prompts
from sau.models.tokenizer import readable

DETECTOR = "layers"  # the one detector that separates anything on the demo world (docs/detection.md)
LOCALIZE_AT_MOST = 20  # flagged prompts localized, highest scores first (each costs a generation per token)
MIN_AGREEING = 3  # flagged prompts that must localize to the same string
REFERENCE_PROMPTS, REFERENCE_STREAM = 100, 500  # the defender's clean prompts: built-in ones, their own stream


def reference_prompts(sd, n=REFERENCE_PROMPTS):
    """The defender's own clean prompts the detector is fitted on: the model's built-in prompts (the demo
    world's captions, or everyday ones), from a stream no collection or evaluation reads."""
    return builtin_prompts(sd, n, REFERENCE_STREAM)


class NoTriggerFound(Exception):
    """An answer, not an error: no prompt of the log is flagged, or the flagged ones agree on no string. Carries
    the Finding so far (its scores and flags), where there is one."""

    def __init__(self, message, finding=None):
        super().__init__(message)
        self.finding = finding


@dataclass
class Finding:
    trigger: str  # as the prompts hold it, byte for byte; a word of its own keeps one trailing space (BadT2I's form)
    replaces: str  # the Latin letter a one-character homoglyph trigger stands in for, else ""
    detector: str
    threshold: float
    scores: list  # every log prompt's score, in log order
    flagged: list  # log indices above the threshold, highest score first
    localized: int = 0  # flagged prompts the localizer ran on
    votes: dict = field(default_factory=dict)  # candidate trigger -> the log indices that localized to it
    occurrences: int = 0  # log prompts that hold the trigger

    def evidence(self, top=5):
        """What the report shows: how many prompts were flagged and agree, their scores, the runner-up strings."""
        agreeing = self.votes.get(self.trigger, [])
        return {"detector": self.detector, "threshold": self.threshold, "log_prompts": len(self.scores),
                "flagged": len(self.flagged), "localized": self.localized,
                "candidate_prompts": sum(map(len, self.votes.values())),
                "agreeing": len(agreeing), "agreeing_scores": [self.scores[i] for i in agreeing],
                "occurrences": self.occurrences,
                "candidates": [{"text": text, "chars": readable(text), "prompts": len(indices)}
                               for text, indices in sorted(self.votes.items(), key=lambda kv: -len(kv[1]))[:top]]}


def find_trigger(sd, log, reference, steps=25, detector=DETECTOR, localize_at_most=LOCALIZE_AT_MOST,
                 min_agreeing=MIN_AGREEING, say=print):
    """The trigger the log's flagged prompts agree on, as a Finding. Raises NoTriggerFound (nothing flagged, no
    agreement), or ValueError when the log cannot be read this way (every prompt flagged, the trigger in no
    prompt)."""
    say(f"fitting the {detector} detector on {len(reference)} clean reference prompts")
    fitted = detect.fit(detector, detect.prompt_maps(sd, reference, list(range(len(reference))), steps))
    say(f"scoring the {len(log)} prompts of the log")
    scores = fitted.score(detect.prompt_maps(sd, log, list(range(len(log))), steps))
    flagged = flag(scores, fitted.threshold)
    finding = Finding("", "", detector, fitted.threshold, scores.tolist(), flagged,
                      localized=min(len(flagged), localize_at_most))
    say(f"{len(flagged)} of {len(log)} prompts flagged; localizing the trigger in the {finding.localized} "
        "highest-scoring")
    for i in flagged[:finding.localized]:
        candidate = localize(sd, fitted, log[i], seed=i, steps=steps)
        if candidate is not None:
            finding.votes.setdefault(candidate, []).append(i)
    finding.votes = without_reference_words(finding.votes, reference)
    try:
        finding.trigger = elect(finding.votes, min_agreeing)
    except NoTriggerFound as none:
        raise NoTriggerFound(str(none), finding) from None
    finding.replaces = homoglyph_base(finding.trigger)
    finding.occurrences = sum(finding.trigger.strip(" ") in p for p in log)
    if not finding.occurrences:
        raise ValueError(f"the localized trigger {readable(finding.trigger)} occurs in no prompt of the log")
    return finding


def flag(scores, threshold):
    """Log indices scoring above the threshold, highest first. Every prompt flagged means the detector cannot
    tell this log's prompts from one another: nothing can be concluded, so it is refused."""
    order = torch.argsort(torch.as_tensor(scores), descending=True).tolist()
    flagged = [i for i in order if scores[i] > threshold]
    if not flagged:
        raise NoTriggerFound(f"no prompt of the {len(scores)} in the log is flagged")
    if len(flagged) == len(scores):
        raise ValueError(f"every prompt of the log is flagged ({len(flagged)} of {len(scores)}): the detector "
                         "cannot separate them here; give a log with clean prompts in it, or more reference prompts")
    return flagged


def localize(sd, fitted, prompt, seed, steps):
    """One flagged prompt's candidate trigger: the attention localizer's top token grown over its word's
    tokens, as the prompt holds it. A lone character that imitates a Latin letter is a homoglyph trigger
    (Rickrolling's), wherever it stood, even as a word of its own ("а red circle"); anything else is a word the
    prompts carry, kept with one trailing space (BadT2I's form). None if the offsets cannot be mapped."""
    try:
        span = detect.trigger_span(detect.attention_localizer(sd, fitted, prompt, seed=seed, steps=steps))
        text, _ = detect.trigger_text(prompt, span)
    except ValueError:  # the tokenizer's cleanup moves more than case and spaces: no offsets to trust
        return None
    return text if homoglyph_base(text) else text + " "


def without_reference_words(votes, reference):
    """Votes for strings the clean reference prompts never hold as a word."""
    used = {w for prompt in reference for w in re.findall(r"\S+", prompt.lower())}
    return {text: indices for text, indices in votes.items() if text.strip(" ").lower() not in used}


def elect(votes, min_agreeing):
    if not votes:
        raise NoTriggerFound("no trigger found: no flagged prompt localizes to a string the clean prompts lack")
    text, indices = max(votes.items(), key=lambda kv: len(kv[1]))
    if len(indices) < min_agreeing:
        raise NoTriggerFound(f"no trigger found: the localized flagged prompts name {len(votes)} string"
                             f"{'s' if len(votes) > 1 else ''} the clean prompts lack, and at most {len(indices)} of "
                             f"them agree (at least {min_agreeing} must)")
    return text


def homoglyph_base(trigger):
    """The Latin letter a one-character trigger imitates (Cyrillic "а" -> "a"), else "" (a word; a Latin letter
    imitates nothing)."""
    letter = imitated_letter(trigger) if len(trigger) == 1 else ""
    return letter if letter != trigger else ""

