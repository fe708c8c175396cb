"""Adapter directories on disk: adapter_config.json + adapter_model.safetensors, nothing else.

`read_adapter_dir` refuses pickled weight files, unreadable JSON, non-float tensors, NaN/Inf
(the last unless the caller checks the staged rows instead: adapters/staging.py);
`read_safetensors` maps the weights file and returns its tensors as views of the mapping (no
read into a second buffer: the staging copies read the page cache directly), after checking
every header entry against the file;
`parse_key` maps a PEFT tensor name to (layer, projection, rest); `write_adapter_dir` writes
atomically (temp dir, then rename), so a crash never leaves a half-written adapter.
Nothing here ever unpickles.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from quiver.adapters.weights import AdapterInfo
from quiver.server.model import PROJECTIONS

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
MAX_HEADER = 100 << 20  # bytes of JSON header, as the safetensors library allows
KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(?:self_attn|mlp)\.([a-z_]+)\.(.+)$")


class AdapterError(ValueError):
    """The adapter cannot be served; the message says why."""


def read_adapter_dir(path: Path, check_finite: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    path = Path(path)
    config = read_config(path)
    w_path = path / WEIGHTS_NAME
    if not w_path.is_file():
        raise AdapterError(f"{path.name}: missing {WEIGHTS_NAME}")
    try:
        tensors = read_safetensors(w_path)
    except (ValueError, OSError) as exc:
        raise AdapterError(f"{path.name}: {WEIGHTS_NAME} is not a readable safetensors file: {exc}") from None
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise AdapterError(f"{path.name}: tensor {name} has dtype {t.dtype}; adapters hold floating point")
        if check_finite and not is_finite(t):
            raise AdapterError(f"{path.name}: tensor {name} holds NaN or Inf")
    return config, {k: v.float() for k, v in tensors.items()}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as views of a private mapping of it (ValueError when
    the header does not describe the file: bounds, sizes, overlaps, dtypes). Writes to the
    views stay in this process; the file is replaced, never rewritten in place, by
    write_adapter_dir, so a mapping always sees one whole version."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise ValueError(f"{size} bytes, shorter than a header")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(MAX_HEADER, size - 8):
            raise ValueError(f"header of {n} bytes in a file of {size}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"header is not JSON: {exc}") from None
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        start, data_len = 8 + n, size - 8 - n
        entries = []
        for name, e in header.items():
            if name == "__metadata__":
                continue
            entries.append((name, *_entry(name, e, data_len)))
        entries.sort(key=lambda x: x[3])
        for (a, *_, a_end), (b, _, _, b_start, _) in zip(entries, entries[1:]):
            if b_start < a_end:
                raise ValueError(f"tensors {a!r} and {b!r} overlap")
        buf = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE) if size else None
    out = {}
    for name, dtype, shape, lo, hi in entries:
        count = hi - lo
        if count == 0:
            out[name] = torch.empty(shape, dtype=dtype)
        elif (start + lo) % dtype.itemsize:  # unaligned for its dtype: copy it out
            out[name] = torch.frombuffer(bytearray(buf[start + lo:start + hi]), dtype=dtype).view(shape)
        else:
            out[name] = torch.frombuffer(buf, dtype=dtype, count=count // dtype.itemsize, offset=start + lo).view(shape)
    return out


def _entry(name: str, e, data_len: int) -> tuple[torch.dtype, list[int], int, int]:
    """(dtype, shape, begin, end) of one header entry, checked against the data's length."""
    if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
        raise ValueError(f"header entry {name!r} is not {{dtype, shape, data_offsets}}")
    dtype = SAFETENSORS_DTYPES.get(e["dtype"])
    if dtype is None:
        raise ValueError(f"tensor {name!r} has unknown dtype {e['dtype']!r}")
    shape, offsets = e["shape"], e["data_offsets"]
    ints = lambda v, n=None: isinstance(v, list) and (n is None or len(v) == n) and all(  # noqa: E731
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v)
    if not ints(shape) or not ints(offsets, 2):
        raise ValueError(f"tensor {name!r}: shape and data_offsets must be lists of non-negative integers")
    lo, hi = offsets
    if not lo <= hi <= data_len:
        raise ValueError(f"tensor {name!r}: data_offsets {offsets} outside the {data_len} data bytes")
    if hi - lo != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"tensor {name!r}: {hi - lo} bytes for shape {shape} of {e['dtype']}")
    return dtype, shape, lo, hi


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
