"""The canonical in-memory form every adaptation method loads into.

Contract: a method module turns its files into one `AdapterWeights`; the slot pool and the
step's AdapterBatch only ever see this form. Keys are (layer index, projection name) with
projection names as in quiver.server.model.PROJECTIONS. Tensors are float32 on the CPU until
a slot takes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

Key = tuple[int, str]  # (layer, "q_proj" ...)


@dataclass
class LoraDelta:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float  # y += scale * b @ (a @ x)

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class Bottleneck:
    down: torch.Tensor  # [r, out]   applied to the projection's output y
    down_bias: torch.Tensor  # [r]
    up: torch.Tensor  # [out, r]
    up_bias: torch.Tensor  # [out]
    act: str  # "relu" | "gelu" | "silu"

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass
class AdapterInfo:
    adapter_id: str
    method: str
    rank: int = 0
    target_modules: list[str] = field(default_factory=list)
    base_model: str | None = None
    warnings: list[str] = field(default_factory=list)
    size_bytes: int = 0


@dataclass
class AdapterWeights:
    """Everything one adapter contributes, per layer and projection.

    Order of application on a projection y = W x_in (x_in = x * in_scale where set):
    y += lora; y = y * out_scale; y += out_add; y += up(act(down(y) + down_bias)) + up_bias.
    """

    info: AdapterInfo
    lora: dict[Key, LoraDelta] = field(default_factory=dict)
    in_scale: dict[Key, torch.Tensor] = field(default_factory=dict)  # [in]  (IA3 feed-forward)
    out_scale: dict[Key, torch.Tensor] = field(default_factory=dict)  # [out] (IA3, DoRA)
    out_add: dict[Key, torch.Tensor] = field(default_factory=dict)  # [out] (BitFit, DoRA bias term)
    bottleneck: dict[Key, Bottleneck] = field(default_factory=dict)
    prefix_kv: torch.Tensor | None = None  # [layers, 2, n_virtual, kv_heads, head_dim] (prefix tuning)
    prompt_embeds: torch.Tensor | None = None  # [n_virtual, hidden] (prompt tuning)
    # the slot pool's rows of this adapter, prebuilt off the engine thread (adapters/staging.py)
    staged: dict = field(default_factory=dict, repr=False)

    def named_tensors(self) -> list[tuple[str, Key | None, torch.Tensor]]:
        """(kind, (layer, projection) or None, tensor) for every tensor: kind is "LoRA",
        "bottleneck", "in_scale vector", "out_scale vector", "out_add vector", "prefix KV" or
        "soft prompt"."""
        out: list = [("LoRA", k, t) for k, d in self.lora.items() for t in (d.a, d.b)]
        out += [("bottleneck", k, t) for k, bn in self.bottleneck.items()
                for t in (bn.down, bn.down_bias, bn.up, bn.up_bias)]
        for kind in ("in_scale", "out_scale", "out_add"):
            out += [(f"{kind} vector", k, t) for k, t in getattr(self, kind).items()]
        out += [(kind, None, t) for kind, t in (("prefix KV", self.prefix_kv), ("soft prompt", self.prompt_embeds))
                if t is not None]
        return out

    def tensors(self) -> list[torch.Tensor]:
        return [t for _, _, t in self.named_tensors()]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

