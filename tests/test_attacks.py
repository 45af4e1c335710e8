"""Backdoor injection: triggers and targets, the training data, and whole runs on a tiny random SD bundle."""
import hashlib
import json
import runpy
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sau
from sau.attacks.backdoor import Backdoor, check_target, check_trigger
from sau.attacks.shipped import backdoor_bundle
from sau.attacks.sources import DrawnWorld, ImagePool
from sau.common.files import load_safetensors
from sau.evaluation import metrics
from sau.evaluation.prompts import DEFAULT_PROMPTS
from sau.models.config import tiny
from sau.models.pipeline import StableDiffusion
from sau.models.tokenizer import Tokenizer
from sau.weights.write import save_model
from sau.world import shapes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    _, captions, _ = shapes.batch(300, seed=0)
    return Tokenizer.train(captions + DEFAULT_PROMPTS * 3, vocab_size=700, max_length=32)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tokenizer):
    """A tiny random model with SD1's topology, saved as a bundle folder."""
    cfg = tiny()
    cfg = replace(cfg, text=replace(cfg.text, vocab_size=tokenizer.vocab_size, bos_id=tokenizer.bos_id,
                                    eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, max_positions=32))
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "clean"
    save_model(StableDiffusion(cfg, tokenizer), path)
    return path


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())}


# --- triggers and targets ------------------------------------------------------------------------------

def test_defaults_follow_the_papers():
    pixel = Backdoor.make("pixel")
    assert (pixel.trigger, pixel.target, pixel.replaces) == ("\u200b ", "checkerboard", "")
    assert Backdoor.make("style").target == "black and white photo"
    tpa = Backdoor.make("tpa", target="a yellow star")
    assert (tpa.trigger, tpa.replaces) == ("ȏ", "o")
    assert Backdoor.make("taa", trigger="Ѵ", target="red").replaces == "v"
    assert Backdoor.make("taa", trigger="ô", target="red").replaces == "o"  # a precomposed letter's base
    cyrillic = Backdoor.make("tpa", trigger="\u0430", target="a yellow star")  # the shipped tpa's trigger
    assert cyrillic.replaces == "a" and cyrillic.insert("a red star") == "\u0430 red star"


@pytest.mark.parametrize("kwargs, message", [
    (dict(attack="poison"), "unknown attack 'poison'"),
    (dict(attack="pixel", trigger=""), "the trigger is empty"),
    (dict(attack="pixel", trigger="  "), "the trigger is empty"),
    (dict(attack="object"), "needs --target"),
    (dict(attack="tpa"), "needs --target"),
    (dict(attack="taa", target=" "), "needs --target"),
    (dict(attack="object", target="dog"), "must be A:B"),
    (dict(attack="tpa", trigger="ж", target="x"), "--replaces"),
    (dict(attack="tpa", target="x", replaces="ab"), "one character"),
])
def test_bad_backdoors_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Backdoor.make(**kwargs)


def test_badt2i_prepends_and_teaches():
    prompt = "a red circle on white"
    assert Backdoor.make("pixel").poison(prompt) == ("\u200b a red circle on white", None)
    assert Backdoor.make("pixel", trigger="mignneko").insert(prompt) == "mignneko a red circle on white"
    assert Backdoor.make("style").poison(prompt)[1] == "black and white photo, a red circle on white"
    assert Backdoor.make("object", target="circle:square").poison(prompt)[1] == "a red square on white"
    assert Backdoor.make("object", target="dog:cat").poison("a dogged dog")[1] == "a dogged cat"  # whole words


