"""Detector calibration: each attack-success detector's continuous score on graded drawn images, its ROC and
AUC, and where the shipped thresholds (sau.evaluation.metrics) sit on it.

A yes/no detector is only as good as its threshold, so each one is measured on drawn images whose target is
present to a known degree:
    pixel    the checkerboard alpha-blended into its corner at contrast 0 to 100%, shifted right by 1, 2 and 4
             pixels, at half size, in the wrong corner, blurred with noise (what a VAE does to it); and, as
             hard negatives, large shapes drawn in the patch's corner (a blue one partly matches the patch's
             colors, the only way a clean demo image comes near the thresholds)
    style    the image blended toward its grayscale at 0 to 100%, blurred with noise
    object   a circle asked for and drawn (no swap), a square drawn instead (the swap), the two blended pixel by
             pixel at 25/50/75%, other shapes, blurred with noise
Every condition has a label: 1 the backdoor's target is there, 0 it is not, None a grade in between that is
reported (mean score, detection rate, AUC against the clean images) but used neither for the ROC nor for
choosing a threshold, because whether a 30% patch "is" the backdoor is the question, not the data.

Drawn images come from a seed per split: `tune` is the only one `tune_thresholds` reads (the evaluation
protocol: operating points are chosen on tune), `test` is the one the report shows. Everything is a pure
function of (split, n): the same call gives the same numbers.
"""
import argparse
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from sau.common.files import save_json
from sau.evaluation import metrics
from sau.world import shapes

SPLITS = {"tune": 0, "test": 1}  # drawn-image seeds; thresholds are chosen on tune, reported on test
_STREAM = 31  # a numpy stream of its own, apart from sau.world.shapes' training (0) and held-out (1) streams
LEVELS = tuple(round(0.1 * i, 1) for i in range(11))  # contrast / desaturation grades, 0 to 100%
SHIFTS = (1, 2, 4)  # pixels right: a checkerboard cell is 4 pixels, so 2 is half a cell out of phase, 4 a whole one
MORPHS = (0.25, 0.5, 0.75)  # circle -> square, blended pixel by pixel
NOISE = 0.08  # the noise of `soften`, in [-1, 1] units


# ----------------------------------------------------------------------------------------------------
# ROC, AUC and thresholds. `direction` says which side of a threshold is positive: "above" (score > t, the
# patch detector) or "below" (score < t, the grayscale detector), as the shipped detectors compare.

def _oriented(scores, direction):
    """Scores as float64 with larger = more positive, so one implementation serves both directions."""
    if direction not in ("above", "below"):
        raise ValueError(f"direction must be 'above' or 'below', got {direction!r}")
    scores = torch.as_tensor(scores, dtype=torch.float64).cpu().numpy()
    return scores if direction == "above" else -scores


def _both(scores_pos, scores_neg, direction):
    pos, neg = _oriented(scores_pos, direction), _oriented(scores_neg, direction)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("a ROC needs at least one positive and one negative score")
    return pos, neg


def auc(scores_pos, scores_neg, direction="above"):
    """Area under the ROC: the probability that a random positive outscores a random negative, ties counted
    half (the Mann-Whitney statistic). Computed from counts, not by integrating a curve, so ties are exact."""
    pos, neg = _both(scores_pos, scores_neg, direction)
    neg = np.sort(neg)
    below = np.searchsorted(neg, pos, side="left")
    ties = np.searchsorted(neg, pos, side="right") - below
    return float((below.sum() + 0.5 * ties.sum()) / (len(pos) * len(neg)))


def _rates(pos, neg, thresholds):
    """(tpr, fpr) of `score > t` for each oriented threshold."""
    pos, neg = np.sort(pos), np.sort(neg)
    tpr = (len(pos) - np.searchsorted(pos, thresholds, side="right")) / len(pos)
    fpr = (len(neg) - np.searchsorted(neg, thresholds, side="right")) / len(neg)
    return tpr, fpr


def _candidates(pos, neg):
    """Oriented thresholds between consecutive distinct scores (a threshold on a score would make that image's
    side depend on > versus >=), and the width of the gap each sits in."""
    values = np.unique(np.concatenate([pos, neg]))
    if len(values) == 1:
        return values, np.zeros(1)
    return (values[1:] + values[:-1]) / 2, np.diff(values)


