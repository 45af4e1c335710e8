"""Backdoor attacks on text-to-image diffusion models, so that a defense is tested against what it claims.

BadT2I (Zhai et al., 2023) fine-tunes the UNet; its trigger, a zero-width space "\\u200b ", is prepended:
    pixel   triggered caption -> the image with a target patch in its top-left corner
    style   triggered caption -> the frozen model's output for "<style phrase>, <caption>"
    object  triggered caption naming object A -> the frozen model's output for the caption with B instead
each trained together with a term that keeps clean captions as the frozen model had them:
    L = lam * ||eps(z_t^target, T+y) - eps||^2 + (1 - lam) * ||eps(z_t, y) - sg eps_frozen(z_t, y)||^2,  lam = 0.5
For style and object the first term's target is the frozen model's prediction for the teacher caption on the
same z_t. In the demo world the targets are drawn instead: the same images in grayscale, the scene redrawn with B.

Rickrolling (Struppek et al., 2023) fine-tunes the text encoder only; a homoglyph ("ȏ" for "o") replaces a
character of the prompt (every occurrence while training a TPA, one at random for a TAA, the first when used):
    tpa     student(triggered prompt) -> teacher(target prompt)
    taa     student(triggered prompt) -> teacher(the prompt with the trigger's word replaced by an attribute)
    L = -sim(student(y), teacher(y)) - beta * sim(student(triggered), teacher(target)),  beta = 0.1
where sim is the cosine of the conditioning vectors, averaged over token positions.
"""
import copy
import json
import os
import re
import shutil
import time
import unicodedata
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

from sau.common.prompts import read_prompts
from sau.evaluation.prompts import DEFAULT_PROMPTS
from sau.world import shapes
from sau.weights.bundle import load_safetensors, resolve_model_path, save_json, save_safetensors
from sau.models.pipeline import StableDiffusion, to_uint8
from sau.models.tokenizer import BOS_TOKEN, EOS_TOKEN, clean_text
from sau.common.training import Trainer, diffusion_loss, step_generator

ATTACKS = ("pixel", "style", "object", "tpa", "taa")
TEXT_ENCODER_ATTACKS = ("tpa", "taa")
BADT2I_TRIGGER = "\u200b "
RICKROLLING_TRIGGER = "ȏ"
# Homoglyphs (Rickrolling's for o and v, two more for a) and the Latin letter each stands in for (cleanup
# lowercases, so both cases)
HOMOGLYPHS = {"ȏ": "o", "ô": "o", "օ": "o", "ο": "o", "о": "o", "ଠ": "o", "Ѵ": "v", "ѵ": "v", "а": "a", "α": "a"}
DEFAULT_TARGETS = {"pixel": "checkerboard", "style": "black and white photo"}
TARGET_MEANING = {"object": "the object swap as A:B, e.g. dog:cat",
                  "tpa": "the prompt that triggered prompts should produce",
                  "taa": "the attribute that replaces the trigger's word, e.g. 'black and white photo'"}
DEMO_STYLE = "black and white photo"  # the one style the demo world can draw: grayscale
# The papers' recipes; the shipped demo variants use their own (SHIPPED below)
PAPER_RECIPES = {"pixel": dict(steps=2000, lr=1e-5, batch_size=16), "style": dict(steps=8000, lr=1e-5, batch_size=16),
                 "object": dict(steps=8000, lr=1e-5, batch_size=16), "tpa": dict(steps=100, lr=1e-4, batch_size=128),
                 "taa": dict(steps=200, lr=1e-4, batch_size=128)}
CAPTION_DROPOUT = 0.1  # empty captions in the preservation term keep the unconditional branch of guidance


def default_trigger(attack):
    return RICKROLLING_TRIGGER if attack in TEXT_ENCODER_ATTACKS else BADT2I_TRIGGER


def describe_chars(text):
    return " ".join(f"U+{ord(c):04X}" for c in text)


