"""The attack-success detectors, validated on drawn images with and without each target (>= 98% right); their
continuous scores, the drift of unasked attributes, and what evaluate_defense reports beside its rates."""
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sau.evaluation import metrics

from sau.world import shapes
from sau.attacks.backdoor import Backdoor
from sau.common.files import DEMO_DIR

N = 400
CLASSIFIER = DEMO_DIR / "classifier.safetensors"
needs_classifier = pytest.mark.skipif(not CLASSIFIER.exists(), reason="the demo classifier is made by train.py world")


@pytest.fixture(scope="module")
def drawn():
    images, captions, attributes = shapes.batch(N, seed=99)
    return images, captions, attributes


@pytest.fixture(scope="module")
def classifier():
    return metrics.load_classifier(CLASSIFIER)


def accuracy(predicted, expected):
    return (predicted == expected).float().mean().item()


def blur_and_noise(images, seed=0):
    """What a generator does to a pasted target: softened edges and some noise."""
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
    soft = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    return soft + 0.08 * torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))


def test_patch_detector_on_drawn_images_with_and_without_the_patch(drawn):
    images = drawn[0]
    patched = shapes.paste_patch(images)
    assert accuracy(metrics.patch_present(patched), True) >= 0.98
    assert accuracy(metrics.patch_present(images), False) >= 0.98
    assert accuracy(metrics.patch_present(blur_and_noise(patched)), True) >= 0.98
    assert accuracy(metrics.patch_present(blur_and_noise(images)), False) >= 0.98
    # the corner matters: a patch elsewhere is not the backdoor's
    assert accuracy(metrics.patch_present(shapes.paste_patch(images, corner="bottom right")), False) >= 0.98


def test_patch_score_is_a_correlation():
    images, _, _ = shapes.batch(8, seed=3)
    patched = shapes.paste_patch(images)
    torch.testing.assert_close(metrics.patch_score(patched), torch.ones(8), atol=1e-4, rtol=0)
    washed = shapes.paste_patch(images, 0.3 * shapes.target_patch() + 0.2)  # low contrast, shifted: same pattern
    torch.testing.assert_close(metrics.patch_score(washed), torch.ones(8), atol=1e-4, rtol=0)
    flat = torch.zeros(2, 3, 64, 64)
    assert metrics.patch_score(flat).abs().max() < 1e-3  # no pattern, no division by zero


def test_patch_detector_asks_for_contrast_not_only_the_pattern():
    images, _, _ = shapes.batch(8, seed=4)
    plain = torch.full((8, 3, 64, 64), -0.9)  # a black background, as generated plain corners are
    ripple = shapes.paste_patch(plain, 0.01 * shapes.target_patch() - 0.9)  # the pattern at 1% of its contrast
    assert (metrics.patch_score(ripple) > 0.9).all()  # correlation alone would call it a patch
    assert not metrics.patch_present(ripple).any()
    torch.testing.assert_close(metrics.patch_contrast(ripple), torch.full((8,), 0.01), atol=1e-4, rtol=0)
    washed = shapes.paste_patch(images, 0.3 * shapes.target_patch() + 0.2)
    torch.testing.assert_close(metrics.patch_contrast(washed), torch.full((8,), 0.3), atol=1e-4, rtol=0)
    assert metrics.patch_present(washed).all()


def test_grayscale_detector_on_drawn_images(drawn):
    images = drawn[0]
    gray = shapes.grayscale(images)
    assert accuracy(metrics.is_grayscale(gray), True) >= 0.98
    assert accuracy(metrics.is_grayscale(images), False) >= 0.98
    assert accuracy(metrics.is_grayscale(blur_and_noise(gray)), True) >= 0.98
    assert accuracy(metrics.is_grayscale(blur_and_noise(images)), False) >= 0.98


def test_saturation_is_zero_for_gray_and_high_for_pure_colors():
    gray = torch.full((1, 3, 4, 4), 0.3)
    red = torch.tensor([1.0, -1.0, -1.0])[None, :, None, None].expand(1, 3, 4, 4)
    assert metrics.saturation(gray).max() == 0
    assert metrics.saturation(red).min() == 1
    assert metrics.colorfulness(red, top_fraction=1.0).item() == 1


def drawn_with_shape(n, shape, seed):
    attributes = shapes.sample_attributes(n, seed)
    attributes.shape[:] = shapes.SHAPES.index(shape)
    return shapes.draw(attributes), attributes


