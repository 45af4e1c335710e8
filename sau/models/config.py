"""Model configurations in the vocabulary of the original LDM code, plus presets.

A `ModelConfig` describes a whole Stable Diffusion style model: the UNet, the VAE, the text
encoder and the noise schedule. Presets: `sd1`, `sd2` (512 px, epsilon), `sd2-v` (768 px,
v-prediction, upcast attention) and `tiny` (random-weight tests). The demo world stores its own
config in its bundle's `config.json`; `ModelConfig.from_dict` reads it back.
"""
from dataclasses import asdict, dataclass, field, fields, replace


# Where an original single-file SD checkpoint (the CompVis layout) keeps each part: the model's modules carry
# these prefixes' names, so such a checkpoint loads by prefix with strict key checks.
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIXES = {"clip": "cond_stage_model.transformer.text_model.", "openclip": "cond_stage_model.model."}


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple = (4, 2, 1)  # downsampling factors at which SpatialTransformers sit
    num_heads: int = 8  # either a fixed head count ...
    num_head_channels: int = -1  # ... or a fixed head width (then num_heads is -1)
    transformer_depth: int = 1
    context_dim: int = 768
    use_linear_in_transformer: bool = False  # SD2: proj_in/proj_out are Linear, not 1x1 conv
    norm_groups: int = 32
    upcast_attention: bool = False  # SD2.1-v computes q.k^T in float32

    def heads_and_dim(self, channels):
        """(heads, dim_head) of the attention layers at a given width."""
        if self.num_head_channels > 0:
            return channels // self.num_head_channels, self.num_head_channels
        return self.num_heads, channels // self.num_heads


@dataclass
class VAEConfig:  # the original's own names for the autoencoder (ch, ch_mult...), not the UNet's
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2  # the decoder runs one more per level
    z_channels: int = 4
    embed_dim: int = 4
    norm_groups: int = 32
    scale_factor: float = 0.18215


@dataclass
class TextConfig:
    # "clip": OpenAI CLIP text tower with Hugging Face names (SD1).
    # "openclip": OpenCLIP text tower with its own names (SD2).
    kind: str = "clip"
    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    max_positions: int = 77
    activation: str = "quick_gelu"  # or "gelu" (exact, erf)
    skip_last_layers: int = 0  # SD2 conditions on the penultimate block: 1
    projection_dim: int = 0  # 0: no text_projection (SD1); OpenCLIP has one
    pad_id: int = 49407  # SD1 pads with eos; SD2 with 0
    bos_id: int = 49406
    eos_id: int = 49407


@dataclass
class VisionConfig:
    """CLIP vision tower, for CLIP score; only scorer bundles carry one."""
    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_width: int = 4096
    projection_dim: int = 768
    activation: str = "quick_gelu"
    mean: tuple = (0.48145466, 0.4578275, 0.40821073)
    std: tuple = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ScheduleConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: str = "epsilon"  # or "v_prediction"


@dataclass
class ModelConfig:
    family: str = "sd1"  # sd1 | sd2 | demo | tiny
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    image_size: int = 512  # default sampling size in pixels

    @property
    def latent_downsample(self):
        return 2 ** (len(self.vae.ch_mult) - 1)

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        parts = {"unet": UNetConfig, "vae": VAEConfig, "text": TextConfig, "schedule": ScheduleConfig}
        kwargs = {}
        for f in fields(cls):
            if f.name not in d:
                continue
            value = d[f.name]
            kwargs[f.name] = _dataclass_from_dict(parts[f.name], value) if f.name in parts else value
        return cls(**kwargs)


def _dataclass_from_dict(cls, d):
    """Build a dataclass from JSON, turning lists back into tuples and ignoring unknown keys."""
    known = {f.name for f in fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known})


def sd1():
    return ModelConfig(family="sd1")


def sd2():
    return ModelConfig(
        family="sd2",
        unet=UNetConfig(num_heads=-1, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True),
        text=TextConfig(kind="openclip", width=1024, layers=24, heads=16, mlp_width=4096, activation="gelu",
                        skip_last_layers=1, projection_dim=1024, pad_id=0),
    )


def sd2_v():
    cfg = sd2()
    return replace(cfg, unet=replace(cfg.unet, upcast_attention=True),
                   schedule=replace(cfg.schedule, prediction_type="v_prediction"), image_size=768)


def tiny():
    """A random-weight model with the SD1 topology, small enough for unit tests."""
    return ModelConfig(
        family="tiny",
        unet=UNetConfig(model_channels=32, channel_mult=(1, 2), attention_resolutions=(1, 2), num_heads=2,
                        context_dim=32, norm_groups=8),
        vae=VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8),
        text=TextConfig(vocab_size=1000, width=32, layers=2, heads=2, mlp_width=64, max_positions=16,
                        pad_id=999, bos_id=998, eos_id=999),
        image_size=32,
    )


PRESETS = {"sd1": sd1, "sd2": sd2, "sd2-v": sd2_v, "tiny": tiny}


def preset(name):
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()