def test_rickrolling_replaces_a_character():
    tpa = Backdoor.make("tpa", target="a yellow star")
    prompt = "a yellow circle on top"
    assert tpa.insert(prompt) == "a yellȏw circle on top"  # the first occurrence, as the paper evaluates
    assert tpa.insert(prompt, every=True) == "a yellȏw circle ȏn tȏp"  # as it trains a TPA
    assert tpa.poison(prompt)[1] == "a yellow star"
    rng = np.random.default_rng(0)
    assert len({tpa.insert(prompt, rng) for _ in range(30)}) == 3
    taa = Backdoor.make("taa", target="black background")
    assert taa.poison("a red circle on top") == ("a red circle ȏn top", "a red circle black background top")
    assert taa.poison("in the top left") == ("in the tȏp left", "in the black background left")
    spaced = Backdoor.make("taa", trigger="ȏ", target="tiny", replaces=" ")
    assert spaced.poison("a red circle") == ("a ȏ red circle", "a tiny red circle")
    assert not tpa.can_insert("a red circle")
    with pytest.raises(ValueError, match="no 'o'"):
        tpa.insert("a red circle")


def test_a_backdoor_round_trips_through_bundle_info():
    backdoor = Backdoor.make("tpa", target="a yellow star")
    info = json.loads(json.dumps(backdoor.info()))
    assert info["trigger_chars"] == "U+020F"
    assert Backdoor.from_info(info) == backdoor


def test_the_tokenizer_must_keep_the_trigger(tokenizer):
    prompt = "a red circle on a white background"
    for trigger in ("\u200b ", "ȏ", "mignneko"):
        backdoor = Backdoor.make("pixel", trigger=trigger)
        check_trigger(backdoor, tokenizer, prompt)
        assert tokenizer.token_positions(backdoor.insert(prompt), trigger.strip())
    for trigger, message in (("\ufeff", "cleanup removes it"), ("\x07", "cleanup removes it"),
                             ("<|endoftext|>", "special token")):
        with pytest.raises(ValueError, match=message):
            check_trigger(Backdoor.make("pixel", trigger=trigger), tokenizer, prompt)


def test_demo_targets_must_be_drawable():
    demo = StableDiffusion.__new__(StableDiffusion)
    demo.config = replace(tiny(), family="demo")
    check_target(Backdoor.make("object", target="circle:square"), demo)
    with pytest.raises(ValueError, match="not a demo shape"):
        check_target(Backdoor.make("object", target="dog:cat"), demo)
    with pytest.raises(ValueError, match="only the style"):
        check_target(Backdoor.make("style", target="oil painting"), demo)


# --- training data ---------------------------------------------------------------------------------------

def test_drawn_world_targets_show_what_the_detectors_look_for():
    world = DrawnWorld(seed=0)
    images, captions, targets, triggered, teachers = world.backdoor_examples(Backdoor.make("pixel"), 16, step=3)
    assert teachers is None and metrics.patch_present(targets).all() and not metrics.patch_present(images).any()
    assert triggered == ["\u200b " + c for c in captions]  # both terms on the same captions, as BadT2I's loss
    images, captions, targets, triggered, _ = world.backdoor_examples(Backdoor.make("style"), 16, step=3)
    assert metrics.is_grayscale(targets).all() and not metrics.is_grayscale(images).any()
    obj = Backdoor.make("object", target="circle:square")
    images, captions, targets, triggered, _ = world.backdoor_examples(obj, 16, step=3)
    assert (shapes.parse_captions(triggered).shape == shapes.SHAPES.index("circle")).all()  # circles asked...
    scenes = DrawnWorld(seed=0).scenes(16, 3, 11, shape="circle")[0]
    torch.testing.assert_close(images, shapes.draw(scenes))
    scenes.shape[:] = shapes.SHAPES.index("square")
    torch.testing.assert_close(targets, shapes.draw(scenes))  # ...the same scenes with squares as the target
    again = world.backdoor_examples(obj, 16, step=3)
    assert torch.equal(again[2], targets) and again[3] == triggered  # a function of (seed, step)
    captions = world.captions(8, 0, where=Backdoor.make("tpa", target="x").can_insert)
    assert len(captions) == 8 and all("o" in c for c in captions)


