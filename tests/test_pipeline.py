"""The model bundle end to end on a tiny random model: text -> image, determinism, save/load, strict loading."""
import pytest
import torch
from PIL import Image

import sau
from sau.common.state import CheckpointError, load_strict
from sau.models.pipeline import from_uint8, save_images, to_uint8
from sau.weights.write import save_model

PROMPTS = ["a red circle", "a big blue square in the top left", "green star, centered"]


@pytest.fixture(scope="module")
def sd(tiny_sd):
    return tiny_sd


def generate(sd, prompts, seeds, **kw):
    return sd.generate(prompts, seeds, steps=4, guidance_scale=3.0, **kw)


def test_images_have_the_configured_size_and_depend_only_on_the_seed(sd):
    a = generate(sd, PROMPTS, [1, 2, 3])
    b = generate(sd, PROMPTS, [1, 2, 3])
    c = generate(sd, PROMPTS, [1, 2, 4])
    assert a.shape == (3, 3, 32, 32)
    assert torch.equal(a, b)
    assert torch.equal(a[:2], c[:2]) and not torch.allclose(a[2], c[2])


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_an_image_does_not_change_with_batch_size(sd, eta):
    batch = generate(sd, PROMPTS, [7, 8, 9], eta=eta)
    alone = generate(sd, PROMPTS[1:2], [8], eta=eta)
    torch.testing.assert_close(batch[1:2], alone, rtol=1e-5, atol=1e-5)


def test_non_square_images_and_latents_only(sd):
    latents = generate(sd, PROMPTS[:1], [0], height=32, width=48, decode=False)
    assert latents.shape == (1, 4, 16, 24)  # the tiny VAE halves the image once
    with pytest.raises(ValueError, match="multiple of"):
        generate(sd, PROMPTS[:1], [0], height=31, width=32)


def test_save_and_load_round_trip_keeps_the_images(sd, tmp_path):
    save_model(sd, tmp_path / "bundle")
    loaded = sau.load(tmp_path / "bundle")
    assert loaded.compvis_state_dict().keys() == sd.compvis_state_dict().keys()
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."))
               for k in loaded.compvis_state_dict())
    torch.testing.assert_close(generate(loaded, PROMPTS[:2], [5, 6]), generate(sd, PROMPTS[:2], [5, 6]),
                               rtol=0, atol=0)
    half = tmp_path / "half"
    save_model(sd, half, dtype=torch.float16)
    assert sau.load(half).dtype == torch.float32  # fp16 storage runs in fp32 on a CPU
    assert sau.load(half).stored_dtype == torch.float16
    assert sau.load(half, dtype=torch.float16).dtype == torch.float16


def test_images_are_saved_as_png(sd, tmp_path):
    paths = save_images(generate(sd, PROMPTS[:2], [0, 1]), tmp_path / "png")
    assert [p.name for p in paths] == ["image_0000.png", "image_0001.png"]
    with Image.open(paths[0]) as image:
        assert image.size == (32, 32) and image.mode == "RGB"


def test_long_prompts_warn_and_truncate(sd):
    with pytest.warns(UserWarning, match="were dropped"):
        ids = sd.tokenizer(["a red circle " * 20])
    assert ids.shape == (1, 16) and ids[0, -1] == sd.tokenizer.eos_id


def test_loading_wrong_weights_lists_missing_unexpected_and_misshaped_keys(sd):
    state = dict(sd.unet.state_dict())
    del state["out.2.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["time_embed.0.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError) as err:
        load_strict(sd.unet, state, "unet")
    message = str(err.value)
    assert "missing 1 (out.2.bias)" in message and "unexpected 1 (extra.weight)" in message
    assert "mis-shaped 1 (time_embed.0.weight (3, 3) != (128, 32))" in message
    assert "\n" not in message


def test_a_delta_bundle_stores_only_what_differs_from_its_base(sd, tmp_path):
    save_model(sd, tmp_path / "base")
    changed = sau.load(tmp_path / "base")
    with torch.no_grad():
        changed.unet.out[2].bias.add_(1.0)
    save_model(changed, tmp_path / "variant", base=tmp_path / "base")
    from safetensors.torch import load_file
    assert list(load_file(tmp_path / "variant" / "model.safetensors")) == ["model.diffusion_model.out.2.bias"]
    loaded = sau.load(tmp_path / "variant")
    for k, v in changed.compvis_state_dict().items():
        assert torch.equal(loaded.compvis_state_dict()[k], v), k


def test_images_become_uint8_pixels_one_way():
    images = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0]).reshape(1, 1, 2, 3).expand(2, 3, 2, 3)
    pixels = to_uint8(images)
    assert pixels.shape == (2, 2, 3, 3) and pixels.dtype.name == "uint8"  # channels last, as image files hold them
    assert pixels[0, :, :, 0].ravel().tolist() == [0, 0, 128, 255, 255, 255]  # clamped, rounded half to even
    every_value = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16, 1).expand(1, 16, 16, 3)
    assert from_uint8(every_value).shape == (1, 3, 16, 16)
    assert (to_uint8(from_uint8(every_value)) == every_value.numpy()).all()  # the two directions are inverses
