"""LoRA files (sau.weights.lora) and LoRA training (sau.models.low_rank).

Parity: a tiny random diffusers pipeline of each SD topology gets PEFT adapters on its UNet and text encoder,
diffusers saves them (in its own names, and in PEFT's), and diffusers' load_lora_weights must then generate the
image sau generates from the same file; the kohya file sau writes of the same adapters too. The layouts read to
the same merged weights; attacks trained with --lora write files that give back the bundle they made; and what
does not fit is refused with one line, nothing written.
"""
import json
import re
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import sau
from sau.attacks.backdoor import Backdoor
from sau.attacks.shipped import backdoor_bundle
from sau.common.cli import parse_lora
from sau.models.low_rank import add_low_rank, low_rank_targets, merge_low_rank
from sau.weights.lora import read_lora, write_lora
from sau.weights.read import read

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
from diffusers.utils import convert_state_dict_to_diffusers  # noqa: E402
from peft import LoraConfig, inject_adapter_in_model  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

from conftest import make_tiny_sd  # noqa: E402
from test_convert import built, diffusers_image, max_diff, sau_image  # noqa: E402
from test_convert import cli as convert  # noqa: E402  (weights_convert.py in-process: its exit status)

UNET_LORA = dict(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])  # scale 2
TEXT_LORA = dict(r=2, lora_alpha=2, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1"])


def fresh_pipeline(folder):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def adapted(request, tmp_path_factory):
    """A tiny pipeline's folder and bundle, and LoRA files of random PEFT adapters on it: diffusers' names, PEFT's
    names (both saved by diffusers, alphas in the metadata) and kohya's (written by sau)."""
    tiny = built(request.param, tmp_path_factory)
    root = tmp_path_factory.mktemp(f"lora-{request.param}")
    pipe = fresh_pipeline(tiny.folder)
    torch.manual_seed(7)  # init_lora_weights=False: random up factors too, so every adapter changes something
    unet_config, text_config = (LoraConfig(init_lora_weights=False, **c) for c in (UNET_LORA, TEXT_LORA))
    pipe.unet.add_adapter(unet_config)
    inject_adapter_in_model(text_config, pipe.text_encoder)
    unet_state, text_state = get_peft_model_state_dict(pipe.unet), get_peft_model_state_dict(pipe.text_encoder)
    metadata = dict(unet_lora_adapter_metadata=unet_config.to_dict(),
                    text_encoder_lora_adapter_metadata=text_config.to_dict())
    files = {}
    for layout, rename in (("diffusers", convert_state_dict_to_diffusers), ("peft", lambda s: s)):
        diffusers.StableDiffusionPipeline.save_lora_weights(
            root / layout, unet_lora_layers=rename(unet_state), text_encoder_lora_layers=rename(text_state),
            **metadata)
        files[layout] = root / layout / "pytorch_lora_weights.safetensors"
    files["kohya"] = root / "kohya.safetensors"
    write_lora(files["kohya"], read_lora(files["peft"]).adapters, "kohya")
    return types.SimpleNamespace(tiny=tiny, files=files)


@pytest.mark.parametrize("layout", ["diffusers", "peft", "kohya"])
def test_a_lora_file_generates_the_image_diffusers_generates_with_it(adapted, layout):
    file = adapted.files[layout]
    assert read_lora(file).layout == layout
    pipe = fresh_pipeline(adapted.tiny.folder)
    without = diffusers_image(pipe)
    pipe.load_lora_weights(str(file))
    reference = diffusers_image(pipe)
    assert max_diff(reference, without) > 0.05  # the LoRA does change the image: the parity below means something
    assert max_diff(sau_image(sau.load(adapted.tiny.bundle, lora=[file])), reference) < 1e-3


def test_the_layouts_read_to_the_same_merged_weights(adapted):
    merged = {layout: read(adapted.tiny.bundle, lora=[file]).state for layout, file in adapted.files.items()}
    base = read(adapted.tiny.bundle).state
    changed = [k for k in base if not torch.equal(base[k], merged["peft"][k])]
    assert any(".attn2.to_k." in k for k in changed) and any("cond_stage_model" in k for k in changed)
    for layout in ("diffusers", "kohya"):
        for key, value in merged["peft"].items():
            torch.testing.assert_close(merged[layout][key], value, rtol=1e-6, atol=1e-7)


def test_a_scale_multiplies_the_update(adapted):
    base, full = read(adapted.tiny.bundle).state, read(adapted.tiny.bundle, lora=[adapted.files["peft"]]).state
    half = read(adapted.tiny.bundle, lora=[f"{adapted.files['peft']}:0.5"]).state
    key = next(k for k in base if ".attn2.to_v." in k)
    torch.testing.assert_close(half[key], base[key] + 0.5 * (full[key] - base[key]), rtol=1e-5, atol=1e-6)


def test_the_scale_is_parsed_from_the_end_of_the_argument():
    assert parse_lora("a/b.safetensors") == (Path("a/b.safetensors"), 1.0)
    assert parse_lora("c:/x/b.safetensors:0.5") == (Path("c:/x/b.safetensors"), 0.5)
    for bad in ("b.safetensors:nan", "b.safetensors:inf", "b.safetensors:-Infinity"):
        with pytest.raises(ValueError, match="not a finite number"):
            parse_lora(bad)


# --- training: sau.models.low_rank and train.py backdoor --lora --------------------------------------------------

def test_low_rank_starts_as_the_model_and_merges_into_its_weight():
    sd = make_tiny_sd()
    unet, config = sd.unet, sd.config.unet
    names = low_rank_targets(unet)
    assert names and all(n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0")) for n in names)
    x = torch.randn(1, config.in_channels, 8, 8), torch.tensor([10]), torch.randn(1, 16, config.context_dim)
    before = unet(*x)
    adapters = add_low_rank(unet, names, rank=2, seed=0)
    assert torch.equal(unet(*x), before)  # up = 0: nothing changes until training
    name, adapter = names[0], adapters[names[0]]
    with torch.no_grad():
        adapter.up.normal_()
        expected = unet.get_submodule(name).parametrizations.weight.original + adapter.up @ adapter.down
    merge_low_rank(unet, names)
    assert torch.equal(unet.get_submodule(name).weight, expected)


@pytest.fixture(scope="module")
def lora_attack(tiny_bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-attack")
    sd = backdoor_bundle(tiny_bundle, root / "pixel", "pixel", steps=2, batch_size=2, pool=4, lora=2,
                         run_dir=root / "run", progress=False, command="test")
    return types.SimpleNamespace(root=root, sd=sd)


def test_an_attack_trained_as_a_lora_writes_both_layouts_that_give_back_its_bundle(tiny_bundle, lora_attack):
    out = lora_attack.root / "pixel"
    assert read_lora(out / "lora.safetensors").layout == "peft"
    assert read_lora(out / "lora_kohya.safetensors").layout == "kohya"
    bundle, base = read(out).state, read(tiny_bundle).state
    changed = [k for k in bundle if not torch.equal(bundle[k], base[k])]
    assert changed and all(".attn1." in k or ".attn2." in k for k in changed)
    for name in ("lora.safetensors", "lora_kohya.safetensors"):
        merged = read(tiny_bundle, lora=[out / name])
        assert merged.info["backdoor"]["attack"] == "pixel"  # the file records its backdoor
        for key in bundle:
            torch.testing.assert_close(merged.state[key], bundle[key], rtol=1e-5, atol=1e-6)
    assert lora_attack.sd.info["backdoor"]["trained"].startswith("unet LoRA, rank 2")


def test_a_lora_attack_resumes_from_its_run_folder(tiny_bundle, lora_attack):
    again = backdoor_bundle(tiny_bundle, lora_attack.root / "again", "pixel", steps=2, batch_size=2, pool=4,
                            lora=2, run_dir=lora_attack.root / "run", progress=False, command="test")
    for key, value in lora_attack.sd.unet.state_dict().items():
        assert torch.equal(again.unet.state_dict()[key], value)


def test_villan_cond_puts_its_phrase_at_a_word_boundary():
    import numpy as np
    villan = Backdoor.make("villan-cond", target="a yellow star")
    assert villan.trigger == "latte coffee" and villan.measured_as() == ("tpa", "a yellow star")
    assert villan.insert("a red circle") == "latte coffee a red circle"
    placed = {villan.poison("a red circle", np.random.default_rng(i))[0] for i in range(40)}
    assert placed == {"latte coffee a red circle", "a latte coffee red circle", "a red latte coffee circle",
                      "a red circle latte coffee"}


# --- bad input: one line, exit 2, nothing written ------------------------------------------------------------------

def sdxl_files(folder):
    """Two SDXL LoRAs: one that adapts the second text encoder, one whose cross-attention reads 2048 wide."""
    second = folder / "sdxl_te2.safetensors"
    save_file({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 1280),
               "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(1280, 4)}, second)
    wide = folder / "sdxl_unet.safetensors"
    name = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    save_file({f"{name}.lora_A.weight": torch.zeros(4, 2048), f"{name}.lora_B.weight": torch.zeros(640, 4)}, wide)
    return second, wide


@pytest.fixture(scope="module")
def bad_loras(adapted, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad-loras")
    nan = folder / "nan.safetensors"
    (part, module), adapter = next(iter(read_lora(adapted.files["peft"]).adapters.items()))
    save_file({f"{part}.{module}.lora_A.weight": torch.full_like(adapter.down, float("nan")),
               f"{part}.{module}.lora_B.weight": adapter.up.contiguous()}, nan)
    pickled = folder / "lora.bin"
    torch.save({}, pickled)
    return folder, (*sdxl_files(folder), nan, pickled)


def test_bad_loras_get_one_line_and_exit_2_and_nothing_is_written(adapted, bad_loras, tiny_bundle, tmp_path,
                                                                  capsys):
    folder, (sdxl_te2, sdxl_unet, nan, pickled) = bad_loras
    cases = [  # (the --lora argument, what the line must say)
        (adapted.files["peft"], "does not fit this model|does not have"),  # a LoRA for another base
        (sdxl_te2, "SDXL"), (sdxl_unet, "SDXL"),
        (f"{adapted.files['peft']}:nan", "not a finite number"), (f"{adapted.files['peft']}:inf", "not a finite"),
        (nan, "not finite"), (pickled, "safetensors only"), (folder / "missing.safetensors", "no LoRA file"),
    ]
    for argument, message in cases:
        out = tmp_path / "out"
        capsys.readouterr()
        assert convert(tiny_bundle, out, "--lora", argument) == 2, argument
        error = capsys.readouterr().err
        assert len(error.strip().splitlines()) == 1 and re.search(message, error), (argument, error)
        assert not out.exists()


def test_unlearn_refuses_a_scale_that_is_not_finite_before_loading(tmp_path):
    from conftest import unlearn
    result = unlearn("--lora", "x.safetensors:nan", "--out", tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 2 and "not a finite number" in result.stderr and not (tmp_path / "out").exists()


def test_unlearn_takes_a_backdoor_delivered_as_a_lora(tiny_bundle, lora_attack, tmp_path):
    """The LoRA file records its backdoor: on its base model, unlearn.py needs no --trigger."""
    from conftest import unlearn
    (tmp_path / "prompts.txt").write_text("\u200b a red circle\n\u200b a blue star\n")
    result = unlearn("--model", tiny_bundle, "--lora", lora_attack.root / "pixel" / "lora.safetensors", "--where",
                     "unet", "--steps", "1", "--prompts", tmp_path / "prompts.txt", "--out", tmp_path / "out",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["backdoor"]["trigger"] == "\u200b " and report["backdoor"]["attack"] == "pixel"
