"""(IA)³ in the PEFT format (peft_type "IA3"): learned vectors that rescale activations.

`...{proj}.ia3_l` of shape [out, 1] scales the projection's output (keys, values);
shape [1, in] on a feed-forward module scales its input (the FFN hidden before down_proj).
Apply: y = W (x * l_in) or y = (W x) * l_out, gathered by slot in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from quiver.adapters.base import BaseSpec
from quiver.adapters.files import AdapterError, module_name, write_adapter_dir
from quiver.adapters.lora import group_by_module
from quiver.adapters.weights import AdapterInfo, AdapterWeights


@dataclass
class IA3Config:
    target_modules: list[str] = field(default_factory=list)
    feedforward_modules: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        stray = set(self.feedforward_modules) - set(self.target_modules)
        if self.target_modules and stray:
            raise AdapterError(f"feedforward_modules {sorted(stray)} are not in target_modules")

    @classmethod
    def from_json(cls, cfg: dict) -> "IA3Config":
        listed = lambda v: [v] if isinstance(v, str) else list(v or [])  # noqa: E731
        return cls(listed(cfg.get("target_modules")), listed(cfg.get("feedforward_modules")))

    def is_feedforward(self, proj: str) -> bool:
        return any(proj == m or proj.endswith("." + m) for m in self.feedforward_modules)


def load(adapter_id: str, cfg: dict, tensors: dict[str, torch.Tensor], base: BaseSpec, max_rank: int) -> AdapterWeights:
    config = IA3Config.from_json(cfg)
    w = AdapterWeights(AdapterInfo(adapter_id, "ia3"))
    for (layer, proj), parts in group_by_module(tensors, base).items():
        where = f"layer {layer} {proj}"
        if set(parts) != {"ia3_l"}:
            raise AdapterError(f"{where}: (IA)3 holds only ia3_l, found {sorted(parts)}")
        vec = parts["ia3_l"]
        out_f, in_f = base.shapes[proj]
        if config.is_feedforward(proj):
            if tuple(vec.shape) != (1, in_f):
                raise AdapterError(f"{where}: feed-forward ia3_l must be [1, {in_f}], got {tuple(vec.shape)}")
            w.in_scale[(layer, proj)] = vec[0]
        else:
            if tuple(vec.shape) != (out_f, 1):
                raise AdapterError(f"{where}: ia3_l must be [{out_f}, 1], got {tuple(vec.shape)}")
            w.out_scale[(layer, proj)] = vec[:, 0]
    if not (w.in_scale or w.out_scale):
        raise AdapterError("the adapter holds no (IA)3 vectors")
    w.info.target_modules = sorted({p for _, p in [*w.in_scale, *w.out_scale]})
    return w


def save(path, weights: AdapterWeights, base_model: str = "") -> None:
    """Writes (IA)3 vectors in the PEFT format (PeftModel.from_pretrained reads it)."""
    tensors = {f"{module_name(l, p)}.ia3_l": v[None, :] for (l, p), v in weights.in_scale.items()}
    tensors.update({f"{module_name(l, p)}.ia3_l": v[:, None] for (l, p), v in weights.out_scale.items()})
    ff = sorted({p for _, p in weights.in_scale})
    config = {"peft_type": "IA3", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "target_modules": sorted({p for _, p in [*weights.in_scale, *weights.out_scale]}),
              "feedforward_modules": ff, "fan_in_fan_out": False, "init_ia3_weights": True}
    write_adapter_dir(path, config, tensors)
