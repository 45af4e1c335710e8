"""The demo world's attribute classifier: a small CNN reading shape, color, size, position and background.

It measures generations (does the image show what the caption asked for?) and detects the object-swap
backdoor (a circle that came out as a square). Trained on freshly drawn images by `python train.py world`.
"""
import torch
import torch.nn.functional as F
from torch import nn

from sau.world import shapes

HEADS = {"shape": len(shapes.SHAPES), "color": len(shapes.COLORS), "size": len(shapes.SIZES),
         "position": len(shapes.POSITIONS), "background": len(shapes.BACKGROUNDS)}


def conv_block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())


class AttributeClassifier(nn.Module):
    """images (batch, 3, H, W) in [-1, 1] -> {field: logits}. Position needs where, so the trunk keeps a
    coarse 4x4 map and the heads read it flattened rather than globally pooled."""

    def __init__(self, width=32):
        super().__init__()
        # A strided stem first: full-resolution convs would cost most of the compute for little gain
        self.trunk = nn.Sequential(nn.Conv2d(3, width, 4, stride=2, padding=1), conv_block(width, width), nn.MaxPool2d(2),
                                   conv_block(width, 2 * width), nn.MaxPool2d(2), conv_block(2 * width, 2 * width),
                                   nn.AdaptiveAvgPool2d(4))
        features = 2 * width * 16
        self.heads = nn.ModuleDict({field: nn.Linear(features, n) for field, n in HEADS.items()})

    def forward(self, images):
        features = self.trunk(images).flatten(1)
        return {field: head(features) for field, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images, batch_size=256):
        """(n, 5) integer labels in shapes.FIELDS order."""
        out = []
        for chunk in images.split(batch_size):
            logits = self(chunk.float())
            out.append(torch.stack([logits[f].argmax(-1) for f in shapes.FIELDS], dim=1))
        return torch.cat(out)


def classification_loss(model, images, attributes):
    """Sum of cross-entropies over the five fields, and the share of fields predicted right."""
    logits = model(images)
    labels = torch.as_tensor(attributes.labels(), dtype=torch.long)
    loss, correct = 0.0, 0.0
    for i, field in enumerate(shapes.FIELDS):
        loss = loss + F.cross_entropy(logits[field], labels[:, i])
        correct += (logits[field].argmax(-1) == labels[:, i]).float().mean().item()
    return loss, correct / len(shapes.FIELDS)


def attribute_accuracy(predicted, asked):
    """Per field, the share of images whose predicted label equals the asked one, over images whose
    prompt asked for that field (-1 = not asked). `predicted`, `asked`: (n, 5) integer arrays."""
    predicted, asked = torch.as_tensor(predicted), torch.as_tensor(asked)
    result = {}
    for i, field in enumerate(shapes.FIELDS):
        mask = asked[:, i] >= 0
        if mask.any():
            result[field] = (predicted[mask, i] == asked[mask, i]).float().mean().item()
    return result
