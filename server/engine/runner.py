"""Builds the step's StepBatch from the scheduled sequences and runs the model.

Contract: `ModelRunner.run(scheduled) -> logits [N, vocab]` for the N sequences
whose scheduled chunk reaches their last known token (those sample a token this step), in
the order of `scheduled`. Index tensors are built once per step on the model's device.
A decode-only step replays a decode graph (graphs.py), a step with a prefill chunk the
mixed-step graphs where they take it (mixed_graphs.py); any other step runs op by op.
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
                 graphs=None, adapters=None, mixed=None):
        self.model = model
        self.kv = kv
        self.blocks = blocks
        self.device = device
        self.graphs = graphs  # DecodeGraphs on CUDA, or None
        self.mixed = mixed  # MixedGraphs on CUDA (steps with a prefill chunk), or None
        self.adapters = adapters  # AdapterManager, or None
        # decodes of an eager step read the paged cache (the decode kernel) instead of joining
        # the padded SDPA gather: on CUDA, where the kernel is Triton (CPU: its reference)
        self.split_decodes = device.type == "cuda"

    def build(self, scheduled: list[Scheduled], adapters=None, prefix_slots: list[list[int]] | None = None,
              feed: torch.Tensor | None = None) -> StepBatch:
        """prefix_slots[i]: KV slots of sequence i's shared prefix (prefix tuning), or [];
        feed: the last step's sampled tokens on the device, which placeholder ids name.
        With split_decodes, rows of one token (decodes) read the paged cache directly
        (StepBatch.dec_*) and only the other rows are gathered for SDPA."""
        ids, pos, slots, samples = [], [], [], []
        q_rows, kv_rows, q_lens, ctx_lens = [], [], [], []  # the SDPA rows
        dec_tok, dec_tables, dec_lens, dec_prefix = [], [], [], []  # the decode rows
        for i, item in enumerate(scheduled):
            seq, n = item.seq, item.num_tokens
            start = seq.num_computed
            base = len(ids)
            pre = prefix_slots[i] if prefix_slots else []
            for p in range(start, start + n):
                ids.append(seq.token_at(p))
                pos.append(p + seq.prefix_len)
                slots.append(self.blocks.slot(seq, p))
            if start + n == seq.num_tokens:
                samples.append(base + n - 1)
            if n == 1 and self.split_decodes:
                dec_tok.append(base)
                dec_tables.append(seq.block_table)
                dec_lens.append(start + 1)
                dec_prefix.append(pre)
                continue
            q_rows.append(list(range(base, base + n)))
            kv_rows.append(pre + [self.blocks.slot(seq, p) for p in range(start + n)])
            q_lens.append(n)
            ctx_lens.append((len(pre), start))
        dev = self.device
        input_ids = to_device(ids, dev, torch.long)
        if min(ids) < 0:
            input_ids = resolve_placeholders(input_ids, feed)
        batch = StepBatch(input_ids=input_ids, positions=to_device(pos, dev, torch.long),
                          slot_mapping=to_device(slots, dev, torch.long),
                          sample_index=to_device(samples, dev, torch.long), adapters=adapters)
        if q_rows:
            self._sdpa_rows(batch, q_rows, kv_rows, q_lens, ctx_lens, len(ids), split=bool(dec_tok))
        if dec_tok:
            self._decode_rows(batch, dec_tok, dec_tables, dec_lens, dec_prefix)
        return batch

    def _sdpa_rows(self, batch: StepBatch, q_rows, kv_rows, q_lens, ctx_lens, T: int, split: bool) -> None:
        """Padded [B, Qmax] query and [B, Lmax] key gathers and the causal mask of the SDPA rows."""
        B, q_max, l_max = len(q_rows), max(q_lens), max(len(r) for r in kv_rows)
        q_gather = torch.zeros((B, q_max), dtype=torch.long)  # padding queries read token 0: their rows are dropped
        kv_gather = torch.zeros((B, l_max), dtype=torch.long)
        mask = torch.zeros((B, 1, q_max, l_max), dtype=torch.bool)
        out_scatter = torch.empty(sum(q_lens), dtype=torch.long)
        done = 0
        for b in range(B):
            n, (n_pre, start) = q_lens[b], ctx_lens[b]
            q_gather[b, :n] = torch.tensor(q_rows[b])
            kv_gather[b, : len(kv_rows[b])] = torch.tensor(kv_rows[b])
            out_scatter[done:done + n] = torch.arange(n) + b * q_max
            done += n
            # query i sits at cache position n_pre + start + i and sees keys 0 .. that position
            limit = n_pre + start + torch.arange(n) + 1  # [n]
            mask[b, 0, :n] = torch.arange(l_max)[None, :] < limit[:, None]
            mask[b, 0, n:, 0] = True  # padding rows attend to one key so softmax stays finite
        dev = self.device
        batch.q_gather, batch.kv_gather = to_device(q_gather, dev), to_device(kv_gather, dev)
        batch.attn_mask, batch.out_scatter = to_device(mask, dev), to_device(out_scatter, dev)
        if split:  # the SDPA rows' tokens, in the order of out_scatter
            batch.sdpa_tokens = to_device([t for r in q_rows for t in r], dev, torch.long)

    def _decode_rows(self, batch: StepBatch, tokens, tables, lens, prefix) -> None:
        """Block tables and context lengths of the decode rows, padded as the decode graphs pad
        theirs (rows to a batch bucket, tables to the graphs' width: the attention kernel then
        takes the variants the graphs compiled at start); prefix slots where a row has them."""
        g = self.graphs
        n = len(tokens)
        rows = next((b for b in g.buckets if b >= n), n) if g is not None else n
        width = max(max(len(t) for t in tables), g.max_blocks if g is not None else 1)
        host = torch.zeros(rows * (width + 1), dtype=torch.int32)  # tables, then lengths: one copy
        table_rows, host[rows * width:rows * width + n] = host[:rows * width].view(rows, width), torch.tensor(lens)
        for r, t in enumerate(tables):
            table_rows[r, :len(t)] = torch.tensor(t, dtype=torch.int32)
        dev32 = to_device(host, self.device)
        # the decode kernel's queries: the rows' tokens, padding rows reading token 0 (their
        # context length is 0, their output unused); dec_tokens is the unpadded view
        batch.dec_gather = to_device(tokens + [0] * (rows - n), self.device, torch.long)
        batch.dec_tokens = batch.dec_gather[:n]
        batch.block_tables, batch.context_lens = dev32[:rows * width].view(rows, width), dev32[rows * width:]
        batch.block_size = self.blocks.block_size
        if any(prefix):
            p = torch.full((rows, max(len(x) for x in prefix)), -1, dtype=torch.long)
            for r, x in enumerate(prefix):
                p[r, :len(x)] = torch.tensor(x, dtype=torch.long)
            batch.dec_prefix = to_device(p, self.device)

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
        if self.mixed is not None and self.mixed.eligible(scheduled):
            logits = self._run_mixed(scheduled, feed)
            if logits is not None:
                return logits
        adapters, prefix_slots = self.adapters.prepare(scheduled) if self.adapters is not None else (None, None)
        return self.model(self.build(scheduled, adapters, prefix_slots, feed), self.kv)

    def _run_mixed(self, scheduled: list[Scheduled], feed: torch.Tensor | None) -> torch.Tensor | None:
        """A step with a prefill chunk through the mixed-step graphs (None: they are off now)."""
        m = self.adapters
        prefix_slots = [m.prefix_slots(item.seq) for item in scheduled] if m is not None else None
        batch = self.build(scheduled, None, prefix_slots, feed)
        token_slots = m.token_slots(scheduled) if m is not None else None
        return self.mixed.run(batch, token_slots, m.graph_batch if m is not None else None,
                              m.pool.version if m is not None else 0)
