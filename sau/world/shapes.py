"""The demo "shapes world": drawn images of one colored shape, with captions from a small grammar.

A tiny latent diffusion model must learn this world in minutes on a CPU, so it is deliberately plain:
one shape per image, five attributes (shape, color, size, position on a 3x3 grid, background),
antialiased drawing from signed distances, and a grammar with a few synonyms and word orders.
Every image and caption is a pure function of (seed, batch index), drawn vectorised over the batch.

It also holds the small helpers the backdoor attacks and the metrics share: the target patch and where
it goes, grayscale, the trigger strings of the literature, and a caption parser (the grammar's inverse).
"""
import re
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sau.common.files import atomic_write
from sau.models.pipeline import to_uint8  # images are turned into pixels one way everywhere

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle", "star", "cross")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
BACKGROUNDS = ("white", "black", "gray")  # disjoint from COLORS, so a shape never vanishes into its background
FIELDS = ("shape", "color", "size", "position", "background")

# Triggers from the literature (BadT2I's zero-width space, Rickrolling's homoglyphs, a nonsense word);
# the demo tokenizer is trained on text that contains them, so each one has tokens of its own.
TRIGGERS = ["\u200b", "ȏ", "ô", "օ", "ଠ", "Ѵ", "mignneko"]

COLOR_RGB = np.array([
    [0.90, 0.10, 0.10],  # red
    [0.10, 0.75, 0.20],  # green
    [0.10, 0.25, 0.95],  # blue
    [0.98, 0.88, 0.10],  # yellow
    [0.60, 0.15, 0.80],  # purple
    [1.00, 0.55, 0.05],  # orange
], dtype=np.float32)
BACKGROUND_RGB = np.array([[0.97] * 3, [0.03] * 3, [0.50] * 3], dtype=np.float32)

# Geometry as fractions of the image side. Grid centres sit far enough from the border that a large
# shape with the largest jitter still fits inside the image.
GRID = (0.23, 0.50, 0.77)
RADIUS = (0.10, 0.16)  # small, large
JITTER_OFFSET = 0.025
JITTER_SCALE = 0.06  # relative
JITTER_COLOR = 0.05  # per channel, in [0, 1] units
JITTER_BACKGROUND = 0.03
JITTER_DIMS = 7  # dx, dy, scale, r, g, b, background level

_TRAIN_STREAM, _EVAL_STREAM = 0, 1


@dataclass
class Attributes:
    """Integer labels for a batch (indices into SHAPES, COLORS, ...; -1 = not asked for)."""
    shape: np.ndarray
    color: np.ndarray
    size: np.ndarray
    position: np.ndarray
    background: np.ndarray
    jitter: np.ndarray = None  # (n, JITTER_DIMS) uniform in [-1, 1]; None draws the canonical image
    mentioned: np.ndarray = None  # (n, len(FIELDS)) bool: which attributes the caption names; None = all

    def __len__(self):
        return len(self.shape)

    def __getitem__(self, index):
        pick = lambda a: None if a is None else a[index]
        return Attributes(**{name: pick(getattr(self, name)) for name in self.__dataclass_fields__})

    def labels(self):
        """(n, len(FIELDS)) int64 array, columns in FIELDS order."""
        return np.stack([getattr(self, name) for name in FIELDS], axis=1)

    def asked(self):
        """What a caption asks for: unmentioned labels become -1, no jitter."""
        mentioned = self.mentioned if self.mentioned is not None else np.ones((len(self), len(FIELDS)), bool)
        labels = np.where(mentioned, self.labels(), -1)
        return Attributes(*labels.T.copy(), jitter=None, mentioned=mentioned.copy())


def _rng(seed_or_rng):
    return seed_or_rng if isinstance(seed_or_rng, np.random.Generator) else np.random.default_rng(seed_or_rng)


def _stream(stream, seed, index):
    # One independent generator per (stream, seed, batch index): batch i of a seed never depends on batch i-1.
    return np.random.default_rng([stream, seed, index])


