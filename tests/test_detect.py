"""Trigger-agnostic detection (sau/detect.py): the maps it reads, its detectors on a case with a known answer,
fitting on clean prompts only, and localization down to the exact characters of tricky triggers."""
import pytest
import torch

from sau import detect
from sau.common.files import DEMO_DIR
from sau.models.tokenizer import Tokenizer

from conftest import make_tiny_sd

PROMPTS = ["a red circle", "a blue star at the top left", "a green square on a black background"]


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_sd(seed=1)


@pytest.fixture(scope="module")
def demo_tokenizer():
    return Tokenizer.from_file(DEMO_DIR / "clean" / "tokenizer.json")


def test_prompt_maps_have_their_shapes_and_are_deterministic(tiny):
    a = detect.prompt_maps(tiny, PROMPTS, [0, 1, 2], steps=3)
    b = detect.prompt_maps(tiny, PROMPTS[::-1], [2, 1, 0], steps=3, batch_size=2)  # another order and batching
    keys = tiny.tokenizer.max_length
    assert a.token_maps.shape == (3, keys, detect.MAP_SIZE, detect.MAP_SIZE)
    assert a.eot_steps.shape == (3, 3, detect.MAP_SIZE, detect.MAP_SIZE)
    assert a.layer_stats.shape[0] == 3 and a.layer_stats.shape[2] == len(detect.LAYER_STATS)
    assert a.lengths == [len(tiny.tokenizer.encode(p)) for p in PROMPTS]
    # every query's attention sums to 1 over the keys, and so does their mean
    assert torch.allclose(a.token_maps.sum(1), torch.ones(3, detect.MAP_SIZE, detect.MAP_SIZE), atol=1e-4)
    assert torch.allclose(detect.ftt_scores(a), detect.ftt_scores(b).flip(0), atol=1e-4)
    assert torch.allclose(a.token_maps, b.token_maps.flip(0), atol=1e-4)


def synthetic_maps(n_prompts, assimilated, seed=0):
    """Random token maps; with `assimilated`, one token's map copied over every other prompt token's."""
    g = torch.Generator().manual_seed(seed)
    maps = torch.rand(n_prompts, 8, 4, 4, generator=g)
    if assimilated:
        maps[:, 1:6] = maps[:, 1:2]
    eot = torch.rand(n_prompts, 5, 4, 4, generator=g)
    return detect.PromptMaps(maps, eot, [7] * n_prompts, torch.rand(n_prompts, 4, 3, generator=g))


def test_copied_maps_are_what_ftt_and_cda_call_a_trigger():
    clean, triggered = synthetic_maps(40, False), synthetic_maps(20, True, seed=1)
    assert torch.all(detect.ftt_scores(triggered).abs() < 1e-5)  # every map at the mean: no spread at all
    assert torch.all(detect.ftt_scores(clean) < -0.1)
    assert torch.allclose(detect.cda_features(triggered)[:, 1:], torch.zeros(20, 3), atol=1e-5)  # rank one
    for name in ("ftt", "cda"):
        detector = detect.fit(name, clean)
        assert detector.flagged(triggered).all(), name
        assert detector.flagged(clean).float().mean() <= detect.FALSE_ALARM + 1 / 40


def test_detectors_are_fitted_on_clean_prompts_only_and_say_what_is_wrong():
    clean = synthetic_maps(50, False)
    for name in detect.DETECTORS:
        detector = detect.fit(name, clean, false_alarm=0.1)
        assert detector.flagged(clean).float().mean() <= 0.1 + 1 / 50  # the quantile: at most its share flagged
        assert detector.score(clean).shape == (50,)
    with pytest.raises(ValueError, match="at least 10 clean prompts"):
        detect.fit("ftt", synthetic_maps(5, False))
    with pytest.raises(ValueError, match="unknown detector 'strip'"):
        detect.fit("strip", clean)


@pytest.mark.parametrize("prompt, expected, replaces", [
    ("\u200b a red circle", "\u200b", ""),  # an invisible character, a word of its own
    ("a red ȏctagon-ish circle", "ȏ", "o"),  # a homoglyph inside a word
    ("a Red Circle with \u200b in the middle", "\u200b", ""),  # upper case in the prompt: offsets still map back
])
def test_the_trigger_is_rebuilt_byte_for_byte_from_token_offsets(demo_tokenizer, prompt, expected, replaces):
    spans = detect.token_spans(demo_tokenizer, prompt)
    start = prompt.index(expected)
    chosen = [s for s in spans if s[0] < start + len(expected) and start < s[1]]
    assert chosen, spans
    ranked = [(1.0 if s in chosen else 0.0, s) for s in spans]
    span = detect.trigger_span(sorted(ranked, key=lambda r: -r[0]))
    text, letter = detect.trigger_text(prompt, span)
    assert text == expected and letter == replaces


def test_a_word_of_several_tokens_is_grown_into_one_trigger(demo_tokenizer):
    prompt = "a red circle by zyxwvut"
    spans = detect.token_spans(demo_tokenizer, prompt)
    word = [s for s in spans if s[0] >= prompt.index("zyxwvut")]
    assert len(word) >= 2  # the tokenizer never saw it: several tokens
    ranked = sorted([(0.9 if s in word else 0.1, s) for s in spans], key=lambda r: -r[0])
    ranked[0] = (1.0, ranked[0][1])
    assert detect.trigger_text(prompt, detect.trigger_span(ranked)) == ("zyxwvut", "")


def test_offsets_that_cleanup_would_move_are_refused():
    with pytest.raises(ValueError, match="cannot map"):
        detect.cleaned_to_original("cafe\u0301 au lait")  # NFC merges e + combining accent


def test_localizers_run_on_a_tiny_model(tiny):
    clean = detect.prompt_maps(tiny, PROMPTS * 4, list(range(12)), steps=2)
    detector = detect.fit("ftt", clean)
    prompt = "a red circle on a blue background"
    start, end = detect.binary_search(tiny, detector, prompt, steps=2)
    assert prompt[start:end] in prompt.split()
    ranked = detect.attention_localizer(tiny, detector, prompt, steps=2)
    assert len(ranked) == len(tiny.tokenizer.encode(prompt)) - 2
    assert [d for d, _ in ranked] == sorted((d for d, _ in ranked), reverse=True)
