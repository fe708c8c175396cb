"""An adapter's tensors laid out as the slot pool stores them, per projection name over all layers.

The pool keeps one bank per projection name (SlotPool: LoRA A [L, S, R, in], B [L, S, out, R],
ranks/scaling [L, S], vectors [L, S, dim]). Loading an adapter into slot s is then one copy per
bank: bank[:, s] <- rows, with rows built here:

    lora_rows(w, name, L, R, dtype) -> (A [L, R, in], B [L, out, R], ranks [L] int32,
                                        scaling [L] float32, has [L] bool)
        zero padding beyond each layer's rank and in layers the adapter does not touch
    vector_rows(w, kind, name, L, dims, dtype) -> (V [L, dim], has [L])   kind: in_scale | out_scale | out_add
        FILL[kind] (1 for scales, 0 for biases) in layers without a vector

`stage(w, dtype, R, L, dims, check, arena)` builds all of them once, off the engine thread, in
ONE page-locked buffer, so the engine thread only queues asynchronous copies. The buffer is a
range of a PinnedArena (adapters/pinned.py: pinned once at start) while it has room: pinning
per adapter costs 12-20 ms. The A and B copies of all projections run on FILL_THREADS threads.
With check=True it also refuses NaN/Inf (AdapterError) with one min/max pass over that buffer
instead of one per file tensor: this checks what is served, in the serving dtype, so a float32
value beyond its range (an fp16 overflow) is refused too. Unstaged adapters (CPU serving), or
staged for another pool rank or dtype, get their rows built at load time instead.

`rebase(w)` then points w's own tensors at those rows (views in the serving dtype) and copies
the few it serves unstaged: an adapter read as views of its mapped file (adapters/mapped.py)
keeps nothing of the file, and the CPU tier holds its rows once, not a float32 copy beside them.
"""

from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor

import torch

from quiver.adapters.files import AdapterError, is_finite
from quiver.adapters.pinned import ALIGN, PinnedArena
from quiver.adapters.weights import AdapterWeights, Bottleneck, LoraDelta

VECTOR_TABLES = ("in_scale", "out_scale", "out_add")
SERVED_UNSTAGED = ("bottleneck", "soft prompt")  # AdapterWeights.named_tensors kinds that stage() leaves alone
FILL_THREADS = 8  # row copies (A, B of each projection) staged in parallel (1: one after another)
FILL = {"in_scale": 1.0, "out_scale": 1.0, "out_add": 0.0}  # a slot (or layer) without the vector


