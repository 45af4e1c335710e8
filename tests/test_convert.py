"""weights_convert.py and sau.convert: every input layout to a bundle and back, checked against diffusers.

Tiny random Stable Diffusion pipelines of the SD1 and SD2 topologies are built with diffusers, saved to a
folder, converted, and must give diffusers' own images and tensors; full-size layouts are checked on the
meta device; `.ckpt` files are read without running code; bad input gets one line and exit status 2.
"""
import argparse
import json
import subprocess
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import sau
from sau import convert as conv
from sau.checkpoint import CheckpointError
from sau.cli import run
from sau.config import sd1, sd2
from sau.ddim import initial_noise
from sau.export import OPENCLIP_TEXT, Weights, compvis_state, diffusers_state_dicts
from sau.pipeline import StableDiffusion
from sau.scorer import CLIPScorer
from sau.tokenizer import Tokenizer

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers.loaders import single_file_utils as single_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import weights_convert  # noqa: E402

PROMPT = "a red circle on a blue square"
STEPS = 4
SIZE = 32  # pixels; the tiny VAE halves once, so latents are 16 x 16

DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
UP = ("UpBlock2D", "CrossAttnUpBlock2D")
STYLES = {
    # SD1: conv proj_in/out, a fixed number of heads, quick_gelu text, pads with eos, epsilon
    "sd1": dict(unet=dict(attention_head_dim=2, down_block_types=DOWN, up_block_types=UP),
                text=dict(hidden_act="quick_gelu"), pad="<|endoftext|>", prediction="epsilon"),
    # SD2: linear proj_in/out, heads of a fixed width (2 and 4 heads), upcast attention, gelu text, pads with "!"
    # (id 0), v-prediction
    "sd2": dict(unet=dict(attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
                          down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2),
                text=dict(hidden_act="gelu"), pad="!", prediction="v_prediction"),
}


def cli(*args):
    """Run weights_convert.py in-process as the shell would; returns the exit status (0 on success)."""
    try:
        run(lambda: weights_convert.main([str(a) for a in args]))
    except SystemExit as e:
        return e.code
    return 0


def perturb(module, seed):
    """Random offsets on every parameter, so zero-initialised layers cannot hide a swapped tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module.eval()


def write_clip_vocab(folder, pad):
    """vocab.json + merges.txt of OpenAI's CLIP vocabulary (from the open_clip_torch wheel), for CLIPTokenizer."""
    ours = Tokenizer.openai()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(ours.backend.get_vocab()))
    merges = json.loads(ours.backend.to_str())["model"]["merges"]
    lines = [m if isinstance(m, str) else " ".join(m) for m in merges]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad)


