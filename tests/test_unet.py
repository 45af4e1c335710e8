"""UNet: parity with diffusers' UNet2DConditionModel, full-size layouts on the meta device,
config inference from shapes, and gradient checkpointing with attention capture."""
import contextlib
import functools
from dataclasses import replace

import pytest
import torch

from sau.models.attention import capture_attention
from sau.models.config import UNetConfig, sd1, sd2, tiny
from sau.weights.layouts.unet import unet_from_diffusers, unet_to_diffusers
from sau.models.unet import UNet, infer_unet_config

diffusers = pytest.importorskip("diffusers")

# Tiny configs of the real topologies, each written twice: in LDM terms and in diffusers terms.
TINY = {
    # SD1 style: conv proj_in/out, a fixed number of heads, no attention at the lowest level.
    "sd1": (
        UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(2, 1),
                   num_heads=2, context_dim=32, norm_groups=8),
        dict(block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=32, attention_head_dim=2,
             norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    ),
    # SD2 style: linear proj_in/out, heads of a fixed width (8) so 2, 4 and 8 heads; diffusers lists head counts.
    "sd2": (
        UNetConfig(model_channels=16, channel_mult=(1, 2, 4), num_res_blocks=2, attention_resolutions=(2, 1),
                   num_heads=-1, num_head_channels=8, context_dim=24, use_linear_in_transformer=True,
                   norm_groups=8, upcast_attention=True),
        dict(block_out_channels=(16, 32, 64), layers_per_block=2, cross_attention_dim=24, attention_head_dim=(2, 4, 8),
             use_linear_projection=True, upcast_attention=True, norm_num_groups=8,
             down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    ),
    # Off the SD path: one ResBlock per level, attention everywhere, two transformer blocks, other channel counts.
    "deep": (
        UNetConfig(in_channels=3, out_channels=5, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                   attention_resolutions=(2, 1), num_heads=4, transformer_depth=2, context_dim=16, norm_groups=4),
        dict(in_channels=3, out_channels=5, block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=16,
             attention_head_dim=4, transformer_layers_per_block=2, norm_num_groups=4,
             down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    ),
}

SD1_DIFFUSERS = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                     cross_attention_dim=768, attention_head_dim=8)
SD2_DIFFUSERS = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                     cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)


