"""The engine: continuous batching over the paged KV cache, one background thread.

Contract: `Engine.submit(prompt_ids, params, adapter) -> RequestHandle` is thread-safe and
validates at once (ValueError for bad input). The engine thread loops: take new requests
and cancellations, `Scheduler.schedule()`, run one forward pass over every scheduled
sequence (prefill chunks and decodes together), sample, stream `Event`s to each handle.
Requests join and leave the running batch at every step.

Overlapped steps (`EngineConfig.overlap`, on by default on CUDA): a step's sampled tokens
stay on the device, and the next step is scheduled and launched before they reach the host;
its input ids are placeholders that the device fills from those tokens (sequence.py). The
host then takes the tokens, streams them and checks the stop conditions while the device
runs that next step, so the device does not wait for host work. A step with a prefill chunk
that the mixed-step graphs take is launched the same way (OVERLAP_MIXED); one they do not take
is launched op by op and bound by the host, so it takes the tokens before it is launched
instead (that long launch would hold back the tokens, often first tokens). The costs: a sequence
that stops on EOS, a stop string or a cancel has had one more token computed, which is
dropped; and a request may share its batch with a stopped sequence one step longer, or be
admitted one step later. Given the same logits a step samples the same tokens (seeded
sampling included), but a different batch can round differently, as any change of batch can.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from quiver.server.config import EngineConfig, SamplingParams
from quiver.server.engine.block_manager import BlockManager
from quiver.server.engine.graphs import DecodeGraphs
from quiver.server.engine.mixed_graphs import MixedGraphs
from quiver.server.engine.output import Detokenizer
from quiver.server.engine.runner import ModelRunner
from quiver.server.engine.sampler import make_generator, sample_tokens
from quiver.server.engine.scheduler import Scheduler
from quiver.server.engine.sequence import Sequence, placeholder
from quiver.server.loader import LoadedModel
from quiver.server.model import KVCache

log = logging.getLogger(__name__)
# A step with a prefill chunk takes the step before's tokens first (Engine.step). True: a step
# that the mixed-step graphs take is launched first, its host work beside the step before's GPU
# time, as a decode step is. H200 serving, 32 adapters (docs/results/h200/serve_overlap_mixed_r15.log):
# 3959/4017 tok/s against 3773/3781 off (1.05-1.06x), TTFT p50 78-84 against 103-107 ms.
OVERLAP_MIXED = True

# Prompt lengths of the start-up warm-up (Engine.warm_up): one step with a prefill each, across
# the NF4 word kernel's batch-row buckets (<= 16, 32, 64, 128, and the dequantize + cuBLAS path
# above); the attention kernels of those shapes compile then (the mixed-step graphs are captured
# before, by MixedGraphs.capture_all).
WARMUP_PROMPTS = (8, 24, 48, 100, 200)


@dataclass
class Event:
    """A chunk of one request's output; the last one has finish_reason (or error) set."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    error_kind: str | None = None  # "unavailable" | "resource_exhausted" | "internal" (set with error)
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Launched:
    """One step's sampled tokens on their way to the host: token i goes to
    seqs[i].output_ids[index[i]], where placeholder(i) holds its place meanwhile."""

    def __init__(self, seqs: list[Sequence], tokens: torch.Tensor):
        self.seqs = seqs
        self.index = [len(seq.output_ids) for seq in seqs]
        for i, seq in enumerate(seqs):
            seq.output_ids.append(placeholder(i))
        self.tokens = tokens  # on the device: the next step's placeholders read it
        self.ready = None
        if tokens.device.type == "cuda":
            self.host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self.host.copy_(tokens, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(torch.cuda.current_stream(tokens.device))
        else:
            self.host = tokens

    def values(self) -> list[int]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()


class RequestHandle:
    """The caller's side of one request: iterate events, or `result()` for the whole answer."""

    def __init__(self, engine: "Engine", seq: Sequence):
        self.engine = engine
        self.seq = seq
        self.events: queue.SimpleQueue[Event] = queue.SimpleQueue()  # C put: no lock + condition per token

    def __iter__(self):
        while True:
            ev = self.events.get()
            yield ev
            if ev.finish_reason is not None or ev.error is not None:
                return

    def result(self) -> Event:
        total = Event()
        for ev in self:
            total.text += ev.text
            total.token_ids += ev.token_ids
            total.finish_reason, total.error, total.error_kind = ev.finish_reason, ev.error, ev.error_kind
            total.prompt_tokens, total.completion_tokens = ev.prompt_tokens, ev.completion_tokens
        return total

    def cancel(self) -> None:
        self.engine.cancel(self)


class Engine:
    def __init__(self, loaded: LoadedModel, cfg: EngineConfig | None = None, adapters=None):
        self.loaded = loaded
        self.cfg = cfg or EngineConfig()
        self.tokenizer = loaded.tokenizer
        self.eos_ids = set(loaded.eos_token_ids)
        m = loaded.model
        # one block beyond the manager's range: the scratch slots that CUDA-graph padding rows write to
        self.kv = KVCache(m.n_layers, self.cfg.num_blocks + 1, self.cfg.block_size, m.n_kv_heads, m.head_dim,
                          loaded.dtype, loaded.device)
        self.blocks = BlockManager(self.cfg.num_blocks, self.cfg.block_size)
        self.adapters = adapters  # quiver.adapters.manager.AdapterManager, or None
        self.scheduler = Scheduler(self.cfg, self.blocks, admit=adapters.admit if adapters is not None else None,
                                   reclaim=adapters.reclaim if adapters is not None else None)
        if adapters is not None:
            adapters.bind(self)
        graphs = None
        if loaded.device.type == "cuda" and self.cfg.cuda_graphs and loaded.quantize != "int8":
            # (bitsandbytes' int8 matmul syncs with the host and cannot be captured)
            scratch = self.cfg.num_blocks * self.cfg.block_size
            graphs = DecodeGraphs(m, self.kv, self.cfg.max_num_seqs, self.cfg.max_blocks_per_seq + 8, scratch,
                                  loaded.device)
        mixed = None
        if graphs is not None and self.cfg.mixed_graphs is not False:  # None (auto): on, as graphs are
            mixed = MixedGraphs(m, self.kv, self.cfg.max_num_batched_tokens, scratch, loaded.device)
        self.runner = ModelRunner(m, self.kv, self.blocks, loaded.device, graphs=graphs, adapters=adapters,
                                  mixed=mixed)
        self._handles: dict[int, RequestHandle] = {}
        self._detok: dict[int, Detokenizer] = {}
        self._gens: dict[int, torch.Generator] = {}
        self._inbox: list[tuple[str, RequestHandle]] = []
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._launched: Launched | None = None  # the last step's tokens, not yet on the host
        overlap = self.cfg.overlap
        self.overlap = loaded.device.type == "cuda" if overlap is None else overlap
        self.steps = 0
        self.metrics = None  # server/metrics.py Metrics, or None; the server sets it after the warm-up

    # ---- caller side (any thread) ----
    def submit(self, prompt_ids: list[int], params: SamplingParams, adapter=None, tenant: str = "") -> RequestHandle:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        limit = self.cfg.max_model_len
        if len(prompt_ids) >= limit:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; the context holds {limit} (prompt + at least one new token)")
        room = limit - len(prompt_ids)
        if params.max_new_tokens > room:
            params = SamplingParams(**{**params.__dict__, "max_new_tokens": room})
        seq = Sequence(list(prompt_ids), params, adapter=adapter, tenant=tenant)
        handle = RequestHandle(self, seq)
        with self._cv:
            self._inbox.append(("add", handle))
            self._cv.notify()
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        with self._cv:
            self._inbox.append(("cancel", handle))
            self._cv.notify()

    def start(self) -> None:
        graphs = self.runner.graphs
        if graphs is not None:  # capture every decode bucket now, not in the middle of serving
            t0 = time.monotonic()
            n = graphs.capture_all()
            log.info("captured %d decode CUDA graphs in %.1f s", n, time.monotonic() - t0)
        mixed = self.runner.mixed
        if mixed is not None:  # and the mixed-step graphs of every token bucket
            t0 = time.monotonic()
            n = mixed.capture_all()
            log.info("captured the mixed-step CUDA graphs of %d token buckets in %.1f s", n, time.monotonic() - t0)
        warm = self.cfg.warmup
        if warm or (warm is None and self.loaded.device.type == "cuda"):
            t0 = time.monotonic()
            try:
                n = self.warm_up()
                log.info("warm-up: %d steps in %.1f s", n, time.monotonic() - t0)
                self.capture_adapter_graphs()
            except Exception as exc:  # serving works without the warm-up, only slower at first
                log.exception("warm-up failed; serving without it")
                self._fail_all(exc)
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="quiver-engine", daemon=True)
        self._thread.start()

    def warm_up(self) -> int:
        """Runs one short request per WARMUP_PROMPTS length through the real step path, before
        the engine thread starts: the kernels of those step shapes are compiled now, not while
        the first requests wait (on the device a new shape's first step took 1.5-2 s). Call
        before start(); returns the number of steps run."""
        assert self._thread is None, "warm up before the engine thread starts"
        before = self.steps
        room = min(self.cfg.max_model_len, self.blocks.num_blocks * self.cfg.block_size)
        for n in WARMUP_PROMPTS:
            if n + 2 > room:
                break
            res = self._run_alone(self.submit([0] * n, SamplingParams(max_new_tokens=2, ignore_eos=True)))
            if res.error:  # not fatal: serving works without the warm-up, only slower at first
                log.warning("warm-up stopped at a %d-token prompt: %s", n, res.error)
                break
        return self.steps - before

    def _run_alone(self, handle: RequestHandle):
        """Steps the engine (its thread not started) until handle's request is done; its result."""
        while handle.seq.request_id in self._handles or self._inbox:
            inbox, self._inbox = self._inbox, []
            self._take(inbox)
            self.step()
        self._collect()  # with overlap a dropped token may still be on its way
        return handle.result()

    def capture_adapter_graphs(self) -> int:
        """With adapters on disk: one warm-up request through the first of them (its load
        allocates the pool's stacks), then the adapter graphs of every decode and mixed-step
        bucket, so that the first adapter requests do not stall the batch on those captures
        (130-610 ms each on the device, seconds when Triton compiles). Later captures happen
        only when the pool's version changes (a new stack, a larger rank). Returns the number of
        adapter graph sets held."""
        m, graphs, mixed = self.adapters, self.runner.graphs, self.runner.mixed
        if m is None or (graphs is None and mixed is None):
            return 0
        ids = m.ids()
        if not ids:
            return 0
        t0 = time.monotonic()
        try:
            handle = self.submit([0] * 8, SamplingParams(max_new_tokens=2, ignore_eos=True), adapter=m.resolve(ids[0]))
        except Exception as exc:  # an unreadable adapter: serving still works, its graphs come on first use
            log.warning("adapter warm-up skipped: %s", exc)
            return 0
        if self._run_alone(handle).error:
            return 0
        n = 0
        if graphs is not None:
            n += graphs.capture_adapters(m.graph_batch, m.pool.version)
        if mixed is not None:
            n += mixed.capture_adapters(m.graph_batch, m.pool.version)
        log.info("captured %d adapter CUDA graph sets (pool version %d) in %.1f s", n, m.pool.version,
                 time.monotonic() - t0)
        return n

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        for handle in list(self._handles.values()):
            self._finish(handle, None, error="server shutting down", kind="unavailable")

    # ---- engine thread ----
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._inbox and not self.scheduler.has_work():
                    self._cv.wait()
                if self._stop:
                    return
                inbox, self._inbox = self._inbox, []
            try:
                self._take(inbox)
                if self.scheduler.has_work():
                    metrics, steps, t0 = self.metrics, self.steps, time.perf_counter()
                    self.step()
                    if metrics is not None and self.steps != steps:  # a forward pass ran
                        metrics.step_time(time.perf_counter() - t0)
            except Exception as exc:  # never let the engine thread die with requests waiting on it
                log.exception("engine loop failed; failing the requests in flight")
                self._fail_all(exc)

    def _fail_all(self, exc: Exception) -> None:
        self._launched = None
        for handle in list(self._handles.values()):
            self._finish(handle, None, error=f"internal error: {exc}")

    def _take(self, inbox: list[tuple[str, RequestHandle]]) -> None:
        for kind, handle in inbox:
            seq = handle.seq
            if kind == "add":
                self._handles[seq.request_id] = handle
                self._detok[seq.request_id] = Detokenizer(self.tokenizer, seq.params.stop)
                self._gens[seq.request_id] = make_generator(seq.params.seed)
                if self.adapters is not None:
                    self.adapters.acquire(seq)
                self.scheduler.add(seq)
            elif seq.request_id in self._handles:
                self._finish(handle, "cancelled")

    def step(self) -> None:
        """One forward pass over everything the scheduler picks; run on the engine thread.
        With overlap, the tokens of the step before are taken to the host after this step is
        launched; without, this step's own tokens are taken before it returns."""
        scheduled = self.scheduler.schedule()
        if self.scheduler.refused:
            self._collect()  # their last tokens first, as without overlap (one may end them)
        for seq in self.scheduler.refused:
            if seq.request_id in self._handles:
                free = self.blocks.num_free * self.cfg.block_size
                self._finish(self._handles[seq.request_id], None, kind="resource_exhausted",
                             error=f"request outgrew the KV cache: its {seq.num_tokens} tokens (prompt and "
                                   f"output so far) do not fit in the {free} free token slots")
        if self.scheduler.refused:
            self.scheduler.refused.clear()
            scheduled = [item for item in scheduled if not item.seq.finished]  # as after the prefill collect
        if not scheduled:
            if self._launched is not None:  # running sequences wait for their last tokens
                self._collect()
                return
            if self.scheduler.running or not self.scheduler.waiting:
                return
            if self.scheduler.reclaim is not None and self.scheduler.reclaim():
                return  # idle adapters' prefix blocks are free now: the next step schedules again
            # nothing fits even with an empty batch: refuse the head of the queue
            handle = self._handles[self.scheduler.waiting[0].request_id]
            self._finish(handle, None, error="request does not fit in the KV cache", kind="resource_exhausted")
            return
        mixed = self.runner.mixed
        if self._launched is not None and any(item.num_tokens > 1 for item in scheduled) and \
                not (OVERLAP_MIXED and mixed is not None and mixed.eligible(scheduled)):
            # a prefill chunk outside the mixed-step graphs: the step is launched op by op and
            # the host is the bound, so there is little to overlap; take the tokens first, so
            # that they (often a first token) are not held back behind this long launch
            self._collect()
            scheduled = [item for item in scheduled if not item.seq.finished]
            if not scheduled:
                return
        self.steps += 1
        if self.metrics is not None:
            self.metrics.step(scheduled)
        feed = self._launched.tokens if self._launched is not None else None
        try:
            logits = self.runner.run(scheduled, feed)
        except Exception as exc:  # a failed step fails its requests, never the server
            log.exception("engine step failed")
            self._collect()  # the step before's tokens are good: stream them first
            for item in scheduled:
                handle = self._handles.get(item.seq.request_id)
                if handle is not None:  # (the collect may have finished it)
                    self._finish(handle, None, error=f"internal error: {exc}")
            return
        sampling = []
        for item in scheduled:
            seq = item.seq
            seq.num_computed += item.num_tokens
            if seq.num_computed == seq.num_tokens:
                sampling.append(seq)
        tokens = sample_tokens(logits, [s.params for s in sampling], [self._gens[s.request_id] for s in sampling])
        launched = Launched(sampling, tokens) if sampling else None
        self._collect()  # the step before's tokens: the device runs this step meanwhile
        self._launched = launched
        if not self.overlap:
            self._collect()

    def _collect(self) -> None:
        """Takes the launched step's tokens to the host and appends them; a sequence that
        finished meanwhile (stopped one step earlier, cancelled) drops its token."""
        launched, self._launched = self._launched, None
        if launched is None:
            return
        for seq, k, token in zip(launched.seqs, launched.index, launched.values()):
            if not seq.finished:
                seq.output_ids[k] = token
                self._append(seq, k, token)

    def _append(self, seq: Sequence, k: int, token: int) -> None:
        """Output token k of seq is known: stream it, or finish seq on a stop condition."""
        handle = self._handles[seq.request_id]
        detok = self._detok[seq.request_id]
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        is_eos = token in self.eos_ids and not seq.params.ignore_eos
        text = "" if is_eos else detok.push(token)
        if is_eos or detok.stopped:
            reason = "stop"
        elif k + 1 >= seq.params.max_new_tokens:
            reason = "length"
        else:
            handle.events.put(Event(text=text, token_ids=[token]))
            return
        handle.events.put(Event(text=text + detok.flush(), token_ids=[token]))
        self._finish(handle, reason)

    def _finish(self, handle: RequestHandle, reason: str | None, error: str | None = None,
                kind: str = "internal") -> None:
        seq = handle.seq
        if seq.request_id not in self._handles:
            return
        self.scheduler.finish(seq, reason or "error")
        while seq.output_ids and seq.output_ids[-1] < 0:
            seq.output_ids.pop()  # a token computed past the stop: dropped
        if self.adapters is not None:
            self.adapters.release(seq)
        if self.metrics is not None:  # before the last event: a caller that has its answer sees it counted
            self.metrics.request_finished(seq, reason, kind if error else None)
        del self._handles[seq.request_id], self._detok[seq.request_id], self._gens[seq.request_id]
        handle.events.put(Event(finish_reason=reason, error=error, error_kind=kind if error else None, prompt_tokens=len(seq.prompt_ids) - seq.virtual_tokens,
                                completion_tokens=len(seq.output_ids)))
