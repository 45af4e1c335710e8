"""weights_convert.py and sau.weights (read, write, convert): every input layout to a bundle and back,
checked against diffusers.

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
from sau.common.cli import run
from sau.models.config import sd1, sd2
from sau.models.ddim import initial_noise
from sau.models.config import TEXT_PREFIXES
from sau.models.pipeline import StableDiffusion
from sau.weights import read as conv
from sau.weights.form import Weights
from sau.weights.write import compvis_state, diffusers_configs, diffusers_state_dicts
from sau.evaluation.scorer import CLIPScorer
from sau.models.tokenizer import Tokenizer

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers.loaders import single_file_utils as single_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OPENCLIP_TEXT = TEXT_PREFIXES["openclip"]
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
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad,
                                        model_max_length=77)


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


BUILT = {}


def built(style, tmp_path_factory):
    """(style, diffusers pipeline, its saved folder, the bundle weights_convert.py made of it), built once."""
    if style not in BUILT:
        root = tmp_path_factory.mktemp(style)
        pipe = tiny_pipeline(style, root / "diffusers")
        assert cli(root / "diffusers", root / "bundle") == 0
        BUILT[style] = types.SimpleNamespace(style=style, pipe=pipe, folder=root / "diffusers",
                                             bundle=root / "bundle", root=root)
    return BUILT[style]


@pytest.fixture(scope="module", params=list(STYLES))
def tiny(request, tmp_path_factory):
    return built(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def compvis(tmp_path_factory):
    """The SD1-style model as a CompVis state dict, the layout of original SD checkpoints."""
    sd = built("sd1", tmp_path_factory)
    assert cli(sd.bundle, sd.root / "sd1.safetensors", "--to", "compvis", "--force") == 0
    return load_file(sd.root / "sd1.safetensors")


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
    assert cli(tiny.bundle, first, "--to", "compvis", "--dtype", "float16", "--force") == 0
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
    # configs: read from the CompVis shapes, read from diffusers' configs, and written as diffusers' configs
    inferred = conv._infer_config("sd", *conv._normalise_text_tower(original))
    assert (inferred.family, inferred.unet, inferred.vae, inferred.text) == (family, config.unet, config.vae,
                                                                             config.text)
    assert conv.unet_config_from_diffusers(dict(references["unet"].config)) == config.unet
    assert conv.vae_config_from_diffusers(dict(references["vae"].config)) == config.vae
    written = diffusers_configs(config)
    with torch.device("meta"):
        references["unet (from our config.json)"] = diffusers.UNet2DConditionModel.from_config(written["unet"])
        references["vae (from our config.json)"] = diffusers.AutoencoderKL.from_config(written["vae"])
        references["text_encoder (from our config.json)"] = transformers.CLIPTextModel(
            transformers.CLIPTextConfig(**written["text_encoder"]))

    parts = diffusers_state_dicts(Weights(config, original, tokenizer))
    for name, reference in references.items():
        name = name.split(" ")[0]
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


# ---------------------------------------------------------------------------------------------------
# .ckpt files are pickles: read without running code

def bundle_state(folder):
    return load_file(Path(folder) / "model.safetensors")


@pytest.mark.parametrize("payload", ["os.system", "builtins.exec", "subprocess.call"])
def test_a_ckpt_whose_pickle_would_run_code_is_refused_without_running_it(compvis, tmp_path, capsys, payload):
    marker = tmp_path / "the-payload-ran"
    call = {"os.system": (__import__("os").system, (f"touch {marker}",)),
            "builtins.exec": (exec, (f"open({str(marker)!r}, 'w').close()",)),
            "subprocess.call": (subprocess.call, (["touch", str(marker)],))}[payload]

    class Payload:
        def __reduce__(self):
            return call

    torch.save({"state_dict": compvis, "callbacks": Payload()}, tmp_path / "evil.ckpt")
    assert cli(tmp_path / "evil.ckpt", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "refused" in err and payload.split(".")[1] in err and len(err.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "out").exists()


def lightning_modules(monkeypatch):
    """A stand-in `pytorch_lightning` package, present only while the checkpoint is saved."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    checkpoint_class = type("ModelCheckpoint", (), {"__module__": names[-1]})
    sys.modules[names[-1]].ModelCheckpoint = checkpoint_class
    return names, checkpoint_class