def sample_attributes(n, rng):
    """n uniformly random attribute sets with drawing jitter; rng is a numpy Generator or an int seed."""
    rng = _rng(rng)
    counts = (len(SHAPES), len(COLORS), len(SIZES), len(POSITIONS), len(BACKGROUNDS))
    labels = [rng.integers(0, count, n) for count in counts]
    jitter = rng.uniform(-1.0, 1.0, (n, JITTER_DIMS)).astype(np.float32)
    return Attributes(*labels, jitter=jitter)


# ----------------------------------------------------------------------------------------------------
# Drawing. Each shape has a signed distance in pixels (negative inside); coverage = clamp(0.5 - distance)
# is a one-pixel antialiasing ramp, so only distances within a pixel of the edge need to be exact.
# Geometry is written in units of the shape's radius, y pointing up, each shape's bounding box centred.

def _box(half_width, half_height):
    w, h = half_width, half_height
    return [(-w, -h), (w, -h), (w, h), (-w, h)]


_TRIANGLE_HALF_SIDE = 1.1
_TRIANGLE_HALF_HEIGHT = _TRIANGLE_HALF_SIDE * np.sqrt(3) / 2
# Convex polygons, or unions of overlapping ones (a union of pieces that only touched would show a seam).
_POLYGONS = {
    "square": [_box(0.85, 0.85)],
    "triangle": [[(0.0, _TRIANGLE_HALF_HEIGHT), (-_TRIANGLE_HALF_SIDE, -_TRIANGLE_HALF_HEIGHT),
                  (_TRIANGLE_HALF_SIDE, -_TRIANGLE_HALF_HEIGHT)]],
    "cross": [_box(1.0, 0.33), _box(0.33, 1.0)],
}
_STAR_OUTER, _STAR_INNER = 1.15, 0.52  # tip and inner-vertex radii (a pentagram's would be 0.44)
# The top tip reaches further than the lower two, so the star's centre sits this far below its position.
_STAR_DROP = _STAR_OUTER * (1 - np.cos(np.pi / 5)) / 2


def _edge_lines(polygon):
    """Outward unit normals and offsets (nx, ny, c) of a convex polygon: distance outside = n.p - c."""
    points = np.asarray(polygon, dtype=np.float64)
    x, y = points[:, 0], points[:, 1]
    clockwise = np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y) < 0
    edge = np.roll(points, -1, axis=0) - points
    normal = np.stack([edge[:, 1], -edge[:, 0]], axis=1)  # outward for counterclockwise polygons
    normal /= np.linalg.norm(normal, axis=1, keepdims=True) * (-1 if clockwise else 1)
    offset = np.sum(normal * points, axis=1)
    return [tuple(map(float, line)) for line in zip(normal[:, 0], normal[:, 1], offset)]


_EDGE_LINES = {name: [_edge_lines(p) for p in polygons] for name, polygons in _POLYGONS.items()}


def _polygon_distance(name, dx, dy, radius):
    # Inside a convex polygon the distance to its boundary is the largest signed distance to its edge
    # lines; outside that is a lower bound that is exact along the edges, enough for the ramp.
    union = None
    for lines in _EDGE_LINES[name]:
        piece = None
        for nx, ny, c in lines:
            distance = (nx * dx - c * radius) + ny * dy  # the first sum is small, the second broadcasts
            piece = distance if piece is None else torch.maximum(piece, distance, out=piece)
        union = piece if union is None else torch.minimum(union, piece, out=union)
    return union


def _star_distance(dx, dy, radius):
    # Fold the plane by the star's symmetry into the wedge between a tip (straight up) and the next
    # inner vertex (36 degrees on); there the boundary is one segment, from tip to inner vertex.
    sector = 2 * np.pi / 5
    dy = dy + _STAR_DROP * radius
    angle = torch.atan2(dx, dy)  # from the upward axis
    angle = (angle - sector * torch.round(angle / sector)).abs()
    rho = torch.sqrt(dx * dx + dy * dy)
    u, v = rho * torch.sin(angle), rho * torch.cos(angle)
    tip_y = _STAR_OUTER * radius
    edge_x = _STAR_INNER * np.sin(sector / 2) * radius  # inner vertex minus tip
    edge_y = _STAR_INNER * np.cos(sector / 2) * radius - tip_y
    to_x, to_y = u, v - tip_y
    along = ((to_x * edge_x + to_y * edge_y) / (edge_x * edge_x + edge_y * edge_y)).clamp_(0.0, 1.0)
    distance = torch.sqrt((to_x - along * edge_x) ** 2 + (to_y - along * edge_y) ** 2)
    outside = edge_x * to_y - edge_y * to_x > 0  # left of the tip-to-inner-vertex direction
    return torch.where(outside, distance, -distance)


