"""Bottleneck (Houlsby-style) adapters, in Quiver's format (PEFT has none).

adapter_config.json: {"peft_type": "BOTTLENECK", "r": 16, "act": "relu"|"gelu"|"silu",
"target_modules": ["o_proj", "down_proj"]}; adapter_model.safetensors, per target:
`model.layers.{i}.{block}.{proj}.adapter_down.weight` [r, out], `adapter_down.bias` [r],
`adapter_up.weight` [out, r], `adapter_up.bias` [out].
Apply to the projection's output y (Houlsby places them after attention's o_proj and after
the FFN's down_proj): y = y + up(act(down(y) + b_down)) + b_up, batched like LoRA by slot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quiver.adapters.base import BaseSpec
from quiver.adapters.files import AdapterError, check_shape, module_name, write_adapter_dir
from quiver.adapters.lora import group_by_module
from quiver.adapters.weights import AdapterInfo, AdapterWeights, Bottleneck, Key

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}
PARTS = {"adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias"}


def load(adapter_id: str, cfg: dict, tensors: dict[str, torch.Tensor], base: BaseSpec, max_rank: int) -> AdapterWeights:
    act = cfg.get("act", "relu")
    if act not in ACTIVATIONS:
        raise AdapterError(f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
    w = AdapterWeights(AdapterInfo(adapter_id, "bottleneck"))
    for (layer, proj), parts in group_by_module(tensors, base).items():
        where = f"layer {layer} {proj}"
        if set(parts) != PARTS:
            raise AdapterError(f"{where}: a bottleneck needs {sorted(PARTS)}, found {sorted(parts)}")
        out_f = base.shapes[proj][0]
        r = parts["adapter_down.weight"].shape[0]
        if r > max_rank:
            raise AdapterError(f"{where}: bottleneck size {r} is above this server's maximum {max_rank}")
        check_shape(parts["adapter_down.weight"], (r, out_f), f"{where} adapter_down.weight")
        check_shape(parts["adapter_down.bias"], (r,), f"{where} adapter_down.bias")
        check_shape(parts["adapter_up.weight"], (out_f, r), f"{where} adapter_up.weight")
        check_shape(parts["adapter_up.bias"], (out_f,), f"{where} adapter_up.bias")
        w.bottleneck[(layer, proj)] = Bottleneck(parts["adapter_down.weight"], parts["adapter_down.bias"],
                                                 parts["adapter_up.weight"], parts["adapter_up.bias"], act)
    if not w.bottleneck:
        raise AdapterError("the adapter holds no bottleneck weights")
    w.info.rank = max(b.rank for b in w.bottleneck.values())
    w.info.target_modules = sorted({p for _, p in w.bottleneck})
    return w


def reference_apply(y: torch.Tensor, bn: Bottleneck) -> torch.Tensor:
    """y [T, out] -> y + up(act(down(y) + b_down)) + b_up (the method's definition)."""
    h = ACTIVATIONS[bn.act](y @ bn.down.T.to(y.dtype) + bn.down_bias.to(y.dtype))
    return y + h @ bn.up.T.to(y.dtype) + bn.up_bias.to(y.dtype)


def save(path, blocks: dict[Key, Bottleneck], act: str, base_model: str = "") -> None:
    tensors = {}
    for (l, p), bn in blocks.items():
        pre = module_name(l, p, peft=False)
        tensors.update({f"{pre}.adapter_down.weight": bn.down, f"{pre}.adapter_down.bias": bn.down_bias,
                        f"{pre}.adapter_up.weight": bn.up, f"{pre}.adapter_up.bias": bn.up_bias})
    r = max(bn.rank for bn in blocks.values())
    write_adapter_dir(path, {"peft_type": "BOTTLENECK", "r": r, "act": act,
                             "target_modules": sorted({p for _, p in blocks}), "base_model_name_or_path": base_model},
                      tensors)
