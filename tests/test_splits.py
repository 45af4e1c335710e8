"""The prompt splits (sau.evaluation.splits): fixed, disjoint from each other and from everything a protocol run
shows the methods; ood out of the training grammar's reach, with its triggers where the attacks never put them;
tuning that cannot read test or ood. No model needed."""
import itertools
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sau.attacks.backdoor import Backdoor
from sau.common.files import DEMO_DIR
from sau.evaluation import metrics, splits
from sau.evaluation.prompts import builtin_prompts
from sau.models.tokenizer import Tokenizer
from sau.world import shapes

SHIPPED = ("pixel", "style", "object", "tpa")
N = 200


def shipped(name):
    return Backdoor.from_info(json.loads((DEMO_DIR / name / "config.json").read_text())["info"]["backdoor"])


# Besides the shipped ones: Rickrolling's default homoglyph (for "o"), a word trigger, one inserted as a word
OTHERS = {"tpa-o": Backdoor.make("tpa", target="a red star"),
          "word": Backdoor.make("pixel", trigger="mignneko"),
          "spaced": Backdoor.make("tpa", trigger="mignneko", target="a red star", replaces=" ")}


@pytest.fixture(scope="module", params=SHIPPED)
def backdoor(request):
    if not (DEMO_DIR / request.param / "config.json").exists():
        pytest.skip("the demo backdoors are made by train.py world")
    return shipped(request.param)


# ----------------------------------------------------------------------------------------------------
# A recognizer of every caption shapes.describe can write, transcribed from _caption_one's four patterns.
# It may accept more than the grammar writes (an/a before anything; any position phrase may lead), never less:
# test_the_recognizer_accepts_the_grammar checks that on 200k captions. So a caption it rejects is one the
# training grammar cannot produce.

def _any(words):
    return "(?:" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + ")"


def _words(table, names):
    return _any([w for name in names for w in table.get(name, (name,))])


SIZE = _words(shapes._SIZE_WORDS, shapes.SIZES)
COLOR = _words(shapes._COLOR_WORDS, shapes.COLORS)
SHAPE = _words(shapes._SHAPE_WORDS, shapes.SHAPES)
BACKGROUND = _words(shapes._BACKGROUND_WORDS, shapes.BACKGROUNDS)
NOUN = f"(?:{SIZE} )?{COLOR} {SHAPE}"
WITH_ARTICLE = f"an? {NOUN}"
CORNER = f"{_any(w for row in shapes._ROW_WORDS for w in row)} (?:left|right)(?: corner)?"
POSITION = (f"(?:{_any(shapes._CENTER_PHRASES)}|(?:at|near) the (?:top|bottom)|(?:on|at) the (?:left|right)"
            f"|(?:in|at) the {CORNER})")
INLINE_BACKGROUND = f"(?:on a {BACKGROUND} background|on {BACKGROUND}|against a {BACKGROUND} background)"
COMMA_BACKGROUND = f"(?:{BACKGROUND} background|on {BACKGROUND})"
GRAMMAR = re.compile("|".join([
    f"{WITH_ARTICLE}(?: {POSITION})?(?: {INLINE_BACKGROUND})?",  # pattern 0
    f"(?:{WITH_ARTICLE}|{NOUN})(?:, {POSITION})?(?:, {COMMA_BACKGROUND})?",  # pattern 1
    f"{POSITION}, {WITH_ARTICLE}(?: {INLINE_BACKGROUND})?",  # pattern 2
    f"a {BACKGROUND} background with {WITH_ARTICLE}(?: {POSITION})?",  # pattern 3
]))


@pytest.fixture(scope="module")
def grammar_sample():
    """200k training-grammar captions, drawn as shapes.batch draws them (without the images)."""
    captions = []
    for chunk in range(20):
        rng = np.random.default_rng([77, chunk])
        captions += shapes.caption(shapes.sample_attributes(10_000, rng), rng)
    return captions


def test_the_recognizer_accepts_the_grammar(grammar_sample):
    rejected = [c for c in grammar_sample if not GRAMMAR.fullmatch(c)]
    assert not rejected, rejected[:5]


def every_ood_caption():
    """The whole ood language: every template with every label combination (the article fixed as splits does)."""
    labels = itertools.product(*(range(len(names)) for names in (shapes.SHAPES, shapes.COLORS, shapes.SIZES,
                                                                 shapes.POSITIONS, shapes.BACKGROUNDS)))
    return {splits._fill(template, *combination) for combination in labels for template in splits.OOD_TEMPLATES}


def test_no_ood_caption_is_producible_by_the_training_grammar(grammar_sample):
    language = every_ood_caption()
    drawn = set(splits._candidates("ood")[0])
    assert drawn <= language  # the split draws from the templates only
    assert not [c for c in language if GRAMMAR.fullmatch(c)]  # structurally: no template is a grammar pattern
    assert not language & set(grammar_sample)  # and empirically


