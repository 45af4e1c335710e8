"""CLIP transformers: Stable Diffusion's text encoders and the vision tower of the CLIP scorer.

- `CLIPTextModel`: OpenAI CLIP text tower with Hugging Face names (SD1, ViT-L/14, quick_gelu).
- `OpenCLIPTextModel`: OpenCLIP text tower with its own names (SD2, ViT-H/14, exact gelu).
- `CLIPVisionModel` and `CLIPModel`: the image tower and the text+image pair used for CLIP score,
  with the names of transformers' `CLIPVisionModelWithProjection` and `CLIPModel`.

Module attribute names are the checkpoint key names, so state dicts load with strict=True.
Both text towers give SD's conditioning from `forward` (the hidden state after all layers but the
last `cfg.skip_last_layers`, then the final LayerNorm) and CLIP's sentence feature from `pooled`.
"""
import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from sau.models.attention import fused_attention
from sau.models.config import TextConfig, VisionConfig

LAYER_NORM_EPS = 1e-5
# Every CLIP tower in use has 64-wide heads (ViT-L text 768/12, ViT-H text 1024/16, ViT-L vision 1024/16),
# which is how the head count is read from tensor shapes.
HEAD_WIDTH = 64


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


def causal_mask(n, dtype, device):
    """Additive (n, n) mask: position i attends to positions 0..i only."""
    return torch.full((n, n), float("-inf"), dtype=dtype, device=device).triu(1)


def multi_head_attention(q, k, v, heads, mask=None):
    """Scaled dot-product attention over `heads` heads of (batch, tokens, width) projections."""
    q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=heads) for t in (q, k, v))
    out = fused_attention(q, k, v, mask=mask)  # SDPA's default scale is dim_head^-0.5, as in CLIP
    return rearrange(out, "b h n d -> b n (h d)")


def eos_positions(input_ids, eos_id):
    """Index of each row's first eos token: SD1 pads with eos, so the largest-id trick fails there.
    A row without eos falls back to its largest id, which is OpenAI's own rule."""
    is_eos = input_ids == eos_id
    first_eos = is_eos.int().argmax(dim=-1)
    return torch.where(is_eos.any(dim=-1), first_eos, input_ids.argmax(dim=-1))


# ---------------------------------------------------------------------------------------------------
# The transformer layer with Hugging Face names, shared by the text tower, the vision tower and the scorer.

class SelfAttention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x, mask=None):
        out = multi_head_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, mask)
        return self.out_proj(out)


class MLP(nn.Module):
    def __init__(self, width, mlp_width, activation):
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_width)
        self.fc2 = nn.Linear(mlp_width, width)
        self.activation = ACTIVATIONS[activation]

    def forward(self, x):
        return self.fc2(self.activation(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-LN residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width, heads, mlp_width, activation):
        super().__init__()
        self.self_attn = SelfAttention(width, heads)
        self.layer_norm1 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.mlp = MLP(width, mlp_width, activation)
        self.layer_norm2 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)

    def forward(self, x, mask=None):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    """The layer stack; `cfg` is a TextConfig or a VisionConfig (both have width, heads, mlp_width, activation)."""

    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayer(cfg.width, cfg.heads, cfg.mlp_width, cfg.activation) for _ in range(cfg.layers))

    def forward(self, x, mask=None, num_layers=None):
        for layer in self.layers[:num_layers]:
            x = layer(x, mask)
        return x


# ---------------------------------------------------------------------------------------------------
# Text towers

