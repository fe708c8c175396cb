"""Prompt tuning / P-tuning v1 soft prompts in the PEFT format (peft_type "PROMPT_TUNING",
also "P_TUNING" when saved without its encoder).

File: `prompt_embeddings` [n_virtual, hidden]. Apply: the request's sequence starts with
n_virtual placeholder tokens whose input embeddings are replaced by these rows at prefill
(positions 0 .. n-1, as in PEFT); the prompt follows.
"""

from __future__ import annotations

import torch

from quiver.adapters.base import BaseSpec
from quiver.adapters.files import AdapterError
from quiver.adapters.weights import AdapterInfo, AdapterWeights


def load(adapter_id: str, cfg: dict, tensors: dict[str, torch.Tensor], base: BaseSpec, max_rank: int) -> AdapterWeights:
    if set(tensors) != {"prompt_embeddings"}:
        raise AdapterError(f"prompt tuning holds only prompt_embeddings, found {sorted(tensors)}")
    emb = tensors["prompt_embeddings"]
    if emb.dim() != 2 or emb.shape[1] != base.hidden:
        raise AdapterError(f"prompt_embeddings has shape {tuple(emb.shape)}; this base needs [n, {base.hidden}]")
    if cfg.get("num_transformer_submodules", 1) != 1:
        raise AdapterError("only decoder-only prompt tuning (num_transformer_submodules=1) is supported")
    return AdapterWeights(AdapterInfo(adapter_id, "prompt_tuning", rank=emb.shape[0]), prompt_embeds=emb)