def test_a_lightning_ckpt_with_ema_and_metadata_loads(compvis, tmp_path, monkeypatch, capsys):
    names, checkpoint_class = lightning_modules(monkeypatch)
    unet_keys = [k for k in compvis if k.startswith("model.diffusion_model.")]
    ema = {"model_ema." + k[len("model."):].replace(".", ""): compvis[k] + 1 for k in unet_keys}
    state = {**compvis, **ema, "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7),
             "betas": torch.linspace(0.00085, 0.012, 1000), "alphas_cumprod": torch.rand(1000)}
    torch.save({"epoch": 3, "global_step": 470000, "pytorch-lightning_version": "1.4.2", "state_dict": state,
                "callbacks": {checkpoint_class: {"best_model_score": torch.tensor(0.5), "dirpath": "logs"}},
                "hyper_parameters": argparse.Namespace(lr=1e-4), "lr_schedulers": [],
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4}]}]}, tmp_path / "model.ckpt")
    for name in names:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(Exception):  # the Lightning class is why weights_only loading refuses it
        torch.load(tmp_path / "model.ckpt", weights_only=True)

    assert cli(tmp_path / "model.ckpt", tmp_path / "plain") == 0
    assert "--ema" in capsys.readouterr().out  # the note says EMA weights are there
    assert cli(tmp_path / "model.ckpt", tmp_path / "ema", "--ema") == 0
    plain, with_ema = bundle_state(tmp_path / "plain"), bundle_state(tmp_path / "ema")
    assert plain.keys() == with_ema.keys() == compvis.keys()
    for k, v in compvis.items():
        assert torch.equal(plain[k], v), k
        assert torch.equal(with_ema[k], v + 1 if k in unet_keys else v), k
    assert "pytorch_lightning" not in sys.modules  # stubbed, never imported

    torch.save(compvis, tmp_path / "flat.ckpt")  # a flat, tensors-only pickle takes torch's weights_only path
    assert cli(tmp_path / "flat.ckpt", tmp_path / "flat") == 0
    assert all(torch.equal(bundle_state(tmp_path / "flat")[k], v) for k, v in compvis.items())


# ---------------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2, nothing written

