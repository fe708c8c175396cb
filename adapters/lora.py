"""LoRA, rsLoRA and DoRA in the Hugging Face PEFT format (peft_type "LORA").

Files: `...layers.{i}.{self_attn|mlp}.{proj}.lora_A.weight` [r, in], `lora_B.weight` [out, r],
and for DoRA `lora_magnitude_vector` [out]. Scale = alpha / r (alpha / sqrt(r) with
use_rslora); rank_pattern / alpha_pattern override r and alpha per module.
Apply: y += scale * B (A x). DoRA: y = s * (W x + scale * B A x) + b with
s = m / ||W + scale * B A||_row, computed once at load from the (dequantized) base weight.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from quiver.adapters.base import BaseSpec
from quiver.adapters.files import AdapterError, check_layer, check_shape, module_name, parse_key, write_adapter_dir
from quiver.adapters.weights import AdapterInfo, AdapterWeights, LoraDelta


@dataclass
class LoraConfig:
    r: int = 8
    lora_alpha: float = 8.0
    use_rslora: bool = False
    use_dora: bool = False
    target_modules: list[str] = field(default_factory=list)
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    fan_in_fan_out: bool = False
    bias: str = "none"

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise AdapterError(f"r must be positive, got {self.r}")
        if self.fan_in_fan_out:
            raise AdapterError("fan_in_fan_out (Conv1D-style weights) is not used by Llama-family models")
        if self.bias != "none":
            raise AdapterError(f"LoRA bias={self.bias!r} is not supported (use a BitFit adapter for bias deltas)")

    @classmethod
    def from_json(cls, cfg: dict) -> "LoraConfig":
        tm = cfg.get("target_modules") or []
        return cls(r=int(cfg.get("r", 8)), lora_alpha=float(cfg.get("lora_alpha", 8)),
                   use_rslora=bool(cfg.get("use_rslora", False)), use_dora=bool(cfg.get("use_dora", False)),
                   target_modules=[tm] if isinstance(tm, str) else list(tm),
                   rank_pattern=cfg.get("rank_pattern") or {}, alpha_pattern=cfg.get("alpha_pattern") or {},
                   fan_in_fan_out=bool(cfg.get("fan_in_fan_out", False)), bias=cfg.get("bias", "none") or "none")


def pattern_value(patterns: dict, name: str, default):
    """PEFT's rule: a pattern key matches the full module name or a dotted suffix of it."""
    for key, value in patterns.items():
        if name == key or re.fullmatch(rf"(.*\.)?{key}", name):
            return value
    return default


def lora_scale(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def group_by_module(tensors: dict[str, torch.Tensor], base: BaseSpec) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    groups: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        layer, proj, rest = parse_key(name)
        check_layer(layer, base.n_layers, name)
        groups.setdefault((layer, proj), {})[rest] = t
    return groups


def load(adapter_id: str, cfg: dict, tensors: dict[str, torch.Tensor], base: BaseSpec, max_rank: int) -> AdapterWeights:
    config = LoraConfig.from_json(cfg)
    w = AdapterWeights(AdapterInfo(adapter_id, "dora" if config.use_dora else "lora"))
    for (layer, proj), parts in group_by_module(tensors, base).items():
        where = f"layer {layer} {proj}"
        if "lora_A.weight" not in parts or "lora_B.weight" not in parts:
            raise AdapterError(f"{where}: needs lora_A.weight and lora_B.weight, found {sorted(parts)}")
        a, b = parts["lora_A.weight"], parts["lora_B.weight"]
        out_f, in_f = base.shapes[proj]
        r = a.shape[0]
        if r > max_rank:
            raise AdapterError(f"{where}: rank {r} is above this server's maximum {max_rank}")
        check_shape(a, (r, in_f), f"{where} lora_A")
        check_shape(b, (out_f, r), f"{where} lora_B")
        alpha = float(pattern_value(config.alpha_pattern, module_name(layer, proj, peft=False), config.lora_alpha))
        scale = lora_scale(alpha, r, config.use_rslora)
        w.lora[(layer, proj)] = LoraDelta(a, b, scale)
        if config.use_dora:
            m = parts.get("lora_magnitude_vector", parts.get("lora_magnitude_vector.weight"))
            if m is None:
                raise AdapterError(f"{where}: use_dora is set but lora_magnitude_vector is missing")
            check_shape(m, (out_f,), f"{where} lora_magnitude_vector")
            dense = base.dense_weight(layer, proj).cpu() + scale * (b @ a)
            s = m / dense.norm(dim=1)
            w.out_scale[(layer, proj)] = s
            bias = base.bias(layer, proj)
            if bias is not None:
                w.out_add[(layer, proj)] = (1 - s) * bias.cpu()
    if not w.lora:
        raise AdapterError("the adapter holds no LoRA weights")
    w.info.rank = max(d.rank for d in w.lora.values())
    w.info.target_modules = sorted({p for _, p in w.lora})
    return w


def save_lora(path, deltas: dict[tuple[int, str], LoraDelta], base_model: str = "") -> None:
    """Writes LoRA deltas in the PEFT format (PeftModel.from_pretrained reads it).

    Each delta's scale is folded into B and its module gets alpha = rank (scale 1) through
    rank_pattern / alpha_pattern, so any mix of ranks and scales (AdaLoRA, mixes) round-trips.
    """
    r = max(d.rank for d in deltas.values())
    tensors, rank_pattern, alpha_pattern = {}, {}, {}
    for (layer, proj), d in deltas.items():
        prefix = module_name(layer, proj)
        tensors[f"{prefix}.lora_A.weight"] = d.a
        tensors[f"{prefix}.lora_B.weight"] = d.b * d.scale
        if d.rank != r:
            name = module_name(layer, proj, peft=False)
            rank_pattern[name] = alpha_pattern[name] = d.rank
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r,
              "target_modules": sorted({p for _, p in deltas}), "base_model_name_or_path": base_model,
              "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "bias": "none",
              "use_rslora": False, "use_dora": False}
    write_adapter_dir(path, config, tensors)
