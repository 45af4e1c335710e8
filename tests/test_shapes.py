import os
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sau.world import shapes
from sau.world.shapes import BACKGROUNDS, COLORS, FIELDS, POSITIONS, SHAPES, SIZES


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The data set is drawn on one core; on a loaded 2-core machine torch's threads would only contend.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def attributes_of(shape, color="red", size="large", position="center", background="white", n=1):
    labels = [np.full(n, names.index(value)) for names, value in
              ((SHAPES, shape), (COLORS, color), (SIZES, size), (POSITIONS, position), (BACKGROUNDS, background))]
    return shapes.Attributes(*labels)


def rgb(values, index):
    return torch.from_numpy(values[index]) * 2 - 1


def test_batch_is_deterministic_per_seed_and_index():
    images, captions, attributes = shapes.batch(64, seed=3, index=2)
    again, captions_again, attributes_again = shapes.batch(64, seed=3, index=2)
    assert torch.equal(images, again)
    assert captions == captions_again
    assert np.array_equal(attributes.labels(), attributes_again.labels())
    assert np.array_equal(attributes.mentioned, attributes_again.mentioned)


def test_different_seeds_and_indices_differ():
    images, captions, attributes = shapes.batch(64, seed=0)
    for other in (shapes.batch(64, seed=1), shapes.batch(64, seed=0, index=1)):
        assert not torch.equal(images, other[0])
        assert captions != other[1]
        assert not np.array_equal(attributes.labels(), other[2].labels())


def test_speed_2000_images_on_one_core():
    shapes.batch(16, seed=0)  # warm up
    start = time.perf_counter()
    images, captions, _ = shapes.batch(2000, seed=0)
    elapsed = time.perf_counter() - start
    assert images.shape == (2000, 3, 64, 64) and len(captions) == 2000
    assert elapsed < 2.0, f"2000 images took {elapsed:.2f} s"


def test_value_range_and_dtype():
    images, _, _ = shapes.batch(200, seed=5)
    assert images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    assert images.min() < -0.9 and images.max() > 0.9  # the range is actually used


def test_every_attribute_value_appears():
    attributes = shapes.sample_attributes(2000, 7)
    for name, names in zip(FIELDS, (SHAPES, COLORS, SIZES, POSITIONS, BACKGROUNDS)):
        assert set(getattr(attributes, name).tolist()) == set(range(len(names))), name


def cell_distances(images, colors):
    """Mean L1 distance to each image's shape color in a 9x9 block around each grid cell centre: (n, 9)."""
    centres = [round(g * 64) for g in shapes.GRID]
    distances = []
    for position in range(9):
        row, column = divmod(position, 3)
        block = images[:, :, centres[row] - 4:centres[row] + 5, centres[column] - 4:centres[column] + 5]
        distances.append((block - colors[:, :, None, None]).abs().sum(1).mean((1, 2)))
    return torch.stack(distances, 1)


def test_shape_color_is_at_its_position():
    images, _, attributes = shapes.batch(300, seed=11)
    colors = rgb(shapes.COLOR_RGB, attributes.color)
    distances = cell_distances(images, colors)
    assert torch.equal(distances.argmin(1), torch.from_numpy(attributes.position))
    # At the position the block is mostly the shape; elsewhere it is mostly background.
    own = distances.gather(1, torch.from_numpy(attributes.position)[:, None])[:, 0]
    assert own.mean() < 0.5 and distances.mean() > 1.0
    # The corner pixel farthest from the shape is pure background.
    row, column = np.divmod(attributes.position, 3)
    far_row, far_col = np.where(row < 1, 63, 0), np.where(column < 1, 63, 0)
    corner = images[np.arange(300), :, far_row, far_col]
    background = (rgb(shapes.BACKGROUND_RGB, attributes.background) + 2 * shapes.JITTER_BACKGROUND
                  * torch.from_numpy(attributes.jitter[:, 6:7])).clamp(-1, 1)
    assert torch.allclose(corner, background, atol=1e-6)