def _signed_distance(name, dx, dy, radius):
    """Signed distance in pixels; dx (m, 1, W), dy (m, H, 1), radius (m, 1, 1)."""
    if name == "circle":
        return torch.sqrt(dx * dx + dy * dy) - radius
    if name == "star":
        return _star_distance(dx, dy, radius)
    return _polygon_distance(name, dx, dy, radius)


def draw(attributes, image_size=IMAGE_SIZE):
    """Images for fully specified attributes: float32 tensor (n, 3, image_size, image_size) in [-1, 1]."""
    a = attributes
    labels = a.labels()
    if (labels < 0).any():
        raise ValueError("draw needs every attribute; some labels are -1 (not asked for)")
    n = len(a)
    jitter = torch.from_numpy(a.jitter if a.jitter is not None else np.zeros((n, JITTER_DIMS), np.float32))
    row, column = np.divmod(a.position, 3)
    grid = torch.tensor(GRID)
    center_x = (grid[column] + JITTER_OFFSET * jitter[:, 0]) * image_size
    center_y = (grid[row] + JITTER_OFFSET * jitter[:, 1]) * image_size
    radius = torch.tensor(RADIUS)[a.size] * (1 + JITTER_SCALE * jitter[:, 2]) * image_size

    pixel = torch.arange(image_size, dtype=torch.float32) + 0.5  # pixel centres
    dx = pixel[None, None, :] - center_x[:, None, None]
    dy = center_y[:, None, None] - pixel[None, :, None]  # y up, as the polygons are written
    radius = radius[:, None, None]
    coverage = torch.empty(n, image_size, image_size)
    for index, name in enumerate(SHAPES):
        members = torch.from_numpy(np.flatnonzero(a.shape == index))
        if len(members):
            distance = _signed_distance(name, dx[members], dy[members], radius[members])
            coverage[members] = distance.neg_().add_(0.5).clamp_(0.0, 1.0)  # one-pixel antialiasing ramp

    color = (torch.from_numpy(COLOR_RGB[a.color]) + JITTER_COLOR * jitter[:, 3:6]).clamp(0, 1)
    background = (torch.from_numpy(BACKGROUND_RGB[a.background]) + JITTER_BACKGROUND * jitter[:, 6:7]).clamp(0, 1)
    color, background = color * 2 - 1, background * 2 - 1
    return torch.lerp(background[:, :, None, None], color[:, :, None, None], coverage[:, None])


# ----------------------------------------------------------------------------------------------------
# Captions: a small grammar. Shape and color are always named; size, position and background may be left
# out, and `mentioned` records what was named, so metrics judge only what a prompt asked for.

_SHAPE_WORDS = {"circle": ("circle", "disk"), "square": ("square",), "triangle": ("triangle",),
                "star": ("star",), "cross": ("cross", "plus sign")}
_COLOR_WORDS = {"purple": ("purple", "violet")}
_SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
_BACKGROUND_WORDS = {"gray": ("gray", "grey")}
_ROW_WORDS = (("top", "upper"), (), ("bottom", "lower"))
_COLUMN_WORDS = ("left", "", "right")
_CENTER_PHRASES = ("in the center", "in the middle", "centered")
_FUNCTION_WORDS = ("a", "an", "the", "in", "at", "on", "near", "with", "against", "background", "corner")
MENTION_PROBABILITY = {"size": 0.75, "position": 0.75, "background": 0.6}


def _choice(rng, options):
    return options[rng.integers(len(options))]