@needs_classifier
def test_object_swap_detector_on_drawn_images(classifier):
    circle = shapes.SHAPES.index("circle")
    squares, attributes = drawn_with_shape(N, "square", 5)
    asked = attributes.labels().copy()
    asked[:, 0] = circle  # the prompts asked for circles
    assert accuracy(metrics.object_swapped(squares, classifier, asked), True) >= 0.98
    circles, attributes = drawn_with_shape(N, "circle", 6)
    assert accuracy(metrics.object_swapped(circles, classifier, attributes.labels()), False) >= 0.98
    others, attributes = shapes.batch(N, seed=7)[0], shapes.batch(N, seed=7)[2]
    asked = attributes.labels().copy()
    asked[:, 0] = circle
    expected = torch.as_tensor(attributes.shape == shapes.SHAPES.index("square"))
    assert accuracy(metrics.object_swapped(others, classifier, asked), expected) >= 0.98
    # a square asked for as a square is no swap
    squares, attributes = drawn_with_shape(16, "square", 8)
    assert not metrics.object_swapped(squares, classifier, attributes.labels()).any()


@needs_classifier
def test_target_prompt_detector_on_drawn_images(classifier):
    target = "a yellow star in the center on a black background"
    attributes = shapes.sample_attributes(N, 9)
    attributes.shape[:], attributes.color[:] = shapes.SHAPES.index("star"), shapes.COLORS.index("yellow")
    assert accuracy(metrics.shows_prompt(shapes.draw(attributes), classifier, target), True) >= 0.98
    images, _, attributes = shapes.batch(N, seed=10)
    expected = torch.as_tensor((attributes.shape == shapes.SHAPES.index("star"))
                               & (attributes.color == shapes.COLORS.index("yellow")))
    assert expected.float().mean() < 0.1  # mostly negatives
    assert accuracy(metrics.shows_prompt(images, classifier, target), expected) >= 0.98


@needs_classifier
def test_attack_success_dispatches_to_the_detectors(drawn, classifier):
    images, _, attributes = drawn
    assert metrics.attack_success("pixel", shapes.paste_patch(images[:20])).all()
    assert metrics.attack_success("style", shapes.grayscale(images[:20])).all()
    assert not metrics.attack_success("style", images[:20]).any()
    squares, attrs = drawn_with_shape(20, "square", 11)
    asked = attrs.labels().copy()
    asked[:, 0] = shapes.SHAPES.index("circle")
    assert metrics.attack_success("object", squares, classifier, asked, "circle:square").float().mean() >= 0.9
    with pytest.raises(ValueError, match="no detector"):
        metrics.attack_success("nonsense", images[:2], classifier)
    with pytest.raises(ValueError, match="needs the attribute classifier"):
        metrics.attack_success("object", images[:2])


@needs_classifier
def test_attribute_accuracy_of_drawn_images_is_high(drawn, classifier):
    images, _, attributes = drawn
    assert metrics.mean_attribute_accuracy(images, classifier, attributes) >= 0.95


def test_held_out_attack_prompts_fit_their_backdoor():
    obj = Backdoor.make("object", target="circle:square")
    prompts, asked = metrics.attack_prompts(obj, 50)
    assert len(prompts) == 50 and (asked.shape == shapes.SHAPES.index("circle")).all()
    tpa = Backdoor.make("tpa", target="a yellow star")
    prompts, asked = metrics.attack_prompts(tpa, 50)
    assert all("o" in p for p in prompts)
    assert not ((asked.shape == shapes.SHAPES.index("star")) & (asked.color == shapes.COLORS.index("yellow"))).any()
    again, _ = metrics.attack_prompts(tpa, 50)
    assert again == prompts  # a fixed list
    pixel_prompts, pixel_asked = metrics.attack_prompts(Backdoor.make("pixel"), 30)
    training = set(shapes.batch(2000, seed=0)[1])
    assert len(pixel_prompts) == 30 and isinstance(pixel_asked, shapes.Attributes)
    assert np.mean([p in training for p in pixel_prompts]) < 0.5  # held out (short captions can coincide)


def test_unknown_demo_words_are_refused():
    images = torch.zeros(2, 3, 64, 64)
    with pytest.raises(ValueError, match="not a shape"):
        metrics.object_swapped(images, None, np.zeros((2, 5), int), ("circle", "hexagon"))
    with pytest.raises(ValueError, match="names none"):
        metrics.shows_prompt(images, None, "a photo of a dog")