def _empty(shape, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


def lora_rows(w: AdapterWeights, name: str, n_layers: int, rank: int, dtype: torch.dtype, alloc=_empty,
              defer: list | None = None):
    """alloc(shape, dtype) -> uninitialized tensor: every element is written here (by a job
    appended to defer instead, when given: stage runs the jobs of all projections in parallel).

    The layers' A and B go into their rows in one multi-tensor copy each (torch._foreach_copy_:
    one call converts every layer, no per-layer Python op and no stacked temporary); padding
    beyond a layer's rank, and layers the adapter leaves alone, are zeroed."""
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
    if a.device.type == "meta":  # stage's sizing pass
        return a, b, ranks, scaling, has
    jobs = [functools.partial(_fill_rows, a, "a", deltas, n_layers), functools.partial(_fill_rows, b, "b", deltas, n_layers),
            functools.partial(_fill_layers, ranks, scaling, has, deltas, n_layers)]
    for job in jobs:
        job() if defer is None else defer.append(job)
    return a, b, ranks, scaling, has


def _fill_rows(rows: torch.Tensor, which: str, deltas: dict, n_layers: int) -> None:
    """rows [L, R, in] <- each layer's A (which="a"), or [L, out, R] <- B: one multi-tensor copy."""
    layers = sorted(deltas)
    r_of = [deltas[layer].rank for layer in layers]
    pad = (lambda r: rows[:, r:]) if which == "a" else (lambda r: rows[:, :, r:])  # noqa: E731
    part = (lambda layer, r: rows[layer, :r]) if which == "a" else (lambda layer, r: rows[layer, :, :r])  # noqa: E731
    if len(layers) == n_layers and min(r_of) == max(r_of):  # the usual adapter: zero only the rank padding
        pad(r_of[0]).zero_()
    else:
        rows.zero_()
    torch._foreach_copy_([part(layer, r) for layer, r in zip(layers, r_of)], [getattr(deltas[layer], which) for layer in layers])


def _fill_layers(ranks, scaling, has, deltas: dict, n_layers: int) -> None:
    """Per layer: rank, scaling, has; layers without this LoRA: rank 1 over zero rows, scaling 0, has False."""
    ranks.copy_(torch.tensor([deltas[layer].rank if layer in deltas else 1 for layer in range(n_layers)]))
    scaling.copy_(torch.tensor([float(deltas[layer].scale) if layer in deltas else 0.0 for layer in range(n_layers)]))
    has.copy_(torch.tensor([layer in deltas for layer in range(n_layers)]))


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


def stage(w: AdapterWeights, dtype: torch.dtype, rank: int, n_layers: int, dims: dict[str, tuple[int, int]],
          check: bool = False, arena: PinnedArena | None = None) -> None:
    """Builds every bank row of w (and its prefix KV) in one pinned buffer; dims: name -> (out, in).
    The rows are written straight into the buffer: a first pass over meta tensors sizes it.
    The buffer is a range of arena (adapters/pinned.py: pinned once, handed back when w is
    dropped) while it has room, else a page-locked allocation of its own.
    check: raise AdapterError (and stage nothing) if a staged row, or a tensor served unstaged
    (bottleneck, soft prompt), holds NaN or Inf."""
    w.staged = {}
    sizes: dict[torch.dtype, int] = {}

    def count(shape, dt):
        sizes[dt] = sizes.get(dt, 0) + math.prod(shape)
        return torch.empty(shape, dtype=dt, device="meta")

    _build(w, dtype, rank, n_layers, dims, count)
    starts, total = {}, 0
    for dt, n in sizes.items():  # one byte range per dtype, each ALIGN-aligned
        starts[dt] = total
        total += -(-n * dt.itemsize // ALIGN) * ALIGN
    region = arena.take(total, w) if arena is not None and total else None
    if region is None:
        region = torch.empty(total, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
    buffers = {dt: [region[starts[dt]:starts[dt] + n * dt.itemsize].view(dt), 0] for dt, n in sizes.items()}

    def take(shape, dt):
        buf = buffers[dt]
        n = math.prod(shape)
        view = buf[0][buf[1]:buf[1] + n].view(shape)
        buf[1] += n
        return view

    jobs: list = []
    w.staged = _build(w, dtype, rank, n_layers, dims, take, jobs)
    if FILL_THREADS > 1 and len(jobs) > 1:  # the ops release the GIL; few cores each (small tensors)
        for future in [_executor().submit(job) for job in jobs]:
            future.result()
    else:
        for job in jobs:
            job()
    if check:
        served = [buf for dt, (buf, _) in buffers.items() if dt.is_floating_point]
        served += [t for kind, _, t in w.named_tensors() if kind in SERVED_UNSTAGED]
        if not all(is_finite(t) for t in served):
            w.staged = {}
            raise AdapterError(f"{w.info.adapter_id}: {_non_finite(w, dtype)}")


def rebase(w: AdapterWeights) -> None:
    """After stage(w, ...): w's LoRA deltas, vectors and prefix KV become views of its staged
    rows (its pinned range stays w's until w is dropped), and its bottleneck and soft-prompt
    tensors owned copies. Nothing of w then refers to the memory it was read into."""
    for (layer, name), d in list(w.lora.items()):
        a, b = w.staged[("lora", name)][:2]
        w.lora[(layer, name)] = LoraDelta(a[layer, :d.rank], b[layer, :, :d.rank], d.scale)
    for kind in VECTOR_TABLES:
        table = getattr(w, kind)
        for layer, name in list(table):
            table[(layer, name)] = w.staged[(kind, name)][0][layer]
    if w.prefix_kv is not None:
        w.prefix_kv = w.staged[("prefix",)][0]
    for key, bn in list(w.bottleneck.items()):
        w.bottleneck[key] = Bottleneck(bn.down.clone(), bn.down_bias.clone(), bn.up.clone(), bn.up_bias.clone(), bn.act)
    if w.prompt_embeds is not None:
        w.prompt_embeds = w.prompt_embeds.clone()


def _non_finite(w: AdapterWeights, dtype: torch.dtype) -> str:
    """Why w's served rows are not finite: where its float32 tensors hold NaN or Inf, else the range."""
    for kind, key, t in w.named_tensors():
        if not is_finite(t):
            return f"{f'layer {key[0]} {key[1]} ' if key else ''}{kind} holds NaN or Inf"
    return f"values beyond the range of {str(dtype).removeprefix('torch.')}, the serving dtype"


@functools.lru_cache(maxsize=1)
def _executor() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(FILL_THREADS, thread_name_prefix="quiver-stage")


def _build(w: AdapterWeights, dtype: torch.dtype, rank: int, n_layers: int, dims: dict, alloc,
           defer: list | None = None) -> dict:
    parts: dict = {}
    for name in names(w.lora):
        parts[("lora", name)] = lora_rows(w, name, n_layers, rank, dtype, alloc, defer)
    for kind in VECTOR_TABLES:
        for name in names(getattr(w, kind)):
            parts[(kind, name)] = vector_rows(w, kind, name, n_layers, dims, dtype, alloc)
    if w.prefix_kv is not None:
        kv = alloc(tuple(w.prefix_kv.shape), dtype)
        kv.copy_(w.prefix_kv)
        parts[("prefix",)] = (kv,)
    return parts
