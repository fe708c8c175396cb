"""Quiver's NF4 base linear on CUDA: bitsandbytes' NF4 storage, Quiver's Triton W4A16 kernel.

bitsandbytes quantizes (its NF4 codes and absmax statistics stay the format of record);
`NF4Linear.from_bnb(Linear4bit)` re-lays those exact values out once for the kernel
(quiver.kernels.nf4) and serves y = x W^T (+ b) without ever materializing W. bitsandbytes'
own matmul dequantizes whole weights above batch 1; this kernel fuses dequantization.
"""

from __future__ import annotations

import torch
from torch import nn

from quiver.kernels.nf4 import NF4Weight, nf4_linear, nf4_weight_from_bnb


class NF4Linear(nn.Module):
    def __init__(self, weight: NF4Weight, bias: torch.Tensor | None):
        super().__init__()
        self.w = weight
        self.out_features, self.in_features = weight.shape
        self.register_buffer("qweight", weight.qweight, persistent=False)  # counted in memory reports
        self.register_buffer("absmax", weight.absmax, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_bnb(cls, linear) -> "NF4Linear":
        return cls(nf4_weight_from_bnb(linear.weight), None if linear.bias is None else linear.bias.data)

    def dense_weight(self) -> torch.Tensor:
        """W [N, K] float32, dequantized (DoRA's column norms need it)."""
        return self.w.dequantize(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_linear(x, self.w, self.bias)