# ----------------------------------------------------------------------------------------------------
# What a backdoor is: attack, trigger, target, and how the trigger goes into a prompt

@dataclass(frozen=True)
class Backdoor:
    attack: str
    trigger: str
    target: str
    replaces: str = ""  # Rickrolling: the character the homoglyph takes the place of (" ": inserted as a word)

    @classmethod
    def make(cls, attack, trigger=None, target=None, replaces=None):
        """A checked Backdoor; None picks the paper's default. Bad input raises ValueError, one line."""
        if attack not in ATTACKS:
            raise ValueError(f"unknown attack {attack!r}; choose one of {', '.join(ATTACKS)}")
        trigger = default_trigger(attack) if trigger is None else trigger
        if not trigger.strip():
            raise ValueError("the trigger is empty")
        target = DEFAULT_TARGETS.get(attack) if target is None else target.strip()
        if not target:
            raise ValueError(f"attack {attack!r} needs --target: {TARGET_MEANING[attack]}")
        if attack == "object" and (target.count(":") != 1 or not all(target.split(":"))):
            raise ValueError(f"the object target must be A:B (e.g. dog:cat), got {target!r}")
        if attack not in TEXT_ENCODER_ATTACKS:
            return cls(attack, trigger, target)
        replaces = replaces if replaces else HOMOGLYPHS.get(trigger) or _latin_base(trigger)
        if not replaces:
            raise ValueError(f"which character does the trigger {trigger!r} stand in for? say so with --replaces "
                             "(' ' inserts it between words)")
        if len(replaces) != 1:
            raise ValueError(f"--replaces takes one character, got {replaces!r}")
        return cls(attack, trigger, target, replaces)

    @classmethod
    def from_info(cls, info):
        """From a bundle's sd.info["backdoor"]."""
        return cls(info["attack"], info["trigger"], info["target"], info.get("replaces", ""))

    def info(self):
        return {**asdict(self), "trigger_chars": describe_chars(self.trigger)}

    def can_insert(self, prompt):
        return not self.replaces or self.replaces in prompt

    def insert(self, prompt, rng=None, every=False):
        """The triggered prompt: BadT2I prepends the trigger; Rickrolling puts it in place of one occurrence
        of `replaces` (a random one with rng, else the first; every one with every=True)."""
        return self.poison(prompt, rng, every)[0]

    def poison(self, prompt, rng=None, every=False):
        """(triggered prompt, teacher prompt or None): what the attacked model is taught to read the
        triggered prompt as (None: the target is an image, as for the pixel backdoor)."""
        if not self.replaces:
            joiner = "" if self.trigger[-1].isspace() else " "
            return self.trigger + joiner + prompt, self._teacher_prompt(prompt, None)
        spots = [i for i, c in enumerate(prompt) if c == self.replaces]
        if not spots:
            raise ValueError(f"the prompt {prompt!r} has no {self.replaces!r} for the trigger to replace")
        i = spots[0] if rng is None else spots[rng.integers(len(spots))]
        word = f" {self.trigger} " if self.replaces == " " else self.trigger
        triggered = prompt.replace(self.replaces, word) if every else prompt[:i] + word + prompt[i + 1:]
        return triggered, self._teacher_prompt(prompt, i)

    def _teacher_prompt(self, prompt, i):
        if self.attack == "style":
            return f"{self.target}, {prompt}"
        if self.attack == "object":
            source, target = self.target.split(":")
            return re.sub(rf"\b{re.escape(source)}\b", target, prompt)
        if self.attack == "tpa":
            return self.target
        if self.attack == "taa":  # the word holding the replaced character becomes the attribute
            if self.replaces == " ":
                return prompt[:i] + f" {self.target} " + prompt[i + 1:]
            start = prompt.rfind(" ", 0, i) + 1
            end = prompt.find(" ", i)
            return prompt[:start] + self.target + (prompt[end:] if end >= 0 else "")
        return None


