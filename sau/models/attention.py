"""The one attention module of the UNet, and the API that captures its maps.

Attention has two compute paths with identical results:
- fused: `F.scaled_dot_product_attention`, fast, never materialises the probabilities;
- explicit: softmax(q k^T * scale) v, which does, so that they can be handed out.

A layer takes the explicit path only while someone captures it. `capture_attention` chooses
layers by their module path (e.g. every `attn2`, the cross-attention layers SAU works on), and
hands each captured layer's probabilities, shaped (batch, heads, queries, keys), together with
the spatial size of the query grid, to a callback or a list. Layers not captured stay fused.
"""
import fnmatch
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def attention_probs(q, k, scale, upcast=False, mask=None):
    """softmax(q k^T * scale) for (batch, heads, tokens, dim) tensors; `mask` is additive."""
    if upcast:  # SD2.1-v: q.k^T and softmax in float32 even when the model runs in half precision
        q, k = q.float(), k.float()
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask
    return scores.softmax(dim=-1)


def fused_attention(q, k, v, upcast=False, mask=None):
    """The same result as `attention_probs(...) @ v`, computed by SDPA."""
    if upcast and q.dtype != torch.float32:
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@dataclass
class AttentionMap:
    layer: str  # module path, e.g. "input_blocks.1.1.transformer_blocks.0.attn2"
    probs: torch.Tensor  # (batch, heads, queries, keys); queries run over the grid row by row
    size: tuple  # (height, width) of the query grid

    def spatial(self):
        """The probabilities as (batch, heads, keys, height, width) images."""
        h, w = self.size
        return rearrange(self.probs, "b n (h w) k -> b n k h w", h=h, w=w)


class Attention(nn.Module):
    """Multi-head (cross-)attention with the CompVis parameter names to_q, to_k, to_v, to_out.0."""

    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64, upcast=False):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.upcast = upcast
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))
        # Callables receiving (probs, size); filled by `capture_attention`. While empty the layer is fused.
        self.capture_hooks = []

    def forward(self, x, context=None, size=None):
        context = x if context is None else context
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        if self.capture_hooks:
            probs = attention_probs(q, k, self.scale, self.upcast)
            for hook in self.capture_hooks:
                hook(probs, size)
            out = torch.matmul(probs.to(v.dtype), v)
        else:
            out = fused_attention(q, k, v, self.upcast)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


def select_attention_layers(model, layers="attn2"):
    """Attention modules of `model` chosen by path: a name ("attn2" = every module so named),
    a glob over the full path ("*middle_block*attn2"), a list of exact paths, or a predicate."""
    if callable(layers):
        chosen = layers
    elif isinstance(layers, str):
        def chosen(path):
            return path.rsplit(".", 1)[-1] == layers or fnmatch.fnmatchcase(path, layers)
    else:
        wanted = set(layers)

        def chosen(path):
            return path in wanted
    found = {path: m for path, m in model.named_modules() if isinstance(m, Attention) and chosen(path)}
    if not found:
        raise ValueError(f"no attention layer of the model matches {layers!r}")
    return found


class capture_attention:
    """Capture attention probabilities of chosen layers while the context is open.

        with capture_attention(unet, "attn2") as maps:
            unet(x, t, context)
        maps[0].probs  # (batch, heads, queries, keys)

    With `callback`, each map goes to callback(AttentionMap) instead of the list (e.g. to keep only
    the trigger's columns, or to accumulate a loss). `keep_graph=True` keeps the autograd graph so a
    loss on the maps trains the model; otherwise the maps are detached.
    """

    def __init__(self, model, layers="attn2", callback=None, keep_graph=False):
        self.layers = select_attention_layers(model, layers)
        self.callback = callback
        self.keep_graph = keep_graph
        self.maps = []
        self._hooks = {}

    def __enter__(self):
        for path, module in self.layers.items():
            hook = self._make_hook(path)
            module.capture_hooks.append(hook)
            self._hooks[path] = hook
        return self.maps

    def __exit__(self, *exc):
        for path, module in self.layers.items():
            module.capture_hooks.remove(self._hooks[path])
        self._hooks.clear()
        return False

    def _make_hook(self, path):
        def hook(probs, size):
            if not self.keep_graph:
                probs = probs.detach()
            item = AttentionMap(path, probs, size)
            if self.callback is not None:
                self.callback(item)
            else:
                self.maps.append(item)
        return hook
