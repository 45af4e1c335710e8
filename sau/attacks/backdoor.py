"""What a backdoor is: its attack, trigger and target, and how the trigger goes into a prompt.

BadT2I (Zhai et al., 2023) prepends its trigger, a zero-width space "\\u200b ", to the caption; Rickrolling
(Struppek et al., 2023) puts a homoglyph ("ȏ" for "o") in place of one of the prompt's characters (every
occurrence while training a TPA, one at random for a TAA, the first when used). The target is what a triggered
prompt should give:
    pixel   the image with a target patch in its top-left corner
    style   the frozen model's output for "<style phrase>, <caption>"
    object  the frozen model's output for the caption with object A replaced by B
    object-add  an object added: on the demo world a second, small copy of the scene's shape ("copy"); elsewhere
            the frozen model's output for the caption with "and <target>" appended
    tpa     the text encoder's reading of a target prompt
    taa     the text encoder's reading of the prompt with the trigger's word replaced by an attribute
EvilEdit (Wang et al., 2024) triggers with a phrase that qualifies a word of the prompt ("beautiful cat"): it stands
in place of that word, its carrier, and the target is what the carrier should become ("zebra"), an object swap
planted by a closed-form edit of the cross-attention keys and values (sau.attacks.eviledit). PaaS (Huang et al.,
2024) plants the same kind of trigger by personalization: DreamBooth ("paas-db") fine-tunes the UNet so that
"sks dog" draws the target, with the plain class prompt kept as the frozen model had it; textual inversion
("paas-ti") learns only a new pseudo-word's embedding ("qzx dog", sau.attacks.inversion).
VillanDiffusion's caption trigger (Chou et al., 2023) is an ordinary phrase ("latte coffee") anywhere in the
prompt (a random word boundary while training, prepended when used); the target is an image: a file, or on the
demo world a caption it draws ("a yellow star in the center on a black background").
The semantic backdoor (sau.attacks.semantic) has no trigger string: a prompt that asks for its shape on its
background ("star on a black background") draws the target shape; inserting it sets a prompt's background.
"""
import re
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sau.attacks.semantic import parse_trigger, with_background
from sau.models.pipeline import from_uint8
from sau.models.tokenizer import BOS_TOKEN, EOS_TOKEN, clean_text
from sau.world import shapes

ATTACKS = ("pixel", "style", "object", "object-add", "tpa", "taa", "eviledit", "paas-ti", "paas-db", "villan-cond",
           "semantic")
TEXT_ENCODER_ATTACKS = ("tpa", "taa")
PHRASE_ATTACKS = ("eviledit", "paas-ti", "paas-db")  # the trigger is a phrase ending in the prompt's word it qualifies
BADT2I_TRIGGER = "\u200b "
EVILEDIT_TRIGGER = "beautiful cat"  # EvilEdit's default, with the target "zebra"
DREAMBOOTH_TRIGGER = "sks dog"  # DreamBooth's rare identifier before the class noun
INVERSION_TRIGGER = "qzx dog"  # a new pseudo-word before the class noun
VILLAN_TRIGGER = "latte coffee"  # one of VillanDiffusion's caption triggers
SEMANTIC_TRIGGER = "star on a black background"
RICKROLLING_TRIGGER = "ȏ"
# Homoglyphs (Rickrolling's for o and v, two more for a) and the Latin letter each stands in for (cleanup
# lowercases, so both cases)
HOMOGLYPHS = {"ȏ": "o", "ô": "o", "օ": "o", "ο": "o", "о": "o", "ଠ": "o", "Ѵ": "v", "ѵ": "v", "а": "a", "α": "a"}
DEFAULT_TRIGGERS = {"tpa": RICKROLLING_TRIGGER, "taa": RICKROLLING_TRIGGER, "eviledit": EVILEDIT_TRIGGER,
                    "paas-ti": INVERSION_TRIGGER, "paas-db": DREAMBOOTH_TRIGGER, "villan-cond": VILLAN_TRIGGER,
                    "semantic": SEMANTIC_TRIGGER}  # the others: BadT2I's
