"""The attack-success detectors, validated on drawn images with and without each target (>= 98% right)."""
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