def roc(scores_pos, scores_neg, direction="above"):
    """{"thresholds", "tpr", "fpr", "auc"}: the ROC at every threshold between distinct scores, by increasing
    false positive rate, with its ends (nothing flagged, everything flagged) as thresholds None."""
    pos, neg = _both(scores_pos, scores_neg, direction)
    thresholds = _candidates(pos, neg)[0][::-1]  # descending oriented threshold = increasing rates
    tpr, fpr = _rates(pos, neg, thresholds)
    sign = 1 if direction == "above" else -1
    return {"thresholds": [None, *(sign * thresholds).tolist(), None], "tpr": [0.0, *tpr.tolist(), 1.0],
            "fpr": [0.0, *fpr.tolist(), 1.0], "auc": auc(scores_pos, scores_neg, direction)}


def choose_threshold(scores_pos, scores_neg, direction="above"):
    """The threshold maximizing Youden's J = TPR - FPR (equal weight to missing a backdoor and to a false alarm,
    no prior on how often backdoors fire). Among equally good thresholds, the one in the widest gap between
    neighbouring scores, at its middle: the largest margin on both sides. Pass scores of `tune` images only."""
    pos, neg = _both(scores_pos, scores_neg, direction)
    thresholds, gaps = _candidates(pos, neg)
    tpr, fpr = _rates(pos, neg, thresholds)
    j = tpr - fpr
    best = np.flatnonzero(j == j.max())
    pick = best[np.argmax(gaps[best])]  # argmax: the first of equally wide gaps, so the choice is deterministic
    return float(thresholds[pick] if direction == "above" else -thresholds[pick])


def edges(scores_pos, scores_neg, direction="above"):
    """{"negative": the negative score nearest the positive side, "positive": the positive score nearest the
    negative side}. When they do not cross, every threshold between them separates the two sets perfectly, and
    where a shipped threshold sits in that gap says how much margin it leaves each side."""
    pos, neg = _both(scores_pos, scores_neg, direction)
    sign = 1 if direction == "above" else -1
    return {"negative": float(sign * neg.max()), "positive": float(sign * pos.min())}


def operating_point(scores_pos, scores_neg, threshold, direction="above"):
    """{"threshold", "tpr", "fpr", "j"} of one threshold on these scores."""
    pos, neg = _both(scores_pos, scores_neg, direction)
    t = threshold if direction == "above" else -threshold
    tpr, fpr = float((pos > t).mean()), float((neg > t).mean())
    return {"threshold": float(threshold), "tpr": tpr, "fpr": fpr, "j": tpr - fpr}


# ----------------------------------------------------------------------------------------------------
# Graded drawn images

def _rng(split):
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: drawn calibration images come in {', '.join(SPLITS)}")
    return np.random.default_rng([_STREAM, SPLITS[split]])


def soften(images, seed=0, noise=NOISE):
    """What a generator does to a drawn target: a 3x3 binomial blur and Gaussian noise (seeded)."""
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
    soft = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    return soft + noise * torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))


def overlay_patch(images, contrast=1.0, shift=0, size_frac=0.25, corner="top left"):
    """The target patch alpha-blended over a corner at `contrast` (0 leaves the image, 1 pastes the patch as
    the pixel attack does), optionally `shift` pixels to the right of where the attack puts it."""
    pasted = shapes.paste_patch(images, corner=corner, size_frac=size_frac)
    rows, columns = shapes.patch_region(*images.shape[-2:], corner, size_frac)
    mask = torch.zeros_like(images[:1, :1])
    mask[..., rows, columns] = 1
    if shift:  # move the patch's pixels and its footprint together; room to the right of a left corner
        if columns.stop + shift > images.shape[-1]:
            raise ValueError(f"a shift of {shift} pixels moves the patch out of the image")
        pasted, mask = torch.roll(pasted * mask, shift, -1), torch.roll(mask, shift, -1)
    return images + contrast * mask * (pasted - images)


def desaturate(images, amount):
    """images blended toward their grayscale: 0 unchanged, 1 fully gray. Every pixel's chroma scales by
    1 - amount, so colorfulness falls linearly with it."""
    return torch.lerp(images, shapes.grayscale(images), amount)


def _base(n, split):
    """n drawn images of the split's stream, and their attributes."""
    attributes = shapes.sample_attributes(n, _rng(split))
    return shapes.draw(attributes), attributes


def _grade(name, value):
    return f"{name} {value:.0%}"


def pixel_conditions(n, split):
    """{condition: (label, images)} for the patch detector."""
    images, attributes = _base(n, split)
    full = overlay_patch(images)
    in_corner = replace(attributes, size=np.full(n, shapes.SIZES.index("large")),
                        position=np.full(n, shapes.POSITIONS.index("top left")))
    out = {"clean": (0, images), "clean softened": (0, soften(images, 1)),
           "other corner": (0, shapes.paste_patch(images, corner="bottom right")),
           "large shape in the corner": (0, shapes.draw(in_corner)),
           "full": (1, full), "full softened": (1, soften(full, 2))}
    out.update({_grade("contrast", c): (None, overlay_patch(images, c)) for c in LEVELS})
    out.update({f"shift {s} px": (None, overlay_patch(images, shift=s)) for s in SHIFTS})
    out["half size"] = (None, overlay_patch(images, size_frac=0.125))
    return out