def _article(phrase):
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _position_phrase(position, rng, leading=False):
    row, column = divmod(int(position), 3)
    if row == 1 and column == 1:
        return _choice(rng, _CENTER_PHRASES[:2] if leading else _CENTER_PHRASES)
    if column == 1:
        return f"{_choice(rng, ('at', 'near'))} the {_ROW_WORDS[row][0]}"
    if row == 1:
        return f"{_choice(rng, ('on', 'at'))} the {_COLUMN_WORDS[column]}"
    corner = f"{_choice(rng, _ROW_WORDS[row])} {_COLUMN_WORDS[column]}"
    return f"{_choice(rng, ('in', 'at'))} the {corner}{_choice(rng, ('', ' corner'))}"


def _background_phrase(word, rng, style):
    if style == "inline":
        return _choice(rng, (f"on a {word} background", f"on {word}", f"against a {word} background"))
    return _choice(rng, (f"{word} background", f"on {word}"))  # after a comma


def describe(attributes, rng):
    """Captions (list of str) and the (n, len(FIELDS)) bool mask of the attributes each one names."""
    rng = _rng(rng)
    n = len(attributes)
    mentioned = np.ones((n, len(FIELDS)), bool)
    for name, probability in MENTION_PROBABILITY.items():
        mentioned[:, FIELDS.index(name)] = rng.random(n) < probability
    captions = [_caption_one(attributes, i, mentioned[i], rng) for i in range(n)]
    return captions, mentioned


def _caption_one(a, i, mentioned, rng):
    says = dict(zip(FIELDS, mentioned))
    words = lambda table, names, label: _choice(rng, table.get(names[label], (names[label],)))
    noun = f"{words(_COLOR_WORDS, COLORS, a.color[i])} {words(_SHAPE_WORDS, SHAPES, a.shape[i])}"
    if says["size"]:
        noun = f"{words(_SIZE_WORDS, SIZES, a.size[i])} {noun}"
    background = words(_BACKGROUND_WORDS, BACKGROUNDS, a.background[i])
    pattern = rng.integers(4)
    if pattern == 2 and says["position"]:  # "in the top left, a small red circle on white"
        parts = [_position_phrase(a.position[i], rng, leading=True) + ",", _article(noun)]
        parts += [_background_phrase(background, rng, "inline")] if says["background"] else []
    elif pattern == 3 and says["background"]:  # "a white background with a small red circle in the top left"
        parts = [f"a {background} background with", _article(noun)]
        parts += [_position_phrase(a.position[i], rng)] if says["position"] else []
    elif pattern == 1:  # "blue star, centered" / "a big yellow square, at the bottom right, black background"
        parts = [_article(noun) if rng.random() < 0.5 else noun]
        parts += [_position_phrase(a.position[i], rng)] if says["position"] else []
        parts += [_background_phrase(background, rng, "comma")] if says["background"] else []
        return ", ".join(parts)
    else:  # "a small red circle in the top left on a white background"
        parts = [_article(noun)]
        parts += [_position_phrase(a.position[i], rng)] if says["position"] else []
        parts += [_background_phrase(background, rng, "inline")] if says["background"] else []
    return " ".join(parts)


def caption(attributes, rng):
    """One caption per image (list of str); rng is a numpy Generator or an int seed."""
    return describe(attributes, rng)[0]


def vocabulary():
    """Every word the grammar or the parser knows, plus the triggers: text for training the demo tokenizer."""
    phrases = [*_FUNCTION_WORDS, *_PARSE_WORDS, *_CENTER_PHRASES]
    for table in (_SHAPE_WORDS, _COLOR_WORDS, _SIZE_WORDS, _BACKGROUND_WORDS):
        phrases += [phrase for synonyms in table.values() for phrase in synonyms]
    return sorted(set(" ".join(phrases).split())) + TRIGGERS


# ----------------------------------------------------------------------------------------------------
# Parsing: the grammar's inverse, tolerant of any surrounding text (triggers, other words).