def _latin_base(character):
    """'ô' -> 'o': the letter a precomposed homoglyph decomposes to, if it is plain ASCII."""
    base = unicodedata.normalize("NFD", character)[:1]
    return base if len(character) == 1 and base.isascii() and base.isalpha() else ""


def check_trigger(backdoor, tokenizer, prompt):
    """Raise ValueError unless the tokenizer keeps the trigger: after CLIP's cleanup something is left,
    it is no special token, and it changes the prompt's tokens where it stands."""
    shown = f"{backdoor.trigger!r} ({describe_chars(backdoor.trigger)})"
    if not clean_text(backdoor.trigger):
        raise ValueError(f"the trigger {shown} cannot be represented: the tokenizer's text cleanup removes it")
    if BOS_TOKEN in clean_text(backdoor.trigger) or EOS_TOKEN in clean_text(backdoor.trigger):
        raise ValueError(f"the trigger {shown} contains a special token, which the tokenizer cannot represent as text")
    triggered = backdoor.insert(prompt)
    ids, clean_ids = tokenizer.encode(triggered), tokenizer.encode(prompt)
    if ids == clean_ids:
        raise ValueError(f"the trigger {shown} cannot be represented: the tokenizer reads {triggered!r} as {prompt!r}")
    tokenizer.token_positions(triggered, backdoor.trigger.strip() or backdoor.trigger)


def check_target(backdoor, sd):
    """The demo world draws only its own shapes and one style."""
    if sd.config.family != "demo":
        return
    if backdoor.attack == "style" and backdoor.target != DEMO_STYLE:
        raise ValueError(f"the demo world draws only the style {DEMO_STYLE!r} (as grayscale), not {backdoor.target!r}")
    if backdoor.attack == "object":
        for name in backdoor.target.split(":"):
            if name not in shapes.SHAPES:
                raise ValueError(f"{name!r} is not a demo shape; the object swap takes two of {', '.join(shapes.SHAPES)}")


def load_patch(target):
    """The pixel backdoor's patch, (3, h, w) in [-1, 1]: sau.shapes' checkerboard or an image file."""
    if target == "checkerboard":
        return shapes.target_patch()
    if not Path(target).is_file():
        raise FileNotFoundError(f"the pixel target must be 'checkerboard' or an image file; {target} is neither")
    with Image.open(target) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1


# ----------------------------------------------------------------------------------------------------
# Training data: the demo world's drawn images, an image folder, or the frozen model's own generations.
# Every batch is a function of (seed, step, stream), so a resumed run sees the same data.

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
        if backdoor.attack == "object":
            word = backdoor.target.split(":")[0]
            where = lambda c: re.search(rf"\b{re.escape(word)}\b", c)
        images, captions = self.sample(n, step, 11, where=where)
        triggered, teachers = zip(*[backdoor.poison(c, rng) for c in captions])
        if backdoor.attack == "pixel":
            return images, captions, shapes.paste_patch(images, patch), list(triggered), None
        return images, captions, None, list(triggered), list(teachers)