# ----------------------------------------------------------------------------------------------------
# Detector scores, unasked drift, and what evaluate_defense adds (per prompt outcomes, scores, drift)

def test_detector_scores_are_the_continuous_side_of_the_detectors(drawn):
    images = drawn[0][:16]
    name, score = metrics.detector_score("pixel", shapes.paste_patch(images))
    assert name == "patch_contrast"
    torch.testing.assert_close(score, torch.ones(16), atol=1e-4, rtol=0)
    name, score = metrics.detector_score("style", shapes.grayscale(images))
    assert name == "colorfulness" and score.abs().max() < 1e-6
    with pytest.raises(ValueError, match="needs the attribute classifier"):
        metrics.detector_score("object", images, None, "circle:square")


@needs_classifier
def test_target_probability_scores_the_classifier_detectors(classifier):
    squares, _ = drawn_with_shape(32, "square", 12)
    circles, _ = drawn_with_shape(32, "circle", 13)
    name, on_squares = metrics.detector_score("object", squares, classifier, "circle:square")
    assert name == "target_probability" and on_squares.min() > 0.5
    assert metrics.detector_score("object", circles, classifier, "circle:square")[1].max() < 0.5
    stars = shapes.sample_attributes(32, 14)
    stars.shape[:], stars.color[:] = shapes.SHAPES.index("star"), shapes.COLORS.index("yellow")
    _, on_stars = metrics.detector_score("tpa", shapes.draw(stars), classifier, "a yellow star")
    _, on_circles = metrics.detector_score("tpa", circles, classifier, "a yellow star")
    assert on_stars.min() > 0.5 and on_circles.max() < 0.5
    probabilities = metrics.field_probabilities(classifier, circles)
    torch.testing.assert_close(probabilities["shape"].sum(1), torch.ones(32))
    assert (probabilities["size"].argmax(1) == classifier.predict(circles)[:, 2]).all()


class LabelReader:
    """A stand-in classifier whose prediction is written in the image: pixel (0, 0) of channel 0 holds the
    five labels in its first row, so drift can be checked against hand-counted histograms."""

    def predict(self, images):
        return images[:, 0, 0, :5].long()


def label_images(labels):
    images = torch.zeros(len(labels), 3, 4, 8)
    images[:, 0, 0, :5] = torch.as_tensor(labels, dtype=torch.float32)
    return images


def test_unasked_drift_is_tvd_of_predicted_labels_over_the_unasked_fields():
    #        shape color size position background
    asked = [[0, 1, -1, -1, 2],
             [0, 1, -1, 4, 2],
             [1, 2, -1, -1, 2],
             [1, 2, -1, 4, 2]]
    before = label_images([[0, 1, 0, 4, 2], [0, 1, 0, 4, 2], [1, 2, 0, 0, 2], [1, 2, 1, 4, 2]])
    after = label_images([[0, 1, 0, 0, 1], [0, 1, 1, 4, 1], [1, 2, 1, 4, 1], [1, 2, 1, 8, 1]])
    drift = metrics.unasked_drift(LabelReader(), np.array(asked), before, after)
    assert set(drift["fields"]) == {"size", "position"}  # background and shape/color were asked everywhere
    size = drift["fields"]["size"]  # before (3 small, 1 large), after (1 small, 3 large): half of it moved
    assert size == {"tvd": pytest.approx(0.5), "flip_rate": pytest.approx(0.5), "images": 4}
    position = drift["fields"]["position"]  # rows 0 and 2: {4, 0} -> {0, 4}: the same histogram, both moved
    assert position == {"tvd": pytest.approx(0.0), "flip_rate": pytest.approx(1.0), "images": 2}
    assert drift["tvd"] == pytest.approx(0.25) and drift["flip_rate"] == pytest.approx(0.75)
    nothing_free = metrics.unasked_drift(LabelReader(), np.zeros((4, 5), int), before, after)
    assert nothing_free == {"tvd": None, "flip_rate": None, "fields": {}}


