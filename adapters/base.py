"""What adapters need to know about the base model: shapes, and dense weights for DoRA.

`BaseSpec.from_model(LlamaForward)` reads the layer count and each projection's (out, in)
shape; `dense_weight(layer, proj)` returns the projection's weight as a float32 matrix,
dequantizing bitsandbytes NF4/int8 storage where needed (DoRA's column norms use it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quiver.server.model import PROJECTIONS


@dataclass
class BaseSpec:
    n_layers: int
    hidden: int
    n_kv_heads: int
    head_dim: int
    shapes: dict[str, tuple[int, int]]  # projection -> (out, in)
    model: object = None  # LlamaForward, for dense weights and biases

    @classmethod
    def from_model(cls, model) -> "BaseSpec":
        layer = model.layers[0]
        shapes = {}
        for name in PROJECTIONS:
            mod = layer.proj[name]  # nn.Linear, bitsandbytes Linear4bit/8bitLt or NF4Linear: all have these
            shapes[name] = (mod.out_features, mod.in_features)
        return cls(model.n_layers, model.embed.shape[1], model.n_kv_heads, model.head_dim, shapes, model)

    def module(self, layer: int, proj: str):
        return self.model.layers[layer].proj[proj]

    def dense_weight(self, layer: int, proj: str) -> torch.Tensor:
        mod = self.module(layer, proj)
        if hasattr(mod, "dense_weight"):  # Quiver's NF4Linear
            return mod.dense_weight()
        w = mod.weight
        if getattr(w, "quant_state", None) is not None:  # bitsandbytes NF4
            import bitsandbytes.functional as bf

            return bf.dequantize_4bit(w.data, w.quant_state).float()
        if getattr(w, "SCB", None) is not None:  # bitsandbytes int8: row-wise absmax / 127
            return w.data.float() * (w.SCB.float()[:, None] / 127.0)
        return w.data.float()

    def bias(self, layer: int, proj: str) -> torch.Tensor | None:
        b = self.module(layer, proj).bias
        return None if b is None else b.data.float()
