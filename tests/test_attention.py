"""The Attention module's two paths and the capture API, on a lone layer and on a tiny UNet."""
import pytest
import torch

import sau.models.attention as attention
from sau.models.attention import Attention, capture_attention, select_attention_layers
from sau.models.config import tiny
from sau.models.unet import UNet


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet(tiny().unet).eval()


def unet_inputs(h=8, w=8, batch=2):
    g = torch.Generator().manual_seed(1)
    cfg = tiny().unet
    x = torch.randn(batch, cfg.in_channels, h, w, generator=g)
    context = torch.randn(batch, 7, cfg.context_dim, generator=g)
    return x, torch.tensor([10, 500][:batch]), context


def test_explicit_path_equals_fused_path():
    torch.manual_seed(0)
    layer = Attention(16, context_dim=8, heads=2, dim_head=8)
    x, context = torch.randn(3, 12, 16), torch.randn(3, 5, 8)
    fused = layer(x, context, size=(3, 4))
    with capture_attention(torch.nn.ModuleDict({"attn2": layer})) as maps:
        explicit = layer(x, context, size=(3, 4))
    assert rel_err(explicit, fused) < 1e-5
    assert maps[0].probs.shape == (3, 2, 12, 5) and maps[0].size == (3, 4)
    assert maps[0].spatial().shape == (3, 2, 5, 3, 4)


def test_upcast_attention_matches_in_float32():
    torch.manual_seed(0)
    layer = Attention(16, heads=2, dim_head=8, upcast=True)
    x = torch.randn(2, 6, 16)
    reference = layer(x)
    half = layer.to(torch.bfloat16)(x.to(torch.bfloat16)).float()
    assert rel_err(half, reference) < 3e-2


def test_unet_capture_maps_sum_to_one_and_leave_output_unchanged(unet):
    x, t, context = unet_inputs()
    plain = unet(x, t, context)
    with capture_attention(unet, "attn2") as maps:
        captured = unet(x, t, context)
    assert rel_err(captured, plain) < 1e-5
    n_attn2 = sum(1 for name, _ in unet.named_modules() if name.endswith("attn2"))
    assert len(maps) == n_attn2 > 0
    for m in maps:
        assert m.layer.endswith("attn2")
        assert m.probs.shape[:2] == (2, 2) and m.probs.shape[-1] == context.shape[1]
        assert m.probs.shape[2] == m.size[0] * m.size[1]
        torch.testing.assert_close(m.probs.sum(-1), torch.ones_like(m.probs[..., 0]))
        assert not m.probs.requires_grad


def test_capture_is_removed_after_the_context(unet):
    with capture_attention(unet, "attn2"):
        pass
    assert all(not m.capture_hooks for m in unet.modules() if isinstance(m, Attention))


def test_gradients_flow_from_captured_maps_into_queries_and_keys(unet):
    x, t, context = unet_inputs()
    unet.zero_grad()
    with capture_attention(unet, "attn2", keep_graph=True) as maps:
        unet(x, t, context)
    loss = sum(m.probs[..., 3:5].pow(2).sum() for m in maps)  # as if tokens 3..4 were a trigger
    loss.backward()
    layer = next(m for name, m in unet.named_modules() if name.endswith("attn2"))
    assert layer.to_q.weight.grad.abs().sum() > 0 and layer.to_k.weight.grad.abs().sum() > 0
    unet.zero_grad()


def test_non_square_latents_report_their_grid(unet):
    x, t, context = unet_inputs(h=8, w=12)
    with capture_attention(unet, "attn2") as maps:
        out = unet(x, t, context)
    assert out.shape == x.shape
    sizes = {m.size for m in maps}
    assert (8, 12) in sizes and all(h * 3 == w * 2 for h, w in sizes)
    for m in maps:
        assert m.spatial().shape[-2:] == m.size


def test_uncaptured_layers_stay_fused(unet, monkeypatch):
    calls = {"fused": 0, "explicit": 0}
    fused, explicit = attention.fused_attention, attention.attention_probs

    def count_fused(*a, **k):
        calls["fused"] += 1
        return fused(*a, **k)

    def count_explicit(*a, **k):
        calls["explicit"] += 1
        return explicit(*a, **k)

    monkeypatch.setattr(attention, "fused_attention", count_fused)
    monkeypatch.setattr(attention, "attention_probs", count_explicit)
    x, t, context = unet_inputs()
    with capture_attention(unet, "attn2"):
        unet(x, t, context)
    n_attn2 = sum(1 for name, _ in unet.named_modules() if name.endswith("attn2"))
    n_attn1 = sum(1 for name, _ in unet.named_modules() if name.endswith("attn1"))
    assert calls == {"fused": n_attn1, "explicit": n_attn2}


def test_callback_receives_maps_and_layer_selection_by_glob_and_list(unet):
    x, t, context = unet_inputs()
    seen = []
    with capture_attention(unet, "*middle_block*attn2", callback=seen.append) as maps:
        unet(x, t, context)
    assert maps == [] and len(seen) == 1 and "middle_block" in seen[0].layer
    chosen = list(select_attention_layers(unet, "attn1"))[:2]
    assert list(select_attention_layers(unet, chosen)) == chosen
    with pytest.raises(ValueError, match="no attention layer"):
        select_attention_layers(unet, "attn9")