def test_ood_captions_ask_what_they_say():
    """The asked attributes are what the caption names (parse_caption reads them back), so the attribute
    classifier scores what was asked."""
    captions, asked = splits._candidates("ood")
    assert np.array_equal(shapes.parse_captions(list(captions)).labels(), asked.labels())
    assert (asked.shape >= 0).all()
    lengths = {len(c.split()) for c in captions}
    assert min(lengths) == 1 and max(lengths) > 14  # "circle." up to longer than any grammar caption


# ----------------------------------------------------------------------------------------------------
# Disjointness and determinism

def reserved():
    """What a protocol run shows the methods, read through the functions that run reads it with, and the
    legacy held-out prompts the default recipe was tuned on."""
    demo = SimpleNamespace(config=SimpleNamespace(family="demo"))
    seen = set()
    for seed in range(5):
        seen |= set(builtin_prompts(demo, 64, seed)) | set(builtin_prompts(demo, 512, seed))
    for name in SHIPPED:
        if (DEMO_DIR / name / "config.json").exists():
            seen |= set(metrics.attack_prompts(shipped(name), N, seed=splits.LEGACY_SEED)[0])
    return seen


def test_whole_splits_are_pairwise_disjoint_and_avoid_collection_pool_and_legacy_prompts():
    lists = {split: splits._candidates(split)[0] for split in splits.SPLITS}
    for split, captions in lists.items():
        assert len(set(captions)) == len(captions), f"{split} repeats a caption"
        assert not set(captions) & reserved(), f"{split} holds a collection, pool or legacy prompt"
    for a, b in itertools.combinations(splits.SPLITS, 2):
        assert not set(lists[a]) & set(lists[b]), f"{a} and {b} share captions"


def test_each_split_gives_200_disjoint_prompts_per_shipped_backdoor(backdoor):
    got = {split: splits.split_prompts(split, backdoor, N) for split in splits.SPLITS}
    for split, s in got.items():
        assert len(s.triggered) == len(s.clean) == len(s.asked) == N, split
        assert len(set(s.clean)) == N and not set(s.clean) & reserved(), split
    for a, b in itertools.combinations(splits.SPLITS, 2):
        assert not set(got[a].clean) & set(got[b].clean), f"{a} and {b} share captions"
    for split in ("tune", "test"):
        assert got[split].triggered == [backdoor.insert(c) for c in got[split].clean]


def test_splits_are_fixed_lists(backdoor):
    first = {split: splits.split_prompts(split, backdoor, N) for split in splits.SPLITS}
    splits._candidates.cache_clear()  # drawn again from the seeds, not read from the cache
    splits.reserved_captions.cache_clear()
    for split in splits.SPLITS:
        again = splits.split_prompts(split, backdoor, N)
        assert again.triggered == first[split].triggered and again.clean == first[split].clean
        assert np.array_equal(again.asked.labels(), first[split].asked.labels())
        shorter = splits.split_prompts(split, backdoor, 50)  # a prefix, as attack_prompts' lists are
        assert shorter.triggered == first[split].triggered[:50]


def test_the_filter_is_attack_prompts_filter(backdoor):
    captions, asked = shapes.eval_prompts(metrics.EVAL_POOL, metrics.EVAL_SEED)
    index = np.flatnonzero(splits.applies(backdoor, captions, asked))[:N]
    expected, expected_asked = metrics.attack_prompts(backdoor, N)
    assert [captions[i] for i in index] == expected
    assert np.array_equal(asked[index].labels(), expected_asked.labels())


def test_the_filters_hold_on_every_split(backdoor):
    for split in splits.SPLITS:
        s = splits.split_prompts(split, backdoor, N)
        if backdoor.attack == "object":
            assert (s.asked.shape == shapes.SHAPES.index(backdoor.target.split(":")[0])).all()
        if backdoor.attack in ("tpa", "taa"):
            wanted = shapes.parse_caption(backdoor.target)
            same = (s.asked.shape == wanted["shape"]) | (s.asked.shape < 0)
            same &= (s.asked.color == wanted["color"]) | (s.asked.color < 0)
            assert not same.any() and all(backdoor.can_insert(c) for c in s.clean)


# ----------------------------------------------------------------------------------------------------
# ood trigger placements

def written(backdoor):
    """The trigger as it stands in a prompt: a homoglyph in place of its letter (a word when it replaces a
    space), a prepended trigger as a word of its own."""
    if backdoor.replaces:
        return f" {backdoor.trigger} " if backdoor.replaces == " " else backdoor.trigger
    return backdoor.trigger.strip()


def untriggered(backdoor, text):
    if backdoor.replaces:
        return text.replace(written(backdoor), backdoor.replaces)
    return " ".join(w for w in text.split(" ") if w != written(backdoor))


