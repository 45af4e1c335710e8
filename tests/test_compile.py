"""sau.compile: a compiled UNet gives the eager results, with and without attention capture, and capture
costs one more graph, not a recompile per call.

How capture behaves under torch.compile is decided by dynamo's tracing (guards on the hook lists, the
hooks' side effects), whatever the backend; the "eager" backend runs dynamo's graphs as they are, without
inductor's code generation, so the test takes seconds. Inductor itself is exercised at full size by
`python -m benchmarks --compile`."""
import pytest
import torch
from torch._dynamo.utils import counters

from sau.models.attention import capture_attention
from sau.models.compile import compile_model
from sau.models.config import UNetConfig
from sau.method import AttentionLoss, TriggerAttention
from sau.models.unet import UNet

# As small as a UNet with every kind of block gets, so that compiling takes seconds.
MICRO = UNetConfig(model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,), num_heads=2,
                   context_dim=8, norm_groups=4)


@pytest.fixture(scope="module")
def unets():
    torch.manual_seed(0)
    eager = UNet(MICRO).eval()
    compiled = UNet(MICRO).eval()
    compiled.load_state_dict(eager.state_dict())
    return eager, compile_model(compiled, backend="eager")


def run(unet, capture):
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    with torch.no_grad(), capture_attention(unet, "attn2") if capture else torch.no_grad() as maps:
        out = unet(x, 321, context)
    return out, maps


def test_compiled_matches_eager_with_and_without_capture(unets):
    eager, compiled = unets
    torch._dynamo.reset()
    counters.clear()
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # compiled in place: no wrapper prefix
    out, _ = run(compiled, capture=False)
    torch.testing.assert_close(out, run(eager, capture=False)[0], rtol=1e-5, atol=1e-5)
    for _ in range(2):  # a second capture context reuses the captured graph
        out, maps = run(compiled, capture=True)
        ref, ref_maps = run(eager, capture=True)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert [m.layer for m in maps] == [m.layer for m in ref_maps] and len(maps) == 4
        for m, r in zip(maps, ref_maps):
            assert m.size == r.size
            torch.testing.assert_close(m.probs, r.probs, rtol=1e-5, atol=1e-6)
    run(compiled, capture=False)
    assert counters["stats"]["unique_graphs"] == 2  # uncaptured and captured, nothing more


def test_sau_callbacks_compile_once(unets):
    """SAU's own callbacks keep their state as dynamo can trace it: after the first calls (the heatmap
    recorder creates its sums on its first), further calls reuse the graphs; results match eager."""
    eager, compiled = unets
    g = torch.Generator().manual_seed(2)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    columns = torch.zeros(2, 5)
    columns[:, 1] = 1
    torch._dynamo.reset()
    counters.clear()
    recorders = {"compiled": TriggerAttention(columns), "eager": TriggerAttention(columns)}
    graphs = []
    for _ in range(4):
        for name, unet in (("compiled", compiled), ("eager", eager)):
            with torch.no_grad(), capture_attention(unet, "attn2", callback=recorders[name]):
                unet(x, 321, context)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[2] == graphs[3], graphs
    for layer, heat in recorders["eager"].heatmaps().items():
        torch.testing.assert_close(recorders["compiled"].heatmaps()[layer], heat, rtol=1e-5, atol=1e-6)
    losses, graphs = [], []
    for _ in range(3):  # a new loss object every step, as unlearning makes them
        loss = AttentionLoss(columns, {})
        with capture_attention(compiled, "attn2", callback=loss, keep_graph=True):
            compiled(x, 321, context)
        losses.append(loss.total)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] == graphs[1] == graphs[2], graphs
    reference = AttentionLoss(columns, {})
    with capture_attention(eager, "attn2", callback=reference, keep_graph=True):
        eager(x, 321, context)
    torch.testing.assert_close(losses[-1], reference.total, rtol=1e-5, atol=1e-7)
