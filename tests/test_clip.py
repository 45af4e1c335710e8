"""CLIP text and vision towers against transformers (and torch's own MultiheadAttention for OpenCLIP blocks)."""
from dataclasses import replace

import pytest
import torch
from torch import nn

from sau.models.clip import (CLIPModel, CLIPTextModel, CLIPVisionModel, OpenCLIPTextModel, build_text_encoder, eos_positions,
                      infer_text_config, infer_vision_config, preprocess_images)
from sau.models.config import TextConfig, VisionConfig, sd1, sd2
from sau.weights.layouts.clip import hf_text_to_openclip, openai_clip_to_hf, openclip_text_to_hf

transformers = pytest.importorskip("transformers")

TOL = 1e-5
BOS, EOS = 998, 999
TINY_SD1 = TextConfig(vocab_size=1000, width=32, layers=2, heads=2, mlp_width=64, max_positions=77,
                      pad_id=EOS, bos_id=BOS, eos_id=EOS)
TINY_SD2 = replace(TINY_SD1, kind="openclip", width=64, layers=3, heads=4, mlp_width=128, activation="gelu",
                   skip_last_layers=1, projection_dim=48, pad_id=0)
TINY_VISION = VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_width=64, projection_dim=16)


def rel_err(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def randomize(module, seed=0):
    """Random values in every parameter (LayerNorm scales around 1), so that no layer is an identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        for m in module.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.add_(1)
    return module.eval()


def prompt_ids(lengths, pad_id, max_positions=77, seed=0):
    """bos, random tokens, eos, then padding: one row per length (the number of tokens between bos and eos)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max_positions), pad_id, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, 0] = BOS
        ids[row, 1:n + 1] = torch.randint(1, 990, (n,), generator=gen)
        ids[row, n + 1] = EOS
    return ids


def hf_text_config(cfg, **overrides):
    settings = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_width,
                    num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                    max_position_embeddings=cfg.max_positions, hidden_act=cfg.activation, layer_norm_eps=1e-5,
                    projection_dim=cfg.projection_dim or cfg.width, bos_token_id=cfg.bos_id,
                    eos_token_id=cfg.eos_id, pad_token_id=cfg.pad_id)
    return transformers.CLIPTextConfig(**(settings | overrides))


def hf_vision_config(cfg):
    return transformers.CLIPVisionConfig(hidden_size=cfg.width, intermediate_size=cfg.mlp_width,
                                         num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                                         image_size=cfg.image_size, patch_size=cfg.patch_size,
                                         projection_dim=cfg.projection_dim, hidden_act=cfg.activation,
                                         layer_norm_eps=1e-5)


def shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


# ------------------------------------------------------------------------------------------------ parity

def test_sd1_text_matches_transformers_including_padding():
    ours = randomize(CLIPTextModel(TINY_SD1))
    ref = transformers.CLIPTextModel(hf_text_config(TINY_SD1)).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    ids = prompt_ids([3, 10, 0], pad_id=EOS)  # SD1 pads with eos; the last row is the empty prompt
    with torch.no_grad():
        got, want = ours(ids), ref(input_ids=ids).last_hidden_state
    assert got.shape == (3, 77, 32)
    assert rel_err(got, want) <= TOL
    assert rel_err(got[:, 20:], want[:, 20:]) <= TOL  # padded positions, which the UNet attends to


def test_sd2_text_is_penultimate_block_of_transformers_reference():
    ours = randomize(OpenCLIPTextModel(TINY_SD2), seed=1)
    hf_sd = openclip_text_to_hf(ours.state_dict())
    hf_sd.pop("logit_scale")
    ref = transformers.CLIPTextModelWithProjection(hf_text_config(TINY_SD2)).eval()
    ref.load_state_dict({k if k == "text_projection.weight" else "text_model." + k: v for k, v in hf_sd.items()},
                        strict=True)
    ids = prompt_ids([5, 40, 1], pad_id=0)
    with torch.no_grad():
        out = ref(input_ids=ids, output_hidden_states=True)
        want = ref.text_model.final_layer_norm(out.hidden_states[-2])
        got = ours(ids)
        full_stack = ref.text_model.final_layer_norm(out.hidden_states[-1])
        assert rel_err(ours.pooled(ids), out.text_embeds) <= TOL
    assert got.shape == (3, 77, 64)
    assert rel_err(got, want) <= TOL
    assert rel_err(got, full_stack) > 1e-2  # the last block really is skipped


