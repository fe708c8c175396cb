"""CUDA graphs for decode-only steps at bucketed batch sizes.

Contract: `DecodeGraphs.eligible(scheduled)` says whether a step can replay a graph (CUDA,
every sequence decoding one token, batch within the largest bucket, prefix-tuning prefixes
block-aligned); `run(scheduled, adapter_batch_factory)` copies the step into static buffers,
replays the graph of the smallest bucket >= batch and returns logits [batch, vocab].
Padding rows write to a scratch KV slot, attend to nothing (context 0) and use no adapter.
A graph is captured on first use of a (bucket, adapters on/off, pool version) key, or ahead
of time by `capture_all()` (no-adapter graphs of every bucket; the engine does it when its
thread starts); if capture fails (an op that cannot be captured), graphs are switched off and
steps run eagerly.
"""

from __future__ import annotations

import logging
import time

import torch

from quiver.server.engine.sequence import resolve_placeholders
from quiver.server.model import KVCache, LlamaForward, StepBatch

log = logging.getLogger(__name__)


def buckets_up_to(n: int) -> list[int]:
    out, b = [], 1
    while b < n:
        out.append(b)
        b = b * 2 if b < 8 else b + 8 if b < 64 else b + 32
    return out + [n]


def graph_key(cache: dict, bucket: int, use_adapters: bool, pool_version: int) -> tuple:
    """The key of a step's graphs in cache: (bucket, adapters on/off, pool version). Graphs
    over an older pool version are never replayed again: a new version's first key frees them."""
    key = (bucket, use_adapters, pool_version if use_adapters else 0)
    if use_adapters and key not in cache:
        for stale in [k for k in cache if k[1] and k[2] != key[2]]:
            del cache[stale]
    return key