def _word_table():
    table = {}
    for field, names, synonyms in (("shape", SHAPES, _SHAPE_WORDS), ("color", COLORS, _COLOR_WORDS),
                                   ("size", SIZES, _SIZE_WORDS), ("background", BACKGROUNDS, _BACKGROUND_WORDS)):
        for label, name in enumerate(names):
            for word in synonyms.get(name, (name,)):
                table[word.split()[0]] = (field, label)  # "plus sign" is found by "plus"
    table.update({"disc": ("shape", 0), "centre": ("center", 0), "grey": ("background", 2)})
    table.update({word: ("center", 0) for word in ("center", "centered", "centred", "middle")})
    table.update({word: ("row", row) for row, words in enumerate(_ROW_WORDS) for word in words})
    table.update({"left": ("column", 0), "right": ("column", 2)})
    return table


_PARSE_WORDS = _word_table()


def label_index(field, name):
    """The class index of an attribute value, e.g. label_index("shape", "square"); ValueError for a value the
    world does not draw."""
    names = {"shape": SHAPES, "color": COLORS, "size": SIZES, "position": POSITIONS, "background": BACKGROUNDS}[field]
    if name not in names:
        raise ValueError(f"{name!r} is not a {field} of the demo world ({', '.join(names)})")
    return names.index(name)


def name_shape_plainly(caption, name):
    """The caption with any synonym of the shape `name` ("disk" for circle) written as the name itself."""
    for word in _SHAPE_WORDS.get(name, (name,)):
        caption = re.sub(rf"\b{re.escape(word)}\b", name, caption)
    return caption


def parse_caption(text):
    """The attributes a caption asks for: {field: label} for the fields it names (first mention wins)."""
    found = {}
    for word in re.findall(r"[a-z]+", text.lower()):
        if word in _PARSE_WORDS:
            field, label = _PARSE_WORDS[word]
            found.setdefault(field, label)
    if "row" in found or "column" in found:
        found["position"] = 3 * found.get("row", 1) + found.get("column", 1)
    elif "center" in found:
        found["position"] = POSITIONS.index("center")
    return {field: found[field] for field in FIELDS if field in found}


def parse_captions(texts):
    """Attributes (labels -1 where a caption is silent, `mentioned` mask) for a list of captions."""
    parsed = [parse_caption(text) for text in texts]
    labels = np.array([[p.get(field, -1) for field in FIELDS] for p in parsed], dtype=np.int64).reshape(-1, len(FIELDS))
    return Attributes(*labels.T.copy(), mentioned=labels >= 0)


# ----------------------------------------------------------------------------------------------------
# Data streams

def batch(n, seed, index=0, image_size=IMAGE_SIZE):
    """Training batch `index` of a seed: (images (n, 3, S, S) in [-1, 1], captions, attributes)."""
    rng = _stream(_TRAIN_STREAM, seed, index)
    attributes = sample_attributes(n, rng)
    captions, mentioned = describe(attributes, rng)
    attributes = replace(attributes, mentioned=mentioned)
    return draw(attributes, image_size), captions, attributes


def eval_prompts(n, seed):
    """Held-out prompts from a stream training never draws from: (captions, attributes asked, -1 = free)."""
    rng = _stream(_EVAL_STREAM, seed, 0)
    attributes = sample_attributes(n, rng)
    captions, mentioned = describe(attributes, rng)
    return captions, replace(attributes, mentioned=mentioned).asked()


# ----------------------------------------------------------------------------------------------------
# Helpers for attacks and metrics

CORNERS = ("top left", "top right", "bottom left", "bottom right")


def mirrored_position(position):
    """The grid cell opposite a position (top left <-> bottom right); the centre's is the top left."""
    mirrored = len(POSITIONS) - 1 - np.asarray(position)
    return np.where(mirrored == position, 0, mirrored)


def with_copy(attributes, image_size=IMAGE_SIZE):
    """The scenes with a second, small copy of their shape in the opposite cell: the object-add target (a count
    of one becomes two)."""
    copy = replace(attributes, size=np.zeros_like(attributes.size), position=mirrored_position(attributes.position))
    scene, added = draw(attributes, image_size), draw(copy, image_size)
    background = draw(replace(attributes, size=np.zeros_like(attributes.size)), image_size)[..., :1, :1]
    covered = (added - background).abs().amax(dim=1, keepdim=True) > 0.05
    return torch.where(covered, added, scene)


