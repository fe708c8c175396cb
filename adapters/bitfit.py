"""BitFit bias deltas, in Quiver's format (PEFT has none).

adapter_config.json: {"peft_type": "BITFIT", "target_modules": ["q_proj", ...],
"base_model_name_or_path": ...}; adapter_model.safetensors:
`model.layers.{i}.{self_attn|mlp}.{proj}.bias_delta` [out]. Apply: y += delta[slot].
(BitFit trains the existing biases; Llama projections have none, so the learned bias is the
delta.) Reference: the base projection with `bias = delta` gives the same output.
"""

from __future__ import annotations

import torch

from quiver.adapters.base import BaseSpec
from quiver.adapters.files import AdapterError, check_shape, module_name, write_adapter_dir
from quiver.adapters.lora import group_by_module
from quiver.adapters.weights import AdapterInfo, AdapterWeights, Key


def load(adapter_id: str, cfg: dict, tensors: dict[str, torch.Tensor], base: BaseSpec, max_rank: int) -> AdapterWeights:
    w = AdapterWeights(AdapterInfo(adapter_id, "bitfit"))
    for (layer, proj), parts in group_by_module(tensors, base).items():
        if set(parts) != {"bias_delta"}:
            raise AdapterError(f"layer {layer} {proj}: BitFit holds only bias_delta, found {sorted(parts)}")
        check_shape(parts["bias_delta"], (base.shapes[proj][0],), f"layer {layer} {proj} bias_delta")
        w.out_add[(layer, proj)] = parts["bias_delta"]
    if not w.out_add:
        raise AdapterError("the adapter holds no bias deltas")
    w.info.target_modules = sorted({p for _, p in w.out_add})
    return w


def save(path, deltas: dict[Key, torch.Tensor], base_model: str = "") -> None:
    tensors = {f"{module_name(l, p, peft=False)}.bias_delta": t for (l, p), t in deltas.items()}
    write_adapter_dir(path, {"peft_type": "BITFIT", "target_modules": sorted({p for _, p in deltas}),
                             "base_model_name_or_path": base_model}, tensors)
