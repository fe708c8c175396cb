"""Adapter store and tiers: disk (every directory under --adapter-dir) -> CPU (LRU of loaded
AdapterWeights) -> accelerator slots (SlotPool), plus the engine-side hooks.

Service side (gRPC threads): `resolve(id)` / `resolve_mix(parts)` read, validate and (on CUDA)
stage from disk into the CPU tier on the caller's thread, so a cold adapter's disk load never
stalls the engine; unknown ids raise KeyError (-> NOT_FOUND), invalid files AdapterError. On
CUDA the weights file is mapped and read once, by the copies that stage its rows into a pinned
arena (adapters/pinned.py); the NaN/Inf check runs once over those rows instead of once per
file tensor, and the CPU tier then keeps the staged rows alone (adapters/staging.py `rebase`),
with nothing left of the file's mapping.
Engine side (engine thread): `acquire(seq)` at submission, `admit(seq)` when the scheduler
wants to start it (copies CPU -> slot, evicting the LRU idle slot; prefix-tuning KV goes into
shared ref-counted KV blocks), `prepare(scheduled)` builds the step's AdapterBatch,
`release(seq)` at the end. The number of adapters served is bounded by disk, not by slots.
`metrics` (set by the server, duck-typed: this package does not import quiver.server) times
cold loads from disk and counts slot loads and evictions.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from quiver.adapters.base import BaseSpec
from quiver.adapters.batch import AdapterBatch
from quiver.adapters.files import CONFIG_NAME, AdapterError, summarize_adapter_dir
from quiver.adapters.methods import load_adapter
from quiver.adapters.mix import compose, mix_id
from quiver.adapters.pinned import PinnedArena, to_device
from quiver.adapters.pool import SlotPool
from quiver.adapters.staging import rebase, stage
from quiver.adapters.weights import AdapterInfo, AdapterWeights

log = logging.getLogger(__name__)
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass
class AdapterRef:
    """What a request carries: the id, and the weights already in the CPU tier."""

    adapter_id: str
    weights: AdapterWeights


@dataclass
class AdapterConfig:
    adapter_dir: str
    num_slots: int = 16  # accelerator slots
    max_rank: int = 64
    cpu_cache: int = 256  # adapters kept loaded in CPU memory
    pinned_mib: int = 1024  # staged rows of CPU-tier adapters, pinned once (CUDA; adapters/pinned.py)

    def __post_init__(self) -> None:
        if self.num_slots <= 0 or self.max_rank <= 0 or self.cpu_cache <= 0:
            raise ValueError("num_slots, max_rank and cpu_cache must be positive")
        if self.pinned_mib < 0:
            raise ValueError("pinned_mib must be >= 0")


def read_staged(path: Path, base: BaseSpec, max_rank: int, base_name: str, device: torch.device, dtype: torch.dtype,
                rank: int, arena: PinnedArena) -> AdapterWeights:
    """The request thread's part of a cold load. On CUDA: the file mapped and read without the
    per-tensor NaN/Inf check, its rows staged into arena (checked there, once), then the
    adapter rebased onto those rows, so nothing of the file's mapping stays. Elsewhere: an
    owned, checked read, rows built when a slot takes it."""
    if device.type != "cuda":
        return load_adapter(path, base, max_rank, base_name)
    weights = load_adapter(path, base, max_rank, base_name, check_finite=False, mapped=True)
    stage(weights, dtype, rank, base.n_layers, base.shapes, True, arena)
    rebase(weights)
    return weights


class AdapterManager:
    def __init__(self, cfg: AdapterConfig, base: BaseSpec, base_name: str, dtype: torch.dtype, device: torch.device):
        self.cfg = cfg
        self.root = Path(cfg.adapter_dir)
        if not self.root.is_dir():
            raise AdapterError(f"adapter directory {self.root} does not exist")
        self.base, self.base_name = base, base_name
        self.dtype, self.device = dtype, device
        # staged rows live in one slab pinned now, not in a new page-locked block per cold load
        self.arena = PinnedArena(cfg.pinned_mib << 20 if device.type == "cuda" else 0)
        self.reset_pool(cfg.num_slots)
        self.cpu: OrderedDict[str, AdapterWeights] = OrderedDict()
        self.lock = threading.Lock()
        self.engine = None
        self.prefix_blocks: dict[int, list[int]] = {}  # slot -> shared KV blocks
        # the server's metrics (quiver.server.metrics.Metrics: adapter_read, slot_load, slot_evicted), or None
        self.metrics = None

    # ---- service side ----
    def ids(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if (p / CONFIG_NAME).is_file() and ID_RE.match(p.name))

    def add(self, weights: AdapterWeights) -> None:
        """Puts already-built weights into the CPU tier under weights.info.adapter_id."""
        self._stage(weights)
        with self.lock:
            self.cpu[weights.info.adapter_id] = weights

    def _weights(self, adapter_id: str) -> AdapterWeights:
        with self.lock:
            if adapter_id in self.cpu:
                self.cpu.move_to_end(adapter_id)
                return self.cpu[adapter_id]
        if not ID_RE.match(adapter_id) or not (self.root / adapter_id / CONFIG_NAME).is_file():
            raise KeyError(f"adapter {adapter_id!r} not found")
        # on the request's thread: the engine thread only starts async copies
        t0 = time.perf_counter()
        weights = read_staged(self.root / adapter_id, self.base, self.cfg.max_rank, self.base_name, self.device,
                              self.dtype, self.pool.R, self.arena)
        if self.metrics is not None:
            self.metrics.adapter_read(time.perf_counter() - t0)
        for warning in weights.info.warnings:
            log.warning("adapter %s: %s", adapter_id, warning)
        with self.lock:
            self.cpu[adapter_id] = weights
            while len(self.cpu) > self.cfg.cpu_cache:
                self.cpu.popitem(last=False)
        return weights

    def _stage(self, weights: AdapterWeights, check: bool = False) -> None:
        if self.device.type == "cuda":
            stage(weights, self.dtype, self.pool.R, self.base.n_layers, self.base.shapes, check, self.arena)

    def resolve(self, adapter_id: str) -> AdapterRef:
        return AdapterRef(adapter_id, self._weights(adapter_id))

    def resolve_mix(self, parts: list[tuple[str, float]]) -> AdapterRef:
        key = mix_id(parts)
        with self.lock:
            if key in self.cpu:
                return AdapterRef(key, self.cpu[key])
        weights = compose([(self._weights(a), w) for a, w in parts], self.cfg.max_rank)
        self._stage(weights)
        with self.lock:
            self.cpu[key] = weights
        return AdapterRef(key, weights)

    def info(self, adapter_id: str) -> AdapterInfo:
        return self._weights(adapter_id).info

    def list(self) -> list[AdapterInfo]:
        """Every adapter on disk, from its config alone (cheap for thousands of adapters);
        loaded adapters report their full info. GetAdapter validates the weights too."""
        out = []
        for adapter_id in self.ids():
            with self.lock:
                loaded = self.cpu.get(adapter_id)
            try:
                out.append(loaded.info if loaded is not None else summarize_adapter_dir(self.root / adapter_id))
            except AdapterError as exc:
                out.append(AdapterInfo(adapter_id, "invalid", warnings=[str(exc)]))
        return out

    # ---- engine side (engine thread only) ----
    def bind(self, engine) -> None:
        self.engine = engine

    def acquire(self, seq) -> None:
        ref: AdapterRef | None = seq.adapter
        if ref is None:
            return
        if ref.weights.prompt_embeds is not None:  # soft prompt: placeholder tokens ahead of the prompt
            n = ref.weights.prompt_embeds.shape[0]
            seq.prompt_ids = [0] * n + seq.prompt_ids
            seq.virtual_tokens = n
        if ref.weights.prefix_kv is not None:
            seq.prefix_len = ref.weights.prefix_kv.shape[2]

    def admit(self, seq) -> bool:
        """Makes seq's adapter resident in a slot and pins it; False = wait (pool busy)."""
        ref: AdapterRef | None = seq.adapter
        if ref is None or seq.slot is not None:
            return True
        slot = self.pool.lookup(ref.adapter_id)
        if slot is None or self.pool.resident.get(slot) is not ref.weights:
            if not self.pool.can_load() or not self._can_place_prefix(ref.weights):
                return False
            slot = self.pool.load(ref.weights)
            self._place_prefix(slot, ref.weights)
            if self.metrics is not None:
                self.metrics.slot_load()
        self.pool.pin(slot)
        seq.slot = slot
        return True

    def release(self, seq) -> None:
        if seq.slot is not None:
            self.pool.unpin(seq.slot)
            seq.slot = None

    def _can_place_prefix(self, w: AdapterWeights) -> bool:
        if w.prefix_kv is None:
            return True
        need = -(-w.prefix_kv.shape[2] // self.engine.blocks.block_size)
        return self.engine.blocks.can_take(need)

    def _place_prefix(self, slot: int, w: AdapterWeights) -> None:
        if w.prefix_kv is None:
            return
        blocks, kv = self.engine.blocks, self.engine.kv
        n = w.prefix_kv.shape[2]
        taken = blocks.take(-(-n // blocks.block_size))
        self.prefix_blocks[slot] = taken
        slots = torch.tensor([taken[i // blocks.block_size] * blocks.block_size + i % blocks.block_size
                              for i in range(n)], device=kv.k[0].device)
        src = w.staged.get(("prefix",), (w.prefix_kv,))[0]  # staged: serving dtype, pinned -> async copies
        dev = kv.k[0].device
        for layer in range(len(kv.k)):
            kv.k[layer][slots] = src[layer, 0].to(dev, kv.k[layer].dtype, non_blocking=True)
            kv.v[layer][slots] = src[layer, 1].to(dev, kv.v[layer].dtype, non_blocking=True)
        self.arena.fence(w)  # these copies read its staged range too (pool.load fenced the slot copies)

    def reset_pool(self, num_slots: int) -> None:
        """A fresh, empty accelerator pool (at start; benchmarks resize it between runs). Its
        version continues the old pool's: a decode graph captured over the old pool's tensors
        (keyed by version) must never match the new one."""
        old = getattr(self, "pool", None)
        self.pool = SlotPool(self.base, num_slots, self.cfg.max_rank, self.dtype, self.device)
        if old is not None:
            self.pool.version = old.version + 1
        self.pool.on_evict = self._evicted
        self.pool.arena = self.arena

    def reclaim(self) -> bool:
        """Evicts the resident adapters that no running sequence pins and that hold prefix KV
        blocks, so that a sequence can have them; True when any block was freed."""
        idle = [slot for slot in self.prefix_blocks if self.pool.refs[slot] == 0]
        for slot in idle:
            self.pool.evict(slot)
        return bool(idle)

    def _evicted(self, slot: int, weights: AdapterWeights) -> None:
        if self.metrics is not None:
            self.metrics.slot_evicted()
        if slot in self.prefix_blocks:
            self.engine.blocks.release(self.prefix_blocks.pop(slot))

    def prefix_slots(self, seq) -> list[int]:
        blocks = self.prefix_blocks.get(seq.slot) if seq.slot is not None else None
        if not blocks:
            return []
        bs = self.engine.blocks.block_size
        return [blocks[i // bs] * bs + i % bs for i in range(seq.prefix_len)]

    def graph_batch(self, token_slot: torch.Tensor) -> AdapterBatch:
        """An AdapterBatch over a static token_slot buffer, for a captured decode graph."""
        return AdapterBatch(self.pool, token_slot)

    def prefix_block_list(self, seq) -> list[int]:
        """Shared prefix KV blocks at the head of seq's block table (decode graphs)."""
        return list(self.prefix_blocks.get(seq.slot, [])) if seq.slot is not None and seq.prefix_len else []

    def token_slots(self, scheduled) -> list[int] | None:
        """Each scheduled token's adapter slot (-1: none), or None when no sequence has one."""
        if all(item.seq.slot is None for item in scheduled):
            return None
        return [-1 if item.seq.slot is None else item.seq.slot for item in scheduled for _ in range(item.num_tokens)]

    def prepare(self, scheduled) -> tuple[AdapterBatch | None, list[list[int]] | None]:
        slots = self.token_slots(scheduled)
        if slots is None:
            return None, None
        prompt_idx, prompt_rows = [], []
        flat = 0
        for item in scheduled:
            seq, n = item.seq, item.num_tokens
            if seq.virtual_tokens and seq.num_computed < seq.virtual_tokens:
                emb = seq.adapter.weights.prompt_embeds
                for p in range(seq.num_computed, min(seq.virtual_tokens, seq.num_computed + n)):
                    prompt_idx.append(flat + p - seq.num_computed)
                    prompt_rows.append(emb[p])
            flat += n
        device = self.pool.device
        rows = None
        if prompt_idx:
            rows = (to_device(prompt_idx, device, torch.long), to_device(torch.stack(prompt_rows), device))
        batch = AdapterBatch(self.pool, to_device(slots, device, torch.int32), rows)
        return batch, [self.prefix_slots(item.seq) for item in scheduled]