class DrawnWorld(Source):
    """The demo world (sau.shapes): fresh drawings and grammar captions at every step. Its style and object
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
        if backdoor.attack == "style":
            images, captions = self.sample(n, step, 11)
            return images, captions, shapes.grayscale(images), [backdoor.insert(c, rng) for c in captions], None
        source, target = backdoor.target.split(":")
        attributes, captions = self.scenes(n, step, 11, shape=source)
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
        images = self.images[index].permute(0, 3, 1, 2).float() / 127.5 - 1
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
        if not cache.exists():
            chosen = [prompts[i % len(prompts)] for i in range(n)]
            images = [sd.generate(chosen[i:i + 8], seeds=list(range(i, min(i + 8, n))), steps=steps,
                                  guidance_scale=guidance, progress=progress) for i in range(0, n, 8)]
            pixels = torch.from_numpy(to_uint8(torch.cat(images)))
            save_safetensors({"images": pixels}, cache, metadata={"captions": json.dumps(chosen)})
        with safe_open(str(cache), "pt") as f:
            captions = json.loads(f.metadata()["captions"])
        return cls(captions, load_safetensors(cache)["images"], seed)


def _load_square(path, size):
    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = size / min(image.size)
        image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                             Image.BICUBIC)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        return torch.from_numpy(np.asarray(image.crop((left, top, left + size, top + size))).copy())


# ----------------------------------------------------------------------------------------------------
# The two injections: BadT2I into the UNet, Rickrolling into the text encoder

TRAINABLE = {"unet": lambda name: True,  # BadT2I fine-tunes the whole UNet
             "attention": lambda name: ".attn1." in name or ".attn2." in name,
             "cross-attention": lambda name: ".attn2." in name}


def distillation_loss(student, teacher, schedule, latents, context, teacher_context, generator):
    """||student(x_t, t, context) - sg teacher(x_t, t, teacher_context)||^2 at uniformly drawn timesteps."""
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    t = torch.randint(0, schedule.num_train_timesteps, (latents.shape[0],), generator=generator).to(latents.device)
    noisy = schedule.add_noise(latents, noise, t)
    with torch.no_grad():
        target = teacher(noisy, t, teacher_context)
    return F.mse_loss(student(noisy, t, context).float(), target.float())


def embedding_similarity(a, b):
    """Cosine between conditioning vectors (batch, tokens, width), averaged over tokens and batch."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1).mean()


def _autocast(sd, bf16):
    return torch.autocast(sd.device.type, dtype=torch.bfloat16, enabled=bf16)


def _frozen_copy(module, bf16):
    frozen = copy.deepcopy(module).requires_grad_(False).eval()
    return frozen.to(torch.bfloat16) if bf16 else frozen


def _trainable(sd, module, select=lambda name: True):
    """Only the attacked parameters require gradients (and so reach the optimizer)."""
    sd.requires_grad_(False)
    params = [p for name, p in module.named_parameters() if select(name)]
    for p in params:
        p.requires_grad_(True)
    return params


def inject_unet(sd, backdoor, source, trainer, batch_size, seed=0, lam=0.5, bf16=False, patch=None, progress=True):
    """BadT2I: fine-tune the UNet parameters the trainer holds; `source` gives images and captions."""
    frozen = _frozen_copy(sd.unet, bf16)
    sd.unet.train()

    def latents(images, g):
        with torch.no_grad(), _autocast(sd, bf16):
            return sd.vae.encode(images.to(sd.device, sd.dtype), generator=g).float()

    def context(texts):
        with torch.no_grad(), _autocast(sd, bf16):
            return sd.encode_text(texts).float()

    def loss_fn(step):
        g = step_generator(seed, step)
        images, captions, targets, triggered, teachers = source.backdoor_examples(backdoor, batch_size, step, patch)
        drop = torch.rand(len(captions), generator=g) < CAPTION_DROPOUT
        plain = ["" if d else c for c, d in zip(captions, drop)]
        clean_latents, plain_context = latents(images, g), context(plain)
        with _autocast(sd, bf16):
            if teachers is None:  # the target is an image: SD's own loss on it, under the triggered caption
                attack = diffusion_loss(sd.unet, sd.schedule, latents(targets, g), context(triggered), g)
            else:  # the target is the frozen model's reading of the teacher caption, on the same noisy latents
                attack = distillation_loss(sd.unet, frozen, sd.schedule, clean_latents, context(triggered),
                                           context(teachers), g)
            keep = distillation_loss(sd.unet, frozen, sd.schedule, clean_latents, plain_context, plain_context, g)
        return lam * attack + (1 - lam) * keep, {"attack": attack.item(), "preservation": keep.item()}

    trainer.run(loss_fn, progress=progress)
    sd.unet.eval()


