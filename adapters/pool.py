"""The fixed pool of accelerator slots that resident adapters live in.

LoRA and vector adapters live in banks, one per projection name over all layers, allocated the
first time an adapter needs that name: LoRA A [L, S, R, in], B [L, S, out, R] (stored
rank-major), ranks and scaling [L, S], slot map [L, S+1]; scale and bias vectors [L, S, dim] (1
and 0 where a slot has none). `lora[(layer, name)]` is a LowRankStack of views into the bank (what the kernels take);
loading an adapter into slot s is one copy per bank tensor: bank[:, s] <- the adapter's rows
(adapters/staging.py, prebuilt and pinned off the engine thread). Bottleneck stacks are per
(layer, projection). Ranks are padded to R in storage only: kernels loop to each slot's own
rank. A slot map [S+1] maps a token's slot (+1, so -1 = base model) to the slot or -1 when that
slot has nothing there. Slots are ref-counted by running sequences; `load` evicts the least
recently used free slot.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from quiver.adapters import staging
from quiver.adapters.base import BaseSpec
from quiver.adapters.bottleneck import ACTIVATIONS
from quiver.adapters.weights import AdapterWeights, Key


@dataclass
class LowRankStack:
    a: torch.Tensor  # [S, R, in]
    b: torch.Tensor  # [S, out, R]
    ranks: torch.Tensor  # [S] int32 (1 where empty: never read, the slot maps to -1)
    scaling: torch.Tensor  # [S] float32
    present: torch.Tensor  # [S+1] int32: slot_map
    down_bias: torch.Tensor | None = None  # [S, R] (bottleneck)
    up_bias: torch.Tensor | None = None  # [S, out] (bottleneck)
    act_ids: torch.Tensor | None = None  # [S+1] int64 index into ACT_NAMES by slot+1, -1 = none (bottleneck)


@dataclass
class LoraBank:  # one projection name, all layers
    a: torch.Tensor  # [L, S, R, in]
    b: torch.Tensor  # [L, S, out, R], stored rank-major ([L, S, R, out] transposed): the kernels'
    # view of the first lora_rank ranks is then one dense block per slot, not a strided slice of
    # every output row
    ranks: torch.Tensor  # [L, S] int32
    scaling: torch.Tensor  # [L, S] float32
    present: torch.Tensor  # [L, S+1] int32


ACT_NAMES = tuple(ACTIVATIONS)  # act_ids index this


class PoolFull(RuntimeError):
    pass


MIN_LORA_RANK = 16  # the smallest rank bound (one BGMV rank block)


class SlotPool:
    def __init__(self, base: BaseSpec, num_slots: int, max_rank: int, dtype: torch.dtype, device: torch.device):
        self.base, self.S, self.R, self.dtype, self.device = base, num_slots, max_rank, dtype, device
        self.lora: dict[Key, LowRankStack] = {}  # views into lora_banks
        self.lora_banks: dict[str, LoraBank] = {}
        self.vector_banks: dict[tuple[str, str], torch.Tensor] = {}  # (table, name) -> [L, S, dim]
        self.bottleneck: dict[Key, LowRankStack] = {}
        self.in_scale: dict[Key, torch.Tensor] = {}
        self.out_scale: dict[Key, torch.Tensor] = {}
        self.out_add: dict[Key, torch.Tensor] = {}
        self.resident: dict[int, AdapterWeights] = {}
        self.slot_of: OrderedDict[str, int] = OrderedDict()  # LRU order, oldest first
        # slots whose weights were superseded by newer weights of the same id while running
        # sequences pinned them: resident, under no id, evicted first once unpinned
        self.stale: set[int] = set()
        self.refs = [0] * num_slots
        self.version = 0  # bumped whenever a new stack is allocated (and when lora_rank grows)
        # the LoRA ranks the kernels cover: the smallest power of two >= MIN_LORA_RANK and >= the
        # rank of every LoRA loaded so far, capped at R (so R itself when R is not a power of
        # two). The stacks keep R rows; the kernels read the first lora_rank (a rank-16 adapter in
        # a rank-64 pool takes the one-rank-block kernels). It only grows: each growth recaptures
        # the decode graphs once.
        self.lora_rank = 0
        self.on_evict = None  # callback(slot, weights), e.g. to free prefix KV blocks
        self.arena = None  # adapters/pinned.py PinnedArena of the staged rows: fenced after each load

    # ---- slot bookkeeping ----
    def lookup(self, adapter_id: str) -> int | None:
        slot = self.slot_of.get(adapter_id)
        if slot is not None:
            self.slot_of.move_to_end(adapter_id)
        return slot

    def can_load(self) -> bool:
        return len(self.resident) < self.S or any(self.refs[s] == 0 for s in self.resident)

    def load(self, weights: AdapterWeights) -> int:
        """Writes weights into a free slot, else into the least recently used unpinned one
        (stale slots first). Weights of an id already resident under other weights (the CPU
        tier dropped and read it again, or two request threads read it at once) supersede
        them: the old slot is emptied now, or once the sequences that pin it are done."""
        old = self.slot_of.pop(weights.info.adapter_id, None)
        if old is not None:
            self.stale.add(old)
            if self.refs[old] == 0:
                self.evict(old)
        if len(self.resident) < self.S:
            slot = next(s for s in range(self.S) if s not in self.resident)
        else:
            unpinned = [s for s in self.stale if self.refs[s] == 0] + [s for s in self.slot_of.values() if self.refs[s] == 0]
            if not unpinned:
                raise PoolFull(f"all {self.S} adapter slots are in use by running requests")
            slot = unpinned[0]
            self.evict(slot)
        self._write(slot, weights)
        if self.arena is not None:
            self.arena.fence(weights)  # its staged range is not reused before these copies are done
        self.resident[slot] = weights
        self.slot_of[weights.info.adapter_id] = slot
        return slot

    def evict(self, slot: int) -> None:
        """Empties a resident slot that no running sequence pins."""
        assert self.refs[slot] == 0, f"slot {slot} is pinned"
        if slot in self.stale:
            self.stale.discard(slot)
        else:
            del self.slot_of[self.resident[slot].info.adapter_id]
        self._clear(slot)

    def pin(self, slot: int) -> None:
        self.refs[slot] += 1

    def unpin(self, slot: int) -> None:
        assert self.refs[slot] > 0
        self.refs[slot] -= 1

    # ---- tensors ----
    def _vector_bank(self, kind: str, name: str) -> torch.Tensor:
        if (kind, name) not in self.vector_banks:
            dim = staging.vector_dim(self.base.shapes, kind, name)
            bank = torch.full((self.base.n_layers, self.S, dim), staging.FILL[kind], dtype=self.dtype,
                              device=self.device)
            self.vector_banks[(kind, name)] = bank
            table = getattr(self, kind)
            for layer in range(self.base.n_layers):
                table[(layer, name)] = bank[layer]
            self.version += 1  # captured CUDA graphs do not know these tensors yet
        return self.vector_banks[(kind, name)]

    def _lora_bank(self, name: str) -> LoraBank:
        if name not in self.lora_banks:
            L, S, R = self.base.n_layers, self.S, self.R
            out_f, in_f = self.base.shapes[name]
            kw = dict(device=self.device)
            bank = LoraBank(
                a=torch.zeros(L, S, R, in_f, dtype=self.dtype, **kw),
                b=torch.zeros(L, S, R, out_f, dtype=self.dtype, **kw).transpose(-1, -2),  # rank-major: see LoraBank
                ranks=torch.ones(L, S, dtype=torch.int32, **kw), scaling=torch.zeros(L, S, dtype=torch.float32, **kw),
                present=torch.full((L, S + 1), -1, dtype=torch.int32, **kw))
            self.lora_banks[name] = bank
            for layer in range(L):
                self.lora[(layer, name)] = LowRankStack(bank.a[layer], bank.b[layer], bank.ranks[layer],
                                                        bank.scaling[layer], bank.present[layer])
            self.version += 1
        return self.lora_banks[name]

    def _bottleneck_stack(self, key: Key, dim: int) -> LowRankStack:
        """down [S, R, dim], up [S, dim, R] and their biases for one (layer, projection)."""
        if key not in self.bottleneck:
            z = lambda *shape: torch.zeros(*shape, dtype=self.dtype, device=self.device)  # noqa: E731
            self.bottleneck[key] = LowRankStack(
                a=z(self.S, self.R, dim), b=z(self.S, dim, self.R),
                ranks=torch.ones(self.S, dtype=torch.int32, device=self.device),
                scaling=torch.zeros(self.S, dtype=torch.float32, device=self.device),
                present=torch.full((self.S + 1,), -1, dtype=torch.int32, device=self.device),
                down_bias=z(self.S, self.R), up_bias=z(self.S, dim),
                act_ids=torch.full((self.S + 1,), -1, dtype=torch.long, device=self.device),
            )
            self.version += 1  # captured CUDA graphs do not know this stack yet
        return self.bottleneck[key]

    def _write(self, slot: int, w: AdapterWeights) -> None:
        """Copies one adapter into a slot: for LoRA and vectors one copy per bank tensor. With w
        staged (adapters/staging.py: pinned) every copy is asynchronous on the current stream:
        the engine thread does not wait for the transfer, the next forward pass is ordered after it."""
        L, dt = self.base.n_layers, self.dtype

        def put(dst: torch.Tensor, src: torch.Tensor) -> None:
            dst.copy_(src, non_blocking=src.is_pinned())

        if w.lora:
            need = min(self.R, max(MIN_LORA_RANK, 1 << (max(d.a.shape[0] for d in w.lora.values()) - 1).bit_length()))
            if need > self.lora_rank:
                self.lora_rank = need
                self.version += 1  # captured CUDA graphs cover the smaller rank
        for name in staging.names(w.lora):
            bank = self._lora_bank(name)
            a, b, ranks, scaling, has = staging.lora_rows(w, name, L, self.R, dt)
            put(bank.a[:, slot], a)
            put(bank.b[:, slot], b)
            put(bank.ranks[:, slot], ranks)
            put(bank.scaling[:, slot], scaling)
            has = has.to(self.device, non_blocking=has.is_pinned())  # the map is built on the device:
            bank.present[:, slot + 1] = torch.where(has, slot, -1)  # a pageable copy would sync
        for kind in staging.VECTOR_TABLES:
            for name in staging.names(getattr(w, kind)):
                v, _ = staging.vector_rows(w, kind, name, L, self.base.shapes, dt)
                put(self._vector_bank(kind, name)[:, slot], v)
        for key, bn in w.bottleneck.items():
            st = self._bottleneck_stack(key, self.base.shapes[key[1]][0])
            r = bn.rank
            st.a[slot].zero_(), st.b[slot].zero_(), st.down_bias[slot].zero_()
            st.a[slot, :r] = bn.down.to(self.device, dt)
            st.b[slot, :, :r] = bn.up.to(self.device, dt)
            st.down_bias[slot, :r] = bn.down_bias.to(self.device, dt)
            st.up_bias[slot] = bn.up_bias.to(self.device, dt)
            st.ranks[slot], st.scaling[slot], st.present[slot + 1] = r, 1.0, slot
            st.act_ids[slot + 1] = ACT_NAMES.index(bn.act)

    def _clear(self, slot: int) -> None:
        old = self.resident.pop(slot)
        for bank in self.lora_banks.values():
            bank.present[:, slot + 1] = -1
        for st in self.bottleneck.values():
            st.present[slot + 1] = -1
            st.act_ids[slot + 1] = -1
        for (kind, _), bank in self.vector_banks.items():
            bank[:, slot] = staging.FILL[kind]
        if self.on_evict is not None:
            self.on_evict(slot, old)
