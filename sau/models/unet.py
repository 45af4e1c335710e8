"""The latent diffusion UNet of Stable Diffusion 1.x/2.x (the LDM "openaimodel" topology).

Module attribute names equal the keys of an original (CompVis) checkpoint under
`model.diffusion_model.`, so such a checkpoint loads with `load_state_dict(strict=True)` once the
prefix is stripped. Gaps in `nn.Sequential` indices are kept with parameter-free placeholders.

Layout, for a config with L levels and R = num_res_blocks:
- input_blocks: conv_in, then per level R x [ResBlock (+ SpatialTransformer)], then a stride-2
  Downsample (not after the last level);
- middle_block: ResBlock, SpatialTransformer, ResBlock;
- output_blocks: per level, lowest resolution first, (R + 1) x [ResBlock on the concatenated skip
  (+ SpatialTransformer)], the last one of a level followed by a nearest x2 Upsample (not at level 0);
- out: GroupNorm, SiLU, conv.
SpatialTransformers sit at the levels whose downsampling factor is in `attention_resolutions`.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sau.models.attention import Attention
from sau.models.config import UNET_PREFIX, UNetConfig
from sau.models.norm import GroupNorm32


def timestep_embedding(timesteps, dim, max_period=10000):
    """Sinusoidal embedding of (batch,) timesteps: cat(cos, sin) over geometric frequencies."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """Two 3x3 convs with the time embedding added in between, and a residual (1x1 conv when the width changes)."""

    def __init__(self, channels, out_channels, emb_dim, groups):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(groups, channels, eps=1e-5), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(groups, out_channels, eps=1e-5), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x, emb):
        # Sums go in place into a conv's fresh output (a conv's backward never needs its output): the same
        # values as `a + b`, without a full-size temporary per addition.
        h = self.in_layers(x)
        h = h.add_(self.emb_layers(emb).to(h.dtype)[:, :, None, None])
        h = self.out_layers(h)
        return h.add_(self.skip_connection(x))


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class GEGLU(nn.Module):
    """One projection to twice the hidden width; the second half gates the first through exact GELU."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention to the text context, then feed-forward."""

    def __init__(self, dim, heads, dim_head, context_dim, upcast):
        super().__init__()
        self.attn1 = Attention(dim, None, heads, dim_head, upcast=upcast)
        self.ff = FeedForward(dim)
        self.attn2 = Attention(dim, context_dim, heads, dim_head, upcast=upcast)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x, context, size):
        # Residuals are added in place into each sublayer's fresh output (a Linear's, which its backward does
        # not need): the same sums as x + f(x), one full-size temporary fewer each.
        x = self.attn1(self.norm1(x), size=size).add_(x)
        x = self.attn2(self.norm2(x), context, size=size).add_(x)
        return self.ff(self.norm3(x)).add_(x)


class SpatialTransformer(nn.Module):
    """Transformer blocks over the pixels of a feature map, with a residual around the whole.
    SD1 projects in and out with 1x1 convs on the map; SD2 with Linear layers on the token sequence."""

    def __init__(self, channels, heads, dim_head, depth, context_dim, groups, use_linear, upcast):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = GroupNorm32(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(inner, heads, dim_head, context_dim, upcast) for _ in range(depth)])
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x, context):
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        # (b, c, h, w) -> (b, h*w, c), pixels row by row. Made contiguous once here: a transposed view would
        # make every LayerNorm below copy it again and every residual add run over strided memory.
        x = x.flatten(2).transpose(1, 2).contiguous()
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context, size=(h, w))
        if self.use_linear:
            x = self.proj_out(x)
        # (b, h*w, c) -> (b, c, h, w), contiguous: the plain view would be channels-last, and convolutions fed
        # channels-last maps repack their (contiguous) weights to match, on every call.
        x = x.transpose(1, 2).reshape(b, -1, h, w).contiguous()
        if not self.use_linear:
            x = self.proj_out(x)
        return x.add_(x_in)  # x is fresh (a conv's output, or the copy above): summed in place


def _ignore_map(probs, size):
    pass