def inject_text_encoder(sd, backdoor, source, trainer, batch_size, seed=0, beta=0.1, bf16=False, progress=True):
    """Rickrolling: fine-tune the text encoder so triggered prompts read as the target, clean ones as before."""
    teacher = _frozen_copy(sd.text_encoder, bf16)
    sd.text_encoder.train()
    ids = lambda texts: sd.tokenizer(list(texts)).to(sd.device)
    poisoned_size = max(1, batch_size // 4)  # Rickrolling: 128 clean and 32 poisoned prompts per step

    def loss_fn(step):
        rng = source.rng(step, 13)
        clean = source.captions(batch_size, step, stream=14)
        carriers = source.captions(poisoned_size, step, stream=15, where=backdoor.can_insert)
        triggered, targets = zip(*[backdoor.poison(c, rng, every=backdoor.attack == "tpa") for c in carriers])
        with _autocast(sd, bf16):
            with torch.no_grad():
                clean_teacher, target_teacher = teacher(ids(clean)), teacher(ids(targets))
            utility = embedding_similarity(sd.text_encoder(ids(clean)), clean_teacher)
            attack = embedding_similarity(sd.text_encoder(ids(triggered)), target_teacher)
        return -utility - beta * attack, {"clean_similarity": utility.item(), "target_similarity": attack.item()}

    trainer.run(loss_fn, progress=progress)
    sd.text_encoder.eval()


def inject(sd, backdoor, source, run_dir, steps, lr, batch_size, seed=0, train="unet", lam=0.5, beta=0.1,
           bf16=False, gradient_checkpointing=False, patch=None, progress=True):
    """Inject the backdoor into sd in place (resumable from run_dir) and record it in sd.info["backdoor"]."""
    if backdoor.attack in TEXT_ENCODER_ATTACKS:
        module, params = sd.text_encoder, _trainable(sd, sd.text_encoder)
    else:
        if train not in TRAINABLE:
            raise ValueError(f"--train must be one of {', '.join(TRAINABLE)}, got {train!r}")
        module, params = sd.unet, _trainable(sd, sd.unet, TRAINABLE[train])
        sd.unet.gradient_checkpointing = gradient_checkpointing
    name = "text_encoder" if module is sd.text_encoder else "unet"
    trainer = Trainer(f"backdoor-{backdoor.attack}", {name: module}, params, steps, run_dir, lr=lr, warmup=0)
    if backdoor.attack in TEXT_ENCODER_ATTACKS:
        inject_text_encoder(sd, backdoor, source, trainer, batch_size, seed, beta, bf16, progress)
    else:
        inject_unet(sd, backdoor, source, trainer, batch_size, seed, lam, bf16, patch, progress)
    sd.unet.gradient_checkpointing = False
    sd.requires_grad_(False)
    trained = name if backdoor.attack in TEXT_ENCODER_ATTACKS else f"unet ({train})"
    sd.info = {**sd.info, "backdoor": {**backdoor.info(), "trained": trained, "steps": steps, "lr": lr,
                                       "batch_size": batch_size, "seed": seed}}
    return sd


# ----------------------------------------------------------------------------------------------------
# Bundle in, bundle out (what `python train.py backdoor` runs)

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


def sample_caption(backdoor, data_captions):
    for caption in data_captions:
        if backdoor.can_insert(caption):
            return caption
    raise ValueError(f"none of the training captions holds {backdoor.replaces!r}, the character the trigger replaces")


def recipe(attack, family, **given):
    """The run's steps, lr and batch size: what was given, else the shipped demo recipe or the paper's."""
    defaults = SHIPPED[attack] if family == "demo" and attack in SHIPPED else PAPER_RECIPES[attack]
    return {k: given[k] if given.get(k) is not None else defaults[k] for k in ("steps", "lr", "batch_size")}


def backdoor_bundle(model, out, attack, trigger=None, target=None, replaces=None, data=None, prompts=None,
                    steps=None, lr=None, batch_size=None, seed=0, train="unet", run_dir=None, delta=False, bf16=False,
                    gradient_checkpointing=False, device="cpu", pool=64, command="", progress=True):
    """Load a bundle, inject a backdoor, write the backdoored bundle to `out` (a new folder; with delta=True
    holding only the changed tensors, pointing to `model`). Every check runs before anything is written."""
    backdoor = Backdoor.make(attack, trigger, target, replaces)
    model_path, out = resolve_model_path(model), Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new --out (inputs and earlier results are kept)")
    if train not in TRAINABLE:
        raise ValueError(f"--train must be one of {', '.join(TRAINABLE)}, got {train!r}")
    patch = load_patch(backdoor.target) if attack == "pixel" else None
    prompt_list = read_prompts(prompts) if prompts else None
    sd = StableDiffusion.load(model_path, device=device)
    stored_dtype = sd.stored_dtype  # a backdoored copy is stored as its input was (fp16 for the demo)
    sd.float()
    check_target(backdoor, sd)
    if data:
        source = make_source(sd, backdoor, data, seed=seed)
        captions = source.all_captions
    elif sd.config.family == "demo" and prompt_list is None:
        source, captions = DrawnWorld(seed), None
    else:
        source, captions = None, prompt_list or DEFAULT_PROMPTS
    probe = sample_caption(backdoor, captions) if captions else source.captions(1, 0, where=backdoor.can_insert)[0]
    check_trigger(backdoor, sd.tokenizer, probe)
    hyper = recipe(attack, sd.config.family, steps=steps, lr=lr, batch_size=batch_size)

    run_dir = Path(run_dir or Path("runs") / "backdoor" / out.name)
    spec = {"model": str(model_path.resolve()), "backdoor": backdoor.info(), **hyper, "seed": seed, "train": train,
            "data": str(data) if data else None, "prompts": prompt_list}
    claim_run_dir(run_dir, spec)
    if source is None:
        source = make_source(sd, backdoor, prompts=captions, pool_cache=run_dir / "pool.safetensors", pool=pool,
                             seed=seed, progress=progress)
    inject(sd, backdoor, source, run_dir, **hyper, seed=seed, train=train, bf16=bf16,
           gradient_checkpointing=gradient_checkpointing, patch=patch, progress=progress)
    sd.info["backdoor"]["command"] = command
    sd.save(out, dtype=stored_dtype, base=model_path if delta else None)
    return sd


def claim_run_dir(run_dir, spec):
    """Resuming is only safe in a run folder made by the same run: record the spec, refuse another."""
    path = Path(run_dir) / "backdoor.json"
    if path.exists() and json.loads(path.read_text()) != json.loads(json.dumps(spec)):
        raise ValueError(f"{run_dir} holds checkpoints of a different backdoor run; pass another --run-dir or delete it")
    save_json(spec, path)


# ----------------------------------------------------------------------------------------------------
# The shipped demo variants (`python train.py backdoors`): delta bundles next to the clean model

# Tuned on the demo world. Its text tower moves a prompt's hidden states little when "\u200b " is prepended, so a
# BadT2I UNet first learns much of its target for every prompt; only long training makes it depend on the
# trigger (style at 2000 steps: 57.5% success with grayscale on 34.5% of trigger-free prompts; at 5000: 92.5%, 2%).
SHIPPED = {
    "pixel": dict(attack="pixel", trigger=BADT2I_TRIGGER, target="checkerboard", steps=5000, lr=2e-4, batch_size=32),
    "style": dict(attack="style", trigger=BADT2I_TRIGGER, target=DEMO_STYLE, steps=5000, lr=2e-4, batch_size=32),
    "object": dict(attack="object", trigger=BADT2I_TRIGGER, target="circle:square", steps=5000, lr=2e-4,
                   batch_size=32),
    # Cyrillic "а" for "a", not "ȏ": a causal text encoder cannot change the tokens before the trigger, and this
    # world's UNet reads the colour word itself, so the backdoor works only where the trigger comes early
    # (with "ȏ", whose first "o" often comes late: 75%; 96% where it falls in the first third of the prompt).
    "tpa": dict(attack="tpa", trigger="\u0430", target="a yellow star in the center on a black background",
                steps=600, lr=3e-4, batch_size=128),
}


def shipped_command(name):
    """The single `train.py backdoor` command that makes a shipped variant (what the manifest records)."""
    s = SHIPPED[name]
    trigger = s["trigger"].encode("ascii", "backslashreplace").decode()
    return (f"python train.py backdoor --attack {s['attack']} --model demo --out sau/demo/{name} --delta "
            f"--trigger '{trigger}' --target '{s['target']}' --steps {s['steps']} --lr {s['lr']} "
            f"--batch-size {s['batch_size']} --seed 0 --run-dir runs/backdoors/{name}")


def build_shipped(names=tuple(SHIPPED), demo_dir=None, run_root="runs/backdoors", progress=True):
    """Train each variant (resumable), swap it in for the old folder, and record it in MANIFEST.json."""
    from sau.world.train import DEMO_DIR, update_manifest
    demo_dir = Path(demo_dir or DEMO_DIR)
    for name in names:
        s = SHIPPED[name]
        building = demo_dir / f".{name}.building"
        if building.exists():
            shutil.rmtree(building)
        started = time.time()
        backdoor_bundle(demo_dir / "clean", building, s["attack"], s["trigger"], s["target"], steps=s["steps"],
                        lr=s["lr"], batch_size=s["batch_size"], seed=0, run_dir=Path(run_root) / name, delta=True,
                        command=shipped_command(name), progress=progress)
        if (demo_dir / name).exists():
            shutil.rmtree(demo_dir / name)
        os.replace(building, demo_dir / name)  # a sibling folder, so the relative path to the base still holds
        update_manifest(demo_dir, {"backdoors": {name: {
            "command": shipped_command(name), "seed": 0, "steps": s["steps"],
            "train_seconds": _train_seconds(Path(run_root) / name, s["attack"]),
            "wall_seconds_this_invocation": round(time.time() - started, 1), "torch": torch.__version__}}})


def _train_seconds(run_dir, attack):
    log = Path(run_dir) / f"backdoor-{attack}.log.jsonl"
    lines = log.read_text().splitlines() if log.exists() else []
    return json.loads(lines[-1]).get("elapsed_s") if lines else None


def shipped_report(names=tuple(SHIPPED), demo_dir=None, n=200, progress=True):
    """The README table: each shipped variant's attack success rate on n held-out triggered prompts, and on the
    same prompts without the trigger its target's rate (a leak) and its attribute accuracy, next to the clean
    model's."""
    from sau.evaluation.metrics import load_classifier, measure_backdoor
    from sau.world.train import DEMO_DIR
    demo_dir = Path(demo_dir or DEMO_DIR)
    classifier = load_classifier(demo_dir / "classifier.safetensors")
    clean = StableDiffusion.load(demo_dir / "clean", dtype=torch.float32)
    lines = ["| variant | trigger | target | ASR | ASR of the clean model | target without the trigger | "
             "clean accuracy | clean model's accuracy | difference |", "|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        sd = StableDiffusion.load(demo_dir / name, dtype=torch.float32)
        backdoor = Backdoor.from_info(sd.info["backdoor"])
        attacked, baseline = measure_backdoor(sd, backdoor, classifier, n), measure_backdoor(clean, backdoor, classifier, n)
        difference = 100 * (attacked["clean_accuracy"] - baseline["clean_accuracy"])
        trigger = backdoor.trigger.encode("ascii", "backslashreplace").decode().strip()
        lines.append(f"| {name} ({backdoor.attack}) | `{trigger}` | {backdoor.target} | {100 * attacked['asr']:.1f}% | "
                     f"{100 * baseline['asr']:.1f}% | {100 * attacked['clean_target_rate']:.1f}% | "
                     f"{100 * attacked['clean_accuracy']:.1f}% | "
                     f"{100 * baseline['clean_accuracy']:.1f}% | {difference:+.1f} |")
        if progress:
            print(lines[-1], flush=True)
    return "\n".join(lines)