def test_pooled_matches_transformers_with_and_without_projection():
    ids = prompt_ids([4, 12, 0], pad_id=EOS)
    plain = randomize(CLIPTextModel(TINY_SD1), seed=2)
    ref = transformers.CLIPTextModel(hf_text_config(TINY_SD1)).eval()
    ref.load_state_dict(plain.state_dict())
    projected_cfg = replace(TINY_SD1, projection_dim=16)
    projected = randomize(CLIPTextModel(projected_cfg), seed=3)
    ref_projected = transformers.CLIPTextModelWithProjection(hf_text_config(projected_cfg)).eval()
    ref_projected.load_state_dict({k if k.startswith("text_projection") else "text_model." + k: v
                                   for k, v in projected.state_dict().items()}, strict=True)
    with torch.no_grad():
        assert plain.pooled(ids).shape == (3, 32)
        assert rel_err(plain.pooled(ids), ref(input_ids=ids).pooler_output) <= TOL
        assert projected.pooled(ids).shape == (3, 16)
        assert rel_err(projected.pooled(ids), ref_projected(input_ids=ids).text_embeds) <= TOL


def test_pooled_uses_first_eos_even_when_eos_is_not_the_largest_id():
    cfg = replace(TINY_SD1, eos_id=500, pad_id=500)
    ours = randomize(CLIPTextModel(cfg), seed=4)
    ref = transformers.CLIPTextModel(hf_text_config(cfg)).eval()
    ref.load_state_dict(ours.state_dict())
    ids = torch.full((2, 77), 500)
    ids[:, 0] = BOS
    ids[0, 1:4] = torch.tensor([900, 950, 7])  # ids larger than eos before it
    ids[1, 1] = 990
    assert eos_positions(ids, 500).tolist() == [4, 2]
    with torch.no_grad():
        assert rel_err(ours.pooled(ids), ref(input_ids=ids).pooler_output) <= TOL


def test_pooled_without_eos_falls_back_to_largest_id():
    ours = randomize(CLIPTextModel(TINY_SD1), seed=5)
    ids = torch.tensor([[5, 700, 9, 3, EOS, EOS], [5, 700, 9, 3, 2, 1]])  # the second row lost its eos
    assert eos_positions(ids, EOS).tolist() == [4, 1]
    with torch.no_grad():
        hidden = ours(ids)  # skip_last_layers is 0 here, so forward is the full stack
        assert torch.equal(ours.pooled(ids), hidden[[0, 1], [4, 1]])


def test_token_embeds_replace_the_lookup():
    for tower in (CLIPTextModel(TINY_SD1), OpenCLIPTextModel(TINY_SD2)):
        randomize(tower, seed=6)
        ids = prompt_ids([6], pad_id=tower.cfg.pad_id)
        lookup = tower.embeddings.token_embedding if isinstance(tower, CLIPTextModel) else tower.token_embedding
        with torch.no_grad():
            assert torch.equal(tower(ids, token_embeds=lookup(ids)), tower(ids))
            assert not torch.allclose(tower(ids, token_embeds=lookup(ids) + 1), tower(ids))


def test_openclip_block_matches_torch_multihead_attention_layer():
    """OpenCLIP's block is nn.MultiheadAttention inside a pre-LN layer: torch's encoder layer is a reference."""
    ours = randomize(OpenCLIPTextModel(TINY_SD2), seed=7)
    block = ours.transformer.resblocks[0]
    ref = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, activation="gelu", layer_norm_eps=1e-5,
                                     batch_first=True, norm_first=True).eval()
    names = {"self_attn.in_proj_weight": "attn.in_proj_weight", "self_attn.in_proj_bias": "attn.in_proj_bias",
             "self_attn.out_proj.weight": "attn.out_proj.weight", "self_attn.out_proj.bias": "attn.out_proj.bias",
             "linear1.weight": "mlp.c_fc.weight", "linear1.bias": "mlp.c_fc.bias",
             "linear2.weight": "mlp.c_proj.weight", "linear2.bias": "mlp.c_proj.bias",
             "norm1.weight": "ln_1.weight", "norm1.bias": "ln_1.bias",
             "norm2.weight": "ln_2.weight", "norm2.bias": "ln_2.bias"}
    ref.load_state_dict({k: block.state_dict()[v] for k, v in names.items()}, strict=True)
    x = torch.randn(2, 77, 64)
    mask = torch.full((77, 77), float("-inf")).triu(1)
    with torch.no_grad():
        assert rel_err(block(x, mask), ref(x, src_mask=mask)) <= TOL


def test_vision_matches_transformers():
    ours = randomize(CLIPVisionModel(TINY_VISION), seed=8)
    ref = transformers.CLIPVisionModelWithProjection(hf_vision_config(TINY_VISION)).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        got, want = ours(pixels), ref(pixel_values=pixels).image_embeds
    assert got.shape == (3, 16)
    assert rel_err(got, want) <= TOL


