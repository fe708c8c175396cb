"""Prefix tuning / P-tuning v2 in the PEFT format (peft_type "PREFIX_TUNING").

File: `prompt_embeddings` [n_virtual, n_layers * 2 * kv_dim] (no prefix_projection).
PEFT reads it as [n, n_layers*2, kv_heads, head_dim]; entry 2*i is layer i's keys, 2*i+1
its values, used as already-positioned cache entries. Quiver writes them once into shared,
ref-counted KV blocks that every request of the adapter attends to; the request's own
tokens take positions n_virtual, n_virtual+1, ... as in PEFT.
"""

from __future__ import annotations

import torch

from quiver.adapters.base import BaseSpec
from quiver.adapters.files import AdapterError
from quiver.adapters.weights import AdapterInfo, AdapterWeights


def load(adapter_id: str, cfg: dict, tensors: dict[str, torch.Tensor], base: BaseSpec, max_rank: int) -> AdapterWeights:
    if cfg.get("prefix_projection"):
        raise AdapterError("prefix_projection=True adapters are not supported: save the projected prefix instead")
    if set(tensors) != {"prompt_embeddings"}:
        raise AdapterError(f"prefix tuning holds only prompt_embeddings, found {sorted(tensors)}")
    emb = tensors["prompt_embeddings"]
    n = int(cfg.get("num_virtual_tokens", emb.shape[0]))
    kv_dim = base.n_kv_heads * base.head_dim
    want = (n, base.n_layers * 2 * kv_dim)
    if tuple(emb.shape) != want:
        raise AdapterError(f"prompt_embeddings has shape {tuple(emb.shape)}; this base needs {want} "
                           f"({base.n_layers} layers x 2 x {kv_dim})")
    kv = emb.view(n, base.n_layers, 2, base.n_kv_heads, base.head_dim).permute(1, 2, 0, 3, 4).contiguous()
    w = AdapterWeights(AdapterInfo(adapter_id, "prefix_tuning", rank=n), prefix_kv=kv)
    return w