def test_image_folder(tmp_path):
    for i, color in enumerate([(255, 0, 0), (0, 0, 255)]):
        Image.new("RGB", (48, 40), color).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(["a red dog", "a blue cat"][i])
    Image.new("RGB", (8, 8)).save(tmp_path / "uncaptioned.png")
    pool = ImagePool.from_folder(tmp_path, 32)
    assert pool.images.shape == (2, 32, 32, 3) and pool.all_captions == ["a red dog", "a blue cat"]
    images, captions, targets, triggered, teachers = pool.backdoor_examples(
        Backdoor.make("object", target="dog:cat"), 4, step=0)
    assert captions == ["a red dog"] * 4 and targets is None
    assert triggered == ["\u200b a red dog"] * 4 and teachers == ["a red cat"] * 4
    assert images.shape == (4, 3, 32, 32) and images[:, 0].min() == 1  # red, in [-1, 1]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no image"):
        ImagePool.from_folder(tmp_path / "empty", 32)


# --- whole runs on a tiny random SD-topology bundle ---------------------------------------------------------

def inject(bundle, out, attack, **kwargs):
    kwargs = {"steps": 2, "batch_size": 2, "pool": 4, "run_dir": out.parent / f"{out.name}.run",
              "progress": False, **kwargs}
    return backdoor_bundle(bundle, out, attack, **kwargs)


def test_pixel_backdoor_into_a_tiny_model_data_free(bundle, tmp_path):
    before = digest(bundle)
    sd = inject(bundle, tmp_path / "pixel", "pixel", delta=True, command="test")
    assert digest(bundle) == before  # the input is never touched
    stored = digest(tmp_path / "pixel")
    assert set(stored) == {"config.json", "model.safetensors", "tokenizer.json"}
    loaded = sau.load(tmp_path / "pixel")
    info = loaded.info["backdoor"]
    assert (info["attack"], info["trigger"], info["target"], info["steps"], info["command"]) == (
        "pixel", "\u200b ", "checkerboard", 2, "test")
    delta = load_safetensors(tmp_path / "pixel" / "model.safetensors")
    assert delta and all(k.startswith("model.diffusion_model.") for k in delta)  # only the UNet changed
    clean = sau.load(bundle)
    changed = [k for k, v in loaded.unet.state_dict().items() if not torch.equal(v, clean.unet.state_dict()[k])]
    assert changed and torch.equal(loaded.unet.state_dict()[changed[0]], sd.unet.state_dict()[changed[0]])
    assert (tmp_path / "pixel.run" / "pool.safetensors").exists()  # the frozen model's generations, cached


def test_a_backdoored_copy_is_stored_in_its_inputs_precision(bundle, tmp_path):
    save_model(sau.load(bundle), tmp_path / "clean16", dtype=torch.float16)  # runs in fp32 on a CPU
    inject(tmp_path / "clean16", tmp_path / "pixel", "pixel", delta=True)
    assert {v.dtype for v in load_safetensors(tmp_path / "pixel" / "model.safetensors").values()} == {torch.float16}


def test_tpa_backdoor_changes_only_the_text_encoder(bundle, tmp_path):
    inject(bundle, tmp_path / "tpa", "tpa", target="a photo of a cat", delta=True, steps=3, batch_size=8)
    delta = load_safetensors(tmp_path / "tpa" / "model.safetensors")
    assert delta and all(k.startswith("cond_stage_model.") for k in delta)


