"""Prefix tuning / P-tuning v2 in the PEFT format (peft_type "PREFIX_TUNING").

File: `prompt_embeddings` [n_virtual, n_layers * 2 * kv_dim] (no prefix_projection).
PEFT reads it as [n, n_layers*2, kv_heads, head_dim]; entry 2*i is layer i's keys, 2*i+1
its values, used as already-positioned cache entries. Quiver writes them once into shared,
ref-counted KV blocks that every request of the adapter attends to; the request's own
tokens take positions n_virtual, n_virtual+1, ... as in PEFT.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quiver.adapters.base import BaseSpec
from quiver.adapters.files import AdapterError, write_adapter_dir
from quiver.adapters.weights import AdapterInfo, AdapterWeights


@dataclass
class PrefixConfig:
    num_virtual_tokens: int
    prefix_projection: bool = False

    def __post_init__(self) -> None:
        if self.num_virtual_tokens <= 0:
            raise AdapterError(f"num_virtual_tokens must be positive, got {self.num_virtual_tokens}")
        if self.prefix_projection:
            raise AdapterError("prefix_projection=True adapters are not supported: save the projected prefix instead")

    @classmethod
    def from_json(cls, cfg: dict, default_tokens: int) -> "PrefixConfig":
        return cls(int(cfg.get("num_virtual_tokens") or default_tokens), bool(cfg.get("prefix_projection", False)))


def load(adapter_id: str, cfg: dict, tensors: dict[str, torch.Tensor], base: BaseSpec, max_rank: int) -> AdapterWeights:
    if set(tensors) != {"prompt_embeddings"}:
        raise AdapterError(f"prefix tuning holds only prompt_embeddings, found {sorted(tensors)}")
    emb = tensors["prompt_embeddings"]
    n = PrefixConfig.from_json(cfg, emb.shape[0]).num_virtual_tokens
    kv_dim = base.n_kv_heads * base.head_dim
    want = (n, base.n_layers * 2 * kv_dim)
    if tuple(emb.shape) != want:
        raise AdapterError(f"prompt_embeddings has shape {tuple(emb.shape)}; this base needs {want} "
                           f"({base.n_layers} layers x 2 x {kv_dim})")
    kv = emb.view(n, base.n_layers, 2, base.n_kv_heads, base.head_dim).permute(1, 2, 0, 3, 4).contiguous()
    return AdapterWeights(AdapterInfo(adapter_id, "prefix_tuning", rank=n), prefix_kv=kv)


def save(path, weights: AdapterWeights, base_model: str = "") -> None:
    """Writes the prefix keys/values in the PEFT format (inverse of load)."""
    kv = weights.prefix_kv  # [layers, 2, n, kv_heads, head_dim]
    layers, _, n, kvh, hd = kv.shape
    emb = kv.permute(2, 0, 1, 3, 4).reshape(n, layers * 2 * kvh * hd)
    config = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "num_virtual_tokens": n, "num_layers": layers, "token_dim": kvh * hd, "num_attention_heads": kvh,
              "num_transformer_submodules": 1, "prefix_projection": False, "encoder_hidden_size": kvh * hd}
    write_adapter_dir(path, config, {"prompt_embeddings": emb})