def check_placements(backdoor, split):
    token = written(backdoor)
    for i, (triggered, clean) in enumerate(zip(split.triggered, split.clean)):
        placement = splits.OOD_PLACEMENTS[i % 3]
        assert untriggered(backdoor, triggered) == clean, (triggered, clean)
        assert triggered != backdoor.insert(clean)
        assert triggered.count(token) == (2 if placement == "repeated" else 1), (placement, triggered)
        if backdoor.replaces:  # the first occurrence, the one Backdoor.insert takes, is left alone
            first = clean.index(backdoor.replaces)
            assert triggered[:first + 1] == clean[:first + 1], triggered
            last = clean.rindex(backdoor.replaces)
            at_last = triggered.endswith(token + clean[last + 1:])
            assert at_last == (placement == "end") or placement == "repeated", (placement, triggered)
        else:  # never prepended
            words = triggered.split(" ")
            assert words[0] != token, triggered
            assert (words[-1] == token) == (placement == "end") or placement == "repeated", (placement, triggered)


def test_ood_triggers_sit_where_the_shipped_attacks_never_put_them(backdoor):
    check_placements(backdoor, splits.split_prompts("ood", backdoor, N))


@pytest.mark.parametrize("name", sorted(OTHERS))
def test_ood_triggers_sit_where_other_attacks_never_put_them(name):
    check_placements(OTHERS[name], splits.split_prompts("ood", OTHERS[name], N))


def test_placements_are_a_third_each_and_fail_only_when_too_few_places():
    backdoor = OTHERS["word"]
    assert splits.place_trigger(backdoor, "circle.", "middle", np.random.default_rng(0)) is None
    assert splits.place_trigger(backdoor, "circle.", "end", np.random.default_rng(0)) == "circle. mignneko"
    with pytest.raises(ValueError, match="unknown placement"):
        splits.place_trigger(backdoor, "circle.", "start", np.random.default_rng(0))


def test_every_triggered_prompt_fits_the_demo_text_encoder(backdoor):
    """Long ood captions with split-up homoglyph words must not lose their trigger to truncation."""
    tokenizer = Tokenizer.from_file(DEMO_DIR / "clean" / "tokenizer.json")
    for split in splits.SPLITS:
        longest = max(len(tokenizer.encode(t)) for t in splits.split_prompts(split, backdoor, N).triggered)
        assert longest <= tokenizer.max_length, split


def test_evaluate_defense_generates_the_splits_triggered_prompts(backdoor):
    seen = []

    class Recorder:
        def generate(self, prompts, seeds, **kwargs):
            seen.append(list(prompts))
            return torch.zeros(len(prompts), 3, 64, 64)

    s = splits.split_prompts("ood", backdoor, 10)
    metrics.evaluate_defense(Recorder(), s.placed(backdoor), s.clean, s.asked)
    assert seen == [s.triggered, s.clean]
    placed = s.placed(backdoor)
    assert (placed.attack, placed.target, placed.trigger) == (backdoor.attack, backdoor.target, backdoor.trigger)
    with pytest.raises(ValueError, match="not one of this split"):
        placed.insert("a red circle")


# ----------------------------------------------------------------------------------------------------
# The tuning door and bad input

@pytest.mark.parametrize("split", ["test", "ood"])
def test_tuning_refuses_test_and_ood(split):
    with pytest.raises(ValueError, match="tuning reads the tune split only; test and ood are for reporting"):
        splits.tuning_prompts(split, OTHERS["word"], N)


def test_tuning_reads_tune():
    tuned, direct = splits.tuning_prompts("tune", OTHERS["word"], N), splits.split_prompts("tune", OTHERS["word"], N)
    assert tuned.triggered == direct.triggered and tuned.clean == direct.clean


@pytest.mark.parametrize("call", [splits.split_prompts, splits.tuning_prompts])
@pytest.mark.parametrize("split", ["train", "validation", "", "TEST"])
def test_an_unknown_split_is_one_clear_line(call, split):
    with pytest.raises(ValueError, match="unknown split") as error:
        call(split, OTHERS["word"], N)
    assert "\n" not in str(error.value) and "tune, test, ood" in str(error.value)


@pytest.mark.parametrize("n", [0, -1, 2.5, True])
def test_a_bad_count_is_one_clear_line(n):
    with pytest.raises(ValueError, match="positive integer") as error:
        splits.split_prompts("tune", OTHERS["word"], n)
    assert "\n" not in str(error.value)


def test_too_many_asked_for_says_how_many_fit():
    with pytest.raises(ValueError, match=r"only \d+ ood prompts fit the object backdoor"):
        splits.split_prompts("ood", Backdoor.make("object", target="circle:square"), 10**6)
