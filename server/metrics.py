"""Prometheus metrics of one Quiver server: the metric objects, their registry, the HTTP endpoint.

Each `Metrics` owns its own `CollectorRegistry` (not prometheus_client's global one), so several
servers in one process (the tests) never share or collide on a metric. Two kinds of metric:

- events, counted where they happen: `request_finished` (engine thread, once per request the
  engine took), `request_rejected` (gRPC thread, a request refused before the engine),
  `step` / `step_time` (engine thread, once per forward pass), `adapter_read` (request
  thread), `slot_load` / `slot_evicted` (engine thread). Each is a few counter increments or
  histogram observations, never work per token;
- state, read at scrape time by `StateCollector` from the engine's plain Python objects
  (queue lengths, free KV blocks, slot pool): the engine thread pays nothing for those.

Label cardinality: `adapter` is bounded by the adapters on disk under --adapter-dir (its value
is the id of an adapter that was found there), plus three fixed values: "" for the base model,
"<mix>" for every weighted mix of adapters (any weights: not one value per mix), "<unknown>"
for a request whose adapter id did not resolve (never the client's string, which is unbounded).
The latency histograms carry no adapter label (adapters x buckets series would not be bounded
by anything small). `status` is "ok", "cancelled", or an error code in lower case
(invalid_argument, not_found, failed_precondition, resource_exhausted, unavailable, internal).
"""

from __future__ import annotations

import logging
import time
from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)

BASE_LABEL = ""  # the base model; an adapter id is never empty (adapters/manager.py ID_RE)
MIX_LABEL = "<mix>"
UNKNOWN_LABEL = "<unknown>"