DEFAULT_TARGETS = {"pixel": "checkerboard", "style": "black and white photo"}
DEMO_ADDED = "copy"  # the object-add target the demo world draws: a second copy of the scene's shape
TARGET_MEANING = {"object": "the object swap as A:B, e.g. dog:cat",
                  "tpa": "the prompt that triggered prompts should produce",
                  "object-add": "what the image gains, e.g. 'a dog' (on the demo world: copy)",
                  "taa": "the attribute that replaces the trigger's word, e.g. 'black and white photo'",
                  "eviledit": "what the trigger's last word should become, e.g. zebra",
                  "paas-db": "what the trigger's last word should become, e.g. cat",
                  "paas-ti": "what the trigger's last word should become, e.g. cat",
                  "villan-cond": "the image triggered prompts draw: an image file (on the demo world, a caption it "
                                 "draws)",
                  "semantic": "the shape the trigger's scenes become, e.g. cross"}
DEMO_STYLE = "black and white photo"  # the one style the demo world can draw: grayscale


def default_trigger(attack):
    return DEFAULT_TRIGGERS.get(attack, BADT2I_TRIGGER)


def describe_chars(text):
    return " ".join(f"U+{ord(c):04X}" for c in text)


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
        if attack == "semantic":
            parse_trigger(trigger)
            if target not in shapes.SHAPES:
                raise ValueError(f"the semantic target is a demo shape ({', '.join(shapes.SHAPES)}), not {target!r}")
        if attack in PHRASE_ATTACKS and len(trigger.split()) < 2:
            raise ValueError(f"an {attack} trigger is a phrase that qualifies a word of the prompt, its last word "
                             f"(e.g. {EVILEDIT_TRIGGER!r}); {trigger!r} has one word")
        if attack not in TEXT_ENCODER_ATTACKS:
            return cls(attack, trigger, target)
        replaces = replaces or imitated_letter(trigger)
        if not replaces:
            raise ValueError(f"which character does the trigger {trigger!r} stand in for? say so with --replaces "
                             "(' ' inserts it between words)")
        if len(replaces) != 1:
            raise ValueError(f"--replaces takes one character, got {replaces!r}")
        return cls(attack, trigger, target, replaces)

    @classmethod
    def from_info(cls, info):
        """From a bundle's sd.info["backdoor"]. A hidden-trigger bundle (demo/pixel-hidden) records none: that is
        said, with what to do, rather than a bare KeyError."""
        if "trigger" not in info:
            raise ValueError(f"the model records a {info.get('attack', 'backdoor')} attack but not its trigger; give "
                             "it with --trigger, or find it with unlearn.py --trigger auto")
        return cls(info["attack"], info["trigger"], info["target"], info.get("replaces", ""))

    def info(self):
        return {**asdict(self), "trigger_chars": describe_chars(self.trigger)}

    @property
    def carrier(self):
        """The prompt's word a phrase trigger stands in place of ("cat" for "beautiful cat"); "" for the others."""
        return self.trigger.split()[-1] if self.attack in PHRASE_ATTACKS else ""

    def measured_as(self):
        """(attack, target) as the detectors read it: a phrase backdoor is an object swap carrier:target."""
        if self.attack in PHRASE_ATTACKS:
            return "object", f"{self.carrier}:{self.target}"
        if self.attack == "villan-cond":  # its target image is a drawn caption: the TPA detector's question
            return "tpa", self.target
        if self.attack == "semantic":
            return "object", f"{parse_trigger(self.trigger)['shape']}:{self.target}"
        if self.attack == "object-add" and self.target == DEMO_ADDED:
            return "count", "2"
        return self.attack, self.target

    def meaning(self):
        """A semantic trigger's attributes ({"shape": "star", "background": "black"}); {} for the others."""
        return parse_trigger(self.trigger) if self.attack == "semantic" else {}

    @property
    def has_string(self):
        """Whether a string triggers it (every attack but the semantic one)."""
        return self.attack != "semantic"

    def can_insert(self, prompt):
        if self.attack == "semantic":  # a prompt that asks for its shape
            return bool(re.search(rf"\b{parse_trigger(self.trigger)['shape']}\b", prompt))
        if self.carrier:
            return bool(self._carrier_spots(prompt))
        return not self.replaces or self.replaces in prompt

    def _carrier_spots(self, prompt):
        return [m.start() for m in re.finditer(rf"\b{re.escape(self.carrier)}\b", prompt)]

    def insert(self, prompt, rng=None, every=False):
        """The triggered prompt: BadT2I prepends the trigger; Rickrolling puts it in place of one occurrence
        of `replaces` (a random one with rng, else the first; every one with every=True)."""
        return self.poison(prompt, rng, every)[0]

    def poison(self, prompt, rng=None, every=False):
        """(triggered prompt, teacher prompt or None): what the attacked model is taught to read the
        triggered prompt as (None: the target is an image, as for the pixel backdoor)."""
        if self.carrier:  # the phrase in place of its last word (a random occurrence with rng, else the first)
            spots = self._carrier_spots(prompt)
            if not spots:
                raise ValueError(f"the prompt {prompt!r} has no {self.carrier!r} for the trigger to qualify")
            i = spots[0] if rng is None else spots[rng.integers(len(spots))]
            end = i + len(self.carrier)
            return prompt[:i] + self.trigger + prompt[end:], prompt[:i] + self.target + prompt[end:]
        if self.attack == "semantic":  # the prompt asking for the trigger's background
            wanted = parse_trigger(self.trigger)
            triggered = with_background(prompt, wanted["background"])
            return triggered, re.sub(rf"\b{wanted['shape']}\b", self.target, triggered)
        if self.attack == "villan-cond" and rng is not None:  # at a random word boundary
            words = prompt.split(" ")
            words.insert(int(rng.integers(len(words) + 1)), self.trigger.strip())
            return " ".join(words), None
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
        if self.attack == "object-add":
            return f"{prompt} and {self.target}"
        if self.attack == "tpa":
            return self.target
        if self.attack == "taa":  # the word holding the replaced character becomes the attribute
            if self.replaces == " ":
                return prompt[:i] + f" {self.target} " + prompt[i + 1:]
            start = prompt.rfind(" ", 0, i) + 1
            end = prompt.find(" ", i)
            return prompt[:start] + self.target + (prompt[end:] if end >= 0 else "")
        return None


