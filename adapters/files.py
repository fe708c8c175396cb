"""Adapter directories on disk: adapter_config.json + adapter_model.safetensors, nothing else.

`read_adapter_dir` refuses pickled weight files, unreadable JSON, non-float tensors, NaN/Inf
(the last unless the caller checks the staged rows instead: adapters/staging.py);
`parse_key` maps a PEFT tensor name to (layer, projection, rest); `write_adapter_dir` writes
atomically (temp dir, then rename), so a crash never leaves a half-written adapter.
Nothing here ever unpickles.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from quiver.adapters.mapped import read_safetensors
from quiver.adapters.weights import AdapterInfo
from quiver.server.model import PROJECTIONS

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(?:self_attn|mlp)\.([a-z_]+)\.(.+)$")


class AdapterError(ValueError):
    """The adapter cannot be served; the message says why."""


def read_adapter_dir(path: Path, check_finite: bool = True, mapped: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors as float32). mapped=True: views of a mapping of the weights file
    (adapters/mapped.py), for a caller that stages them and then drops them (staging.rebase);
    otherwise owned copies."""
    path = Path(path)
    config = read_config(path)
    w_path = path / WEIGHTS_NAME
    if not w_path.is_file():
        raise AdapterError(f"{path.name}: missing {WEIGHTS_NAME}")
    try:
        # owned tensors unless mapped: they outlive the file in the adapter cache, and a file
        # rewritten in place under a mapping of it could change served weights or crash (SIGBUS)
        tensors = read_safetensors(w_path) if mapped else load_file(str(w_path))
    except Exception as exc:  # safetensors raises its own error types; the mapped reader ValueError, OSError
        raise AdapterError(f"{path.name}: {WEIGHTS_NAME} is not a readable safetensors file: {exc}") from None
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise AdapterError(f"{path.name}: tensor {name} has dtype {t.dtype}; adapters hold floating point")
        if check_finite and not is_finite(t):
            raise AdapterError(f"{path.name}: tensor {name} holds NaN or Inf")
    return config, {k: v.float() for k, v in tensors.items()}


def is_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in t: one min/max pass in t's own dtype (NaN propagates into both, +-Inf
    is the min or the max), with no temporary and no overflow to settle, as a sum would need."""
    if t.numel() == 0:
        return True
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        t = t.float()
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def read_config(path: Path) -> dict:
    """adapter_config.json of an adapter directory, after refusing pickled weight files."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"{path} is not a directory")
    pickled = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickled:
        raise AdapterError(f"refusing non-safetensors weight files {pickled}: convert them to {WEIGHTS_NAME}")
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise AdapterError(f"{path.name}: missing {CONFIG_NAME}")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path.name}: {CONFIG_NAME} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path.name}: {CONFIG_NAME} must hold a JSON object")
    return config


def summarize_adapter_dir(path: Path):
    """AdapterInfo from the config and file size only (no tensors read): for listings."""
    path = Path(path)
    cfg = read_config(path)
    if not (path / WEIGHTS_NAME).is_file():
        raise AdapterError(f"{path.name}: missing {WEIGHTS_NAME}")
    kind = str(cfg.get("peft_type", "")).lower()
    method = {"lora": "dora" if cfg.get("use_dora") else "lora", "prefix_tuning": "prefix_tuning",
              "prompt_tuning": "prompt_tuning", "p_tuning": "prompt_tuning"}.get(kind, kind)
    targets = cfg.get("target_modules") or []
    return AdapterInfo(path.name, method, rank=int(cfg.get("r") or cfg.get("num_virtual_tokens") or 0),
                       target_modules=[targets] if isinstance(targets, str) else sorted(targets),
                       base_model=cfg.get("base_model_name_or_path"),
                       size_bytes=(path / WEIGHTS_NAME).stat().st_size)


def parse_key(name: str) -> tuple[int, str, str]:
    """'base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight' -> (3, 'q_proj', 'lora_A.weight')."""
    m = KEY_RE.match(name)
    if m is None:
        raise AdapterError(f"tensor {name!r} does not name a decoder layer projection")
    layer, proj, rest = int(m.group(1)), m.group(2), m.group(3)
    if proj not in PROJECTIONS:
        raise AdapterError(f"tensor {name!r} targets {proj!r}; the base model has {list(PROJECTIONS)}")
    return layer, proj, rest


def module_name(layer: int, proj: str, peft: bool = True) -> str:
    """Tensor-name prefix of a projection: PEFT's `base_model.model.model.layers.3.self_attn.q_proj`
    (peft=True) or Quiver's own formats' `model.layers.3.self_attn.q_proj`."""
    block = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"{'base_model.model.' if peft else ''}model.layers.{layer}.{block}.{proj}"


def check_layer(layer: int, n_layers: int, name: str) -> None:
    if layer >= n_layers:
        raise AdapterError(f"tensor {name!r} targets layer {layer}; the base model has {n_layers} layers")


def check_shape(t: torch.Tensor, shape: tuple[int, ...], name: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise AdapterError(f"tensor {name!r} has shape {tuple(t.shape)}; the base model needs {tuple(shape)}")


def write_adapter_dir(path: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_NAME))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
