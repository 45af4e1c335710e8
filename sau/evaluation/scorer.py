"""A CLIP model used as a scorer: CLIP score (text-image) and image-image similarity.

A scorer bundle is a folder like a model bundle (see checkpoint.py) holding a `CLIPModel` under the
transformers `CLIPModel` key names, its text and vision configs, and its tokenizer.
"""
from dataclasses import asdict

import torch
import torch.nn.functional as F

from sau.weights.bundle import load_strict, read_bundle, write_bundle
from sau.models.clip import CLIPModel
from sau.models.config import TextConfig, VisionConfig, _dataclass_from_dict
from sau.models.tokenizer import Tokenizer


class CLIPScorer:
    def __init__(self, clip: CLIPModel, tokenizer: Tokenizer):
        self.clip = clip.eval().requires_grad_(False)
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, path, device="cpu"):
        config, state, tokenizer_path = read_bundle(path, kind="clip")
        text = _dataclass_from_dict(TextConfig, config["text"])
        vision = _dataclass_from_dict(VisionConfig, config["vision"])
        clip = CLIPModel(text, vision)
        load_strict(clip, {k: v.float() for k, v in state.items()}, "CLIP scorer")
        return cls(clip.to(device), Tokenizer.from_file(tokenizer_path, pad_id=text.pad_id))

    def save(self, path, dtype=torch.float16):
        state = {k: v.to(dtype) for k, v in self.clip.state_dict().items()}
        config = {"text": asdict(self.clip.text_cfg), "vision": asdict(self.clip.vision_cfg)}
        write_bundle(path, config, state, self.tokenizer, kind="clip")

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