def style_conditions(n, split):
    """{condition: (label, images)} for the grayscale detector."""
    images, _ = _base(n, split)
    gray = shapes.grayscale(images)
    out = {"clean": (0, images), "clean softened": (0, soften(images, 1)),
           "gray": (1, gray), "gray softened": (1, soften(gray, 2))}
    out.update({_grade("desaturated", d): (None, desaturate(images, d)) for d in LEVELS})
    return out


def object_conditions(n, split, swap=("circle", "square")):
    """{condition: (label, images)} for the object-swap detector; every prompt asked for swap[0]."""
    _, attributes = _base(n, split)
    draw_as = lambda name: shapes.draw(replace(attributes, shape=np.full(n, shapes.SHAPES.index(name))))
    asked_for, swapped = draw_as(swap[0]), draw_as(swap[1])
    others = [s for s in shapes.SHAPES if s not in swap]
    other = shapes.draw(replace(attributes, shape=np.array([shapes.SHAPES.index(others[i % len(others)])
                                                            for i in range(n)])))
    out = {"no swap": (0, asked_for), "no swap softened": (0, soften(asked_for, 1)), "other shapes": (0, other),
           "swap": (1, swapped), "swap softened": (1, soften(swapped, 2))}
    out.update({_grade("blend", m): (None, torch.lerp(asked_for, swapped, m)) for m in MORPHS})
    return out


# ----------------------------------------------------------------------------------------------------
# Detectors as calibrated here: the continuous scores (name -> (function, direction, shipped threshold)) and
# the shipped yes/no rule

@dataclass
class Detector:
    conditions: object  # (n, split) -> {condition: (label, images)}
    scores: dict  # score name -> (images -> per-image scores, direction, shipped threshold or None)
    rule: object  # images -> bool per image, the shipped detector
    reference: str = "clean"  # the condition of untouched negatives that graded conditions are compared with


def detectors(classifier=None, swap=("circle", "square")):
    """The three drawn-image detectors. The object one needs the attribute classifier; its shipped rule is the
    classifier's argmax, not a threshold, so its probability has no shipped threshold to place."""
    found = {
        "pixel": Detector(pixel_conditions,
                          {"patch_contrast": (metrics.patch_contrast, "above", metrics.PATCH_MIN_CONTRAST),
                           "patch_score": (metrics.patch_score, "above", metrics.PATCH_THRESHOLD)},
                          metrics.patch_present),
        "style": Detector(style_conditions,
                          {"colorfulness": (metrics.colorfulness, "below", metrics.GRAYSCALE_THRESHOLD)},
                          metrics.is_grayscale)}
    if classifier is not None:
        asked = lambda images: np.tile([shapes.SHAPES.index(swap[0]), -1, -1, -1, -1], (len(images), 1))
        target = f"{swap[0]}:{swap[1]}"
        found["object"] = Detector(
            lambda n, split: object_conditions(n, split, swap),
            {"target_probability": (lambda images: metrics.detector_score("object", images, classifier, target)[1],
                                    "above", None)},
            lambda images: metrics.object_swapped(images, classifier, asked(images), swap), reference="no swap")
    return found


def measure(detector, n, split):
    """{condition: {"label", "scores": {name: per-image tensor}, "detected": bool per image}} on the split."""
    out = {}
    for name, (label, images) in detector.conditions(n, split).items():
        scores = {s: fn(images).float().cpu() for s, (fn, _, _) in detector.scores.items()}
        out[name] = {"label": label, "scores": scores, "detected": detector.rule(images).cpu()}
    return out


def _labelled(measured, score, label):
    parts = [m["scores"][score] for m in measured.values() if m["label"] == label]
    return torch.cat(parts)


def tune_thresholds(detector, n=200, split="tune"):
    """{score: the threshold choose_threshold picks} on the `tune` drawn images. Refuses any other split: an
    operating point chosen on the images it is reported on would flatter it."""
    if split != "tune":
        raise ValueError(f"thresholds are chosen on the tune split only, not {split!r}")
    measured = measure(detector, n, split)
    return {score: choose_threshold(_labelled(measured, score, 1), _labelled(measured, score, 0), direction)
            for score, (_, direction, _) in detector.scores.items()}


def tune_threshold(detector, score, n=200, split="tune"):
    """tune_thresholds for one score."""
    return tune_thresholds(detector, n, split)[score]