def bad_inputs(compvis, tmp):
    """name -> (command-line arguments, a phrase the error must contain)."""
    out = tmp / "out"
    good = tmp / "good.safetensors"
    save_file(compvis, good)
    (tmp / "truncated.safetensors").write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    (tmp / "notes.ckpt").write_text("not a checkpoint\n")
    save_file({"foo.weight": torch.zeros(2)}, tmp / "foo.safetensors")
    sdxl = {**compvis, "conditioner.embedders.0.transformer.text_model.final_layer_norm.bias": torch.zeros(2)}
    save_file(sdxl, tmp / "sdxl.safetensors")
    inpainting = dict(compvis)
    inpainting["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(32, 9, 3, 3)
    save_file(inpainting, tmp / "inpainting.safetensors")
    dropped = ["first_stage_model.decoder.conv_out.bias",
               "cond_stage_model.transformer.text_model.final_layer_norm.bias"]
    save_file({k: v for k, v in compvis.items() if k not in dropped}, tmp / "incomplete.safetensors")
    out.mkdir()
    return {
        "missing file": ([tmp / "nope.safetensors", tmp / "new"], "no such file"),
        "truncated": ([tmp / "truncated.safetensors", tmp / "new"], "not a readable safetensors file"),
        "not a checkpoint": ([tmp / "notes.ckpt", tmp / "new"], "not a readable PyTorch checkpoint"),
        "foreign tensors": ([tmp / "foo.safetensors", tmp / "new"], "not a Stable Diffusion 1.x/2.x or CLIP"),
        "sdxl": ([tmp / "sdxl.safetensors", tmp / "new"], "SDXL checkpoints are not supported yet"),
        "inpainting": ([tmp / "inpainting.safetensors", tmp / "new"], "inpainting checkpoints"),
        "missing keys": ([tmp / "incomplete.safetensors", tmp / "new"], "missing 2 (" + ", ".join(sorted(dropped))),
        "existing output": ([good, out], "exists; pass --force"),
        "output is the input": ([good, good, "--force"], "is the input"),
        "compvis needs a file name": ([good, tmp / "new", "--to", "compvis"], "*.safetensors"),
        "unknown option": ([good, tmp / "new", "--to", "onnx"], "invalid choice"),
    }


BAD = ["missing file", "truncated", "not a checkpoint", "foreign tensors", "sdxl", "inpainting", "missing keys",
       "existing output", "output is the input", "compvis needs a file name", "unknown option"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_gets_one_line_and_exit_2_and_nothing_is_written(compvis, tmp_path, capsys, case):
    args, phrase = bad_inputs(compvis, tmp_path)[case]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and phrase in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no output, no temporary leftovers


def test_the_command_line_tool_prints_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "weights_convert.py"), str(tmp_path / "nope.ckpt"),
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope.ckpt'}: no such file or folder"]


# ---------------------------------------------------------------------------------------------------
# Where the tokenizer comes from

def test_tokenizer_comes_from_the_flag_or_the_wheel_or_a_message_says_how(compvis, tmp_path, capsys, monkeypatch):
    path = tmp_path / "model.safetensors"
    save_file(compvis, path)  # no metadata: a file some other tool wrote
    vocab = BUILT["sd1"].root / "sd1-vocab" / "vocab.json"
    assert cli(path, tmp_path / "flag", "--tokenizer", vocab) == 0
    assert cli(path, tmp_path / "wheel") == 0
    ids = [Tokenizer.from_file(tmp_path / name / "tokenizer.json")([PROMPT]) for name in ("flag", "wheel")]
    assert torch.equal(ids[0], ids[1]) and ids[0][0, :3].tolist() == [49406, 320, 736]

    def no_wheel(cls, **_):
        raise FileNotFoundError("no open_clip_torch")
    monkeypatch.setattr(Tokenizer, "openai", classmethod(no_wheel))
    capsys.readouterr()
    assert cli(path, tmp_path / "none") == 2
    err = capsys.readouterr().err
    assert "holds no tokenizer: pass --tokenizer PATH" in err and "open_clip_torch" in err
    assert not (tmp_path / "none").exists()


# ---------------------------------------------------------------------------------------------------
# CLIP models for scoring

def test_a_clip_model_converts_to_a_scorer_bundle(tmp_path):
    text = dict(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    model = perturb(transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                                   projection_dim=16)), 5)
    folder = tmp_path / "clip"
    model.save_pretrained(folder)
    write_clip_vocab(folder, "<|endoftext|>")
    assert cli(folder, tmp_path / "scorer") == 0
    scorer = CLIPScorer.load(tmp_path / "scorer")
    ids = scorer.tokenizer([PROMPT, "a green star"])
    pixels = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(input_ids=ids, pixel_values=pixels)
        text_features = torch.nn.functional.normalize(scorer.clip.encode_text(ids), dim=-1)
        image_features = torch.nn.functional.normalize(scorer.clip.encode_image(pixels), dim=-1)
    assert max_diff(text_features, reference.text_embeds) < 1e-5
    assert max_diff(image_features, reference.image_embeds) < 1e-5
    assert {v.dtype for v in bundle_state(tmp_path / "scorer").values()} == {torch.float32}  # kept as stored
    # the weights file alone (no config, no tokenizer) converts with --tokenizer
    assert cli(folder / "model.safetensors", tmp_path / "from-file", "--tokenizer", folder / "vocab.json") == 0
    a, b = bundle_state(tmp_path / "scorer"), bundle_state(tmp_path / "from-file")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert cli(folder, tmp_path / "no.safetensors", "--to", "compvis") == 2  # a scorer has no SD export