def rel_err(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@functools.lru_cache(maxsize=None)
def tiny_pair(name):
    """(ours, reference) with the same random weights; every parameter is perturbed so that
    unit norm weights, zero biases and zero-initialised layers cannot hide a swapped tensor."""
    cfg, kwargs = TINY[name]
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(sample_size=16, **kwargs).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = UNet(cfg).eval()
    ours.load_state_dict(unet_from_diffusers(ref.state_dict(), cfg), strict=True)
    return ours, ref


def inputs(cfg, batch=2, size=(16, 16), seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, *size, generator=g)
    context = torch.randn(batch, 7, cfg.context_dim, generator=g)
    return x, context


@pytest.mark.parametrize("name", list(TINY))
def test_parity_with_diffusers(name):
    ours, ref = tiny_pair(name)
    x, context = inputs(ours.cfg)
    with torch.no_grad():
        expected = ref(x, torch.tensor(421), encoder_hidden_states=context).sample
        assert rel_err(ours(x, 421, context), expected) <= 1e-5  # a plain number
        assert rel_err(ours(x, torch.tensor(421), context), expected) <= 1e-5  # a 0-d tensor
    assert expected.shape == (2, ours.cfg.out_channels, 16, 16)


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_parity_non_square_with_per_sample_timesteps(name):
    ours, ref = tiny_pair(name)
    x, context = inputs(ours.cfg, batch=3, size=(16, 24))
    t = torch.tensor([1, 500, 999])
    with torch.no_grad(), capture_attention(ours, "attn2") as maps:
        out = ours(x, t, context)
        expected = ref(x, t, encoder_hidden_states=context).sample
    assert out.shape == x.shape[:1] + (ours.cfg.out_channels,) + x.shape[2:]
    assert rel_err(out, expected) <= 1e-5
    # Each sample's timestep is its own: the batch equals the samples run one by one.
    with torch.no_grad():
        for i in range(3):
            alone = ours(x[i:i + 1], int(t[i]), context[i:i + 1])
            assert rel_err(alone, out[i:i + 1]) <= 1e-5
    # Capture reports the query grid of each attention layer: 16x24 and 8x12, the middle block 4x6.
    assert {m.size for m in maps} == {(16, 24), (8, 12), (4, 6)}
    assert all(m.probs.shape[2] == m.size[0] * m.size[1] and m.probs.shape[3] == 7 for m in maps)


def test_odd_latent_size_is_a_clear_error():
    unet = UNet(tiny().unet)
    x = torch.randn(1, 4, 15, 16)
    with pytest.raises(ValueError, match="not divisible by 2"):
        unet(x, 1, torch.randn(1, 3, 32))


@pytest.mark.parametrize("name", list(TINY))
def test_layout_round_trip_is_exact(name):
    ours, ref = tiny_pair(name)
    compvis, theirs = ours.state_dict(), ref.state_dict()
    there = unet_to_diffusers(compvis, ours.cfg)
    assert there.keys() == theirs.keys()
    back = unet_from_diffusers(there, ours.cfg)
    assert list(back) == list(compvis) and all(back[k] is compvis[k] for k in compvis)
    again = unet_to_diffusers(unet_from_diffusers(theirs, ours.cfg), ours.cfg)
    assert again.keys() == theirs.keys() and all(again[k] is theirs[k] for k in theirs)


def test_layout_lists_keys_it_cannot_map():
    cfg = TINY["sd1"][0]
    sd = dict(tiny_pair("sd1")[0].state_dict())
    sd["input_blocks.1.0.bogus.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="input_blocks.1.0.bogus.weight"):
        unet_to_diffusers(sd, cfg)
    with pytest.raises(ValueError, match="down_blocks.7.resnets.0.conv1.weight"):
        unet_from_diffusers({"down_blocks.7.resnets.0.conv1.weight": torch.zeros(1)}, cfg)


def meta_state_dict(model_cfg):
    with torch.device("meta"):
        return UNet(model_cfg).state_dict()


def shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize("preset, reference, params", [(sd1, SD1_DIFFUSERS, 859_520_964),
                                                       (sd2, SD2_DIFFUSERS, 865_910_724)])
def test_full_size_layout(preset, reference, params):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    cfg = preset().unet
    ours = meta_state_dict(cfg)
    assert len(ours) == 686
    assert sum(v.numel() for v in ours.values()) == params
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**reference)
    theirs = ref.state_dict()
    assert shapes(unet_from_diffusers(theirs, cfg)) == shapes(ours)
    # diffusers' own single-file converter reads exactly our keys.
    converted = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in ours.items()},
                                            dict(ref.config))
    assert shapes(converted) == shapes(theirs)


@pytest.mark.parametrize("preset", [sd1, sd2])
def test_infer_config_of_presets(preset):
    cfg = preset().unet
    sd = meta_state_dict(cfg)
    assert infer_unet_config(sd) == cfg
    assert infer_unet_config({"model.diffusion_model." + k: v for k, v in sd.items()}) == cfg


def descending_resolutions(cfg):
    # attention_resolutions is a set written as a tuple; inference lists it as LDM does, (4, 2, 1).
    return replace(cfg, attention_resolutions=tuple(sorted(cfg.attention_resolutions, reverse=True)))


def test_infer_config_of_tiny_models():
    for cfg in (tiny().unet, TINY["sd1"][0], TINY["deep"][0]):
        inferred = infer_unet_config(meta_state_dict(cfg), num_heads=cfg.num_heads, norm_groups=cfg.norm_groups)
        assert inferred == descending_resolutions(cfg)
    cfg = TINY["sd2"][0]
    inferred = infer_unet_config(meta_state_dict(cfg), num_head_channels=8, norm_groups=8, upcast_attention=True)
    assert inferred == cfg


def test_infer_config_refuses_other_models():
    sd = dict(meta_state_dict(sd1().unet))
    inpainting = dict(sd, **{"input_blocks.0.0.weight": torch.empty(320, 9, 3, 3, device="meta")})
    with pytest.raises(ValueError, match="inpainting .* not supported yet"):
        infer_unet_config(inpainting)
    vae = {"encoder.conv_in.weight": torch.empty(128, 3, 3, 3), "decoder.conv_out.weight": torch.empty(3, 128, 3, 3)}
    with pytest.raises(ValueError, match="not a Stable Diffusion UNet"):
        infer_unet_config(vae)
    del sd["output_blocks.4.1.proj_out.weight"]
    with pytest.raises(ValueError, match="missing output_blocks.4.1.proj_out.weight"):
        infer_unet_config(sd)
    # 8 fixed heads do not divide this tiny model's 36-wide attention.
    odd = UNetConfig(model_channels=36, channel_mult=(1,), attention_resolutions=(1,), num_heads=6, context_dim=8,
                     norm_groups=4)
    with pytest.raises(ValueError, match="not a Stable Diffusion UNet"):
        infer_unet_config(meta_state_dict(odd), norm_groups=4)
    with pytest.raises(ValueError, match="not a Stable Diffusion UNet"):  # 32 groups do not divide 36 channels
        infer_unet_config(meta_state_dict(odd), num_heads=6)


