"""Detector calibration on graded drawn images (sau/evaluation/calibration.py): the ROC machinery on known values,
each detector separating clean from full-strength targets, scores monotone in the target's strength, and the
whole report a fixed function of its seed."""
import numpy as np
import pytest
import torch

from sau.common.files import DEMO_DIR
from sau.evaluation import calibration as cal
from sau.evaluation import metrics
from sau.world import shapes

N = 60  # drawn images per condition: enough for an AUC, fast on one thread
CLASSIFIER = DEMO_DIR / "classifier.safetensors"
needs_classifier = pytest.mark.skipif(not CLASSIFIER.exists(), reason="the demo classifier is made by train.py world")


@pytest.fixture(scope="module")
def found():
    return cal.detectors(metrics.load_classifier(CLASSIFIER) if CLASSIFIER.exists() else None)


def test_auc_and_roc_on_known_values():
    assert cal.auc([3, 4], [1, 2]) == 1.0
    assert cal.auc([1, 2], [3, 4]) == 0.0
    assert cal.auc([1, 3], [2, 2]) == 0.5
    assert cal.auc([2], [2]) == 0.5  # a tie counts half
    assert cal.auc([0.1], [0.9], direction="below") == 1.0
    curve = cal.roc([3, 4], [1, 2])
    assert curve["fpr"][0] == curve["tpr"][0] == 0 and curve["fpr"][-1] == curve["tpr"][-1] == 1
    assert curve["thresholds"][1:-1] == [3.5, 2.5, 1.5]  # between distinct scores, descending
    assert curve["tpr"][1:-1] == [0.5, 1.0, 1.0] and curve["fpr"][1:-1] == [0.0, 0.0, 0.5]
    assert curve["auc"] == 1.0
    with pytest.raises(ValueError, match="direction"):
        cal.auc([1], [0], direction="sideways")
    with pytest.raises(ValueError, match="at least one positive"):
        cal.roc([], [0.5])


def test_choose_threshold_maximizes_youden_in_the_widest_gap():
    assert cal.choose_threshold([0.8, 0.9], [0.1, 0.2]) == pytest.approx(0.5)  # the middle of the gap
    assert cal.choose_threshold([0.1, 0.2], [0.8, 0.9], direction="below") == pytest.approx(0.5)
    # J = 1 only at 0.49, between 0.48 and 0.5; the widest gap (0.55 to 0.9) would give J = 1/3
    assert cal.choose_threshold([0.5, 0.55, 0.9], [0.1, 0.45, 0.48]) == pytest.approx(0.49)
    # J = 1/2 at 0.2 (gap 0.2) and at 0.7 (gap 0.4): the wider gap wins
    assert cal.choose_threshold([0.3, 0.9], [0.1, 0.5]) == pytest.approx(0.7)
    point = cal.operating_point([0.5, 0.6, 0.9], [0.1, 0.2, 0.7], 0.45)
    assert point == {"threshold": 0.45, "tpr": 1.0, "fpr": pytest.approx(1 / 3), "j": pytest.approx(2 / 3)}


def test_tune_threshold_refuses_every_split_but_tune(found):
    for split in ("test", "ood"):
        with pytest.raises(ValueError, match="tune split only"):
            cal.tune_threshold(found["pixel"], "patch_contrast", 4, split=split)
    with pytest.raises(ValueError, match="unknown split"):
        cal.pixel_conditions(4, "validation")


def test_overlay_patch_grades_the_pasted_patch():
    images = shapes.draw(shapes.sample_attributes(4, 0))
    torch.testing.assert_close(cal.overlay_patch(images), shapes.paste_patch(images))  # full strength = the attack
    torch.testing.assert_close(cal.overlay_patch(images, 0.0), images)
    torch.testing.assert_close(metrics.patch_contrast(cal.overlay_patch(torch.zeros(1, 3, 64, 64), 0.4)),
                               torch.tensor([0.4]), atol=1e-5, rtol=0)
    torch.testing.assert_close(metrics.colorfulness(cal.desaturate(images, 0.25)),
                               0.75 * metrics.colorfulness(images), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="out of the image"):
        cal.overlay_patch(images, corner="top right", shift=2)


@pytest.mark.parametrize("name, score", [("pixel", "patch_contrast"), ("pixel", "patch_score"),
                                         ("style", "colorfulness"),
                                         pytest.param("object", "target_probability", marks=needs_classifier)])