class TextTower(nn.Module):
    """What both text towers share: the causal stack, SD's conditioning and CLIP's pooled feature.
    Subclasses provide `embed(input_ids, token_embeds)`, `blocks`, `final_norm` and `project`."""

    def hidden_states(self, input_ids, num_layers, token_embeds=None):
        """Output of the first `num_layers` blocks, before the final LayerNorm."""
        x = self.embed(input_ids, token_embeds)
        mask = causal_mask(x.shape[1], x.dtype, x.device)
        for block in self.blocks[:num_layers]:
            x = block(x, mask)
        return x

    def forward(self, input_ids, token_embeds=None):
        """SD's conditioning, (batch, tokens, width). `token_embeds` (batch, tokens, width) replaces the
        token lookup, e.g. for learnt embeddings; positions are still added."""
        num_layers = self.cfg.layers - self.cfg.skip_last_layers
        return self.final_norm(self.hidden_states(input_ids, num_layers, token_embeds))

    def pooled(self, input_ids, token_embeds=None):
        """CLIP's sentence feature: the full stack's final-normed state at eos, projected if the tower has
        a projection. (batch, projection_dim or width)."""
        x = self.final_norm(self.hidden_states(input_ids, self.cfg.layers, token_embeds))
        x = x[torch.arange(x.shape[0], device=x.device), eos_positions(input_ids, self.cfg.eos_id)]
        return self.project(x)


class TextEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)

    def forward(self, input_ids, token_embeds=None):
        x = self.token_embedding(input_ids) if token_embeds is None else token_embeds
        # Positions are regenerated rather than kept in a `position_ids` buffer, so they are not state
        return x + self.position_embedding.weight[:input_ids.shape[1]]


class CLIPTextModel(TextTower):
    """The OpenAI CLIP text tower with Hugging Face names, as under `cond_stage_model.transformer.text_model.`."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=LAYER_NORM_EPS)
        if cfg.projection_dim > 0:
            self.text_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)
        self.apply(init_weights)

    def embed(self, input_ids, token_embeds=None):
        return self.embeddings(input_ids, token_embeds)

    @property
    def blocks(self):
        return self.encoder.layers

    def final_norm(self, x):
        return self.final_layer_norm(x)

    def project(self, x):
        return self.text_projection(x) if self.cfg.projection_dim > 0 else x


class OpenCLIPAttention(nn.Module):
    """nn.MultiheadAttention's parameter layout: q, k and v projections stacked by rows in one matrix."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.randn(3 * width, width) * 0.02)
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x, mask=None):
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return self.out_proj(multi_head_attention(q, k, v, self.heads, mask))


class OpenCLIPMLP(nn.Module):
    """`MLP` under OpenCLIP's names (c_fc, c_proj): the checkpoint's keys name the attributes, so the two
    towers keep a class each."""

    def __init__(self, width, mlp_width, activation):
        super().__init__()
        self.c_fc = nn.Linear(width, mlp_width)
        self.c_proj = nn.Linear(mlp_width, width)
        self.activation = ACTIVATIONS[activation]

    def forward(self, x):
        return self.c_proj(self.activation(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """The same pre-LN block as `EncoderLayer`, under OpenCLIP's names."""

    def __init__(self, width, heads, mlp_width, activation):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.attn = OpenCLIPAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.mlp = OpenCLIPMLP(width, mlp_width, activation)

    def forward(self, x, mask=None):
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class OpenCLIPTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(cfg.width, cfg.heads, cfg.mlp_width, cfg.activation) for _ in range(cfg.layers))


class OpenCLIPTextModel(TextTower):
    """The OpenCLIP text tower with its own names, as under `cond_stage_model.model.` of an SD2 checkpoint."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.max_positions, cfg.width))
        self.transformer = OpenCLIPTransformer(cfg)
        self.ln_final = nn.LayerNorm(cfg.width, eps=LAYER_NORM_EPS)
        # OpenCLIP always has a projection (applied as x @ P) and a logit scale; SD2 uses neither
        self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.projection_dim or cfg.width))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.apply(init_weights)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=cfg.width ** -0.5)

    def embed(self, input_ids, token_embeds=None):
        x = self.token_embedding(input_ids) if token_embeds is None else token_embeds
        return x + self.positional_embedding[:input_ids.shape[1]]

    @property
    def blocks(self):
        return self.transformer.resblocks

    def final_norm(self, x):
        return self.ln_final(x)

    def project(self, x):
        return x @ self.text_projection


def build_text_encoder(cfg: TextConfig):
    towers = {"clip": CLIPTextModel, "openclip": OpenCLIPTextModel}
    if cfg.kind not in towers:
        raise ValueError(f"unknown text encoder kind {cfg.kind!r}; expected one of {', '.join(towers)}")
    return towers[cfg.kind](cfg)


# ---------------------------------------------------------------------------------------------------
# Vision tower and the CLIP scorer

class VisionEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.randn(cfg.width) * 0.02)
        self.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        num_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.position_embedding = nn.Embedding(num_patches + 1, cfg.width)

    def forward(self, pixels):
        patches = rearrange(self.patch_embedding(pixels), "b c h w -> b (h w) c")
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class VisionTransformer(nn.Module):
    """ViT: patches and a class token, pre-LN, the layer stack (no mask), post-LN of the class token."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=LAYER_NORM_EPS)  # sic: the checkpoint's spelling
        self.encoder = Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=LAYER_NORM_EPS)

    def forward(self, pixels):
        x = self.encoder(self.pre_layrnorm(self.embeddings(pixels)))
        return self.post_layernorm(x[:, 0])