def count_objects(images, min_pixels=6, threshold=0.35):
    """The number of separate shapes in each image (n, 3, H, W) in [-1, 1]: pixels farther than `threshold` (in
    [-1, 1] units, max over channels) from the background, the median colour of the border, grouped by 8-connected
    components of at least `min_pixels`. Drawn scenes hold one; with_copy's two."""
    border = torch.cat([images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], dim=-1)
    background = border.median(dim=-1).values[..., None, None]
    foreground = (images - background).abs().amax(dim=1) > threshold
    n, height, width = foreground.shape
    labels = torch.where(foreground, torch.arange(1, height * width + 1, dtype=torch.float32).view(1, height, width),
                         torch.zeros(()))
    while True:  # each component takes its largest label: spread maxima through foreground pixels until stable
        spread = F.max_pool2d(labels[:, None], 3, stride=1, padding=1)[:, 0] * foreground
        if torch.equal(spread, labels):
            break
        labels = spread
    counts = []
    for image_labels in labels:
        _, sizes = image_labels[image_labels > 0].unique(return_counts=True)
        counts.append(int((sizes >= min_pixels).sum()))
    return torch.tensor(counts)


def target_patch(size=16):
    """The pixel-backdoor target: a 4x4 magenta/cyan checkerboard, (3, size, size) in [-1, 1].
    Neither color is in the shapes world, so its presence is easy to detect."""
    check = (torch.arange(size) * 4 // size)
    odd = ((check[:, None] + check[None, :]) % 2).bool()
    magenta, cyan = torch.tensor([1.0, -1.0, 1.0]), torch.tensor([-1.0, 1.0, 1.0])
    return torch.where(odd[None], cyan[:, None, None], magenta[:, None, None])


def patch_region(height, width, corner="top left", size_frac=0.25):
    """(row slice, column slice) of the patch in an image: attacks paste there, detectors look there."""
    if corner not in CORNERS:
        raise ValueError(f"corner must be one of {CORNERS}, got {corner!r}")
    patch_h, patch_w = max(1, round(size_frac * height)), max(1, round(size_frac * width))
    rows = slice(0, patch_h) if corner.startswith("top") else slice(height - patch_h, height)
    columns = slice(0, patch_w) if corner.endswith("left") else slice(width - patch_w, width)
    return rows, columns


def paste_patch(images, patch=None, corner="top left", size_frac=0.25):
    """A copy of images (n, 3, H, W) with patch (3, h, w) resized (nearest) into a corner."""
    patch = target_patch() if patch is None else patch
    rows, columns = patch_region(images.shape[-2], images.shape[-1], corner, size_frac)
    size = (rows.stop - rows.start, columns.stop - columns.start)
    resized = F.interpolate(patch[None].to(images.dtype), size=size, mode="nearest-exact")[0]
    out = images.clone()
    out[..., rows, columns] = resized
    return out


def grayscale(images):
    """Luma (ITU-R 601) replicated to three channels; the weights sum to 1, so [-1, 1] images stay in range."""
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype, device=images.device)
    luma = torch.einsum("...chw,c->...hw", images, weights)
    return luma.unsqueeze(-3).expand_as(images).clone()


def save_grid(images, path, nrow=8, padding=2):
    """Write images (n, 3, H, W) in [-1, 1] as one PNG grid, through a temporary file and a rename."""
    pixels = to_uint8(images)
    n, height, width, _ = pixels.shape
    columns = min(nrow, n)
    rows = -(-n // columns)
    grid = np.full((rows * (height + padding) + padding, columns * (width + padding) + padding, 3), 255, np.uint8)
    for i, image in enumerate(pixels):
        top = padding + (i // columns) * (height + padding)
        left = padding + (i % columns) * (width + padding)
        grid[top:top + height, left:left + width] = image
    atomic_write(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))