def tiny_hf_clip_model():
    text_cfg = replace(TINY_SD1, projection_dim=16)
    config = transformers.CLIPConfig(text_config=hf_text_config(text_cfg).to_dict(),
                                     vision_config=hf_vision_config(TINY_VISION).to_dict(), projection_dim=16)
    return text_cfg, transformers.CLIPModel(config).eval()


def test_clip_model_matches_transformers():
    text_cfg, ref = tiny_hf_clip_model()
    ours = randomize(CLIPModel(text_cfg, TINY_VISION), seed=9)
    assert shapes(ours.state_dict()) == shapes(ref.state_dict())
    ref.load_state_dict(ours.state_dict(), strict=True)
    ids = prompt_ids([2, 8], pad_id=EOS)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = ref(input_ids=ids, pixel_values=pixels)
        text, image = ours.encode_text(ids), ours.encode_image(pixels)
        assert rel_err(text, ref.text_projection(ref.text_model(input_ids=ids).pooler_output)) <= TOL
        assert rel_err(nn.functional.normalize(text, dim=-1), out.text_embeds) <= TOL
        assert rel_err(nn.functional.normalize(image, dim=-1), out.image_embeds) <= TOL
        logits = ours(ids, pixels)
    assert logits.shape == (3, 2)
    assert rel_err(logits, out.logits_per_image) <= TOL


def test_build_text_encoder_picks_the_tower():
    assert isinstance(build_text_encoder(TINY_SD1), CLIPTextModel)
    assert isinstance(build_text_encoder(TINY_SD2), OpenCLIPTextModel)
    with pytest.raises(ValueError, match="unknown text encoder kind"):
        build_text_encoder(replace(TINY_SD1, kind="t5"))


def test_preprocess_resizes_crops_and_normalises():
    mean = torch.tensor(VisionConfig().mean)[:, None, None]
    std = torch.tensor(VisionConfig().std)[:, None, None]
    constant = torch.full((1, 3, 448, 448), 0.5)
    out = preprocess_images(constant, VisionConfig())
    assert out.shape == (1, 3, 224, 224)
    assert torch.allclose(out, ((0.5 - mean) / std).expand(1, 3, 224, 224), atol=1e-5)
    wide = torch.rand(2, 3, 224, 300)  # shortest side already 224: only the centre crop acts
    assert torch.equal(preprocess_images(wide, VisionConfig()), (wide[..., 38:262] - mean) / std)
    tall = torch.rand(1, 3, 64, 32)
    assert CLIPVisionModel(TINY_VISION).preprocess(tall).shape == (1, 3, 32, 32)


# ------------------------------------------------------------------------------------------------ layouts

def test_sd1_full_size_keys_and_parameter_count():
    with torch.device("meta"):
        ours = CLIPTextModel(sd1().text)
        ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12))
    sd = ours.state_dict()
    assert len(sd) == 196
    assert sum(v.numel() for v in sd.values()) == 123_060_480
    assert shapes(sd) == shapes(ref.state_dict())
    assert not any("position_ids" in k for k in sd)


def sd2_full_size():
    with torch.device("meta"):
        return OpenCLIPTextModel(sd2().text).state_dict()


def test_sd2_full_size_keys_shapes_and_hf_conversion():
    sd = sd2_full_size()
    assert len(sd) == 294
    assert sum(v.numel() for v in sd.values()) == 354_032_641
    expected = {"token_embedding.weight": (49408, 1024), "positional_embedding": (77, 1024),
                "transformer.resblocks.23.attn.in_proj_weight": (3072, 1024),
                "transformer.resblocks.0.attn.in_proj_bias": (3072,),
                "transformer.resblocks.5.mlp.c_fc.weight": (4096, 1024),
                "transformer.resblocks.5.mlp.c_proj.weight": (1024, 4096), "ln_final.weight": (1024,),
                "text_projection": (1024, 1024), "logit_scale": ()}
    assert {k: shapes(sd)[k] for k in expected} == expected

    with torch.device("meta"):
        ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16))
    hf = openclip_text_to_hf(sd, num_layers=23)
    want = shapes(ref.state_dict()) | {"text_projection.weight": (1024, 1024), "logit_scale": ()}
    assert shapes(hf) == want
    assert shapes(hf_text_to_openclip(openclip_text_to_hf(sd))) == shapes(sd)


def test_vit_l14_vision_full_size_keys():
    with torch.device("meta"):
        ours = CLIPVisionModel(VisionConfig())
        ref = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
            patch_size=14, projection_dim=768))
    assert shapes(ours.state_dict()) == shapes(ref.state_dict())
    assert infer_vision_config(ours.state_dict()) == VisionConfig()


