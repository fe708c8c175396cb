"""An adapter's tensors laid out as the slot pool stores them, per projection name over all layers.

The pool keeps one bank per projection name (SlotPool: LoRA A [L, S, R, in], B [L, S, out, R],
ranks/scaling [L, S], vectors [L, S, dim]). Loading an adapter into slot s is then one copy per
bank: bank[:, s] <- rows, with rows built here:

    lora_rows(w, name, L, R, dtype) -> (A [L, R, in], B [L, out, R], ranks [L] int32,
                                        scaling [L] float32, has [L] bool)
        zero padding beyond each layer's rank and in layers the adapter does not touch
    vector_rows(w, kind, name, L, dims, dtype) -> (V [L, dim], has [L])   kind: in_scale | out_scale | out_add
        FILL[kind] (1 for scales, 0 for biases) in layers without a vector

`stage(w, dtype, R, L)` builds all of them once, off the engine thread, in ONE page-locked buffer
(pinning is a costly allocation; one per adapter), so the engine thread only queues asynchronous
copies. Unstaged adapters (CPU serving), or staged for another pool rank or dtype, get their
rows built at load time instead.
"""

from __future__ import annotations

import torch

from quiver.adapters.weights import AdapterWeights

VECTOR_TABLES = ("in_scale", "out_scale", "out_add")
FILL = {"in_scale": 1.0, "out_scale": 1.0, "out_add": 0.0}  # a slot (or layer) without the vector


def lora_rows(w: AdapterWeights, name: str, n_layers: int, rank: int, dtype: torch.dtype):
    cached = _cached(w, ("lora", name), dtype, rank)
    if cached is not None:
        return cached
    deltas = {layer: d for (layer, n), d in w.lora.items() if n == name}
    d0 = next(iter(deltas.values()))
    in_f, out_f = d0.a.shape[1], d0.b.shape[0]
    a = torch.zeros(n_layers, rank, in_f, dtype=dtype)
    b = torch.zeros(n_layers, out_f, rank, dtype=dtype)
    ranks = torch.ones(n_layers, dtype=torch.int32)
    scaling = torch.zeros(n_layers, dtype=torch.float32)
    has = torch.zeros(n_layers, dtype=torch.bool)
    for layer, d in deltas.items():
        a[layer, :d.rank] = d.a
        b[layer, :, :d.rank] = d.b
        ranks[layer], scaling[layer], has[layer] = d.rank, d.scale, True
    return a, b, ranks, scaling, has


def vector_rows(w: AdapterWeights, kind: str, name: str, n_layers: int, dims: dict[str, tuple[int, int]],
                dtype: torch.dtype):
    cached = _cached(w, (kind, name), dtype)
    if cached is not None:
        return cached
    v = torch.full((n_layers, vector_dim(dims, kind, name)), FILL[kind], dtype=dtype)
    has = torch.zeros(n_layers, dtype=torch.bool)
    for (layer, n), vec in getattr(w, kind).items():
        if n == name:
            v[layer] = vec
            has[layer] = True
    return v, has


def vector_dim(dims: dict[str, tuple[int, int]], kind: str, name: str) -> int:
    """Length of a `kind` vector on projection `name` (dims: name -> (out, in))."""
    return dims[name][1 if kind == "in_scale" else 0]


def _cached(w: AdapterWeights, key: tuple, dtype: torch.dtype, rank: int | None = None):
    """Staged rows of w when they fit (dtype, and rank for LoRA): a pool of another rank builds its own."""
    rows = w.staged.get(key)
    if rows is None or rows[0].dtype != dtype or (rank is not None and rows[0].shape[1] != rank):
        return None
    return rows


def names(keys) -> list[str]:
    return sorted({n for _, n in keys})


def stage(w: AdapterWeights, dtype: torch.dtype, rank: int, n_layers: int, dims: dict[str, tuple[int, int]]) -> None:
    """Builds every bank row of w (and its prefix KV) in one pinned buffer; dims: name -> (out, in)."""
    w.staged = {}
    parts: dict = {}
    for name in names(w.lora):
        parts[("lora", name)] = lora_rows(w, name, n_layers, rank, dtype)
    for kind in VECTOR_TABLES:
        for name in names(getattr(w, kind)):
            parts[(kind, name)] = vector_rows(w, kind, name, n_layers, dims, dtype)
    if w.prefix_kv is not None:
        parts[("prefix",)] = (w.prefix_kv.to(dtype),)
    w.staged = _pin_all(parts)


def _pin_all(parts: dict) -> dict:
    """The same tuples of tensors, as views of one page-locked buffer per dtype (when CUDA exists)."""
    pin = torch.cuda.is_available()
    flat = [t for tensors in parts.values() for t in tensors]
    buffers = {}
    for dt in {t.dtype for t in flat}:
        size = sum(t.numel() for t in flat if t.dtype == dt)
        buffers[dt] = [torch.empty(size, dtype=dt, pin_memory=pin), 0]
    out = {}
    for key, tensors in parts.items():
        views = []
        for t in tensors:
            buf = buffers[t.dtype]
            view = buf[0][buf[1]:buf[1] + t.numel()].view(t.shape)
            buf[1] += t.numel()
            view.copy_(t)
            views.append(view)
        out[key] = tuple(views)
    return out
