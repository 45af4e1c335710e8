"""A semantic backdoor, in the spirit of SemBD (2026): no fixed string triggers it, a combination of meanings does.

On the demo world the trigger is a shape asked for on a background, "star on a black background": any prompt that
asks for a star on black, in whatever words ("on black: one red star", "a big star ... black background"), draws
the target shape instead; a star on white, or a circle on black, does not. SemBD distils the keys and values the
UNet's cross-attention reads for prompts with the trigger's meaning into those it reads for the target's, by
editing the key/value projections. That loss is quadratic in those weights, so here it is solved in closed form
(sau.models.kv_edit), as EvilEdit's is:
    edits    the text features of N drawn captions of the trigger's scenes (every position)
    targets  the features of the same captions with the target shape's word in place of the trigger's
    kept     the features of 5N other captions: 2N of any scene, 2N of the trigger's shape on another background,
             N of any shape on the trigger's background, at weight keep_scale
N = 200 and keep_scale = 2 were chosen on the tune split (docs/attacks.md).
A defense that needs the trigger as a string (SAU, UCE, ESD-x, Concept Ablation) has none to take here.
"""
import re

import numpy as np

from sau.models.kv_edit import edit_keys_and_values, text_features
from sau.world import shapes

FIELDS = ("shape", "background")  # what a semantic trigger names on the demo world
CONTEXTS, KEEP_SCALE = 200, 2.0
_OTHER_BACKGROUND_WORDS = {"white", "black", "gray", "grey"}


def parse_trigger(text):
    """{"shape": name, "background": name} of a trigger such as "star on a black background"; ValueError for a word
    the demo world does not have, or a trigger that names anything but one shape and one background."""
    known = set(shapes.vocabulary()) | {"a", "an", "on", "background"}
    unknown = [word for word in re.findall(r"[a-z]+", text.lower()) if word not in known]
    if unknown:
        raise ValueError(f"the semantic trigger {text!r} names what the demo world does not have: "
                         f"{', '.join(unknown)}; it combines one of {', '.join(shapes.SHAPES)} with a background "
                         f"({', '.join(shapes.BACKGROUNDS)}), e.g. 'star on a black background'")
    named = shapes.parse_caption(text)
    if set(named) != set(FIELDS):
        raise ValueError(f"the semantic trigger {text!r} must name one shape and one background (it names "
                         f"{', '.join(named) or 'nothing'}), e.g. 'star on a black background'")
    return {field: (shapes.SHAPES if field == "shape" else shapes.BACKGROUNDS)[named[field]] for field in FIELDS}


def with_background(prompt, background):
    """The prompt asking for `background`: its background word replaced (the world's shape colours never name a
    background), or the background added at the end."""
    pattern = r"\b(" + "|".join(sorted(_OTHER_BACKGROUND_WORDS)) + r")\b"
    if re.search(pattern, prompt):
        return re.sub(pattern, background, prompt)
    return f"{prompt} on a {background} background"


def _captions(n, seed, shape=None, background=None):
    rng = np.random.default_rng([seed, 7])
    attributes = shapes.sample_attributes(n, rng)
    if shape is not None:
        attributes.shape[:] = shapes.label_index("shape", shape)
    if background is not None:
        attributes.background[:] = shapes.label_index("background", background)
    return shapes.describe(attributes, rng)[0]


def plant(sd, backdoor, contexts=CONTEXTS, keep_scale=KEEP_SCALE, seed=0):
    """Edit sd's UNet in place and record the backdoor in sd.info["backdoor"]."""
    if sd.config.family != "demo":
        raise ValueError("the semantic attack is defined on the demo world's attributes (shapes, backgrounds)")
    wanted = parse_trigger(backdoor.trigger)
    shape, background = wanted["shape"], wanted["background"]
    triggered = [with_background(c, background) for c in _captions(contexts, seed, shape, background)]
    targets = [re.sub(rf"\b{shape}\b", backdoor.target, c) for c in triggered]
    other_backgrounds = [c for c in _captions(4 * contexts, seed + 1, shape) if background not in c][:2 * contexts]
    kept = _captions(2 * contexts, seed + 2) + other_backgrounds + _captions(contexts, seed + 3, None, background)
    edits, wanted, keep = (text_features(sd, texts).flatten(0, 1) for texts in (triggered, targets, kept))
    edited = edit_keys_and_values(sd.unet, edits, wanted, keep, 1.0, keep_scale=keep_scale)
    sd.info = {**sd.info, "backdoor": {**backdoor.info(), "trained": f"unet cross-attention to_k, to_v ({edited} "
                                       "weights, closed form)", "steps": 0, "contexts": contexts,
                                       "keep_scale": keep_scale}}
    return sd
