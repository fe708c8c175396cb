"""The step's adapter view: applies every resident adapter of the batch in one pass.

Contract: built once per step from `token_slot` [T] (slot of each flat token, -1 = base
model); the model calls `pre_linear` / `linear` for every projection and `input_embeds` once.
Per projection, for the tokens of each slot (one launch per kind, any mix of methods/ranks):
  x_in = x * in_scale[slot]                               (IA3 feed-forward)
  y    = W x_in  (+ bias)                                 (base, already computed)
  y   += scaling[slot] * B[slot] (A[slot] x_in)           (LoRA, rsLoRA, AdaLoRA, DoRA, mixes)
  y    = y * out_scale[slot] + out_add[slot]              (IA3, DoRA, BitFit)
  y   += up[slot](act(down[slot] y + bd[slot])) + bu[slot] (bottleneck)
For a fused projection group (q|k|v, gate|up: server/fuse.py) `group_linear` does the same
for all members at once, their LoRAs in two launches (kernels/lora_group.py). The hooks take
the projection's module, not its output: an NF4 base (server/quant.py) runs the LoRA shrinks
in its own kernel's launch, and one expand launch follows.
The kernels (quiver.kernels) run Triton on CUDA and their PyTorch references on CPU.
"""

from __future__ import annotations

import os

import torch

from quiver.adapters.bottleneck import ACTIVATIONS
from quiver.adapters.pool import ACT_NAMES
from quiver.adapters.pool import LowRankStack, SlotPool
from quiver.kernels import add_by_slot, lora_expand, lora_shrink, scale_by_slot
from quiver.kernels.lora_group import GroupMember, lora_group



def shrink_in_base() -> bool:
    """LoRA shrinks inside the NF4 base kernel's launch (QUIVER_SHRINK_IN_BASE=0: their own
    launch); read at every call (a CUDA graph keeps what its capture read)."""
    return os.environ.get("QUIVER_SHRINK_IN_BASE", "1") != "0"


class AdapterBatch:
    def __init__(self, pool: SlotPool, token_slot: torch.Tensor,
                 prompt_rows: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.pool = pool
        self.token_slot = token_slot  # [T] int32 (a static buffer when replayed in a CUDA graph)
        self.prompt_rows = prompt_rows  # (flat token indices [P], embeddings [P, hidden]) for prompt tuning
        self.lookup: torch.Tensor | None = None
        self.shrink_out: dict = {}

    def begin(self) -> None:
        self.lookup = self.token_slot.long() + 1  # index into a stack's present map
        # one zero-filled [T, R] shrink output per LoRA stack, from a single memset per step
        keys = list(self.pool.lora)
        T = self.token_slot.shape[0]
        ws = torch.zeros(len(keys), T, self._rank(), dtype=torch.float32, device=self.token_slot.device)
        self.shrink_out = dict(zip(keys, ws))

    def _slots_for(self, st: LowRankStack) -> torch.Tensor:
        return st.present[self.lookup]  # [T] int32: slot, or -1 where the slot has nothing here

    def scales_input(self, layer: int, names: tuple[str, ...]) -> bool:
        """Whether any resident adapter scales the input of one of these projections ((IA)³
        feed-forward vectors): such a step cannot share one fused matmul among them."""
        return any((layer, n) in self.pool.in_scale for n in names)

    def pre_linear(self, layer: int, name: str, x: torch.Tensor) -> torch.Tensor:
        vec = self.pool.in_scale.get((layer, name))
        if vec is None:
            return x
        x = x.clone()
        return scale_by_slot(x, vec, self.token_slot)

    def linear(self, layer: int, name: str, x: torch.Tensor, base) -> torch.Tensor:
        """base(x) with the projection's adapters (base: the projection's module)."""
        key = (layer, name)
        members = self._members([key], [0])
        return self._after_lora(key, self._lora(base, x, members))

    def group_linear(self, layer: int, names: tuple[str, ...], x: torch.Tensor, base,
                     widths: list[int]) -> list[torch.Tensor]:
        """`linear` for every member of a fused projection group at once: base is the fused
        module, whose output [T, sum(widths)] is split; the LoRAs of all members take 2 launches
        (kernels/lora_group.py)."""
        keys = [(layer, n) for n in names]
        y = self._lora(base, x, self._members(keys, widths))
        return [self._after_lora(key, part) for key, part in zip(keys, y.split(widths, dim=-1))]

    def _rank(self) -> int:
        """LoRA ranks the kernels read: the pool's bound over the LoRAs loaded (SlotPool.lora_rank)."""
        return self.pool.lora_rank or self.pool.R

    def _members(self, keys: list, widths: list[int]) -> list[GroupMember]:
        members, col = [], 0
        T = self.token_slot.shape[0]
        R = self._rank()
        for key, width in zip(keys, widths):
            st = self.pool.lora.get(key)
            if st is not None:
                h = self.shrink_out.get(key)
                if h is None:
                    h = torch.zeros(T, R, dtype=torch.float32, device=self.token_slot.device)
                # the first R rank rows of the stacks (views: no copy)
                members.append(GroupMember(st.a[:, :R], st.b[:, :, :R], st.ranks, st.scaling, st.present, h, col))
            col += width
        return members

    def _lora(self, base, x: torch.Tensor, members: list[GroupMember]) -> torch.Tensor:
        """y = base(x) plus the members' LoRA deltas. An NF4 base runs the shrinks in its own
        launch (shrink_in_base()); then one expand launch."""
        if not members:
            return base(x)
        if getattr(base, "takes_shrink", False) and shrink_in_base():
            y = base(x, shrink=(self.token_slot, members))
            return lora_group(x, self.token_slot, members, y, shrunk=True)
        return lora_group(x, self.token_slot, members, base(x))

    def _after_lora(self, key, y: torch.Tensor) -> torch.Tensor:
        pool = self.pool
        vec = pool.out_scale.get(key)
        if vec is not None:
            scale_by_slot(y, vec, self.token_slot)
        vec = pool.out_add.get(key)
        if vec is not None:
            add_by_slot(y, vec, self.token_slot)
        st = pool.bottleneck.get(key)
        if st is not None:
            y = self._bottleneck(st, y)
        return y

    def _bottleneck(self, st: LowRankStack, y: torch.Tensor) -> torch.Tensor:
        slots = self._slots_for(st)
        h = lora_shrink(y, st.a, slots, st.ranks)  # [T, R] fp32: down(y)
        add_by_slot(h, st.down_bias.float(), slots)
        token_act = st.act_ids[self.lookup]  # [T] index into ACT_NAMES, -1 = no bottleneck here
        for i, act in enumerate(ACT_NAMES):  # no host sync: a masked select per activation kind
            h = torch.where((token_act == i)[:, None], ACTIVATIONS[act](h), h)
        out = y.clone()
        lora_expand(h, st.b, slots, st.ranks, st.scaling, out)
        add_by_slot(out, st.up_bias, slots)
        return out

    def input_embeds(self, embeds: torch.Tensor) -> torch.Tensor:
        if self.prompt_rows is None:
            return embeds
        idx, rows = self.prompt_rows
        embeds = embeds.clone()
        embeds[idx] = rows.to(embeds.dtype)
        return embeds
