"""The fixed pool of accelerator slots that resident adapters live in.

Per (layer, projection), stacked tensors indexed by slot, allocated the first time an adapter
needs them: LoRA A [S, R, in] / B [S, out, R] / ranks [S] / scaling [S]; scale and bias
vectors [S, dim] (1 and 0 where a slot has none); bottleneck down/up stacks. Ranks are padded
to R in storage only: kernels loop to each slot's own rank. `slot_map(key)` [S+1] maps a
token's slot (+1, so -1 = base model) to the slot or -1 when that slot has nothing there.
Slots are ref-counted by running sequences; `load` evicts the least recently used free slot.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

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


ACT_NAMES = tuple(ACTIVATIONS)  # act_ids index this


class PoolFull(RuntimeError):
    pass


class SlotPool:
    def __init__(self, base: BaseSpec, num_slots: int, max_rank: int, dtype: torch.dtype, device: torch.device):
        self.base, self.S, self.R, self.dtype, self.device = base, num_slots, max_rank, dtype, device
        self.lora: dict[Key, LowRankStack] = {}
        self.bottleneck: dict[Key, LowRankStack] = {}
        self.in_scale: dict[Key, torch.Tensor] = {}
        self.out_scale: dict[Key, torch.Tensor] = {}
        self.out_add: dict[Key, torch.Tensor] = {}
        self.resident: dict[int, AdapterWeights] = {}
        self.slot_of: OrderedDict[str, int] = OrderedDict()  # LRU order, oldest first
        self.refs = [0] * num_slots
        self.version = 0  # bumped whenever a new stack is allocated
        self.on_evict = None  # callback(slot, weights), e.g. to free prefix KV blocks

    # ---- slot bookkeeping ----
    def lookup(self, adapter_id: str) -> int | None:
        slot = self.slot_of.get(adapter_id)
        if slot is not None:
            self.slot_of.move_to_end(adapter_id)
        return slot

    def can_load(self) -> bool:
        return len(self.slot_of) < self.S or any(self.refs[s] == 0 for s in self.slot_of.values())

    def load(self, weights: AdapterWeights) -> int:
        if len(self.slot_of) < self.S:
            slot = next(s for s in range(self.S) if s not in self.resident)
        else:
            victim = next((a for a, s in self.slot_of.items() if self.refs[s] == 0), None)
            if victim is None:
                raise PoolFull(f"all {self.S} adapter slots are in use by running requests")
            slot = self.slot_of.pop(victim)
            self._clear(slot)
        self._write(slot, weights)
        self.resident[slot] = weights
        self.slot_of[weights.info.adapter_id] = slot
        return slot

    def pin(self, slot: int) -> None:
        self.refs[slot] += 1

    def unpin(self, slot: int) -> None:
        assert self.refs[slot] > 0
        self.refs[slot] -= 1

    # ---- tensors ----
    def _vec(self, table: dict, key: Key, dim: int, fill: float) -> torch.Tensor:
        if key not in table:
            table[key] = torch.full((self.S, dim), fill, dtype=self.dtype, device=self.device)
            self.version += 1
        return table[key]

    def _stack(self, table: dict, key: Key, in_f: int, out_f: int, biased: bool) -> LowRankStack:
        if key not in table:
            z = lambda *shape: torch.zeros(*shape, dtype=self.dtype, device=self.device)  # noqa: E731
            table[key] = LowRankStack(
                a=z(self.S, self.R, in_f), b=z(self.S, out_f, self.R),
                ranks=torch.ones(self.S, dtype=torch.int32, device=self.device),
                scaling=torch.zeros(self.S, dtype=torch.float32, device=self.device),
                present=torch.full((self.S + 1,), -1, dtype=torch.int32, device=self.device),
                down_bias=z(self.S, self.R) if biased else None, up_bias=z(self.S, out_f) if biased else None,
                act_ids=torch.full((self.S + 1,), -1, dtype=torch.long, device=self.device) if biased else None,
            )
            self.version += 1  # captured CUDA graphs do not know this stack yet
        return table[key]

    def _write(self, slot: int, w: AdapterWeights) -> None:
        """Copies one adapter into a slot. With w staged (AdapterWeights.stage: serving dtype,
        pinned) every copy is asynchronous on the current stream: the engine thread does not
        wait for the transfer, and the next forward pass is ordered after it."""
        def put(dst: torch.Tensor, src: torch.Tensor) -> None:
            src = w.source(src)[tuple(slice(0, n) for n in dst.shape)]  # a staged copy may be padded
            if src.dtype != dst.dtype:
                src = src.to(dst.dtype)
            dst.copy_(src, non_blocking=src.is_pinned())

        for key, d in w.lora.items():
            out_f, in_f = self.base.shapes[key[1]]
            st = self._stack(self.lora, key, in_f, out_f, biased=False)
            r = d.rank
            if w.source(d.a).shape == st.a[slot].shape:  # staged padded to the pool rank: whole rows
                put(st.a[slot], d.a)
                put(st.b[slot], d.b)
            else:
                st.a[slot].zero_(), st.b[slot].zero_()
                put(st.a[slot, :r], d.a)
                put(st.b[slot, :, :r], d.b)
            self._meta(st, slot, r, d.scale)
        for key, bn in w.bottleneck.items():
            out_f = self.base.shapes[key[1]][0]
            st = self._stack(self.bottleneck, key, out_f, out_f, biased=True)
            r = bn.rank
            st.a[slot].zero_(), st.b[slot].zero_(), st.down_bias[slot].zero_()
            put(st.a[slot, :r], bn.down)
            put(st.b[slot, :, :r], bn.up)
            put(st.down_bias[slot, :r], bn.down_bias)
            put(st.up_bias[slot], bn.up_bias)
            self._meta(st, slot, r, 1.0)
            st.act_ids[slot + 1] = ACT_NAMES.index(bn.act)
        for table, src, fill, dim_of in ((self.in_scale, w.in_scale, 1.0, 1), (self.out_scale, w.out_scale, 1.0, 0),
                                         (self.out_add, w.out_add, 0.0, 0)):
            for key, vec in src.items():
                put(self._vec(table, key, self.base.shapes[key[1]][dim_of], fill)[slot], vec)

    @staticmethod
    def _meta(st: LowRankStack, slot: int, rank: int, scale: float) -> None:
        # scalar writes into device tensors: fill_ launches a kernel, no host sync
        st.ranks[slot].fill_(rank)
        st.scaling[slot].fill_(scale)
        st.present[slot + 1].fill_(slot)

    def _clear(self, slot: int) -> None:
        old = self.resident.pop(slot)
        for table in (self.lora, self.bottleneck):
            for st in table.values():
                st.present[slot + 1] = -1
                if st.act_ids is not None:
                    st.act_ids[slot + 1] = -1
        for table, fill in ((self.in_scale, 1.0), (self.out_scale, 1.0), (self.out_add, 0.0)):
            for vec in table.values():
                vec[slot] = fill
        if self.on_evict is not None:
            self.on_evict(slot, old)