# Buckets in seconds. TTFT: a warm GPU answers in tens of ms, a queued or long prompt in seconds.
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
# TPOT: a few ms per token on a GPU at small batch, tens to hundreds on a CPU.
TPOT_BUCKETS = (0.002, 0.004, 0.006, 0.008, 0.01, 0.0125, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
STEP_BUCKETS = (0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.0125, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
                0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512)
ADAPTER_LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def adapter_label(ref) -> str:
    """The `adapter` label of a request the engine took: ref is its AdapterRef or None."""
    if ref is None:
        return BASE_LABEL
    return MIX_LABEL if ref.adapter_id.startswith("mix(") else ref.adapter_id


def finish_status(reason: str | None, error_kind: str | None) -> str:
    """The `status` label of a request the engine finished: its finish reason or error kind."""
    if error_kind is not None:
        return error_kind
    return "cancelled" if reason == "cancelled" else "ok"


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("quiver_requests", "Finished requests, by adapter and status", ["adapter", "status"],
                                registry=r)
        self.prompt_tokens = Counter("quiver_prompt_tokens", "Prompt tokens of the requests the engine finished",
                                     ["adapter"], registry=r)
        self.generation_tokens = Counter("quiver_generation_tokens",
                                         "Generated tokens of the requests the engine finished", ["adapter"],
                                         registry=r)
        self.ttft = Histogram("quiver_time_to_first_token_seconds",
                              "Submission to the first generated token, over requests that finished ok",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("quiver_time_per_output_token_seconds",
                              "Mean time per output token after the first, one sample per request that finished ok "
                              "with at least two tokens", buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("quiver_request_duration_seconds",
                             "Submission to the last token, over requests that finished ok", buckets=E2E_BUCKETS,
                             registry=r)
        steps = Counter("quiver_engine_steps", "Engine forward passes, by kind: decode (every sequence one token) "
                        "or prefill (a prefill chunk in the step)", ["kind"], registry=r)
        self.decode_steps, self.prefill_steps = steps.labels("decode"), steps.labels("prefill")
        self.step_duration = Histogram("quiver_engine_step_duration_seconds",
                                       "Wall time of an engine iteration that ran a forward pass (with overlapped "
                                       "steps: its launch and the step before's tokens)", buckets=STEP_BUCKETS,
                                       registry=r)
        self.batch_size = Histogram("quiver_engine_batch_size", "Sequences per forward pass", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.slot_loads = Counter("quiver_adapter_slot_loads",
                                  "Adapters copied from the CPU tier into an accelerator slot", registry=r)
        self.slot_evictions = Counter("quiver_adapter_slot_evictions",
                                      "Adapters evicted from an accelerator slot", registry=r)
        self.disk_load = Histogram("quiver_adapter_disk_load_duration_seconds",
                                   "Cold adapter loads: read, validated and staged from disk into the CPU tier "
                                   "(on the request's thread)", buckets=ADAPTER_LOAD_BUCKETS, registry=r)
        self.model = Info("quiver_model", "The served base model", registry=r)
        self.state = StateCollector()
        r.register(self.state)

    # ---- wiring ----
    def set_model(self, loaded) -> None:
        self.model.info({"model": str(loaded.name), "quantize": str(loaded.quantize),
                         "dtype": str(loaded.dtype).removeprefix("torch."), "device": str(loaded.device)})

    def bind(self, engine) -> None:
        """Reads the state gauges from engine (and its adapter manager) from now on."""
        self.state.engine = engine

    # ---- events ----
    def request_finished(self, seq, reason: str | None, error_kind: str | None) -> None:
        """seq left the engine (any outcome); its output_ids hold only real tokens."""
        now = time.monotonic()
        label = adapter_label(seq.adapter)
        status = finish_status(reason, error_kind)
        n_out = len(seq.output_ids)
        self.requests.labels(label, status).inc()
        self.prompt_tokens.labels(label).inc(len(seq.prompt_ids) - seq.virtual_tokens)
        self.generation_tokens.labels(label).inc(n_out)
        if status != "ok":
            return
        self.e2e.observe(now - seq.arrival)
        if seq.first_token_time is not None:
            self.ttft.observe(seq.first_token_time - seq.arrival)
            if n_out > 1:
                self.tpot.observe((now - seq.first_token_time) / (n_out - 1))

    def request_rejected(self, adapter: str, code_name: str) -> None:
        """A request refused before it reached the engine; code_name is the gRPC status name."""
        self.requests.labels(adapter, code_name.lower()).inc()

    def step(self, scheduled) -> None:
        """One forward pass over scheduled (a list of engine Scheduled items)."""
        self.batch_size.observe(len(scheduled))
        if any(item.num_tokens > 1 for item in scheduled):
            self.prefill_steps.inc()
        else:
            self.decode_steps.inc()

    def step_time(self, seconds: float) -> None:
        self.step_duration.observe(seconds)

    def adapter_read(self, seconds: float) -> None:
        self.disk_load.observe(seconds)

    def slot_load(self) -> None:
        self.slot_loads.inc()

    def slot_evicted(self) -> None:
        self.slot_evictions.inc()


# (name, help, kind, value(engine)) of the state StateCollector reads at scrape time
def _pool(engine):
    return engine.adapters.pool if engine.adapters is not None else None


STATE = (
    ("quiver_requests_running", "Sequences in the running batch", "gauge", lambda e: len(e.scheduler.running)),
    ("quiver_requests_waiting", "Sequences waiting to be scheduled (new or preempted)", "gauge",
     lambda e: len(e.scheduler.waiting)),
    ("quiver_engine_preemptions", "Sequences preempted (KV blocks freed, recomputed later)", "counter",
     lambda e: e.scheduler.preemptions),
    ("quiver_kv_blocks", "KV-cache blocks (capacity)", "gauge", lambda e: e.blocks.num_blocks),
    ("quiver_kv_blocks_used", "KV-cache blocks in use (sequences and adapters' shared prefix blocks)", "gauge",
     lambda e: e.blocks.num_blocks - e.blocks.num_free),
    ("quiver_kv_block_size_tokens", "Tokens per KV-cache block", "gauge", lambda e: e.blocks.block_size),
    ("quiver_adapter_slots", "Accelerator adapter slots (capacity; 0 without --adapter-dir)", "gauge",
     lambda e: _pool(e).S if _pool(e) is not None else 0),
    ("quiver_adapter_slots_used", "Accelerator slots holding an adapter", "gauge",
     lambda e: len(_pool(e).resident) if _pool(e) is not None else 0),
    ("quiver_adapter_slots_pinned", "Accelerator slots pinned by running requests", "gauge",
     lambda e: sum(1 for n in _pool(e).refs if n) if _pool(e) is not None else 0),
    ("quiver_adapters_cpu", "Adapters loaded in the CPU tier", "gauge",
     lambda e: len(e.adapters.cpu) if e.adapters is not None else 0),
)


class StateCollector:
    """The engine's state as gauges, read when Prometheus scrapes: lengths and counts of plain
    Python objects that the engine thread owns (a torn read is one scrape off, never an error)."""

    def __init__(self) -> None:
        self.engine = None

    def describe(self) -> Iterator:
        for name, help_text, kind, _ in STATE:
            yield (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(name, help_text)

    def collect(self) -> Iterator:
        engine = self.engine
        if engine is None:  # the model is still loading
            return
        for name, help_text, kind, value in STATE:
            cls = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            yield cls(name, help_text, value=value(engine))


def metrics_url(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6
    return f"http://{host}:{port}/metrics"


class MetricsEndpoint:
    """GET /metrics over HTTP on its own daemon thread; stop() closes it (the port is free after)."""

    def __init__(self, metrics: Metrics, host: str, port: int):
        self.httpd, self.thread = start_http_server(port, addr=host, registry=metrics.registry)
        self.port = self.httpd.server_port

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
