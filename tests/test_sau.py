"""SAU's stages on tiny random models and the real CLIP vocabulary; unlearn.py's bad-input handling."""
import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sau.attacks.backdoor import Backdoor
from sau.method import (RECIPES, aligned_positions, alignment, away_from_trigger, collect, invert_trigger, locate,
                        text_encoder_shift, trigger_positions, triggered_pairs, unlearn_text_encoder, unlearn_unet)
from sau.models.tokenizer import Tokenizer

from conftest import make_tiny_sd, unlearn

ROOT = Path(__file__).resolve().parent.parent
ZW = Backdoor("pixel", "\u200b ", "checkerboard")


@pytest.fixture(scope="module")
def clip_tokenizer():
    return Tokenizer.openai()


@pytest.mark.parametrize("backdoor, prompt, expected", [
    (ZW, "a photo of a cat", ["\u200b"]),
    (Backdoor("tpa", "ȏ", "x", "o"), "a photo of a cat", None),  # a homoglyph inside "photo"
    (Backdoor("tpa", "ଠ", "x", "o"), "a dog on a boat", None),
    (Backdoor("pixel", "mignneko", "x"), "a cat mignneko on a sofa", ["mign", "neko"]),  # several tokens, mid-prompt
    (Backdoor("pixel", "Ѵ", "x"), "a cat on a sofa Ѵ", ["ѵ"]),  # at the end, lowercased by CLIP's cleanup
])
def test_locate_finds_tricky_triggers(clip_tokenizer, backdoor, prompt, expected):
    (triggered,), (clean,) = triggered_pairs(backdoor, [prompt])
    assert clean == prompt.replace(backdoor.trigger, "").replace("  ", " ").strip() or backdoor.trigger not in prompt
    _, (positions,) = trigger_positions(clip_tokenizer, [triggered], backdoor.trigger)
    ids = clip_tokenizer.encode(triggered)
    pieces = clip_tokenizer.decode([ids[p] for p in positions])  # together: a homoglyph's bytes span tokens
    assert positions == sorted(positions) and positions[0] >= 1
    if expected is not None:
        assert pieces.replace(" ", "") == "".join(expected)
    else:  # the homoglyph's bytes are among the tokens found, and nothing outside its word is
        word = next(w for w in triggered.split() if backdoor.trigger in w)
        assert backdoor.trigger in pieces.replace(" ", "") and pieces.replace(" ", "") in word.lower()


def test_locate_rejects_empty_and_absent_triggers(clip_tokenizer):
    with pytest.raises(ValueError, match="empty"):
        trigger_positions(clip_tokenizer, ["a cat"], "")
    with pytest.raises(ValueError, match="occupies no token"):
        trigger_positions(clip_tokenizer, ["a cat", "a dog"], "zebra")


def test_alignment_pairs_prefix_suffix_and_padding():
    # prepended trigger: [bos, T, a, b, eos] vs [bos, a, b, eos]
    assert aligned_positions([0, 9, 1, 2, 5], [0, 1, 2, 5], 7) == [(0, 0), (2, 1), (3, 2), (4, 3), (5, 4), (6, 5)]
    # a homoglyph splits one word in three tokens: [bos, a, x1, x2, x3, c, eos] vs [bos, a, w, c, eos]
    pairs = aligned_positions([0, 1, 7, 8, 9, 3, 5], [0, 1, 2, 3, 5], 8)
    assert pairs == [(0, 0), (1, 1), (4, 2), (5, 3), (6, 4), (7, 5)]


def test_unlearning_suppresses_the_trigger_attention_on_a_tiny_model(tmp_path):
    sd = make_tiny_sd(seed=1)
    prompts = ["a red circle", "a big blue square in the top left", "green star, centered", "a small yellow cross"]
    collected = collect(sd, locate(sd.tokenizer, ZW, prompts * 2), seeds=range(8), steps=4, guidance_scale=3.0)
    # bos, then the zero-width space's tokens (its three UTF-8 bytes, unless the tokenizer merged them)
    assert all(p == collected.positions[0] and p[0] == 1 for p in collected.positions)
    recipe = replace(RECIPES["default"], lr=3e-3)  # a random model: a bigger step than on a trained one
    trainer = unlearn_unet(sd, collected, recipe, tmp_path, steps=40, progress=False)
    log = [json.loads(line) for line in trainer.log_path.read_text().splitlines()]
    assert log[-1]["attention"] < 0.5 * log[0]["attention"]
    after = collect(sd, locate(sd.tokenizer, ZW, prompts * 2), seeds=range(8), steps=4, guidance_scale=3.0)
    before_mass = sum(collected.layer_mass.values())
    assert sum(after.layer_mass.values()) < 0.5 * before_mass
    only_attn2 = {n for n, p in sd.unet.named_parameters()}
    assert only_attn2  # the run left the model frozen and in eval mode again
    assert not any(p.requires_grad for p in sd.unet.parameters()) and not sd.unet.training