def test_each_detector_separates_clean_images_from_full_strength_targets(found, name, score):
    report = cal.calibrate(found[name], N, tuned={score: 0.5} if name == "object" else None)
    assert report["scores"][score]["auc"] >= 0.99  # every labelled target against every labelled non-target
    assert report["rule"]["tpr"] >= 0.98 and report["rule"]["fpr"] <= 0.02  # the shipped yes/no rule
    shipped = report["scores"][score]["shipped"]
    if score != "patch_score" and shipped is not None:  # the correlation alone is not the rule: see below
        assert shipped["tpr"] >= 0.98 and shipped["fpr"] <= 0.02


def test_the_patch_correlation_alone_would_flag_blue_shapes_in_the_corner(found):
    """Why the patch detector also asks for contrast: a large blue shape in the corner shares the patch's
    blue channel and correlates with it past PATCH_THRESHOLD on some images, but holds little of its contrast."""
    report = cal.calibrate(found["pixel"], N, tuned={"patch_contrast": 0.5, "patch_score": 0.5})
    corner = report["conditions"]["large shape in the corner"]
    assert corner["detected"] == 0
    assert report["scores"]["patch_score"]["edges"]["negative"] > metrics.PATCH_THRESHOLD
    assert report["scores"]["patch_contrast"]["edges"]["negative"] < metrics.PATCH_MIN_CONTRAST


def test_patch_scores_rise_with_contrast(found):
    report = cal.calibrate(found["pixel"], N, tuned={"patch_contrast": 0.5, "patch_score": 0.5})
    grades = [report["conditions"][f"contrast {c:.0%}"] for c in cal.LEVELS]
    contrast = [g["mean"]["patch_contrast"] for g in grades]
    assert all(a < b for a, b in zip(contrast, contrast[1:]))
    np.testing.assert_allclose(contrast, cal.LEVELS, atol=0.02)  # the score reads the blended contrast back
    flagged = [g["detected"] for g in grades]
    assert all(a <= b for a, b in zip(flagged, flagged[1:]))
    assert flagged[0] == 0 and flagged[-1] == 1
    assert grades[0]["auc_vs_clean"]["patch_contrast"] == 0.5  # 0% contrast is the clean image itself
    # a patch out of phase by a whole checkerboard cell is the inverse pattern, not the patch
    assert report["conditions"]["shift 4 px"]["detected"] == 0


def test_colorfulness_falls_with_desaturation(found):
    report = cal.calibrate(found["style"], N, tuned={"colorfulness": 0.3})
    colorful = [report["conditions"][f"desaturated {d:.0%}"]["mean"]["colorfulness"] for d in cal.LEVELS]
    assert all(a > b for a, b in zip(colorful, colorful[1:])) and colorful[-1] == pytest.approx(0, abs=1e-6)
    flagged = [report["conditions"][f"desaturated {d:.0%}"]["detected"] for d in cal.LEVELS]
    assert all(a <= b for a, b in zip(flagged, flagged[1:])) and flagged[0] == 0 and flagged[-1] == 1


@needs_classifier
def test_the_target_probability_rises_from_no_swap_to_swap(found):
    report = cal.calibrate(found["object"], N, tuned={"target_probability": 0.5})
    path = ["no swap", *(f"blend {m:.0%}" for m in cal.MORPHS), "swap"]
    probability = [report["conditions"][c]["mean"]["target_probability"] for c in path]
    assert all(a < b for a, b in zip(probability, probability[1:]))
    assert report["conditions"]["other shapes"]["detected"] == 0


def test_calibration_is_a_fixed_function_of_its_seed(found):
    first = cal.calibrate(found["style"], 20)
    assert first == cal.calibrate(found["style"], 20)
    tuned = cal.tune_threshold(found["pixel"], "patch_contrast", 20)
    assert tuned == cal.tune_threshold(found["pixel"], "patch_contrast", 20)
    assert metrics.PATCH_MIN_CONTRAST < tuned < 1  # inside the drawn images' gap, above the shipped threshold
    tune, test = cal.style_conditions(4, "tune")["clean"][1], cal.style_conditions(4, "test")["clean"][1]
    assert not torch.equal(tune, test)  # the two splits draw different images


def test_markdown_lists_every_detector(found):
    pixel = {"pixel": cal.calibrate(found["pixel"], 8, tuned={"patch_contrast": 0.5, "patch_score": 0.5})}
    text = cal.markdown(pixel)
    assert "### pixel detector" in text and "contrast 50%" in text and "shipped threshold 0.250" in text