class DecodeGraphs:
    def __init__(self, model: LlamaForward, kv: KVCache, max_batch: int, max_blocks: int, scratch_slot: int,
                 device: torch.device):
        self.model, self.kv, self.device = model, kv, device
        self.buckets = buckets_up_to(max_batch)
        self.max_blocks = max_blocks
        self.scratch_slot = scratch_slot
        n = max_batch
        # The step's inputs live in two flat device buffers (int64: ids, positions, KV slots;
        # int32: block tables, context lengths, adapter slots) with pinned host mirrors: a step
        # is written into the mirrors and copied with two host->device copies.
        pin = device.type == "cuda"
        self.host64 = torch.zeros(3 * n, dtype=torch.long, pin_memory=pin)
        self.host32 = torch.zeros(n * max_blocks + 2 * n, dtype=torch.int32, pin_memory=pin)
        self.dev64 = torch.zeros(3 * n, dtype=torch.long, device=device)
        self.dev32 = torch.zeros(n * max_blocks + 2 * n, dtype=torch.int32, device=device)
        self.input_ids, self.positions, self.slot_mapping = self.dev64.view(3, n)
        self.block_tables = self.dev32[: n * max_blocks].view(n, max_blocks)
        self.context_lens, self.token_slot = self.dev32[n * max_blocks:].view(2, n)
        self.slot_mapping.fill_(scratch_slot)
        self.token_slot.fill_(-1)
        self.copied = None  # event: the last host->device copy of the mirrors is done
        self.sample_index = torch.arange(n, device=device)
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool_handle = None
        self.enabled = device.type == "cuda"

    def eligible(self, scheduled, block_size: int) -> bool:
        if not self.enabled or len(scheduled) > self.buckets[-1]:
            return False
        for item in scheduled:
            seq = item.seq
            if item.num_tokens != 1 or seq.num_computed + 1 != seq.num_tokens or seq.prefix_len % block_size:
                return False
        return True

    def _batch(self, bucket: int, adapters) -> StepBatch:
        b = bucket
        return StepBatch(
            input_ids=self.input_ids[:b], positions=self.positions[:b], slot_mapping=self.slot_mapping[:b],
            sample_index=self.sample_index[:b], adapters=adapters, block_tables=self.block_tables[:b],
            context_lens=self.context_lens[:b], block_size=self.kv.block_size,
        )

    def fill(self, scheduled, blocks, prefix_blocks, feed: torch.Tensor | None = None) -> None:
        """Writes the step into the pinned host mirrors and copies them to the static buffers
        (two host->device copies); rows past the batch are padding rows. Placeholder ids are
        then resolved from feed (the last step's tokens) on the device."""
        n, N, mb = len(scheduled), self.input_ids.shape[0], self.max_blocks
        if self.copied is not None:
            self.copied.synchronize()  # the mirrors are free again (normally long done)
        ids, pos, slots, ctx, slot_ids = [], [], [], [], []
        tables = self.host32[: N * mb].view(N, mb).numpy()
        tables[:n] = 0
        for i, item in enumerate(scheduled):
            seq = item.seq
            p = seq.num_computed
            ids.append(seq.token_at(p))
            pos.append(p + seq.prefix_len)
            slots.append(blocks.slot(seq, p))
            ctx.append(seq.prefix_len + p + 1)
            slot_ids.append(-1 if seq.slot is None else seq.slot)
            table = prefix_blocks(seq) + seq.block_table if seq.prefix_len else seq.block_table
            tables[i, : len(table)] = table
        h64 = self.host64.numpy()
        h64[:n], h64[N: N + n], h64[2 * N: 2 * N + n] = ids, pos, slots
        h64[n:N] = 0  # padding rows embed token 0 (never a stale placeholder)
        h64[2 * N + n:] = self.scratch_slot
        rest = self.host32[N * mb:].numpy()
        rest[:n], rest[n:N], rest[N: N + n], rest[N + n:] = ctx, 0, slot_ids, -1
        self.dev64.copy_(self.host64, non_blocking=True)
        self.dev32.copy_(self.host32, non_blocking=True)
        if ids and min(ids) < 0:
            self.input_ids[:n] = resolve_placeholders(self.input_ids[:n], feed)
        if self.device.type == "cuda":
            self.copied = torch.cuda.Event()
            self.copied.record(torch.cuda.current_stream(self.device))

    def capture_all(self) -> int:
        """Captures the no-adapter graph of every bucket, largest first (smaller captures reuse
        its memory), so no decode step stalls on a capture later. The static buffers hold
        padding rows meanwhile (context 0, scratch slot), as a real step's padding does.
        Returns the number captured; a failed capture switches graphs off, as in run()."""
        self.slot_mapping.fill_(self.scratch_slot)  # every row a padding row: the warm-up
        self.context_lens.zero_()  # passes of a capture write K/V to the scratch slot only
        self.token_slot.fill_(-1)
        for bucket in sorted(self.buckets, reverse=True):
            key = (bucket, False, 0)
            if not self.enabled:
                break
            if key not in self.graphs:
                self._try_capture(key, bucket, None)
        return sum(1 for key in self.graphs if not key[1])

    def capture_adapters(self, adapter_batch_factory, pool_version: int) -> int:
        """Captures the adapter graph of every bucket over the pool's current tensors (at start,
        once an adapter's stacks exist), so the first adapter requests do not stall on them. A
        failure stops this, not the graphs: a step then captures on first use, as before.
        Returns the number of adapter graphs now held."""
        self.slot_mapping.fill_(self.scratch_slot)
        self.context_lens.zero_()
        self.token_slot.fill_(-1)
        for bucket in sorted(self.buckets, reverse=True):
            key = graph_key(self.graphs, bucket, True, pool_version)
            if self.enabled and key not in self.graphs:
                try:
                    self.graphs[key] = self._capture(bucket, adapter_batch_factory(self.token_slot[:bucket]))
                except Exception as exc:
                    log.warning("decode CUDA graph capture with adapters failed at start (%s)", exc)
                    break
        return sum(1 for key in self.graphs if key[1])

    def _try_capture(self, key: tuple, bucket: int, adapters) -> bool:
        """Captures the graph of `key`; if capture fails (an op that cannot be captured), graphs
        are switched off and decode runs eagerly from now on."""
        try:
            self.graphs[key] = self._capture(bucket, adapters)
            return True
        except Exception as exc:
            log.warning("CUDA graph capture failed (%s); decode runs eagerly", exc)
            self.enabled = False
            return False

    def run(self, scheduled, blocks, adapter_batch_factory, prefix_blocks, pool_version: int,
            feed: torch.Tensor | None = None) -> torch.Tensor:
        n = len(scheduled)
        bucket = next(b for b in self.buckets if b >= n)
        self.fill(scheduled, blocks, prefix_blocks, feed)
        use_adapters = any(item.seq.slot is not None for item in scheduled)
        key = graph_key(self.graphs, bucket, use_adapters, pool_version)
        if key not in self.graphs:
            adapters = adapter_batch_factory(self.token_slot[:bucket]) if use_adapters else None
            if not self._try_capture(key, bucket, adapters):
                return self.model(self._batch(bucket, adapters), self.kv)[:n]
        graph, out = self.graphs[key]
        graph.replay()
        return out[:n]

    def _capture(self, bucket: int, adapters) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        t0 = time.perf_counter()
        batch = self._batch(bucket, adapters)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up: Triton compiles, allocator settles
                self.model(batch, self.kv)
        torch.cuda.current_stream().wait_stream(stream)
        if self.pool_handle is None:
            self.pool_handle = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool_handle, capture_error_mode="thread_local"):  # as mixed_graphs.py
            out = self.model(batch, self.kv)
        log.info("captured decode CUDA graph for batch %d (adapters %s) in %.0f ms", bucket, adapters is not None,
                 (time.perf_counter() - t0) * 1e3)
        return graph, out