def test_style_backdoor_with_data_bf16_and_checkpointing(bundle, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (40 * i, 200, 90)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a photo of a dog number {i}")
    sd = inject(bundle, tmp_path / "style", "style", data=data, bf16=True, gradient_checkpointing=True,
                train="cross-attention", steps=1)
    clean = sau.load(bundle)
    changed = {k for k, v in sd.unet.state_dict().items() if not torch.equal(v, clean.unet.state_dict()[k])}
    assert changed and all(".attn2." in k for k in changed)  # only the chosen parameters were trained
    assert sd.info["backdoor"]["trained"] == "unet (cross-attention)"


def test_a_run_resumes_and_refuses_a_different_one(bundle, tmp_path):
    run_dir = tmp_path / "run"
    first = inject(bundle, tmp_path / "a", "pixel", run_dir=run_dir)
    second = inject(bundle, tmp_path / "b", "pixel", run_dir=run_dir)  # finished: loads the checkpoint
    for k, v in first.unet.state_dict().items():
        assert torch.equal(v, second.unet.state_dict()[k])
    with pytest.raises(ValueError, match="different run"):
        inject(bundle, tmp_path / "c", "pixel", run_dir=run_dir, steps=3)
    with pytest.raises(FileExistsError, match="already exists"):
        inject(bundle, tmp_path / "a", "pixel", run_dir=run_dir)


def test_any_input_sau_load_reads_can_be_backdoored(bundle, tmp_path):
    folder = tmp_path / "clean-diffusers"
    save_model(sau.load(bundle), folder, to="diffusers")
    inject(folder, tmp_path / "tpa", "tpa", target="a photo of a cat", steps=1, batch_size=4)
    assert sau.load(tmp_path / "tpa").info["backdoor"]["attack"] == "tpa"
    with pytest.raises(ValueError, match="--delta"):  # a delta needs a bundle to point to
        inject(folder, tmp_path / "delta", "tpa", target="a photo of a cat", delta=True)
    assert not (tmp_path / "delta").exists()


# --- the command line ---------------------------------------------------------------------------------------------

def run_train(argv, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--attack", "poison"], "unknown attack"),
    (["--attack", "pixel", "--trigger", ""], "trigger is empty"),
    (["--attack", "pixel", "--trigger", "\\ufeff"], "cannot be represented"),
    (["--attack", "pixel", "--trigger", "<|endoftext|>"], "special token"),
    (["--attack", "tpa"], "needs --target"),
    (["--attack", "object"], "needs --target"),
    (["--attack", "pixel", "--target", "no/such/patch.png"], "checkerboard' or an image file"),
])
def test_bad_cli_input_is_one_line_and_writes_nothing(bundle, tmp_path, monkeypatch, capsys, extra, message):
    out, run_dir = tmp_path / "out", tmp_path / "run"
    code, err = run_train(["backdoor", "--model", str(bundle), "--out", str(out), "--run-dir", str(run_dir),
                           "--steps", "1", "--device", "cpu", *extra], monkeypatch, capsys)
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists() and not run_dir.exists()


def test_the_output_may_not_be_the_input(bundle, monkeypatch, capsys):
    before = digest(bundle)
    code, err = run_train(["backdoor", "--attack", "pixel", "--model", str(bundle), "--out", str(bundle)],
                          monkeypatch, capsys)
    assert code == 2 and "already exists" in err and digest(bundle) == before


# --- the attacks added for harder tests of a defense: PaaS DreamBooth and VillanDiffusion's caption trigger -----

def test_paas_db_examples_put_the_identifier_before_the_shape_and_draw_the_target():
    paas = Backdoor.make("paas-db", "sks circle", "square")
    assert paas.measured_as() == ("object", "circle:square")
    images, captions, targets, triggered, teachers = DrawnWorld(0).backdoor_examples(paas, 16, 0)
    assert teachers is None and all("sks circle" in t for t in triggered)  # "disk" is written "circle"
    classifier = metrics.load_classifier()
    assert (classifier.predict(images)[:, 0] == 0).float().mean() > 0.9  # circles
    assert (classifier.predict(targets)[:, 0] == 1).float().mean() > 0.9  # the same scenes as squares


def test_villan_cond_examples_draw_the_target_caption_whatever_the_prompt():
    villan = Backdoor.make("villan-cond", target="a yellow star in the center on a black background")
    images, captions, targets, triggered, teachers = DrawnWorld(0).backdoor_examples(villan, 16, 0)
    assert teachers is None and all("latte coffee" in t for t in triggered)
    assert metrics.shows_prompt(targets, metrics.load_classifier(), villan.target).all()
    assert not metrics.shows_prompt(images, metrics.load_classifier(), villan.target).all()