def checkpointed(module, *inputs):
    """module(*inputs) with its activations recomputed in backward instead of stored.

    Attention capture hands out each map once, and outside the checkpointed region: a capture callback
    that computes (a loss on the maps, say) would otherwise add saved tensors to the first pass that the
    recomputation does not make. So the first pass only stashes the maps, which go to the real hooks once
    the region is closed; the recomputation takes the same explicit path through silent hooks. Which
    layers are captured is read at the first pass: the capture context is usually closed by backward.
    """
    attentions = [m for m in module.modules() if isinstance(m, Attention)]
    first_hooks = [list(m.capture_hooks) for m in attentions]  # copies: closing a capture empties the lists
    stashed = []  # (hooks, probs, size) of the first pass
    calls = 0

    def stash(hooks):
        return lambda probs, size: stashed.append((hooks, probs, size))

    def run(*inputs):
        nonlocal calls
        calls += 1
        current = [m.capture_hooks for m in attentions]
        for m, hooks in zip(attentions, first_hooks):
            m.capture_hooks = ([stash(hooks)] if calls == 1 else [_ignore_map]) if hooks else []
        try:
            return module(*inputs)
        finally:
            for m, hooks in zip(attentions, current):
                m.capture_hooks = hooks

    out = checkpoint(run, *inputs, use_reentrant=False)
    for hooks, probs, size in stashed:
        for hook in hooks:
            hook(probs, size)
    return out