def preprocess_images(images, cfg: VisionConfig):
    """CLIP's preprocessing for (batch, 3, H, W) images in [0, 1]: bicubic resize of the shortest side,
    centre crop, normalisation. Returns (batch, 3, image_size, image_size)."""
    size = cfg.image_size
    height, width = images.shape[-2:]
    scale = size / min(height, width)
    new_size = (max(size, round(height * scale)), max(size, round(width * scale)))
    if new_size != (height, width):
        # antialias follows PIL, which CLIP used; the clamp stands for PIL's uint8 pixels
        images = F.interpolate(images, size=new_size, mode="bicubic", antialias=True, align_corners=False)
        images = images.clamp(0, 1)
    top = int(round((new_size[0] - size) / 2))
    left = int(round((new_size[1] - size) / 2))
    images = images[..., top:top + size, left:left + size]
    mean = torch.tensor(cfg.mean, dtype=images.dtype, device=images.device)[:, None, None]
    std = torch.tensor(cfg.std, dtype=images.dtype, device=images.device)[:, None, None]
    return (images - mean) / std


class CLIPVisionModel(nn.Module):
    """Image tower with projection; keys as transformers' `CLIPVisionModelWithProjection`."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_model = VisionTransformer(cfg)
        self.visual_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)
        self.apply(init_weights)

    def forward(self, pixels):
        """Projected image features (batch, projection_dim) of preprocessed pixels."""
        return self.visual_projection(self.vision_model(pixels))

    def preprocess(self, images):
        return preprocess_images(images, self.cfg)


class CLIPModel(nn.Module):
    """Text and image towers in one embedding space: the CLIP score model. Keys as transformers' `CLIPModel`."""

    def __init__(self, text_cfg: TextConfig, vision_cfg: VisionConfig):
        super().__init__()
        projection_dim = vision_cfg.projection_dim
        if text_cfg.projection_dim not in (0, projection_dim):
            raise ValueError(f"text projection {text_cfg.projection_dim} != image projection {projection_dim}")
        self.text_cfg, self.vision_cfg = text_cfg, vision_cfg
        # The projections live at the top level here, so the towers are built without them
        self.text_model = CLIPTextModel(replace(text_cfg, projection_dim=0, skip_last_layers=0))
        self.vision_model = VisionTransformer(vision_cfg)
        self.text_projection = nn.Linear(text_cfg.width, projection_dim, bias=False)
        self.visual_projection = nn.Linear(vision_cfg.width, projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # stored as a log; 100 once trained
        self.apply(init_weights)

    def encode_text(self, input_ids):
        """Projected text features (batch, projection_dim), not normalised."""
        return self.text_projection(self.text_model.pooled(input_ids))

    def encode_image(self, pixels):
        """Projected image features (batch, projection_dim) of preprocessed pixels, not normalised."""
        return self.visual_projection(self.vision_model(pixels))

    def preprocess(self, images):
        return preprocess_images(images, self.vision_cfg)

    def forward(self, input_ids, pixels):
        """logit_scale.exp() * cosine similarity, (images, texts)."""
        text = F.normalize(self.encode_text(input_ids), dim=-1)
        image = F.normalize(self.encode_image(pixels), dim=-1)
        return self.logit_scale.exp() * image @ text.t()


def init_weights(module):
    """A trainable start for the demo world's towers: Linear and conv weights with std fan_in^-0.5 (CLIP's own
    scale), embeddings with std 0.02 (the vision tower's class and position embeddings: width^-0.5), zero
    biases, LayerNorms as made. With a uniform std of 0.02 instead, a small tower's outputs start almost
    identical for every input and contrastive training stalls."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=module.in_features ** -0.5)
    elif isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, std=(module.in_channels * module.kernel_size[0] * module.kernel_size[1]) ** -0.5)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    elif isinstance(module, VisionEmbeddings):
        width = module.class_embedding.shape[0]
        nn.init.normal_(module.class_embedding, std=width ** -0.5)
        nn.init.normal_(module.position_embedding.weight, std=width ** -0.5)
        return
    else:
        return
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)


# ---------------------------------------------------------------------------------------------------
# Configs from tensor shapes

def _num_blocks(state_dict, prefix):
    indices = {int(k[len(prefix):].split(".")[0]) for k in state_dict if k.startswith(prefix)}
    if not indices:
        raise ValueError(f"no transformer blocks under {prefix!r}")
    return max(indices) + 1


def infer_text_config(state_dict) -> TextConfig:
    """The TextConfig of a text encoder state dict (keys without the checkpoint prefix), HF or OpenCLIP names."""
    sd = {k.removeprefix("text_model."): v for k, v in state_dict.items()}
    if "token_embedding.weight" in sd:  # OpenCLIP (and OpenAI) names
        tokens, positions = sd["token_embedding.weight"], sd["positional_embedding"]
        layers = _num_blocks(sd, "transformer.resblocks.")
        mlp_width = sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        projection_dim = sd["text_projection"].shape[1] if "text_projection" in sd else 0
        return TextConfig(kind="openclip", vocab_size=tokens.shape[0], width=tokens.shape[1], layers=layers,
                          heads=tokens.shape[1] // HEAD_WIDTH, mlp_width=mlp_width, max_positions=positions.shape[0],
                          activation="gelu", skip_last_layers=1, projection_dim=projection_dim, pad_id=0)
    if "embeddings.token_embedding.weight" in sd:  # Hugging Face names
        tokens = sd["embeddings.token_embedding.weight"]
        positions = sd["embeddings.position_embedding.weight"]
        layers = _num_blocks(sd, "encoder.layers.")
        mlp_width = sd["encoder.layers.0.mlp.fc1.weight"].shape[0]
        projection_dim = sd["text_projection.weight"].shape[0] if "text_projection.weight" in sd else 0
        width = tokens.shape[1]
        # Width 1024 under HF names is OpenCLIP ViT-H converted for diffusers (SD2): exact gelu, pads with 0,
        # its 23 layers already stop at the penultimate block. OpenAI's ViT-L text (SD1) is 768 wide.
        converted_openclip = width == 1024
        return TextConfig(kind="clip", vocab_size=tokens.shape[0], width=width, layers=layers,
                          heads=width // HEAD_WIDTH, mlp_width=mlp_width, max_positions=positions.shape[0],
                          activation="gelu" if converted_openclip else "quick_gelu", skip_last_layers=0,
                          projection_dim=projection_dim, pad_id=0 if converted_openclip else 49407)
    raise ValueError("not a CLIP text encoder state dict: found neither 'token_embedding.weight' "
                     "nor 'embeddings.token_embedding.weight'")


def infer_vision_config(state_dict) -> VisionConfig:
    """The VisionConfig of a `CLIPVisionModelWithProjection` or `CLIPModel` state dict (HF names)."""
    patches = state_dict["vision_model.embeddings.patch_embedding.weight"]  # (width, 3, patch, patch)
    positions = state_dict["vision_model.embeddings.position_embedding.weight"]  # (patches + 1, width)
    width, patch = patches.shape[0], patches.shape[-1]
    grid = math.isqrt(positions.shape[0] - 1)
    return VisionConfig(image_size=grid * patch, patch_size=patch, width=width,
                        layers=_num_blocks(state_dict, "vision_model.encoder.layers."), heads=width // HEAD_WIDTH,
                        mlp_width=state_dict["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                        projection_dim=state_dict["visual_projection.weight"].shape[0])