def tiny_pipeline(style, folder):
    s = STYLES[style]
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(sample_size=SIZE // 2, block_out_channels=(32, 64), layers_per_block=2,
                                          cross_attention_dim=64, norm_num_groups=8, **s["unet"])
    vae = diffusers.AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, sample_size=SIZE)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, **s["text"]))
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                        prediction_type=s["prediction"])
    pipe = diffusers.StableDiffusionPipeline(
        vae=perturb(vae, 1), text_encoder=perturb(text, 2), unet=perturb(unet, 3),
        tokenizer=write_clip_vocab(folder.parent / f"{style}-vocab", s["pad"]), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    return pipe


@pytest.fixture(scope="module", params=list(STYLES))
def tiny(request, tmp_path_factory):
    """(style, diffusers pipeline, its saved folder, the bundle weights_convert.py made of it)."""
    root = tmp_path_factory.mktemp(request.param)
    pipe = tiny_pipeline(request.param, root / "diffusers")
    assert cli(root / "diffusers", root / "bundle") == 0
    return types.SimpleNamespace(style=request.param, pipe=pipe, folder=root / "diffusers", bundle=root / "bundle",
                                 root=root)


def diffusers_image(pipe, seed=0):
    latents = initial_noise((4, SIZE // 2, SIZE // 2), [seed])  # the noise sau draws for this seed
    return pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=7.5, latents=latents,
                output_type="pt").images


def sau_image(sd, seed=0):
    images = sd.generate([PROMPT], seeds=[seed], steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE)
    return ((images + 1) / 2).clamp(0, 1)


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


# ---------------------------------------------------------------------------------------------------
# diffusers folder -> bundle -> the same images

def test_diffusers_folder_to_bundle_generates_the_diffusers_image(tiny):
    config = json.loads((tiny.bundle / "config.json").read_text())
    s = STYLES[tiny.style]
    assert config["family"] == tiny.style
    assert config["schedule"]["prediction_type"] == s["prediction"]
    assert config["text"]["pad_id"] == (0 if tiny.style == "sd2" else 49407)
    assert config["vae"]["scale_factor"] == pytest.approx(0.18215)
    assert config["unet"]["upcast_attention"] == (tiny.style == "sd2")
    assert (tiny.bundle / "tokenizer.json").is_file()
    reference = diffusers_image(tiny.pipe)
    assert max_diff(sau_image(sau.load(tiny.bundle)), reference) < 1e-3
    # sau.load also takes the diffusers folder itself, converting in memory
    assert max_diff(sau_image(sau.load(tiny.folder)), reference) < 1e-3


# ---------------------------------------------------------------------------------------------------
# CompVis export: diffusers' own single-file converters read it back exactly; CompVis -> bundle -> CompVis

def text_state(module):
    return {k.removeprefix("text_model."): v for k, v in module.state_dict().items() if "position_ids" not in k}


def test_compvis_export_reads_back_through_diffusers_converters(tiny):
    out = tiny.root / "model.safetensors"
    assert cli(tiny.bundle, out, "--to", "compvis", "--force") == 0
    ckpt = load_file(out)
    unet = single_file.convert_ldm_unet_checkpoint(ckpt, tiny.pipe.unet.config)
    vae = single_file.convert_ldm_vae_checkpoint(ckpt, tiny.pipe.vae.config)
    if tiny.style == "sd1":
        assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in ckpt)
        text = single_file.convert_ldm_clip_checkpoint(ckpt)
    else:  # SD2 tools look for the text encoder under OpenCLIP names
        assert any(k.startswith(OPENCLIP_TEXT + "transformer.resblocks.") for k in ckpt)
        text = single_file.convert_open_clip_checkpoint(tiny.pipe.text_encoder, ckpt)
    text = {k.removeprefix("text_model."): v for k, v in text.items()}
    for ours, module in ((unet, tiny.pipe.unet), (vae, tiny.pipe.vae), (text, None)):
        reference = text_state(tiny.pipe.text_encoder) if module is None else module.state_dict()
        assert ours.keys() == reference.keys()
        for k, v in reference.items():
            assert ours[k].dtype == v.dtype and torch.equal(ours[k], v), k


def test_compvis_to_bundle_to_compvis_is_bitwise_identical(tiny):
    first, second = tiny.root / "half.safetensors", tiny.root / "again.safetensors"
    assert cli(tiny.bundle, first, "--to", "compvis", "--dtype", "fp16", "--force") == 0
    assert cli(first, tiny.root / "from-compvis", "--force") == 0
    assert cli(tiny.root / "from-compvis", second, "--to", "compvis", "--force") == 0
    a, b = load_file(first), load_file(second)
    assert a.keys() == b.keys() and len(a) > 100
    assert all(a[k].dtype == b[k].dtype == torch.float16 and torch.equal(a[k], b[k]) for k in a)
    # the file carries the exact config, and a model loaded straight from it draws the same image
    reference = diffusers_image(tiny.pipe)
    assert max_diff(sau_image(sau.load(first, dtype=torch.float32)), reference) < 2e-2  # fp16 weights
    full = tiny.root / "full.safetensors"
    assert cli(tiny.bundle, full, "--to", "compvis", "--force") == 0
    assert max_diff(sau_image(sau.load(full)), reference) < 1e-3


def test_diffusers_export_loads_offline_with_from_pretrained(tiny):
    out = tiny.root / "exported"
    assert cli(tiny.bundle, out, "--to", "diffusers", "--force") == 0
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    for name in ("unet", "vae"):
        ours, ref = getattr(pipe, name).state_dict(), getattr(tiny.pipe, name).state_dict()
        assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref), name
    ours, ref = text_state(pipe.text_encoder), text_state(tiny.pipe.text_encoder)
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)
    assert pipe.scheduler.config.prediction_type == STYLES[tiny.style]["prediction"]
    assert pipe.unet.config.upcast_attention == (tiny.style == "sd2")
    assert pipe.tokenizer(PROMPT).input_ids == tiny.pipe.tokenizer(PROMPT).input_ids
    assert pipe.tokenizer.pad_token_id == tiny.pipe.tokenizer.pad_token_id
    assert max_diff(diffusers_image(pipe), diffusers_image(tiny.pipe)) < 1e-5


# ---------------------------------------------------------------------------------------------------
# Full-size layouts on the meta device: every key converts, both ways

SD1_UNET = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                attention_head_dim=8)
SD2_UNET = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=1024,
                attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SD1_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
SD2_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                hidden_act="gelu")


def shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_full_size_layouts_convert_both_ways_with_no_key_left_over(family):
    config, unet_kw, text_kw = {"sd1": (sd1(), SD1_UNET, SD1_TEXT), "sd2": (sd2(), SD2_UNET, SD2_TEXT)}[family]
    tokenizer = Tokenizer.openai(pad_id=config.text.pad_id)
    with torch.device("meta"):
        model = StableDiffusion(config, tokenizer)
        references = {"unet": diffusers.UNet2DConditionModel(**unet_kw), "vae": diffusers.AutoencoderKL(**SD_VAE),
                      "text_encoder": transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_kw))}
    original = model.compvis_state_dict()
    parts = diffusers_state_dicts(Weights(config, original, tokenizer))
    for name, reference in references.items():
        ours = parts[name] if name != "text_encoder" else {k.removeprefix("text_model."): v
                                                            for k, v in parts[name].items()}
        expected = {k.removeprefix("text_model."): v for k, v in reference.state_dict().items()
                    if "position_ids" not in k}
        assert shapes(ours) == shapes(expected), name

    # back: what diffusers holds, as a diffusers folder reads (its SD2 text encoder under HF names) ...
    from_diffusers = conv.compvis_from_diffusers(parts, config)
    text = conv._text_config_from_diffusers({"hidden_act": config.text.activation}, parts["text_encoder"], Path("."))
    back = compvis_state(Weights(replace(config, text=text), from_diffusers, tokenizer))
    dropped = set()
    if family == "sd2":  # ... loses only what diffusers drops: OpenCLIP's last block and its unused projection
        dropped = {k for k in original if k.startswith(OPENCLIP_TEXT + "transformer.resblocks.23.")}
        dropped |= {OPENCLIP_TEXT + "text_projection", OPENCLIP_TEXT + "logit_scale"}
        assert len(dropped) == 14
    assert shapes(back) == {k: v for k, v in shapes(original).items() if k not in dropped}