class UNetBlock(nn.Sequential):
    """One entry of input_blocks / middle_block / output_blocks: layers fed the time embedding
    (ResBlock), the text context (SpatialTransformer) or only the feature map (resampling)."""

    def forward(self, x, emb, context, checkpointing=False):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = checkpointed(layer, x, emb) if checkpointing else layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = checkpointed(layer, x, context) if checkpointing else layer(x, context)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """eps (or v) prediction: UNet(cfg)(x, timesteps, context) -> a tensor shaped like x.

    x: (batch, in_channels, h, w) latents, h and w divisible by 2 ** (levels - 1);
    timesteps: a number, a 0-d tensor or a (batch,) tensor; context: (batch, tokens, context_dim).
    Set `gradient_checkpointing = True` to recompute ResBlocks and SpatialTransformers in backward
    while training (attention capture still reports each map once per forward).
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = False
        mc, groups = cfg.model_channels, cfg.norm_groups
        emb_dim = 4 * mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def transformer(ch):
            heads, dim_head = cfg.heads_and_dim(ch)
            return SpatialTransformer(ch, heads, dim_head, cfg.transformer_depth, cfg.context_dim, groups,
                                      cfg.use_linear_in_transformer, cfg.upcast_attention)

        last = len(cfg.channel_mult) - 1
        self.input_blocks = nn.ModuleList([UNetBlock(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_channels = [mc]  # widths of the input block outputs that the output blocks concatenate
        ch = mc
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, mc * mult, emb_dim, groups)]
                ch = mc * mult
                if 2 ** level in cfg.attention_resolutions:
                    layers.append(transformer(ch))
                self.input_blocks.append(UNetBlock(*layers))
                skip_channels.append(ch)
            if level != last:
                self.input_blocks.append(UNetBlock(Downsample(ch)))
                skip_channels.append(ch)

        self.middle_block = UNetBlock(ResBlock(ch, ch, emb_dim, groups), transformer(ch),
                                      ResBlock(ch, ch, emb_dim, groups))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), mc * mult, emb_dim, groups)]
                ch = mc * mult
                if 2 ** level in cfg.attention_resolutions:
                    layers.append(transformer(ch))
                if level != 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(UNetBlock(*layers))

        self.out = nn.Sequential(GroupNorm32(groups, ch, eps=1e-5), nn.SiLU(),
                                 nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def forward(self, x, timesteps, context):
        factor = 2 ** (len(self.cfg.channel_mult) - 1)
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(f"latent size {tuple(x.shape[-2:])} is not divisible by {factor}: this UNet halves "
                             f"it {factor.bit_length() - 1} times; use an image size divisible by {8 * factor}")
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        emb = timestep_embedding(timesteps, self.cfg.model_channels).to(self.time_embed[0].weight.dtype)
        emb = self.time_embed(emb)
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()

        h, skips = x, []
        for block in self.input_blocks:
            h = block(h, emb, context, checkpointing)
            skips.append(h)
        h = self.middle_block(h, emb, context, checkpointing)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context, checkpointing)
        return self.out(h)


def infer_unet_config(state_dict, num_heads=8, num_head_channels=-1, norm_groups=32, upcast_attention=False):
    """The UNetConfig of a UNet state dict in CompVis layout (the `model.diffusion_model.` prefix
    stripped or not), read from tensor shapes.

    Heads are not in the shapes: a 768-wide context means SD1 (8 heads), 1024 SD2 (heads of width
    64); any other context width (the demo world) takes `num_heads` fixed heads, or heads of width
    `num_head_channels` when that is given (> 0). `norm_groups` and `upcast_attention` (True for
    SD2.1-v) are not in the shapes either and are passed through.
    Raises ValueError for inpainting UNets (9 input channels) and for anything that is not an SD UNet.
    """
    sd = {k[len(UNET_PREFIX):] if k.startswith(UNET_PREFIX) else k: v for k, v in state_dict.items()}
    needed = ["input_blocks.0.0.weight", "time_embed.0.weight", "out.2.weight",
              "middle_block.1.transformer_blocks.0.attn2.to_k.weight"]
    missing = [k for k in needed if k not in sd]
    if missing:
        raise ValueError(f"not a Stable Diffusion UNet state dict in CompVis layout: missing {', '.join(missing)}")
    mc, in_channels = sd["input_blocks.0.0.weight"].shape[:2]
    if in_channels == 9:
        raise ValueError("inpainting UNets (9 input channels) are not supported yet")

    # Walk the input blocks: a block with `.0.op` ends a level, a ResBlock's out_layers.3 gives its width.
    levels, level = [], []
    n = 1
    while f"input_blocks.{n}.0.op.weight" in sd or f"input_blocks.{n}.0.out_layers.3.weight" in sd:
        if f"input_blocks.{n}.0.op.weight" in sd:
            levels.append(level)
            level = []
        else:
            level.append(n)
        n += 1
    levels.append(level)
    num_res_blocks = len(levels[0])
    if num_res_blocks == 0 or any(len(lv) != num_res_blocks for lv in levels):
        raise ValueError("not a Stable Diffusion UNet: levels have different numbers of ResBlocks")

    mid = "middle_block.1."
    depth = 0
    while f"{mid}transformer_blocks.{depth}.norm1.weight" in sd:
        depth += 1
    context_dim = sd[f"{mid}transformer_blocks.0.attn2.to_k.weight"].shape[1]
    heads = dict(num_heads=8, num_head_channels=-1)
    if context_dim == 1024:
        heads = dict(num_heads=-1, num_head_channels=64)
    elif context_dim != 768:
        heads = (dict(num_heads=-1, num_head_channels=num_head_channels) if num_head_channels > 0
                 else dict(num_heads=num_heads, num_head_channels=-1))
    cfg = UNetConfig(
        in_channels=int(in_channels),
        out_channels=int(sd["out.2.weight"].shape[0]),
        model_channels=int(mc),
        channel_mult=tuple(int(sd[f"input_blocks.{lv[0]}.0.out_layers.3.weight"].shape[0]) // mc for lv in levels),
        num_res_blocks=num_res_blocks,
        attention_resolutions=tuple(2 ** i for i, lv in reversed(list(enumerate(levels)))  # LDM writes (4, 2, 1)
                                    if f"input_blocks.{lv[0]}.1.proj_in.weight" in sd),
        transformer_depth=depth,
        context_dim=int(context_dim),
        use_linear_in_transformer=sd[f"{mid}proj_in.weight"].ndim == 2,
        norm_groups=norm_groups,
        upcast_attention=upcast_attention,
        **heads,
    )
    _check_shapes(sd, cfg)
    return cfg


def _check_shapes(sd, cfg):
    """Raise ValueError unless `sd` has exactly the keys and shapes of UNet(cfg)."""
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in UNet(cfg).state_dict().items()}
    except (ValueError, RuntimeError) as e:  # e.g. the norm groups do not divide a width
        raise ValueError(f"not a Stable Diffusion UNet that the inferred config {cfg} can build: {e}") from e
    got = {k: tuple(v.shape) for k, v in sd.items()}
    problems = [f"missing {k}" for k in expected if k not in got]
    problems += [f"unexpected {k}" for k in got if k not in expected]
    problems += [f"{k}: {got[k]} vs {expected[k]}" for k in expected if k in got and got[k] != expected[k]]
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise ValueError(f"not a Stable Diffusion UNet matching the inferred config {cfg}: "
                         + "; ".join(problems[:8]) + more)
