"""Prompt tuning / P-tuning v1 soft prompts in the PEFT format (peft_type "PROMPT_TUNING",
also "P_TUNING" when saved without its encoder).

File: `prompt_embeddings` [n_virtual, hidden]. Apply: the request's sequence starts with
n_virtual placeholder tokens whose input embeddings are replaced by these rows at prefill
(positions 0 .. n-1, as in PEFT); the prompt follows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quiver.adapters.base import BaseSpec
from quiver.adapters.files import AdapterError, write_adapter_dir
from quiver.adapters.weights import AdapterInfo, AdapterWeights


@dataclass
class PromptConfig:
    num_virtual_tokens: int
    num_transformer_submodules: int = 1

    def __post_init__(self) -> None:
        if self.num_virtual_tokens <= 0:
            raise AdapterError(f"num_virtual_tokens must be positive, got {self.num_virtual_tokens}")
        if self.num_transformer_submodules != 1:
            raise AdapterError("only decoder-only prompt tuning (num_transformer_submodules=1) is supported")

    @classmethod
    def from_json(cls, cfg: dict, default_tokens: int) -> "PromptConfig":
        return cls(int(cfg.get("num_virtual_tokens") or default_tokens),
                   int(cfg.get("num_transformer_submodules") or 1))


def load(adapter_id: str, cfg: dict, tensors: dict[str, torch.Tensor], base: BaseSpec, max_rank: int) -> AdapterWeights:
    if set(tensors) != {"prompt_embeddings"}:
        raise AdapterError(f"prompt tuning holds only prompt_embeddings, found {sorted(tensors)}")
    emb = tensors["prompt_embeddings"]
    if emb.dim() != 2 or emb.shape[1] != base.hidden:
        raise AdapterError(f"prompt_embeddings has shape {tuple(emb.shape)}; this base needs [n, {base.hidden}]")
    config = PromptConfig.from_json(cfg, emb.shape[0])
    if config.num_virtual_tokens != emb.shape[0]:
        raise AdapterError(f"num_virtual_tokens is {config.num_virtual_tokens} but prompt_embeddings has "
                           f"{emb.shape[0]} rows")
    return AdapterWeights(AdapterInfo(adapter_id, "prompt_tuning", rank=emb.shape[0]), prompt_embeds=emb)


def save(path, weights: AdapterWeights, n_layers: int, base_model: str = "") -> None:
    """Writes the soft prompt in the PEFT format (inverse of load)."""
    emb = weights.prompt_embeds
    config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "num_virtual_tokens": emb.shape[0], "token_dim": emb.shape[1], "num_layers": n_layers,
              "num_transformer_submodules": 1, "prompt_tuning_init": "RANDOM"}
    write_adapter_dir(path, config, {"prompt_embeddings": emb})
