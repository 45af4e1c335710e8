"""LoRA adapters for training (Hu et al., 2021): a frozen weight W is read as W + (alpha / r) * up @ down, and only
down (r, in) and up (out, r) learn. Implemented as a torch parametrization of the weight, so the modules and their
forward passes stay as they are; `merge_low_rank` folds the product into W when training ends.

Initialisation as PEFT's default: down ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform with a = sqrt(5)), up = 0,
so training starts from the model unchanged. Files: sau.weights.lora.
"""
import math

import torch
from torch import nn
from torch.nn.utils import parametrize

# The projections diffusers' and PEFT's LoRA training scripts adapt in the UNet: every attention's q, k, v, out
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class LowRank(nn.Module):
    def __init__(self, weight, rank, alpha=None, generator=None):
        super().__init__()
        fan_in = weight[0].numel()
        bound = 1 / math.sqrt(fan_in)
        self.down = nn.Parameter((torch.rand(rank, fan_in, generator=generator) * 2 - 1) * bound)
        self.up = nn.Parameter(torch.zeros(weight.shape[0], rank))
        self.alpha = float(alpha or rank)

    def forward(self, weight):
        product = (self.up @ self.down).view_as(weight).to(weight.dtype)
        return weight + self.alpha / self.down.shape[0] * product


def low_rank_targets(module, targets=UNET_TARGETS):
    """Names of the submodules whose name ends in one of `targets` (".to_q", ".to_out.0", ...)."""
    return [name for name, _ in module.named_modules() if name.endswith(tuple("." + t for t in targets))]


def add_low_rank(module, names, rank, alpha=None, seed=0):
    """A LowRank adapter on the weight of each named submodule; returns {name: adapter}."""
    generator = torch.Generator().manual_seed(seed)
    adapters = {}
    for name in names:
        target = module.get_submodule(name)
        adapter = LowRank(target.weight, rank, alpha, generator).to(target.weight.device)
        parametrize.register_parametrization(target, "weight", adapter)
        adapters[name] = adapter
    return adapters


def merge_low_rank(module, names):
    """Fold each adapter into its weight and remove it: the module is plain again, with the adapted weights."""
    for name in names:
        parametrize.remove_parametrizations(module.get_submodule(name), "weight", leave_parametrized=True)
