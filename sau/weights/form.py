"""The one form every saved model is read into and written from, whatever its layout on disk.

`Weights` is a Stable Diffusion model between layouts: its ModelConfig, its state dict under CompVis keys
(a bundle's layout, sau's own module names) and its tokenizer; `CLIPWeights` a CLIP scoring model under
transformers' CLIPModel keys. sau.weights.read makes them from every layout, sau.weights.write writes them to
every layout, and StableDiffusion.from_weights / CLIPScorer.from_weights build the modules.
"""
from dataclasses import dataclass, field, replace

from sau.models.config import ModelConfig, TextConfig, VisionConfig
from sau.models.tokenizer import Tokenizer

SAU_CONFIG = "sau_config"  # metadata key of a CompVis file sau wrote: the exact config, which shapes alone cannot give


@dataclass
class Weights:
    """A Stable Diffusion model between layouts: config, CompVis-keyed state dict, tokenizer."""
    config: ModelConfig
    state: dict
    tokenizer: Tokenizer
    info: dict = field(default_factory=dict)  # how the model was made (a backdoor, its removal...): config.json's
    notes: list = field(default_factory=list)  # what the user should know, e.g. an assumed prediction type

    @classmethod
    def of(cls, model):
        """The weights of a StableDiffusion as they stand (tensors shared, not copied)."""
        return cls(model.config, model.compvis_state_dict(), model.tokenizer, info=dict(model.info))


@dataclass
class CLIPWeights:
    """A CLIP scoring model between layouts, under transformers' CLIPModel keys."""
    text: TextConfig
    vision: VisionConfig
    state: dict
    tokenizer: Tokenizer
    info: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


def cast(weights, dtype):
    """The same weights with floating-point tensors in `dtype` (None: as stored)."""
    if dtype is None:
        return weights
    return replace(weights, state={k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.state.items()})