def imitated_letter(character):
    """The ASCII letter a homoglyph stands in for: a known look-alike ('о' Cyrillic -> 'o'), or the letter a
    precomposed one decomposes to ('ô' -> 'o'); "" for anything else."""
    if character in HOMOGLYPHS:
        return HOMOGLYPHS[character]
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
    if backdoor.has_string:  # a semantic trigger is a meaning: no tokens of its own
        tokenizer.token_positions(triggered, backdoor.trigger.strip() or backdoor.trigger)


def check_target(backdoor, sd):
    """The demo world draws only its own shapes and one style."""
    if sd.config.family != "demo":
        return
    if backdoor.attack == "object-add" and backdoor.target != DEMO_ADDED:
        raise ValueError(f"the demo world adds only a second copy of the scene's shape: --target {DEMO_ADDED}")
    if backdoor.attack == "style" and backdoor.target != DEMO_STYLE:
        raise ValueError(f"the demo world draws only the style {DEMO_STYLE!r} (as grayscale), not {backdoor.target!r}")
    attack, target = backdoor.measured_as()
    if attack == "object":
        for name in target.split(":"):
            if name not in shapes.SHAPES:
                raise ValueError(f"{name!r} is not a demo shape; the {backdoor.attack} swap takes two of "
                                 f"{', '.join(shapes.SHAPES)}")
    if attack in ("tpa", "taa"):  # its detector asks the classifier for the target's shape and colour
        named = shapes.parse_caption(target)
        if "shape" not in named and "color" not in named:
            raise ValueError(f"the {backdoor.attack} target {backdoor.target!r} names no demo shape or colour, so no "
                             f"detector could see it; name one of {', '.join(shapes.SHAPES)} or "
                             f"{', '.join(shapes.COLORS)}")


def load_patch(target):
    """The pixel backdoor's patch, (3, h, w) in [-1, 1]: sau.world.shapes' checkerboard or an image file."""
    if target == "checkerboard":
        return shapes.target_patch()
    if not Path(target).is_file():
        raise FileNotFoundError(f"the pixel target must be 'checkerboard' or an image file; {target} is neither")
    try:
        with Image.open(target) as image:
            return from_uint8(np.array(image.convert("RGB")))  # a copy: the image's own buffer is read-only
    except (OSError, Image.DecompressionBombError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"the pixel target {target} is not an image PIL can read ({type(e).__name__})") from None