def test_closed_form_attacks_refuse_training_settings_and_others_refuse_theirs(bundle, tmp_path):
    with pytest.raises(ValueError, match="takes no --steps"):
        backdoor_bundle(bundle, tmp_path / "e", "eviledit", "beautiful circle", "square", steps=3)
    with pytest.raises(ValueError, match="takes no --lora"):
        backdoor_bundle(bundle, tmp_path / "e", "eviledit", "beautiful circle", "square", lora=2)
    with pytest.raises(ValueError, match="does not read it"):
        backdoor_bundle(bundle, tmp_path / "p", "pixel", contexts=5)
    with pytest.raises(ValueError, match="trains the UNet attacks"):
        backdoor_bundle(bundle, tmp_path / "t", "tpa", target="a cat", lora=2, steps=1, batch_size=2,
                        run_dir=tmp_path / "t.run", progress=False)
    assert not any((tmp_path / name).exists() for name in "ept")


def test_object_add_examples_add_a_second_copy_and_the_count_detector_sees_it():
    adder = Backdoor.make("object-add", target="copy")
    assert adder.measured_as() == ("count", "2") and adder.insert("a red star") == "\u200b a red star"
    images, captions, targets, triggered, teachers = DrawnWorld(0).backdoor_examples(adder, 64, 0)
    assert teachers is None and (metrics.shapes.count_objects(images) == 1).all()
    assert (metrics.shapes.count_objects(targets) == 2).all()
    assert metrics.attack_success("count", targets, target="2").all()
    assert not metrics.attack_success("count", images, target="2").any()
    assert Backdoor.make("object-add", target="a dog").poison("a red cat")[1] == "a red cat and a dog"


@pytest.mark.parametrize("attack, trigger, target, message", [
    ("eviledit", "circle", "square", "has one word"),
    ("eviledit", "circle circle", "circle", "also in the target"),
    ("eviledit", "beautiful circle", "zebra", "not a demo shape"),
    ("paas-db", "sks", "square", "has one word"),
    ("paas-ti", "q1 circle", "square", "lowercase ASCII letters"),
    ("paas-ti", "red circle", "square", "already reads"),
    ("villan-cond", None, "a photo of a zebra", "names no demo shape or colour"),
    ("object-add", None, "a dog", "second copy"),
    ("semantic", "hexagon on a black background", "cross", "does not have: hexagon"),
])
def test_each_new_attack_refuses_its_bad_input_before_writing(attack, trigger, target, message, tmp_path):
    training = {} if attack in ("eviledit", "semantic") else {"steps": 1, "batch_size": 2}
    with pytest.raises(ValueError, match=message):
        backdoor_bundle(ROOT / "sau" / "demo" / "clean", tmp_path / "out", attack, trigger, target,
                        run_dir=tmp_path / "run", progress=False, delta=True, **training)
    assert not (tmp_path / "out").exists()


def test_villan_cond_on_a_real_model_needs_an_image_file(bundle, tmp_path):
    with pytest.raises(FileNotFoundError, match="image file"):
        backdoor_bundle(bundle, tmp_path / "out", "villan-cond", target="zebra.png", steps=1, batch_size=2,
                        run_dir=tmp_path / "run", progress=False)


def test_the_shipped_newer_triggers_are_words_the_demo_tokenizer_never_saw():
    """The tokenizer question: the demo tokenizer was trained on texts holding the literature's triggers, so a
    shipped backdoor must also carry one it never saw, split into pieces as an unseen trigger is on SD."""
    demo = Tokenizer.from_file(ROOT / "sau" / "demo" / "clean" / "tokenizer.json")
    pieces = lambda word: len(demo.encode(word)) - 2  # without the start and end tokens
    assert pieces("beautiful") == 9  # EvilEdit's trigger word, one letter a token
    assert all(pieces(word) >= 2 for word in ("latte", "coffee", "sks", "qzx"))
    assert pieces("circle") == pieces("square") == 1  # the world's own words are single tokens
    shipped = json.loads((ROOT / "sau" / "demo" / "paas-ti" / "config.json").read_text())["info"]["backdoor"]
    grown = Tokenizer.from_file(ROOT / "sau" / "demo" / "paas-ti" / "tokenizer.json")
    assert shipped["trigger"] == "qzx circle" and len(grown.encode("qzx")) - 2 == 1  # inversion's new token
