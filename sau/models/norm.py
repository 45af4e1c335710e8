"""GroupNorm as Stable Diffusion needs it in half precision."""
import torch
import torch.nn.functional as F
from torch import nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose statistics are never computed in float16.

    CompVis computes SD's GroupNorms in float32 because float16 overflows on SD's activations. bfloat16 has
    float32's range, and PyTorch's kernels accumulate its mean and variance in float32 anyway, so bf16 runs
    natively: the upcast would only add two full-size copies per norm (measured in `python -m benchmarks`).
    """

    def forward(self, x):
        if x.dtype != torch.float16:
            return super().forward(x)
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)
