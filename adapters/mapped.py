"""A safetensors file's tensors as views of a private mapping of it, for one staging pass.

`read_safetensors(path)` checks every header entry against the file (bounds, sizes, overlaps,
dtypes: ValueError otherwise) and returns views of the mapping, so the staging copies
(adapters/staging.py) read the page cache directly instead of a second buffer first.

The views are for the load that made them and nothing after it: `staging.rebase` points the
adapter at its staged rows once they are built, and the mapping goes with the last view. The
window in which a file truncated in place can fault the process (SIGBUS) is then the staging
copy alone, as it is for safetensors' own `load_file`, which reads through a mapping too.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
MAX_HEADER = 100 << 20  # bytes of JSON header, as the safetensors library allows


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as views of a private mapping of it (ValueError when
    the header does not describe the file). Writes to the views stay in this process."""
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
