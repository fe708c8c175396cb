"""Composition (LoRAHub-style): a weighted mix of LoRA adapters as one virtual adapter.

For weights w_i over LoRAs (A_i, B_i, s_i) on the same projection, the mix is one LoRA with
stacked ranks: A = [A_1; A_2; ...], B = [w_1 s_1 B_1, w_2 s_2 B_2, ...], scale 1, so
B A x = sum_i w_i s_i B_i A_i x. Served in the same batch as any other adapter.
"""

from __future__ import annotations

import torch

from quiver.adapters.files import AdapterError
from quiver.adapters.weights import AdapterInfo, AdapterWeights, LoraDelta


def mix_id(parts: list[tuple[str, float]]) -> str:
    return "mix(" + ",".join(f"{a}:{w:g}" for a, w in parts) + ")"


def compose(parts: list[tuple[AdapterWeights, float]], max_rank: int) -> AdapterWeights:
    for w, _ in parts:
        if w.info.method not in ("lora", "adalora"):
            raise AdapterError(f"adapter {w.info.adapter_id!r} is {w.info.method}; a mix combines LoRA adapters only")
    out = AdapterWeights(AdapterInfo(mix_id([(w.info.adapter_id, c) for w, c in parts]), "lora"))
    keys = sorted({k for w, _ in parts for k in w.lora})
    for key in keys:
        deltas = [(w.lora[key], c) for w, c in parts if key in w.lora]
        a = torch.cat([d.a.float() for d, _ in deltas])  # staged adapters hold serving-dtype rows
        b = torch.cat([d.b.float() * (c * d.scale) for d, c in deltas], dim=1)
        if a.shape[0] > max_rank:
            raise AdapterError(f"the mix has rank {a.shape[0]} on {key}, above this server's maximum {max_rank}")
        out.lora[key] = LoraDelta(a, b, 1.0)
    out.info.rank = max(d.rank for d in out.lora.values())
    out.info.target_modules = sorted({p for _, p in out.lora})
    return out