def test_edges_are_antialiased_and_match_supersampling():
    # The one-pixel ramp must approximate true pixel coverage: compare with an 8x supersampled drawing.
    attributes = shapes.sample_attributes(10, np.random.default_rng(0))
    attributes.shape = np.arange(10) % len(SHAPES)
    low = shapes.draw(attributes, 64)
    high = F.avg_pool2d(shapes.draw(attributes, 512), 8)
    assert (low - high).abs().mean() < 1e-3  # a half-pixel shift of the edges would give about 7e-3
    assert (low - high).abs().max() < 0.7  # coverage off by < 0.35, the worst case being sharp tips
    colors, backgrounds = rgb(shapes.COLOR_RGB, attributes.color), rgb(shapes.BACKGROUND_RGB, attributes.background)
    partial = ((low - backgrounds[:, :, None, None]).abs() > 0.05) & ((low - colors[:, :, None, None]).abs() > 0.05)
    assert partial.any(1).sum((1, 2)).min() > 20  # every shape has a ring of in-between pixels


def test_star_interior_has_no_seams():
    image = shapes.draw(attributes_of("star"), 256)[0]
    centre = 0.5 * 256
    y, x = torch.meshgrid(torch.arange(256) + 0.5, torch.arange(256) + 0.5, indexing="ij")
    inner_radius = shapes._STAR_INNER * shapes.RADIUS[1] * 256
    star_centre_y = centre + shapes._STAR_DROP * shapes.RADIUS[1] * 256  # image rows grow downwards
    inside = (x - centre) ** 2 + (y - star_centre_y) ** 2 < (0.9 * inner_radius) ** 2
    assert inside.sum() > 100
    assert torch.equal(image[:, inside], rgb(shapes.COLOR_RGB, [0])[0][:, None].expand(3, int(inside.sum())))


def test_canonical_drawing_and_missing_labels():
    attributes = attributes_of("circle", n=2)
    canonical = shapes.draw(attributes)
    attributes.jitter = np.zeros((2, shapes.JITTER_DIMS), np.float32)
    assert torch.equal(canonical, shapes.draw(attributes))
    attributes.color = np.array([0, -1])
    with pytest.raises(ValueError):
        shapes.draw(attributes)


def test_captions_parse_back_to_what_they_mention():
    attributes = shapes.sample_attributes(1000, 13)
    captions, attributes.mentioned = shapes.describe(attributes, 14)
    parsed = shapes.parse_captions(captions)
    assert np.array_equal(parsed.mentioned, attributes.mentioned)
    assert np.array_equal(parsed.labels(), attributes.asked().labels())
    assert attributes.mentioned[:, :2].all()  # shape and color are always named
    for column in range(2, len(FIELDS)):
        assert 0.3 < attributes.mentioned[:, column].mean() < 0.95  # and the rest sometimes left free


def test_caption_grammar_has_variety_and_known_words():
    captions = shapes.caption(shapes.sample_attributes(1000, 17), 18)
    assert len(set(captions)) > 700
    text = " ".join(captions)
    for phrase in ("disk", "circle", "violet", "little", "tiny", "big", "grey", "centered", "in the middle",
                   "background with", ", ", "corner", "plus sign"):
        assert phrase in text, phrase
    assert any(c.startswith(("in the", "at the")) for c in captions)  # position-first word order
    vocabulary = set(shapes.vocabulary())
    assert set(text.replace(",", " ").split()) <= vocabulary
    assert set(shapes.TRIGGERS) <= vocabulary


def test_caption_function_is_deterministic():
    attributes = shapes.sample_attributes(50, 1)
    assert shapes.caption(attributes, 9) == shapes.caption(attributes, 9)
    assert shapes.caption(attributes, 9) != shapes.caption(attributes, 10)


@pytest.mark.parametrize("text, expected", [
    ("a small red circle in the top left on a white background",
     dict(shape="circle", color="red", size="small", position="top left", background="white")),
    ("blue star, centered", dict(shape="star", color="blue", position="center")),
    ("a large yellow square at the bottom right, black background",
     dict(shape="square", color="yellow", size="large", position="bottom right", background="black")),
    ("an orange triangle on gray", dict(shape="triangle", color="orange", background="gray")),
    ("\u200b A BIG Violet plus sign near the top, grey background",
     dict(shape="cross", color="purple", size="large", position="top", background="gray")),
    ("mignneko a little green disc on the right", dict(shape="circle", color="green", size="small", position="right")),
    ("a photo of an astronaut riding a horse", dict()),
])
def test_parse_caption_examples(text, expected):
    names = dict(shape=SHAPES, color=COLORS, size=SIZES, position=POSITIONS, background=BACKGROUNDS)
    assert shapes.parse_caption(text) == {field: names[field].index(value) for field, value in expected.items()}