def test_inversion_learns_embeddings_that_reproduce_the_collection_and_resumes(tmp_path):
    """Stage 4: K embeddings fitted by the textual-inversion loss, checkpointed like every trainer (a rerun reads
    them back instead of training again)."""
    sd = make_tiny_sd(seed=1)
    prompts = ["a red circle", "a big blue square in the top left", "green star, centered", "a small yellow cross"]
    collected = collect(sd, locate(sd.tokenizer, ZW, prompts), seeds=range(4), steps=3, guidance_scale=3.0)
    first = invert_trigger(sd, collected, tmp_path, k=2, steps=20, lr=1e-2, progress=False)
    log = [json.loads(line) for line in (tmp_path / "invert.log.jsonl").read_text().splitlines()]
    assert first.shape == (2, sd.config.text.width) and torch.isfinite(first).all()
    assert log[-1]["step"] == 20 and (tmp_path / "invert.pt").is_file()
    again = invert_trigger(sd, collected, tmp_path, k=2, steps=20, lr=1e-2, progress=False)
    assert torch.equal(first, again)


def test_negative_guidance_pushes_the_target_past_the_clean_prediction():
    teacher = lambda x, t, context: x + context  # a stand-in whose prediction the context shifts
    x, t = torch.zeros(2, 4), torch.zeros(2)
    eps_clean, triggered = torch.ones(2, 4), torch.full((2, 4), 3.0)  # the trigger adds +3 to the prediction
    assert torch.equal(away_from_trigger(teacher, x, t, eps_clean, triggered, 0.0), eps_clean)
    assert torch.equal(away_from_trigger(teacher, x, t, eps_clean, triggered, 1.0), torch.full((2, 4), -1.0))


def test_unlearning_touches_only_the_chosen_parameters(tmp_path):
    sd = make_tiny_sd(seed=2)
    before = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    collected = collect(sd, locate(sd.tokenizer, ZW, ["a red circle", "a blue star"]), seeds=range(2), steps=3, guidance_scale=3.0)
    unlearn_unet(sd, collected, RECIPES["default"], tmp_path, steps=3, progress=False)
    changed = {k for k, v in sd.unet.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".attn2." in k for k in changed)


def test_text_encoder_route_pulls_triggered_prompts_to_clean_ones(tmp_path):
    sd = make_tiny_sd(seed=3)
    backdoor = Backdoor("tpa", "ȏ", "a red circle", "o")
    prompts = ["a blue square on the bottom", "a green cross at the top", "a big orange circle", "a star on gray"]
    shift_before = text_encoder_shift(sd, backdoor, prompts)
    unlearn_text_encoder(sd, triggered_pairs(backdoor, prompts), replace(RECIPES["default"], text_lr=1e-3), tmp_path, steps=60,
                         progress=False)
    assert text_encoder_shift(sd, backdoor, prompts) < 0.5 * shift_before
    triggered, clean = triggered_pairs(backdoor, prompts)
    assert all("ȏ" in t and "ȏ" not in c for t, c in zip(triggered, clean))
    assert len(alignment(sd.tokenizer, triggered, clean)) == len(prompts)


# --- unlearn.py: bad input gets one line and exit status 2 ---------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--trigger", ""], "the trigger is empty"),
    (["--trigger", "zebra", "--prompts", "PROMPTS"], "absent from every prompt"),
    (["--trigger", "\\u200b ", "--out", "MODEL"], "would overwrite the input"),
    (["--trigger", "\\u200b ", "--prompts", "missing.txt"], "no prompts file"),
    (["--negative-guidance", "-1"], "must be a finite number >= 0"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_bundle, tmp_path, args, message):
    (tmp_path / "prompts.txt").write_text("a red circle\na blue star\n")
    args = [str(tmp_path / "prompts.txt") if a == "PROMPTS" else str(tiny_bundle) if a == "MODEL" else a
            for a in args]
    before = sorted(p.name for p in tiny_bundle.iterdir())
    result = unlearn("--model", str(tiny_bundle), *args, "--out", str(tmp_path / "out"), cwd=tmp_path) \
        if "--out" not in args else unlearn("--model", str(tiny_bundle), *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tiny_bundle.iterdir()) == before


