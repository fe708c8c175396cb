"""(IA)³ in the PEFT format (peft_type "IA3"): learned vectors that rescale activations.

`...{proj}.ia3_l` of shape [out, 1] scales the projection's output (keys, values);
shape [1, in] on a feed-forward module scales its input (the FFN hidden before down_proj).
Apply: y = W (x * l_in) or y = (W x) * l_out, gathered by slot in the batch.
"""

from __future__ import annotations

import torch

from quiver.adapters.base import BaseSpec
from quiver.adapters.files import AdapterError
from quiver.adapters.lora import group_by_module
from quiver.adapters.weights import AdapterInfo, AdapterWeights


def load(adapter_id: str, cfg: dict, tensors: dict[str, torch.Tensor], base: BaseSpec, max_rank: int) -> AdapterWeights:
    ff = set(cfg.get("feedforward_modules") or [])
    w = AdapterWeights(AdapterInfo(adapter_id, "ia3"))
    for (layer, proj), parts in group_by_module(tensors, base).items():
        where = f"layer {layer} {proj}"
        if set(parts) != {"ia3_l"}:
            raise AdapterError(f"{where}: (IA)3 holds only ia3_l, found {sorted(parts)}")
        vec = parts["ia3_l"]
        out_f, in_f = base.shapes[proj]
        if proj in ff or any(proj.endswith(m) for m in ff):
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
