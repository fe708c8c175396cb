"""Builds the step's StepBatch from the scheduled sequences and runs the model.

Contract: `ModelRunner.run(scheduled) -> logits [N, vocab]` for the N sequences
whose scheduled chunk reaches their last known token (those sample a token this step), in
the order of `scheduled`. Index tensors are built once per step on the model's device.
"""

from __future__ import annotations

import torch

from quiver.adapters.pinned import to_device
from quiver.server.engine.block_manager import BlockManager
from quiver.server.engine.scheduler import Scheduled
from quiver.server.engine.sequence import resolve_placeholders
from quiver.server.model import KVCache, LlamaForward, StepBatch


class ModelRunner:
    def __init__(self, model: LlamaForward, kv: KVCache, blocks: BlockManager, device: torch.device,
                 graphs=None, adapters=None):
        self.model = model
        self.kv = kv
        self.blocks = blocks
        self.device = device
        self.graphs = graphs  # DecodeGraphs on CUDA, or None
        self.adapters = adapters  # AdapterManager, or None

    def build(self, scheduled: list[Scheduled], adapters=None, prefix_slots: list[list[int]] | None = None,
              feed: torch.Tensor | None = None) -> StepBatch:
        """prefix_slots[i]: KV slots of sequence i's shared prefix (prefix tuning), or [];
        feed: the last step's sampled tokens on the device, which placeholder ids name."""
        ids, pos, slots, samples = [], [], [], []
        q_rows, kv_rows, q_lens, ctx_lens = [], [], [], []
        for i, item in enumerate(scheduled):
            seq, n = item.seq, item.num_tokens
            start = seq.num_computed
            tokens = seq.tokens
            base = len(ids)
            pre = prefix_slots[i] if prefix_slots else []
            for p in range(start, start + n):
                ids.append(tokens[p])
                pos.append(p + seq.prefix_len)
                slots.append(self.blocks.slot(seq, p))
            q_rows.append(list(range(base, base + n)))
            kv_rows.append(pre + [self.blocks.slot(seq, p) for p in range(start + n)])
            q_lens.append(n)
            ctx_lens.append((len(pre), start))
            if start + n == seq.num_tokens:
                samples.append(base + n - 1)
        T, B = len(ids), len(scheduled)
        q_max = max(q_lens)
        l_max = max(len(r) for r in kv_rows)
        q_gather = torch.full((B, q_max), T, dtype=torch.long)
        kv_gather = torch.zeros((B, l_max), dtype=torch.long)
        mask = torch.zeros((B, 1, q_max, l_max), dtype=torch.bool)
        out_scatter = torch.empty(T, dtype=torch.long)
        for b in range(B):
            n, (n_pre, start) = q_lens[b], ctx_lens[b]
            q_gather[b, :n] = torch.tensor(q_rows[b])
            kv_gather[b, : len(kv_rows[b])] = torch.tensor(kv_rows[b])
            out_scatter[q_rows[b]] = torch.arange(n) + b * q_max
            # query i sits at cache position n_pre + start + i and sees keys 0 .. that position
            limit = n_pre + start + torch.arange(n) + 1  # [n]
            mask[b, 0, :n] = torch.arange(l_max)[None, :] < limit[:, None]
            mask[b, 0, n:, 0] = True  # padding rows attend to one key so softmax stays finite
        dev = self.device
        input_ids = to_device(ids, dev, torch.long)
        if min(ids) < 0:
            input_ids = resolve_placeholders(input_ids, feed)
        return StepBatch(
            input_ids=input_ids, positions=to_device(pos, dev, torch.long),
            slot_mapping=to_device(slots, dev, torch.long), q_gather=to_device(q_gather, dev),
            out_scatter=to_device(out_scatter, dev), kv_gather=to_device(kv_gather, dev),
            attn_mask=to_device(mask, dev), sample_index=to_device(samples, dev, torch.long),
            adapters=adapters,
        )

    def run(self, scheduled: list[Scheduled], feed: torch.Tensor | None = None) -> torch.Tensor:
        """A decode step that a CUDA graph can take replays it (the graph reads the adapters'
        slots from its own static buffer); any other step builds its StepBatch and AdapterBatch.
        feed: the last step's sampled tokens on the device (placeholder ids name its rows)."""
        if self.graphs is not None and self.graphs.eligible(scheduled, self.blocks.block_size):
            m = self.adapters
            return self.graphs.run(
                scheduled, self.blocks,
                adapter_batch_factory=m.graph_batch if m is not None else None,
                prefix_blocks=m.prefix_block_list if m is not None else (lambda seq: []),
                pool_version=m.pool.version if m is not None else 0, feed=feed,
            )
        adapters, prefix_slots = self.adapters.prepare(scheduled) if self.adapters is not None else (None, None)
        return self.model(self.build(scheduled, adapters, prefix_slots, feed), self.kv)