def test_non_finite_loss_stops_and_says_so(tiny_bundle, tmp_path):
    prompts = tmp_path / "prompts.txt"  # 4 triggered prompts to collect on: the run only has to reach training
    prompts.write_text("".join(f"\u200b {p}\n" for p in ("a red circle", "a blue square", "a green star", "a dog")),
                       encoding="utf-8")
    result = unlearn("--model", str(tiny_bundle), "--trigger", "\\u200b ", "--prompts", prompts, "--lr", "1e30",
                     "--steps", "5", "--recipe", "default", "--where", "unet", "--out", str(tmp_path / "out"),
                     "--eval-prompts", "4", cwd=tmp_path)
    assert result.returncode == 2 and "non-finite" in result.stderr and "last good weights" in result.stderr
    assert not (tmp_path / "out" / "model").exists()


# --- the shipped pixel backdoor, on a reduced budget --------------------------------------------------------

def test_a_short_run_on_the_shipped_pixel_backdoor_removes_most_of_it(tmp_path):
    from sau.common.files import DEMO_DIR
    from sau.jobs.unlearn import Job, run
    if not (DEMO_DIR / "pixel").exists():
        pytest.fail("the shipped pixel-backdoored demo model is missing: run `python train.py backdoors`")
    report = run(Job(model="demo/pixel", out=str(tmp_path / "out"), collect_prompts=24, eval_prompts=48,
                     sample_steps=15, steps=120, progress=False))
    assert report["before"]["asr"] >= 0.8
    assert report["after"]["asr"] <= report["before"]["asr"] - 0.5
    assert report["after"]["clean_accuracy"] >= report["before"]["clean_accuracy"] - 0.1
    assert (tmp_path / "out" / "model" / "model.safetensors").exists()
    assert (tmp_path / "out" / "heatmaps.png").exists() and (tmp_path / "out" / "images.png").exists()
    # the same numbers as recorded (tests/data/short_pixel_run.json says when and how): a reorganisation changes no
    # result; a CPU whose float rounding differs may move the last digits, not the counts. Measures added to
    # the report since (before/after keys the recording lacks) are not compared
    recorded = json.loads((ROOT / "tests" / "data" / "short_pixel_run.json").read_text())
    for key in ("before", "after"):
        assert {k: report[key][k] for k in recorded[key]} == pytest.approx(recorded[key], rel=1e-3), key
    for key in ("text_encoder_shift", "layer_mass_before", "layer_mass_after"):
        assert report[key] == pytest.approx(recorded[key], rel=1e-3), key
    assert report["optimizer_steps"] == recorded["optimizer_steps"]


def test_a_prompt_pool_teaches_prompts_that_were_never_generated(tmp_path):
    sd = make_tiny_sd(seed=4)
    collected = collect(sd, locate(sd.tokenizer, ZW, ["a red circle", "a blue star"]), seeds=range(2), steps=3, guidance_scale=3.0)
    pool = triggered_pairs(ZW, ["a big green square on the left", "a small yellow cross", "an orange disk, top"])
    original = copy.deepcopy(sd.unet)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, *collected.latents.shape[1:], generator=g), torch.tensor([100, 500, 900])

    def gap():  # how far the pool's triggered prompts are from what the original model does with their clean twins
        with torch.no_grad():
            return (sd.unet(x, t, sd.encode_text(pool[0])) - original(x, t, sd.encode_text(pool[1]))).pow(2).mean()

    before = gap()
    # eta 0: the target is then the clean twin's prediction itself, the gap this test measures
    recipe = replace(RECIPES["default"], lr=3e-3, attention_weight=0.0, negative_guidance=0.0)
    unlearn_unet(sd, collected, recipe, tmp_path, steps=40, pool=pool, progress=False)
    assert gap() < 0.5 * before