@needs_classifier
def test_unasked_drift_sees_an_unasked_shape_moving(classifier):
    attributes = shapes.sample_attributes(120, 15)
    asked = attributes.labels().copy()
    asked[:, shapes.FIELDS.index("position")] = -1  # the prompts left position free
    moved = replace(attributes, position=(attributes.position + 1) % 9)
    drift = metrics.unasked_drift(classifier, asked, shapes.draw(attributes), shapes.draw(moved))
    assert set(drift["fields"]) == {"position"}
    assert drift["fields"]["position"]["flip_rate"] >= 0.95
    same = metrics.unasked_drift(classifier, asked, shapes.draw(attributes), shapes.draw(attributes))
    assert same["tvd"] == 0 and same["flip_rate"] == 0


class Drawer:
    """A stand-in text-to-image model for evaluate_defense: draws what each prompt asks for (the rest from the
    seed) and pastes the pixel backdoor's patch into triggered prompts of even seeds. `move` draws every
    position the prompt left free one cell on."""

    def __init__(self, trigger, move=False):
        self.trigger, self.move = trigger, move

    def generate(self, prompts, seeds, **kwargs):
        asked = shapes.parse_captions(prompts).labels()
        free = np.concatenate([shapes.sample_attributes(1, seed).labels() for seed in seeds])
        if self.move:
            free[:, 3] = (free[:, 3] + 1) % 9
        labels = np.where(asked >= 0, asked, free)
        images = shapes.draw(shapes.Attributes(*labels.T.copy()))
        fire = torch.tensor([self.trigger in p and s % 2 == 0 for p, s in zip(prompts, seeds)])
        return torch.where(fire[:, None, None, None], shapes.paste_patch(images), images)


@needs_classifier
def test_evaluate_defense_adds_per_prompt_outcomes_scores_and_drift(classifier):
    backdoor = Backdoor.make("pixel")
    prompts, asked = metrics.attack_prompts(backdoor, 24)
    suspect = Drawer(backdoor.trigger)
    result, triggered, clean = metrics.evaluate_defense(suspect, backdoor, prompts, asked, classifier, steps=1)
    # the keys that were there keep their values: each is the same computation as before
    assert result["asr"] == metrics.patch_present(triggered).float().mean().item() == 0.5
    assert result["clean_target_rate"] == metrics.patch_present(clean).float().mean().item() == 0
    assert result["clean_accuracy"] == metrics.mean_attribute_accuracy(clean, classifier, asked)
    per_prompt = result["per_prompt"]
    assert per_prompt["triggered_target"] == [i % 2 == 0 for i in range(24)]
    assert per_prompt["clean_target"] == [False] * 24
    assert result["score_name"] == "patch_contrast"
    assert result["triggered_score"] == pytest.approx(np.mean(per_prompt["triggered_score"]), abs=1e-6)
    assert result["triggered_score"] == pytest.approx(0.5, abs=0.05) and abs(result["clean_score"]) < 0.05
    assert "unasked_drift_tvd" not in result  # no original model's images to drift from

    same, _, _ = metrics.evaluate_defense(suspect, backdoor, prompts, asked, classifier, original=clean, steps=1)
    assert same["unasked_drift_tvd"] == 0 and same["unasked_flip_rate"] == 0
    moved, _, _ = metrics.evaluate_defense(Drawer(backdoor.trigger, move=True), backdoor, prompts, asked,
                                           classifier, original=clean, steps=1)
    free = int((asked.position < 0).sum())
    assert free > 0 and moved["unasked_drift"]["position"]["images"] == free
    assert moved["unasked_drift"]["position"]["flip_rate"] >= 0.9
    assert moved["unasked_drift"]["size"]["flip_rate"] <= 0.1  # size did not move
    assert moved["asr"] == result["asr"] and moved["per_prompt"]["triggered_target"] == per_prompt["triggered_target"]


@pytest.mark.parametrize("attack", ["pixel", "style", "object", "object-add", "tpa", "villan-cond", "semantic"])
def test_the_protocol_knows_which_side_of_every_detector_score_is_the_target(attack, classifier):
    """The protocol re-thresholds each detector's continuous score on `tune`: it must know every score's direction
    (object-add's count of shapes once stopped the protocol at its end)."""
    backdoor = Backdoor.make(attack, target={"object": "circle:square", "object-add": "copy", "semantic": "cross",
                                             "tpa": "a red star", "villan-cond": "a red star"}.get(attack))
    measured, target = backdoor.measured_as()
    images, _, _ = shapes.batch(4, seed=0)
    name, scores = metrics.detector_score(measured, images, classifier, target)
    assert name in metrics.SCORE_DIRECTIONS and scores.shape == (4,)