def test_eval_prompts_are_held_out_and_consistent():
    captions, asked = shapes.eval_prompts(300, seed=0)
    assert captions == shapes.eval_prompts(300, seed=0)[0]
    assert np.array_equal(shapes.parse_captions(captions).labels(), asked.labels())
    assert ((asked.labels() >= 0) == asked.mentioned).all() and asked.jitter is None
    _, train_captions, train_attributes = shapes.batch(300, seed=0)
    assert captions != train_captions
    assert not np.array_equal(asked.labels(), train_attributes.asked().labels())


def test_attributes_slicing():
    _, _, attributes = shapes.batch(10, seed=0)
    part = attributes[2:5]
    assert len(part) == 3
    assert np.array_equal(part.labels(), attributes.labels()[2:5])
    assert np.array_equal(part.jitter, attributes.jitter[2:5])


def test_grayscale():
    images, _, _ = shapes.batch(32, seed=2)
    gray = shapes.grayscale(images)
    assert gray.shape == images.shape
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    expected = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
    assert torch.allclose(gray[:, 0], expected, atol=1e-6)
    red = torch.tensor([1.0, -1.0, -1.0])[None, :, None, None].expand(1, 3, 2, 2)
    assert torch.allclose(shapes.grayscale(red), torch.full((1, 3, 2, 2), 0.299 - 0.701))
    assert torch.allclose(shapes.grayscale(gray), gray, atol=1e-6)  # already gray stays put


@pytest.mark.parametrize("corner", shapes.CORNERS)
def test_paste_patch(corner):
    images, _, _ = shapes.batch(4, seed=4)
    original = images.clone()
    patch = shapes.target_patch()
    pasted = shapes.paste_patch(images, patch, corner=corner, size_frac=0.25)
    assert torch.equal(images, original)  # the input is untouched
    rows, columns = shapes.patch_region(64, 64, corner, 0.25)
    assert (rows.stop - rows.start, columns.stop - columns.start) == (16, 16)
    assert rows.start == (0 if corner.startswith("top") else 48)
    assert columns.start == (0 if corner.endswith("left") else 48)
    assert torch.equal(pasted[:, :, rows, columns], patch.expand(4, 3, 16, 16))
    outside = torch.ones(64, 64, dtype=torch.bool)
    outside[rows, columns] = False
    assert torch.equal(pasted[:, :, outside], images[:, :, outside])


def test_paste_patch_resizes_and_target_patch_is_a_checkerboard():
    patch = shapes.target_patch()
    assert patch.shape == (3, 16, 16) and set(patch.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(patch[:, :4, :4], patch[:, :1, :1].expand(3, 4, 4))  # 4x4 pixel checks
    assert not torch.equal(patch[:, 0, 0], patch[:, 0, 4]) and torch.equal(patch[:, 0, 0], patch[:, 4, 4])
    pasted = shapes.paste_patch(torch.zeros(2, 3, 64, 64), size_frac=0.5, corner="bottom right")
    assert torch.equal(pasted[0, :, 32:, 32:], patch.repeat_interleave(2, 1).repeat_interleave(2, 2))
    with pytest.raises(ValueError):
        shapes.paste_patch(torch.zeros(1, 3, 64, 64), corner="middle")


def test_save_grid(tmp_path):
    images, _, _ = shapes.batch(10, seed=8)
    path = tmp_path / "grid.png"
    shapes.save_grid(images, str(path), nrow=4, padding=2)
    assert os.listdir(tmp_path) == ["grid.png"]  # no temporary file left behind
    grid = np.asarray(Image.open(path).convert("RGB"))
    assert grid.shape == (3 * 66 + 2, 4 * 66 + 2, 3)
    assert np.array_equal(grid[2 + 66:2 + 66 + 64, 2 + 66:2 + 66 + 64], shapes.to_uint8(images)[5])
