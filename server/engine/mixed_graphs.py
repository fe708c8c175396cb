"""CUDA graphs for mixed steps (prefill chunks beside decodes), piecewise around attention.

A decode step's graph (graphs.py) holds the whole forward. A mixed step's attention changes
shape nearly every step (the prefill's length and context), but everything else in a layer
depends only on the number of tokens. So per key (token bucket, adapters on/off, pool version):

    pre graph   embeddings, the adapter batch's index math, rotary tables -> static h, cos, sin
    per layer   graph A: norm, q|k|v with adapters, rotary, KV write       -> static q
                attention, eager, over the step's real rows (DecoderLayer.attend)
                graph B: o_proj, residual and norm, the MLP with adapters  -> static h

then the LM head, eager, on the sampled rows. An eager mixed step launches every op from Python
(tens of ms of host time for about 15 ms of GPU time on a 7B model, docs/BENCHMARKS.md);
here the host launches the attention ops and replays the rest.

Contract: `eligible(scheduled)`: enabled (CUDA), the step's tokens within the largest bucket
(max_num_batched_tokens rounded up to STEP, at most MAX_TOKENS),
no soft prompt being prefilled (its embeddings are written per step). `run(batch, token_slots,
adapter_batch_factory, pool_version) -> logits | None`: batch is the step's eager StepBatch
without adapters (its attention fields and sample_index); the tokens go into static buffers of
the smallest bucket >= T (padding rows: token 0, position 0, the scratch KV slot, no adapter).
`capture_all()` captures every bucket's graphs without adapters (the engine does it when it
starts); a key with adapters is captured on its first use. If a capture fails, run returns
None and the caller runs the step eagerly; after MAX_FAILURES failed captures mixed graphs
are switched off and every such step runs eagerly.
capture=False (tests on the CPU) calls the pieces instead of replaying captured graphs: the
same buffers, padding and order, without CUDA.
"""

from __future__ import annotations

import logging
import time

import torch

from quiver.adapters.pinned import to_device
from quiver.server.engine.graphs import graph_key
from quiver.server.model import KVCache, LlamaForward, StepBatch

log = logging.getLogger(__name__)

STEP = 64  # token buckets are multiples of this, as the prefill path's rows (kernels/nf4_words.PREFILL_M_BUCKET)
MAX_TOKENS = 1024  # the largest bucket: larger steps run eagerly (their GPU time grows, their launch does not)
MAX_FAILURES = 3  # failed captures before mixed graphs are switched off (one may be another thread's doing)


