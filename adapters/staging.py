"""An adapter's tensors laid out as the slot pool stores them, per projection name over all layers.

The pool keeps one bank per projection name (SlotPool: LoRA A [L, S, R, in], B [L, S, out, R],
ranks/scaling [L, S], vectors [L, S, dim]). Loading an adapter into slot s is then one copy per
bank: bank[:, s] <- rows, with rows built here:

    lora_rows(w, name, L, R, dtype) -> (A [L, R, in], B [L, out, R], ranks [L] int32,
                                        scaling [L] float32, has [L] bool)
        zero padding beyond each layer's rank and in layers the adapter does not touch
    vector_rows(w.out_scale (or in_scale, out_add), name, L, dim, fill, dtype) -> (V [L, dim], has [L])
        fill (1 for scales, 0 for biases) in layers without a vector

`stage(w, dtype, R, L)` builds all of them once, off the engine thread, in ONE page-locked buffer
(pinning is a costly allocation; one per adapter), so the engine thread only queues asynchronous
copies. Unstaged adapters (CPU serving) get their rows built at load time instead.
"""

from __future__ import annotations

import torch

from quiver.adapters.weights import AdapterWeights

VECTOR_TABLES = ("in_scale", "out_scale", "out_add")


def lora_rows(w: AdapterWeights, name: str, n_layers: int, rank: int, dtype: torch.dtype):
    cached = w.staged.get(("lora", name))
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


def vector_rows(table: dict, name: str, n_layers: int, dim: int, fill: float, dtype: torch.dtype):
    v = torch.full((n_layers, dim), fill, dtype=dtype)
    has = torch.zeros(n_layers, dtype=torch.bool)
    for (layer, n), vec in table.items():
        if n == name:
            v[layer] = vec
            has[layer] = True
    return v, has


def names(keys) -> list[str]:
    return sorted({n for _, n in keys})


def stage(w: AdapterWeights, dtype: torch.dtype, rank: int, n_layers: int, dims: dict[str, tuple[int, int]]) -> None:
    """Builds every bank row of w (and its prefix KV) in one pinned buffer; dims: name -> (out, in)."""
    parts: dict = {}
    for name in names(w.lora):
        parts[("lora", name)] = lora_rows(w, name, n_layers, rank, dtype)
    for kind in VECTOR_TABLES:
        table = getattr(w, kind)
        for name in names(table):
            dim = dims[name][1 if kind == "in_scale" else 0]
            parts[(kind, name)] = vector_rows(table, name, n_layers, dim, 0.0 if kind == "out_add" else 1.0, dtype)
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
