"""A CLIP model used as a scorer: CLIP score (text-image) and image-image similarity.

A scorer bundle is a folder like a model bundle (sau.weights.bundle) holding a `CLIPModel` under the
transformers `CLIPModel` key names, its text and vision configs, and its tokenizer. It is read and written
like every model, through sau.weights.read and sau.weights.write, so a transformers CLIP folder loads too.
"""
import torch
import torch.nn.functional as F

from sau.common.state import CheckpointError, load_strict
from sau.models.clip import CLIPModel
from sau.models.tokenizer import Tokenizer
from sau.weights.form import CLIPWeights, cast
from sau.weights.read import read
from sau.weights.write import write


class CLIPScorer:
    def __init__(self, clip: CLIPModel, tokenizer: Tokenizer):
        self.clip = clip.eval().requires_grad_(False)
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, path, device="cpu"):
        """A scorer bundle (or any CLIP model sau.weights.read reads), computing in float32."""
        weights = read(path)
        if not isinstance(weights, CLIPWeights):
            raise CheckpointError(f"{path}: a Stable Diffusion model, not a CLIP scorer")
        return cls.from_weights(weights, device)

    @classmethod
    def from_weights(cls, weights, device="cpu"):
        clip = CLIPModel(weights.text, weights.vision)
        load_strict(clip, {k: v.float() for k, v in weights.state.items()}, "CLIP scorer")
        return cls(clip.to(device), weights.tokenizer)

    def weights(self):
        return CLIPWeights(self.clip.text_cfg, self.clip.vision_cfg, self.clip.state_dict(), self.tokenizer)

    def save(self, path, dtype=torch.float16):
        """A scorer bundle, stored in `dtype` (half by default: scores do not need more)."""
        write(cast(self.weights(), dtype), path)

    @property
    def device(self):
        return next(self.clip.parameters()).device

    @torch.no_grad()
    def image_features(self, images, batch_size=128):
        """Unit-norm features of images (batch, 3, H, W) in [-1, 1]."""
        feats = [self.clip.encode_image(self.clip.preprocess((chunk.float().to(self.device) + 1) / 2))
                 for chunk in images.split(batch_size)]
        return F.normalize(torch.cat(feats), dim=-1)

    @torch.no_grad()
    def text_features(self, prompts, batch_size=256):
        feats = [self.clip.encode_text(self.tokenizer(prompts[i:i + batch_size]).to(self.device))
                 for i in range(0, len(prompts), batch_size)]
        return F.normalize(torch.cat(feats), dim=-1)

    def clip_score(self, images, prompts):
        """Per image, 100 * max(cos, 0) between it and its prompt (the torchmetrics convention)."""
        cos = (self.image_features(images) * self.text_features(list(prompts))).sum(-1)
        return 100 * cos.clamp(min=0)

    def image_similarity(self, images, references):
        """Per pair, the cosine between the CLIP features of two images (e.g. same seed, two models)."""
        return (self.image_features(images) * self.image_features(references)).sum(-1)

    def retrieve(self, images, captions):
        """For each image, the index of the caption that scores highest."""
        return (self.image_features(images) @ self.text_features(list(captions)).t()).argmax(-1).cpu()