class MixedGraphs:
    def __init__(self, model: LlamaForward, kv: KVCache, max_tokens: int, scratch_slot: int, device: torch.device,
                 capture: bool = True):
        self.model, self.kv, self.device, self.capture = model, kv, device, capture
        self.buckets = list(range(STEP, -(-min(max_tokens, MAX_TOKENS) // STEP) * STEP + 1, STEP))
        self.scratch_slot = scratch_slot
        n, dt = self.buckets[-1], model.embed.dtype
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), scratch_slot, dtype=torch.long, device=device)
        self.token_slot = torch.full((n,), -1, dtype=torch.int32, device=device)
        self.h = torch.zeros(n, model.embed.shape[1], dtype=dt, device=device)
        self.q = torch.zeros(n, model.n_heads * model.head_dim, dtype=dt, device=device)
        self.attn = torch.zeros_like(self.q)
        self.cos = self.sin = None  # [n, D], shaped by the model's rotary module at the first capture
        self.sets: dict[tuple, list] = {}  # key -> [pre, A0, B0, A1, ...]: CUDA graphs (or Uncaptured)
        self.pool_handle = None
        self.failures = 0
        self.enabled = device.type == "cuda" or not capture

    def eligible(self, scheduled) -> bool:
        if not self.enabled or sum(item.num_tokens for item in scheduled) > self.buckets[-1]:
            return False
        return not any(item.seq.virtual_tokens and item.seq.num_computed < item.seq.virtual_tokens
                       for item in scheduled)

    @torch.inference_mode()
    def run(self, batch: StepBatch, token_slots: list[int] | None, adapter_batch_factory,
            pool_version: int) -> torch.Tensor | None:
        T = batch.input_ids.shape[0]
        bucket = next(b for b in self.buckets if b >= T)
        use_adapters = token_slots is not None
        key = graph_key(self.sets, bucket, use_adapters, pool_version)
        if key not in self.sets:
            adapters = adapter_batch_factory(self.token_slot[:bucket]) if use_adapters else None
            if not self._try_capture(key, bucket, adapters):
                return None
        self._fill(batch, token_slots, T, bucket)
        graphs = self.sets[key]
        graphs[0].replay()
        for i, layer in enumerate(self.model.layers):
            graphs[1 + 2 * i].replay()
            self.attn[:T] = layer.attend(self.q[:T], batch, self.kv)
            graphs[2 + 2 * i].replay()
        return self.model.logits(self.h, batch.sample_index)

    @torch.inference_mode()
    def capture_all(self) -> int:
        """Captures the no-adapter graphs of every bucket, largest first, so that no step stalls
        on those captures while serving (graphs with adapters are captured on first use, as the
        pool's version names them). Returns the number of buckets captured."""
        for bucket in sorted(self.buckets, reverse=True):
            if self.enabled and (bucket, False, 0) not in self.sets:
                self._try_capture((bucket, False, 0), bucket, None)
        return sum(1 for key in self.sets if not key[1])

    @torch.inference_mode()
    def capture_adapters(self, adapter_batch_factory, pool_version: int) -> int:
        """The adapter graphs of every bucket over the pool's current tensors, as capture_all
        (at start, once an adapter's stacks exist). Returns the number of adapter sets held."""
        for bucket in sorted(self.buckets, reverse=True):
            key = graph_key(self.sets, bucket, True, pool_version)
            if self.enabled and key not in self.sets:
                if not self._try_capture(key, bucket, adapter_batch_factory(self.token_slot[:bucket])):
                    break
        return sum(1 for key in self.sets if key[1])

    def _try_capture(self, key: tuple, bucket: int, adapters) -> bool:
        try:
            self.sets[key] = self._capture(bucket, adapters)
            return True
        except Exception as exc:  # this step runs eagerly; after MAX_FAILURES, every mixed step does
            self.failures += 1
            off = self.failures >= MAX_FAILURES
            log.warning("mixed-step CUDA graph capture failed (%s); %s", exc,
                        "mixed steps run eagerly from now on" if off else "this step runs eagerly")
            if off:
                self.enabled = False
                self.sets.clear()  # never replayed again: their memory goes back to the pool
            return False

    def _fill(self, batch: StepBatch, token_slots: list[int] | None, T: int, bucket: int) -> None:
        self.input_ids[:T], self.positions[:T], self.slot_mapping[:T] = batch.input_ids, batch.positions, batch.slot_mapping
        self.input_ids[T:bucket], self.positions[T:bucket] = 0, 0
        self.slot_mapping[T:bucket] = self.scratch_slot
        if token_slots is not None:
            self.token_slot[:T] = to_device(token_slots, self.device, torch.int32)
            self.token_slot[T:bucket] = -1

    def _capture(self, bucket: int, adapters) -> list:
        """The pre graph, then graphs A and B of every layer, over padding rows (the scratch KV
        slot, no adapter), after two eager passes that compile the kernels of this bucket."""
        t0 = time.perf_counter()
        self.slot_mapping.fill_(self.scratch_slot)
        self.token_slot.fill_(-1)
        b = StepBatch(input_ids=self.input_ids[:bucket], positions=self.positions[:bucket],
                      slot_mapping=self.slot_mapping[:bucket], sample_index=self.input_ids[:0], adapters=adapters)
        if self.cos is None:
            cos, _ = self.model.rotary_tables(self.positions, self.h.dtype)
            self.cos, self.sin = torch.zeros_like(cos), torch.zeros_like(cos)
        h, q, attn, cos, sin = self.h[:bucket], self.q[:bucket], self.attn[:bucket], self.cos[:bucket], self.sin[:bucket]

        def pre():
            h0, c, s = self.model.embed_step(b)
            h.copy_(h0), cos.copy_(c), sin.copy_(s)

        pieces = [pre]
        for layer in self.model.layers:
            pieces.append(lambda layer=layer: q.copy_(layer.attention_in(h, b, self.kv, cos, sin)))
            pieces.append(lambda layer=layer: h.copy_(layer.attention_out(attn, h, b)))
        if not self.capture:
            return [Uncaptured(piece) for piece in pieces]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up: Triton compiles, the allocator settles
                for piece in pieces:
                    piece()
        torch.cuda.current_stream().wait_stream(stream)
        if self.pool_handle is None:
            self.pool_handle = torch.cuda.graph_pool_handle()
        graphs = []
        for piece in pieces:
            graph = torch.cuda.CUDAGraph()
            # thread_local: a request thread's CUDA calls (a cold adapter load querying events or
            # pinning memory) do not invalidate this capture, as they would in the global mode
            with torch.cuda.graph(graph, pool=self.pool_handle, capture_error_mode="thread_local"):
                piece()
            graphs.append(graph)
        log.info("captured mixed-step CUDA graphs for %d tokens (adapters %s) in %.0f ms", bucket, adapters is not None,
                 (time.perf_counter() - t0) * 1e3)
        return graphs


class Uncaptured:
    """A piece run as it is (MixedGraphs(capture=False)), in place of its graph."""

    def __init__(self, piece):
        self.replay = piece
