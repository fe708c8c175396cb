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

import math

import torch

from quiver.adapters.weights import AdapterWeights

VECTOR_TABLES = ("in_scale", "out_scale", "out_add")
BULK_ROWS = True  # an adapter on every layer at one rank: bulk conversions (False: layer by layer)
FILL = {"in_scale": 1.0, "out_scale": 1.0, "out_add": 0.0}  # a slot (or layer) without the vector


def _empty(shape, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


def lora_rows(w: AdapterWeights, name: str, n_layers: int, rank: int, dtype: torch.dtype, alloc=_empty):
    """alloc(shape, dtype) -> uninitialized tensor: every element is written here."""
    cached = _cached(w, ("lora", name), dtype, rank)
    if cached is not None:
        return cached
    deltas = {layer: d for (layer, n), d in w.lora.items() if n == name}
    if max(deltas) >= n_layers:
        raise ValueError(f"{w.info.adapter_id}: {name} LoRA in layer {max(deltas)}; the base has {n_layers} layers")
    d0 = next(iter(deltas.values()))
    in_f, out_f = d0.a.shape[1], d0.b.shape[0]
    a = alloc((n_layers, rank, in_f), dtype)
    b = alloc((n_layers, out_f, rank), dtype)
    ranks, scaling, has = alloc((n_layers,), torch.int32), alloc((n_layers,), torch.float32), alloc((n_layers,), torch.bool)
    r0 = d0.rank
    if BULK_ROWS and a.device.type != "meta" and len(deltas) == n_layers and all(d.rank == r0 for d in deltas.values()):
        # every layer at one rank (the usual adapter): two large conversions instead of 2 per layer
        # (a small copy costs its fixed overhead on a many-core host: 12 ms for 256 of them)
        order = [deltas[layer] for layer in range(n_layers)]
        a[:, :r0].copy_(torch.stack([d.a for d in order]))
        b[:, :, :r0].copy_(torch.stack([d.b for d in order]))
        a[:, r0:].zero_()
        b[:, :, r0:].zero_()
        ranks.fill_(r0), has.fill_(True)
        scaling.copy_(torch.tensor([float(d.scale) for d in order]))
        return a, b, ranks, scaling, has
    ranks.fill_(1), scaling.zero_(), has.zero_()
    for layer in range(n_layers):
        d = deltas.get(layer)
        r = 0 if d is None else d.rank
        if d is not None:
            a[layer, :r] = d.a
            b[layer, :, :r] = d.b
            ranks[layer], scaling[layer], has[layer] = r, d.scale, True
        a[layer, r:].zero_()
        b[layer, :, r:].zero_()
    return a, b, ranks, scaling, has


def vector_rows(w: AdapterWeights, kind: str, name: str, n_layers: int, dims: dict[str, tuple[int, int]],
                dtype: torch.dtype, alloc=_empty):
    cached = _cached(w, (kind, name), dtype)
    if cached is not None:
        return cached
    v = alloc((n_layers, vector_dim(dims, kind, name)), dtype)
    has = alloc((n_layers,), torch.bool)
    v.fill_(FILL[kind]), has.zero_()
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
    """Builds every bank row of w (and its prefix KV) in one pinned buffer; dims: name -> (out, in).
    The rows are written straight into the buffer: a first pass over meta tensors sizes it."""
    w.staged = {}
    sizes: dict[torch.dtype, int] = {}

    def count(shape, dt):
        sizes[dt] = sizes.get(dt, 0) + math.prod(shape)
        return torch.empty(shape, dtype=dt, device="meta")

    _build(w, dtype, rank, n_layers, dims, count)
    pin = torch.cuda.is_available()
    buffers = {dt: [torch.empty(n, dtype=dt, pin_memory=pin), 0] for dt, n in sizes.items()}

    def take(shape, dt):
        buf = buffers[dt]
        n = math.prod(shape)
        view = buf[0][buf[1]:buf[1] + n].view(shape)
        buf[1] += n
        return view

    w.staged = _build(w, dtype, rank, n_layers, dims, take)


def _build(w: AdapterWeights, dtype: torch.dtype, rank: int, n_layers: int, dims: dict, alloc) -> dict:
    parts: dict = {}
    for name in names(w.lora):
        parts[("lora", name)] = lora_rows(w, name, n_layers, rank, dtype, alloc)
    for kind in VECTOR_TABLES:
        for name in names(getattr(w, kind)):
            parts[(kind, name)] = vector_rows(w, kind, name, n_layers, dims, dtype, alloc)
    if w.prefix_kv is not None:
        kv = alloc(tuple(w.prefix_kv.shape), dtype)
        kv.copy_(w.prefix_kv)
        parts[("prefix",)] = (kv,)
    return parts
