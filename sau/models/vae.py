"""The LDM KL autoencoder (the VAE of Stable Diffusion): images in [-1, 1] <-> latents.

Module names equal the CompVis checkpoint keys under `first_stage_model.` (encoder.down.0.block.1.conv2,
decoder.up.3.upsample.conv, encoder.mid.attn_1.q ...), so an original checkpoint loads with `strict=True`.

The encoder halves the resolution at every level but the last, ends in a mid block (ResnetBlock, a single-head
self-attention, ResnetBlock) and predicts the mean and log-variance of a diagonal Gaussian. The decoder mirrors
it with one more ResnetBlock per level. Its `up` list is indexed like the encoder's `down` list, by resolution:
up.{levels-1} is the lowest resolution and runs first, up.0 runs last.
"""
import torch
import torch.nn.functional as F
from torch import nn

from sau.models.attention import fused_attention
from sau.models.config import VAE_PREFIX, VAEConfig
from sau.models.norm import GroupNorm32


def vae_norm(groups, channels):
    """The VAE's GroupNorm: eps 1e-6, where the UNet's is 1e-5."""
    return GroupNorm32(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels, out_channels, groups):
        super().__init__()
        self.norm1 = vae_norm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = vae_norm(groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # A 1x1 conv brings the input to the new width when the block changes it.
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, with 1x1 convs as projections (scale C^-0.5)."""

    def __init__(self, channels, groups):
        super().__init__()
        self.norm = vae_norm(groups, channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, height, width = x.shape
        h = self.norm(x)
        # (b, c, h, w) -> (b, 1 head, h*w, c); SDPA's default scale is then exactly C^-0.5
        q, k, v = (t.flatten(2).transpose(1, 2).unsqueeze(1) for t in (self.q(h), self.k(h), self.v(h)))
        h = fused_attention(q, k, v)
        h = h.squeeze(1).transpose(1, 2).reshape(b, c, height, width)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        # LDM pads right and bottom only, then convolves without padding; symmetric padding shifts the grid.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    # The same layer as the UNet's Upsample (sau/models/unet.py): each model file stands alone, as the
    # original's modules do, and both are bound to the checkpoint name `conv`.
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels, groups):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


def resnet_stack(in_channels, out_channels, num_blocks, groups):
    """ResnetBlocks of one level; the first one changes the width."""
    widths = [in_channels] + [out_channels] * num_blocks
    return nn.ModuleList(ResnetBlock(a, b, groups) for a, b in zip(widths, widths[1:]))


class DownLevel(nn.Module):
    """Encoder level `down.i`: ResnetBlocks, then a downsample on all but the last level."""

    def __init__(self, in_channels, out_channels, num_blocks, groups, downsample):
        super().__init__()
        self.block = resnet_stack(in_channels, out_channels, num_blocks, groups)
        self.downsample = Downsample(out_channels) if downsample else nn.Identity()

    def forward(self, x):
        for block in self.block:
            x = block(x)
        return self.downsample(x)


class UpLevel(nn.Module):
    """Decoder level `up.i`: ResnetBlocks, then an upsample on all but level 0. DownLevel's twin, kept apart
    because the checkpoint names the resampler `down.i.downsample` there and `up.i.upsample` here."""

    def __init__(self, in_channels, out_channels, num_blocks, groups, upsample):
        super().__init__()
        self.block = resnet_stack(in_channels, out_channels, num_blocks, groups)
        self.upsample = Upsample(out_channels) if upsample else nn.Identity()

    def forward(self, x):
        for block in self.block:
            x = block(x)
        return self.upsample(x)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList(
            DownLevel(widths[i - 1] if i else cfg.ch, widths[i], cfg.num_res_blocks, cfg.norm_groups,
                      downsample=i != last)
            for i in range(len(widths)))
        self.mid = MidBlock(widths[-1], cfg.norm_groups)
        self.norm_out = vae_norm(cfg.norm_groups, widths[-1])
        # Twice the latent channels: mean and log-variance.
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1], cfg.norm_groups)
        # up.i works at the resolution of down.i and takes its input from up.{i+1} (or mid for the last one).
        self.up = nn.ModuleList(
            UpLevel(widths[min(i + 1, len(widths) - 1)], widths[i], cfg.num_res_blocks + 1, cfg.norm_groups,
                    upsample=i != 0)
            for i in range(len(widths)))
        self.norm_out = vae_norm(cfg.norm_groups, widths[0])
        self.conv_out = nn.Conv2d(widths[0], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):  # lowest resolution first
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode_moments(self, images):
        """Mean and log-variance (clamped to [-30, 20]) of the unscaled latent distribution."""
        mean, logvar = self.quant_conv(self.encoder(images)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, images, generator=None, sample=True):
        """Images in [-1, 1] -> latents scaled by `scale_factor`, as the diffusion model sees them.

        `generator` is None, one torch.Generator, or a list with one per image. Noise is drawn image by image,
        so a batch gives the same latents as encoding its images one at a time (with the same generators).
        """
        mean, logvar = self.encode_moments(images)
        z = mean + torch.exp(0.5 * logvar) * per_image_noise(mean, generator) if sample else mean
        return self.cfg.scale_factor * z

    def decode(self, latents):
        """Scaled latents -> images in [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(latents / self.cfg.scale_factor))

    @staticmethod
    def to_pixels(images, uint8=False):
        return to_pixels(images, uint8)


def per_image_noise(like, generator=None):
    """Standard normal noise shaped like `like`, drawn in float32 one image at a time from `generator`
    (None, a generator, or a list of generators, one per image)."""
    batch = like.shape[0]
    generators = generator if isinstance(generator, (list, tuple)) else [generator] * batch
    if len(generators) != batch:
        raise ValueError(f"got {len(generators)} generators for a batch of {batch} images")
    noise = [torch.randn(like.shape[1:], generator=g, dtype=torch.float32,
                         device=g.device if g is not None else like.device) for g in generators]
    return torch.stack(noise).to(device=like.device, dtype=like.dtype)


def to_pixels(images, uint8=False):
    """Decoded images in [-1, 1] -> [0, 1] floats, or uint8 in [0, 255] with `uint8=True`."""
    x = ((images.float() + 1) / 2).clamp(0, 1)
    return (x * 255).round().to(torch.uint8) if uint8 else x


def infer_vae_config(state_dict, norm_groups=32, scale_factor=0.18215):
    """A VAEConfig read from the tensor shapes of a VAE state dict (CompVis keys; a `first_stage_model.` prefix
    is stripped). The GroupNorm group count and the latent scale are not in the shapes: they are arguments."""
    sd = {k[len(VAE_PREFIX):] if k.startswith(VAE_PREFIX) else k: v for k, v in state_dict.items()}
    conv_in = sd["encoder.conv_in.weight"]
    ch = conv_in.shape[0]
    levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down."))
    blocks = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.down.0.block."))
    widths = [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)]
    return VAEConfig(
        in_channels=conv_in.shape[1],
        out_channels=sd["decoder.conv_out.weight"].shape[0],
        ch=ch,
        ch_mult=tuple(w // ch for w in widths),
        num_res_blocks=blocks,
        z_channels=sd["decoder.conv_in.weight"].shape[1],
        embed_dim=sd["post_quant_conv.weight"].shape[1],
        norm_groups=norm_groups,
        scale_factor=scale_factor,
    )
