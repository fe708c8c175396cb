"""Quiver's NF4 base linear on CUDA: bitsandbytes' NF4 storage, Quiver's Triton W4A16 kernels.

bitsandbytes quantizes (its NF4 codes and absmax statistics stay the format of record);
`NF4Linear.from_bnb(Linear4bit)` re-lays those exact values out once and serves y = x W^T (+ b)
without materializing W for decode batches. Two layouts (quiver.kernels):

  * words (K % 128 == 0, the usual case): 32-bit words, the NF4 table looked up in registers,
    the scale applied per 64-block after the dot (kernels/nf4_words.py). Decode batches up to
    WORDS_MAX_M tokens (NARROW_MAX_M for outputs narrower than WIDE_N) run that kernel; larger
    batches (prefill) dequantize W with a Triton kernel and leave the GEMM to cuBLAS.
  * bytes (any K % 64 == 0): kernels/nf4.py's GEMV/GEMM kernels.

Fused projections (q|k|v, gate|up) are one NF4Linear over the concatenated output columns;
`column_view` gives each member a module that shares that storage (strided words/absmax).
"""

from __future__ import annotations

import torch
from torch import nn

from quiver.kernels.lora_group import group_shrink
from quiver.kernels.nf4 import NF4Weight, nf4_linear, nf4_weight_from_bnb
from quiver.kernels.nf4_words import WORD_K, dequantize_words, nf4_words_linear, words_from_nf4


class NF4Linear(nn.Module):
    def __init__(self, weight: NF4Weight | None, bias: torch.Tensor | None, words: torch.Tensor | None = None,
                 absmax: torch.Tensor | None = None):
        super().__init__()
        assert (weight is None) != (words is None), "give an NF4Weight (bytes layout) or words + absmax"
        self.w = weight
        if words is not None:
            self.out_features, self.in_features = words.shape[1], words.shape[0] // 16 * WORD_K
            self.register_buffer("words", words, persistent=False)  # counted in memory reports
            self.register_buffer("absmax", absmax, persistent=False)
        else:
            self.out_features, self.in_features = weight.shape
            self.words = None
            self.register_buffer("qweight", weight.qweight, persistent=False)
            self.register_buffer("absmax", weight.absmax, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_bnb(cls, linear) -> "NF4Linear":
        return cls.from_weight(nf4_weight_from_bnb(linear.weight), None if linear.bias is None else linear.bias.data)

    @classmethod
    def from_weight(cls, w: NF4Weight, bias: torch.Tensor | None = None) -> "NF4Linear":
        """The word layout where K allows it, else the byte layout."""
        if w.shape[1] % WORD_K == 0:
            return cls(None, bias, words=words_from_nf4(w), absmax=w.absmax)
        return cls(w, bias)

    @classmethod
    def fuse(cls, members: list["NF4Linear"]) -> "NF4Linear | None":
        """One module over the members' concatenated outputs (word layout only), or None."""
        if any(m.words is None for m in members) or len({m.in_features for m in members}) != 1:
            return None
        if len({m.bias is None for m in members}) != 1:
            return None
        bias = None if members[0].bias is None else torch.cat([m.bias.data for m in members])
        return cls(None, bias, words=torch.cat([m.words for m in members], dim=1),
                   absmax=torch.cat([m.absmax for m in members], dim=1))

    def column_view(self, lo: int, hi: int) -> "NF4Linear":
        """Output columns lo:hi as a module sharing this one's storage (word layout only)."""
        bias = None if self.bias is None else self.bias.data[lo:hi]
        return NF4Linear(None, bias, words=self.words[:, lo:hi], absmax=self.absmax[:, lo:hi])

    def dense_weight(self) -> torch.Tensor:
        """W [N, K] float32, dequantized (DoRA's column norms need it)."""
        if self.words is not None:
            return dequantize_words(self.words, self.absmax, torch.float32)
        return self.w.dequantize(torch.float32)

    takes_shrink = True  # forward(x, shrink=...) also runs LoRA shrinks of x (adapters/batch.py)

    def forward(self, x: torch.Tensor, shrink: tuple | None = None) -> torch.Tensor:
        """shrink (token_slot, [GroupMember]): the LoRA shrinks of x (kernels/lora_group.py),
        in the word kernel's own launch where it runs."""
        if self.words is not None:
            return nf4_words_linear(x, self.words, self.absmax, self.bias, shrink=shrink)
        y = nf4_linear(x, self.w, self.bias)
        if shrink is not None:
            group_shrink(x.reshape(-1, x.shape[-1]), *shrink)
        return y