def test_openclip_hf_round_trip_values():
    sd = randomize(OpenCLIPTextModel(TINY_SD2), seed=10).state_dict()
    hf = openclip_text_to_hf(sd)
    q, k, v = (hf[f"encoder.layers.1.self_attn.{p}_proj.weight"] for p in "qkv")
    assert torch.equal(torch.cat([q, k, v]), sd["transformer.resblocks.1.attn.in_proj_weight"])
    assert torch.equal(hf["text_projection.weight"], sd["text_projection"].t())
    back = hf_text_to_openclip(hf)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[key], sd[key]) for key in sd)
    trimmed = openclip_text_to_hf(sd, num_layers=2)
    assert not any(key.startswith("encoder.layers.2.") for key in trimmed)
    assert "encoder.layers.1.mlp.fc2.bias" in trimmed


def hf_to_openai_by_hand(hf):
    """The inverse of openai_clip_to_hf, written independently: text by hf_text_to_openclip, vision by hand."""
    text = {k: v for k, v in hf.items() if k.startswith("text_model.")}
    out = hf_text_to_openclip(text | {"text_projection.weight": hf["text_projection.weight"]})
    out["logit_scale"] = hf["logit_scale"]
    vision = "vision_model."
    out["visual.conv1.weight"] = hf[vision + "embeddings.patch_embedding.weight"]
    out["visual.class_embedding"] = hf[vision + "embeddings.class_embedding"]
    out["visual.positional_embedding"] = hf[vision + "embeddings.position_embedding.weight"]
    out["visual.proj"] = hf["visual_projection.weight"].t()
    for side in ("weight", "bias"):
        out[f"visual.ln_pre.{side}"] = hf[f"{vision}pre_layrnorm.{side}"]
        out[f"visual.ln_post.{side}"] = hf[f"{vision}post_layernorm.{side}"]
    layers = vision + "encoder.layers."
    for key in [k for k in hf if k.startswith(layers)]:
        index, rest = key[len(layers):].split(".", 1)
        block = f"visual.transformer.resblocks.{index}."
        for hf_name, openai_name in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                                     ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj")):
            if rest.startswith(hf_name + "."):
                out[block + openai_name + rest[len(hf_name):]] = hf[key]
        if rest.startswith("self_attn.q_proj."):
            side = rest.rsplit(".", 1)[1]
            out[f"{block}attn.in_proj_{side}"] = torch.cat(
                [hf[f"{layers}{index}.self_attn.{p}_proj.{side}"] for p in "qkv"])
    return out


def test_openai_clip_to_hf_gives_the_transformers_model():
    text_cfg, ref = tiny_hf_clip_model()
    hf = randomize(CLIPModel(text_cfg, TINY_VISION), seed=11).state_dict()
    openai = hf_to_openai_by_hand(hf) | {"input_resolution": torch.tensor(32), "context_length": torch.tensor(77),
                                         "vocab_size": torch.tensor(1000)}
    assert "visual.transformer.resblocks.1.attn.in_proj_weight" in openai
    assert "transformer.resblocks.1.ln_2.bias" in openai
    converted = openai_clip_to_hf(openai)
    assert converted.keys() == hf.keys()
    assert all(torch.equal(converted[k], hf[k]) for k in hf)
    ref.load_state_dict(converted, strict=True)


def test_infer_text_config_from_shapes():
    # Heads are width // 64 and token ids are SD's, whatever the tiny config said
    def inferable(cfg):
        pad_id = 0 if cfg.kind == "openclip" else 49407
        return replace(cfg, heads=cfg.width // 64, bos_id=49406, eos_id=49407, pad_id=pad_id)

    tiny_sd1 = replace(TINY_SD1, width=128, heads=2)
    assert infer_text_config(CLIPTextModel(tiny_sd1).state_dict()) == inferable(tiny_sd1)
    assert infer_text_config(OpenCLIPTextModel(TINY_SD2).state_dict()) == inferable(TINY_SD2)
    with torch.device("meta"):
        sd1_dict = CLIPTextModel(sd1().text).state_dict()
    assert infer_text_config(sd1_dict) == sd1().text
    assert infer_text_config({"text_model." + k: v for k, v in sd1_dict.items()}) == sd1().text
    sd2_dict = sd2_full_size()
    assert infer_text_config(sd2_dict) == sd2().text
    diffusers_sd2 = infer_text_config(openclip_text_to_hf(sd2_dict, num_layers=23))  # what diffusers ships for SD2
    assert (diffusers_sd2.kind, diffusers_sd2.layers, diffusers_sd2.activation) == ("clip", 23, "gelu")
    assert (diffusers_sd2.heads, diffusers_sd2.pad_id, diffusers_sd2.skip_last_layers) == (16, 0, 0)
    with pytest.raises(ValueError, match="not a CLIP text encoder"):
        infer_text_config({"weight": torch.zeros(1)})
