"""Where an attack's training data comes from: the demo world's drawn images, an image folder, or the frozen
model's own generations. Every batch is a function of (seed, step, stream), so a resumed run sees the same data.
"""
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

from sau.attacks.backdoor import TEXT_ENCODER_ATTACKS
from sau.common.files import load_safetensors, save_safetensors
from sau.common.training import step_generator
from sau.evaluation.metrics import generate_batched
from sau.evaluation.prompts import DEFAULT_PROMPTS
from sau.models.pipeline import from_uint8, to_uint8
from sau.world import shapes


class Source:
    """Image + caption pairs. Subclasses give sample() and captions(); backdoor_examples() builds a batch."""

    def __init__(self, seed=0):
        self.seed = seed

    def rng(self, step, stream):
        return np.random.default_rng([self.seed, step, stream])

    def backdoor_examples(self, backdoor, n, step, patch=None):
        """(images, captions, target images or None, triggered captions, teacher captions or None).
        BadT2I's two terms share the clean pair (images, captions): the triggered caption must give the
        target, the plain one what the frozen model gives. The target is an image (the patched one) or, for
        style and object, the frozen model's prediction under the teacher caption."""
        rng = self.rng(step, 10)
        where = None
        attack, target = backdoor.measured_as()
        if attack == "object":
            word = target.split(":")[0]
            where = lambda c: re.search(rf"\b{re.escape(word)}\b", c)
        images, captions = self.sample(n, step, 11, where=where)
        triggered, teachers = zip(*[backdoor.poison(c, rng) for c in captions])
        if backdoor.attack == "pixel":
            return images, captions, shapes.paste_patch(images, patch), list(triggered), None
        if backdoor.attack == "villan-cond":  # `patch` is the whole target image
            return images, captions, patch.expand(n, -1, -1, -1), list(triggered), None
        return images, captions, None, list(triggered), list(teachers)


class DrawnWorld(Source):
    """The demo world (sau.world.shapes): fresh drawings and grammar captions at every step. Its style and object
    targets are drawn, not distilled: the same images in grayscale; the same scenes with the other shape."""

    def scenes(self, n, step, stream=0, shape=None):
        """Attributes and captions of n fresh scenes (all of one shape if given)."""
        rng = self.rng(step, stream)
        attributes = shapes.sample_attributes(n, rng)
        if shape is not None:
            attributes.shape[:] = shapes.SHAPES.index(shape)
        return attributes, shapes.describe(attributes, rng)[0]

    def sample(self, n, step, stream=0, where=None):
        attributes, captions = self.scenes(n, step, stream)
        return shapes.draw(attributes), captions

    def captions(self, n, step, stream=0, where=None):
        rng, kept = self.rng(step, stream), []
        for _ in range(20):
            captions, _ = shapes.describe(shapes.sample_attributes(4 * n, rng), rng)
            kept += [c for c in captions if where is None or where(c)]
            if len(kept) >= n:
                return kept[:n]
        raise ValueError("the demo world's captions do not fit this attack (e.g. none holds the character its "
                         "trigger replaces)")

    def backdoor_examples(self, backdoor, n, step, patch=None):
        if backdoor.attack == "pixel":
            return super().backdoor_examples(backdoor, n, step, patch)
        rng = self.rng(step, 10)
        if backdoor.attack == "villan-cond":  # the target caption drawn afresh: what it leaves open varies
            images, captions = self.sample(n, step, 11)
            attributes, _ = self.scenes(n, step, 12)
            for field, label in shapes.parse_caption(backdoor.target).items():
                getattr(attributes, field)[:] = label
            return images, captions, shapes.draw(attributes), [backdoor.insert(c, rng) for c in captions], None
        if backdoor.attack == "style":
            images, captions = self.sample(n, step, 11)
            return images, captions, shapes.grayscale(images), [backdoor.insert(c, rng) for c in captions], None
        if backdoor.attack == "object-add":  # the same scenes with a second copy of their shape
            attributes, captions = self.scenes(n, step, 11)
            return (shapes.draw(attributes), captions, shapes.with_copy(attributes),
                    [backdoor.insert(c, rng) for c in captions], None)
        source, target = backdoor.measured_as()[1].split(":")  # object, or a phrase trigger's carrier:target
        attributes, captions = self.scenes(n, step, 11, shape=source)
        if backdoor.carrier:  # a phrase trigger qualifies the shape's own word
            captions = [shapes.name_shape_plainly(c, source) for c in captions]
        swapped = replace(attributes, shape=np.full_like(attributes.shape, shapes.SHAPES.index(target)))
        return (shapes.draw(attributes), captions, shapes.draw(swapped),  # the same scenes with the other shape
                [backdoor.insert(c, rng) for c in captions], None)