class MapLoss:
    """A capture callback that computes as the maps arrive (as SAU's attention loss does), keeping them too."""

    def __init__(self):
        self.maps, self.total = [], 0

    def __call__(self, item):
        self.maps.append(item)
        self.total = self.total + item.probs.square().sum()


def forward_backward(unet, x, t, context, capture):
    """Output, captured maps and parameter gradients of a loss on the output and, if captured, the maps:
    capture "list" sums the loss after the forward, capture "callback" while the maps arrive."""
    unet.zero_grad()
    callback = MapLoss() if capture == "callback" else None
    with capture_attention(unet, "attn2", callback=callback, keep_graph=True) if capture \
            else contextlib.nullcontext() as maps:
        out = unet(x, t, context)
    maps = callback.maps if callback else maps
    loss = out.square().mean() + (callback.total if callback else sum(m.probs.square().sum() for m in maps or []))
    loss.backward()  # after the capture context is closed, as SAU does
    grads = {k: p.grad.clone() for k, p in unet.named_parameters()}
    return out.detach(), [m.probs.detach() for m in maps or []], grads


@pytest.mark.parametrize("capture", [None, "list", "callback"])
def test_gradient_checkpointing_matches(capture):
    torch.manual_seed(0)
    unet = UNet(TINY["sd1"][0]).train()
    x, context = inputs(unet.cfg)
    t = torch.tensor([3, 700])
    calls = []
    unet.input_blocks[1][1].register_forward_pre_hook(lambda *a: calls.append(1))  # a SpatialTransformer
    plain = forward_backward(unet, x, t, context, capture)
    assert len(calls) == 1
    unet.gradient_checkpointing = True
    checkpointed = forward_backward(unet, x, t, context, capture)
    assert len(calls) == 3  # forward, then recomputed in backward: checkpointing really ran
    assert rel_err(checkpointed[0], plain[0]) <= 1e-6
    n_attn2 = sum(name.endswith("attn2") for name, _ in unet.named_modules())
    assert len(plain[1]) == len(checkpointed[1]) == (n_attn2 if capture else 0)  # each map once
    for a, b in zip(checkpointed[1], plain[1]):
        assert rel_err(a, b) <= 1e-6
    for k, g in plain[2].items():
        assert rel_err(checkpointed[2][k], g) <= 1e-5, k
    if capture == "list":  # backward inside the capture context: the recomputation must not add maps either
        unet.zero_grad()
        with capture_attention(unet, "attn2", keep_graph=True) as maps:
            unet(x, t, context)
            sum(m.probs.square().sum() for m in maps).backward()
            assert len(maps) == n_attn2
    # Not while evaluating.
    calls.clear()
    unet.eval()
    with torch.no_grad():
        unet(x, t, context)
    assert len(calls) == 1


def test_half_precision_group_norm_statistics_stay_float32():
    """fp16 GroupNorms run in float32 (CompVis); bf16 ones natively, since PyTorch accumulates their
    statistics in float32 anyway: the same numbers up to bf16 rounding, without the two full-size casts."""
    torch.manual_seed(0)
    unet = UNet(tiny().unet)
    x, context = inputs(unet.cfg, batch=1, size=(8, 8))
    with torch.no_grad():
        full = unet(x, 10, context)
        half = unet.to(torch.bfloat16)(x.bfloat16(), 10, context.bfloat16())
        norm = unet.out[0]
        h = torch.randn(1, 32, 4, 4) * 300  # squares overflow float16

        def ref(h):
            return torch.nn.functional.group_norm(h.float(), norm.num_groups, norm.weight.float(),
                                                  norm.bias.float(), 1e-5)
        bf16, reference_bf16 = norm(h.bfloat16()), ref(h.bfloat16())
        fp16, reference_fp16 = norm.to(torch.float16)(h.half()), ref(h.half())
    assert half.dtype == bf16.dtype == torch.bfloat16 and fp16.dtype == torch.float16
    assert rel_err(half.float(), full) < 0.05
    torch.testing.assert_close(bf16.float(), reference_bf16, rtol=8e-3, atol=8e-3)  # bf16 rounding
    assert torch.equal(fp16, reference_fp16.half())