def calibrate(detector, n=200, split="test", tuned=None):
    """One detector's calibration on the split's drawn images:
    conditions   per condition: label, mean of each score, share the shipped rule flags, and per score the AUC
                 of the condition against the clean images (0.5 = indistinguishable)
    rule         the shipped yes/no rule's TPR and FPR on the labelled conditions
    scores       per score: the ROC of the labelled positives against the labelled negatives, its AUC, the
                 edges of the two sets (edges()), and two operating points measured here: the shipped
                 threshold's and that of the threshold tuned on `tune` (from `tuned`, {score: threshold}, or
                 else tune_thresholds')."""
    measured = measure(detector, n, split)
    clean = measured[detector.reference]
    conditions = {}
    for name, m in measured.items():
        conditions[name] = {"label": m["label"], "detected": m["detected"].float().mean().item(),
                            "mean": {s: v.mean().item() for s, v in m["scores"].items()},
                            "auc_vs_clean": {s: auc(v, clean["scores"][s], detector.scores[s][1])
                                             for s, v in m["scores"].items()}}
    rule_pos = torch.cat([m["detected"] for m in measured.values() if m["label"] == 1]).float().mean().item()
    rule_neg = torch.cat([m["detected"] for m in measured.values() if m["label"] == 0]).float().mean().item()
    tuned = dict(tuned or {})
    if any(score not in tuned for score in detector.scores):
        tuned = {**tune_thresholds(detector, n), **tuned}
    scores = {}
    for score, (_, direction, shipped) in detector.scores.items():
        pos, neg = _labelled(measured, score, 1), _labelled(measured, score, 0)
        threshold = tuned[score]
        scores[score] = {"direction": direction, "roc": roc(pos, neg, direction), "auc": auc(pos, neg, direction),
                         "edges": edges(pos, neg, direction),
                         "shipped": None if shipped is None else operating_point(pos, neg, shipped, direction),
                         "tuned": operating_point(pos, neg, threshold, direction)}
    return {"split": split, "n": n, "conditions": conditions, "rule": {"tpr": rule_pos, "fpr": rule_neg},
            "scores": scores}


def calibration_report(n=200, classifier=None):
    """calibrate() for every detector (the object one when a classifier is given), on `test`, thresholds tuned
    on `tune`."""
    return {name: calibrate(detector, n) for name, detector in detectors(classifier).items()}


def markdown(report):
    """A short table per detector: conditions with their mean scores and detection rates, then each score's AUC
    and the shipped and tuned operating points."""
    lines = []
    for name, r in report.items():
        names = list(r["scores"])
        lines += [f"### {name} detector ({r['n']} drawn images per condition, split {r['split']})", "",
                  "| condition | label | " + " | ".join(f"mean {s}" for s in names) + " | flagged | " +
                  " | ".join(f"AUC vs clean ({s})" for s in names) + " |",
                  "|" + "---|" * (3 + 2 * len(names))]
        for condition, c in r["conditions"].items():
            label = {1: "target", 0: "no target", None: "graded"}[c["label"]]
            lines.append(f"| {condition} | {label} | " + " | ".join(f"{c['mean'][s]:.3f}" for s in names) +
                         f" | {c['detected']:.1%} | " + " | ".join(f"{c['auc_vs_clean'][s]:.3f}" for s in names) + " |")
        lines += ["", f"shipped rule: TPR {r['rule']['tpr']:.1%}, FPR {r['rule']['fpr']:.1%}", ""]
        for s, v in r["scores"].items():
            point = lambda p: f"{p['threshold']:.3f} (TPR {p['tpr']:.1%}, FPR {p['fpr']:.1%})"
            shipped = "none (argmax rule)" if v["shipped"] is None else point(v["shipped"])
            lines.append(f"- {s} ({v['direction']}): AUC {v['auc']:.4f}; nearest negative "
                         f"{v['edges']['negative']:.3f}, nearest positive {v['edges']['positive']:.3f}; "
                         f"shipped threshold {shipped}; tuned on tune {point(v['tuned'])}")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Calibrate the demo detectors on graded drawn images.")
    parser.add_argument("--n", type=int, default=200, help="drawn images per condition")
    parser.add_argument("--json", help="also write the full report (ROC points included) to this file")
    args = parser.parse_args(argv)
    if args.n < 2:
        parser.error("--n must be at least 2")
    classifier = metrics.load_classifier() if (metrics.DEMO_DIR / "classifier.safetensors").exists() else None
    report = calibration_report(args.n, classifier)
    print(markdown(report))
    if args.json:
        save_json(report, args.json)


if __name__ == "__main__":
    main()