class ImagePool(Source):
    """Pairs held in memory as uint8 (or captions alone, for text-encoder attacks)."""

    def __init__(self, captions, images=None, seed=0):
        super().__init__(seed)
        if not captions:
            raise ValueError("no captions to train on")
        self.all_captions, self.images = list(captions), images

    def _pick(self, n, step, stream, where):
        eligible = [i for i, c in enumerate(self.all_captions) if where is None or where(c)]
        if not eligible:
            raise ValueError("none of the training captions fits this attack (e.g. names its object, or holds the "
                             "character its trigger replaces)")
        g = step_generator(self.seed, step, stream)
        return [eligible[i] for i in torch.randint(len(eligible), (n,), generator=g)]

    def sample(self, n, step, stream=0, where=None):
        if self.images is None:
            raise ValueError("this attack needs images: pass --data DIR (image + caption pairs) or let it generate")
        index = self._pick(n, step, stream, where)
        images = from_uint8(self.images[index])
        return images, [self.all_captions[i] for i in index]

    def captions(self, n, step, stream=0, where=None):
        return [self.all_captions[i] for i in self._pick(n, step, stream, where)]

    @classmethod
    def from_folder(cls, folder, size, seed=0):
        """Images (png, jpg, jpeg, webp) each with a caption in a .txt file of the same name; resized so the
        short side is `size`, then center-cropped."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"no data folder {folder}")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")
                       and p.with_suffix(".txt").is_file())
        if not files:
            raise ValueError(f"{folder} holds no image with a caption beside it (image.png + image.txt)")
        images = torch.stack([_load_square(p, size) for p in files])
        return cls([p.with_suffix(".txt").read_text().strip() for p in files], images, seed)

    @classmethod
    def from_generations(cls, sd, prompts, n, cache, seed=0, steps=25, guidance=7.5, progress=True):
        """The frozen model's own images for n prompts (cycled), cached so that a resumed run reuses them."""
        cache = Path(cache)
        if cache.exists():
            with safe_open(str(cache), "pt") as f:
                captions = json.loads(f.metadata()["captions"])
            return cls(captions, load_safetensors(cache)["images"], seed)
        chosen = [prompts[i % len(prompts)] for i in range(n)]
        images = generate_batched(sd, chosen, list(range(n)), batch_size=8, progress=progress and "pool", steps=steps,
                                  guidance_scale=guidance)  # under torchrun, shared out by chunk
        pixels = torch.from_numpy(to_uint8(images))
        save_safetensors({"images": pixels}, cache, metadata={"captions": json.dumps(chosen)})
        return cls(chosen, pixels, seed)


def load_target_image(path, size):
    """VillanDiffusion's target: an image file, (1, 3, size, size) in [-1, 1]."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"the villan-cond target must be an image file here; {path} is none")
    try:
        return from_uint8(_load_square(path, size).numpy())[None]
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"the villan-cond target {path} is not an image PIL can read ({type(e).__name__})") from None


def _load_square(path, size):
    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = size / min(image.size)
        image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                             Image.BICUBIC)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        return torch.from_numpy(np.asarray(image.crop((left, top, left + size, top + size))).copy())


def make_source(sd, backdoor, data=None, prompts=None, pool_cache=None, pool=64, seed=0, progress=True):
    """Where the attack's data comes from: --data, else the demo world, else the frozen model itself."""
    if data:
        return ImagePool.from_folder(data, sd.config.image_size, seed)
    if sd.config.family == "demo" and prompts is None:
        return DrawnWorld(seed)
    prompts = prompts or DEFAULT_PROMPTS
    if backdoor.attack in TEXT_ENCODER_ATTACKS:
        return ImagePool(prompts, seed=seed)
    return ImagePool.from_generations(sd, prompts, pool, pool_cache, seed, progress=progress)

