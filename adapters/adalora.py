"""AdaLoRA in the PEFT format (peft_type "ADALORA"): SVD-style P (lora_A), Λ (lora_E), Q (lora_B).

Apply: y += B ((A * E) x) * scaling / (ranknum + 1e-5), scaling = lora_alpha (or r when 0).
Ranks pruned by AdaLoRA (E == 0) are dropped at load, so each layer is served at its own
effective rank; the result is an ordinary LoraDelta. Saving: a served AdaLoRA adapter is an
ordinary LoRA, written with quiver.adapters.lora.save_lora (P, Λ, Q are not recoverable).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from quiver.adapters.base import BaseSpec
from quiver.adapters.files import AdapterError, check_shape
from quiver.adapters.lora import group_by_module
from quiver.adapters.weights import AdapterInfo, AdapterWeights, LoraDelta


@dataclass
class AdaLoraConfig:
    lora_alpha: float = 0.0  # 0 = use each layer's rank
    target_modules: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.lora_alpha < 0:
            raise AdapterError(f"lora_alpha must be >= 0, got {self.lora_alpha}")

    @classmethod
    def from_json(cls, cfg: dict) -> "AdaLoraConfig":
        tm = cfg.get("target_modules") or []
        return cls(float(cfg.get("lora_alpha", 0) or 0), [tm] if isinstance(tm, str) else list(tm))


def load(adapter_id: str, cfg: dict, tensors: dict[str, torch.Tensor], base: BaseSpec, max_rank: int) -> AdapterWeights:
    alpha = AdaLoraConfig.from_json(cfg).lora_alpha
    w = AdapterWeights(AdapterInfo(adapter_id, "adalora"))
    for (layer, proj), parts in group_by_module(tensors, base).items():
        where = f"layer {layer} {proj}"
        if not {"lora_A", "lora_B", "lora_E"} <= parts.keys():
            raise AdapterError(f"{where}: needs lora_A, lora_B and lora_E, found {sorted(parts)}")
        a, b, e = parts["lora_A"], parts["lora_B"], parts["lora_E"]
        out_f, in_f = base.shapes[proj]
        r = a.shape[0]
        check_shape(a, (r, in_f), f"{where} lora_A")
        check_shape(b, (out_f, r), f"{where} lora_B")
        check_shape(e, (r, 1), f"{where} lora_E")
        ranknum = float(parts["ranknum"].item()) if "ranknum" in parts else float(r)
        scale = (alpha if alpha > 0 else float(r)) / (ranknum + 1e-5)
        keep = e[:, 0] != 0
        if not keep.any():
            continue  # every rank pruned: this layer is unchanged
        if int(keep.sum()) > max_rank:
            raise AdapterError(f"{where}: rank {int(keep.sum())} is above this server's maximum {max_rank}")
        w.lora[(layer, proj)] = LoraDelta((a * e)[keep], b[:, keep], scale)
    if not w.lora:
        raise AdapterError("the adapter holds no AdaLoRA weights")
    w.info.rank = max(d.rank for d in w.lora.values())
    w.info.target_modules = sorted({p for _, p in w.lora})
    return w
