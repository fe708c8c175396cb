"""Prometheus metrics: the units of server/metrics.py, then a real server on the embedded model
scraped over HTTP after gRPC calls (base model, an adapter, refused requests, a cancel), and
the deploy/ files checked against the metric names the server exports."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from quiver.server.config import DEFAULT_METRICS_PORT, EngineConfig, ModelConfig, SamplingParams, ServerConfig
from quiver.server.engine.sequence import Sequence
from quiver.server.metrics import Metrics, MetricsEndpoint, adapter_label, finish_status, metrics_url

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """A /metrics page as {(sample name, labels): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(page, name: str, **labels) -> float:
    return page.get((name, frozenset(labels.items())), 0.0)


def total(page, name: str) -> float:
    """Sum of every sample of name, whatever its labels."""
    return sum(v for (n, _), v in page.items() if n == name)


def scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        return samples(resp.read().decode())


def delta(after, before, name: str, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


# ---- units ----

def test_labels_of_adapters_and_statuses():
    assert adapter_label(None) == ""
    assert adapter_label(SimpleNamespace(adapter_id="my-lora")) == "my-lora"
    assert adapter_label(SimpleNamespace(adapter_id="mix(a:0.5,b:0.5)")) == "<mix>"
    assert finish_status("stop", None) == "ok" and finish_status("length", None) == "ok"
    assert finish_status("cancelled", None) == "cancelled"
    assert finish_status(None, "resource_exhausted") == "resource_exhausted"


def finished_seq(arrival_ago: float, first_ago: float | None, n_out: int, adapter=None) -> Sequence:
    seq = Sequence([1, 2, 3, 4], SamplingParams(max_new_tokens=16), adapter=adapter)
    now = time.monotonic()
    seq.arrival = now - arrival_ago
    seq.first_token_time = None if first_ago is None else now - first_ago
    seq.output_ids = list(range(n_out))
    return seq


def test_request_finished_counts_tokens_and_observes_latencies():
    m = Metrics()
    get = m.registry.get_sample_value
    m.request_finished(finished_seq(2.0, 1.5, 5), "length", None)
    assert get("quiver_requests_total", {"adapter": "", "status": "ok"}) == 1
    assert get("quiver_prompt_tokens_total", {"adapter": ""}) == 4
    assert get("quiver_generation_tokens_total", {"adapter": ""}) == 5
    assert get("quiver_time_to_first_token_seconds_count") == 1
    assert get("quiver_time_to_first_token_seconds_sum") == pytest.approx(0.5, abs=0.05)
    assert get("quiver_time_per_output_token_seconds_sum") == pytest.approx(1.5 / 4, abs=0.05)
    assert get("quiver_request_duration_seconds_sum") == pytest.approx(2.0, abs=0.05)
    assert get("quiver_time_to_first_token_seconds_bucket", {"le": "0.4"}) is None  # not a bucket edge
    assert get("quiver_time_to_first_token_seconds_bucket", {"le": "0.3"}) == 0
    assert get("quiver_time_to_first_token_seconds_bucket", {"le": "0.75"}) == 1

    # a cancel and an error are counted with their tokens, but are no latency samples
    m.request_finished(finished_seq(1.0, 0.5, 3, SimpleNamespace(adapter_id="a1")), "cancelled", None)
    m.request_finished(finished_seq(1.0, None, 0, SimpleNamespace(adapter_id="a1")), None, "resource_exhausted")
    assert get("quiver_requests_total", {"adapter": "a1", "status": "cancelled"}) == 1
    assert get("quiver_requests_total", {"adapter": "a1", "status": "resource_exhausted"}) == 1
    assert get("quiver_generation_tokens_total", {"adapter": "a1"}) == 3
    assert get("quiver_time_to_first_token_seconds_count") == 1
    assert get("quiver_request_duration_seconds_count") == 1
    # one token: a TTFT sample, no time-per-output-token sample
    m.request_finished(finished_seq(1.0, 0.5, 1), "stop", None)
    assert get("quiver_time_to_first_token_seconds_count") == 2
    assert get("quiver_time_per_output_token_seconds_count") == 1


def test_prompt_tokens_leave_out_a_soft_prompt():
    m = Metrics()
    seq = finished_seq(1.0, 0.5, 2, SimpleNamespace(adapter_id="prompt"))
    seq.prompt_ids = [0] * 5 + seq.prompt_ids  # prompt tuning's virtual tokens (AdapterManager.acquire)
    seq.virtual_tokens = 5
    m.request_finished(seq, "stop", None)
    assert m.registry.get_sample_value("quiver_prompt_tokens_total", {"adapter": "prompt"}) == 4


def test_steps_by_kind_and_batch_size():
    m = Metrics()
    get = m.registry.get_sample_value
    item = lambda n: SimpleNamespace(num_tokens=n)  # noqa: E731
    m.step([item(1), item(1), item(1)])
    m.step([item(1), item(7)])
    m.step_time(0.003)
    assert get("quiver_engine_steps_total", {"kind": "decode"}) == 1
    assert get("quiver_engine_steps_total", {"kind": "prefill"}) == 1
    assert get("quiver_engine_batch_size_count") == 2 and get("quiver_engine_batch_size_sum") == 5
    assert get("quiver_engine_step_duration_seconds_bucket", {"le": "0.002"}) == 0
    assert get("quiver_engine_step_duration_seconds_bucket", {"le": "0.004"}) == 1


def fake_engine(adapters=None):
    blocks = SimpleNamespace(num_blocks=10, num_free=7, block_size=16)
    sched = SimpleNamespace(running=[1, 2], waiting=deque([3]), preemptions=4)
    return SimpleNamespace(scheduler=sched, blocks=blocks, adapters=adapters)


def test_state_is_read_at_scrape_time():
    m = Metrics()
    get = m.registry.get_sample_value
    assert get("quiver_kv_blocks") is None  # not bound yet (the model is loading)
    engine = fake_engine()
    m.bind(engine)
    assert get("quiver_requests_running") == 2 and get("quiver_requests_waiting") == 1
    assert get("quiver_kv_blocks") == 10 and get("quiver_kv_blocks_used") == 3
    assert get("quiver_engine_preemptions_total") == 4
    assert get("quiver_adapter_slots") == 0 and get("quiver_adapters_cpu") == 0
    engine.blocks.num_free = 10
    engine.scheduler.running.clear()
    assert get("quiver_kv_blocks_used") == 0 and get("quiver_requests_running") == 0
    pool = SimpleNamespace(S=4, resident={0: "w", 2: "w"}, refs=[1, 0, 0, 0])
    engine.adapters = SimpleNamespace(pool=pool, cpu={"a": 1, "b": 2, "c": 3})
    assert get("quiver_adapter_slots") == 4 and get("quiver_adapter_slots_used") == 2
    assert get("quiver_adapter_slots_pinned") == 1 and get("quiver_adapters_cpu") == 3


def test_model_info_and_separate_registries():
    a, b = Metrics(), Metrics()  # prometheus_client's global registry would refuse the second
    a.set_model(SimpleNamespace(name="m", quantize="nf4", dtype=torch.bfloat16, device=torch.device("cuda", 0)))
    a.slot_load()
    assert a.registry.get_sample_value("quiver_model_info", {"model": "m", "quantize": "nf4", "dtype": "bfloat16",
                                                             "device": "cuda:0"}) == 1
    assert a.registry.get_sample_value("quiver_adapter_slot_loads_total") == 1
    assert b.registry.get_sample_value("quiver_adapter_slot_loads_total") == 0


def test_endpoint_serves_and_stops():
    m = Metrics()
    m.request_rejected("", "INVALID_ARGUMENT")
    ep = MetricsEndpoint(m, "127.0.0.1", 0)
    port = ep.port
    assert port > 0
    page = scrape(port)
    assert value(page, "quiver_requests_total", adapter="", status="invalid_argument") == 1
    ep.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    with socket.socket() as s:  # the port is free again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def test_metrics_url():
    assert metrics_url("127.0.0.1", 9095) == "http://127.0.0.1:9095/metrics"
    assert metrics_url("::1", 9095) == "http://[::1]:9095/metrics"


def test_busy_metrics_port_fails_before_the_model_loads():
    from quiver.server.app import BindError, Server

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        srv = Server(ServerConfig(port=0, metrics_port=busy.getsockname()[1]), ModelConfig(model="/nonexistent"),
                     EngineConfig())
        with pytest.raises(BindError, match="metrics port"):
            srv.start()  # a model load would raise ModelLoadError instead
        srv.stop(0)


@pytest.mark.parametrize("flag", ["-2", "70000"])
def test_bad_metrics_port_flag(flag, capsys):
    from quiver.server.cli import main

    assert main(["serve", "--metrics-port", flag]) == 2
    assert "port" in capsys.readouterr().err


def test_metrics_port_config():
    assert ServerConfig().metrics_port is None  # library default: no metrics
    with pytest.raises(ValueError):
        ServerConfig(metrics_port=65536)


# ---- a real server ----

@pytest.fixture(scope="module")
def served(fp32_model, tmp_path_factory):
    """The embedded model with one small random LoRA under --adapter-dir, metrics on any free port."""
    from quiver.adapters.lora import save_lora
    from quiver.adapters.weights import LoraDelta
    from quiver.server.app import Server
    from quiver.server.pb import quiver_pb2_grpc as pb_grpc

    root = tmp_path_factory.mktemp("metrics_adapters")
    hidden = fp32_model.hf_config.hidden_size
    g = torch.Generator().manual_seed(0)
    save_lora(root / "lora1", {(layer, "q_proj"): LoraDelta(torch.randn(4, hidden, generator=g) * 0.05,
                                                            torch.randn(hidden, 4, generator=g) * 0.05, 1.0)
                               for layer in range(0, 30, 5)}, fp32_model.name)
    srv = Server(ServerConfig(port=0, metrics_port=0, adapter_dir=str(root), adapter_slots=2), ModelConfig(),
                 EngineConfig(max_model_len=256, max_num_batched_tokens=64), loaded=fp32_model)
    port = srv.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(channel).result(timeout=30)
    yield srv, pb_grpc.QuiverStub(channel)
    channel.close()
    metrics_port = srv.metrics_port
    srv.stop()
    with pytest.raises(urllib.error.URLError):  # stop() closed the endpoint
        urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2)


def test_metrics_after_requests(served):
    from quiver.server.pb import quiver_pb2 as pb

    srv, stub = served
    assert srv.metrics_port and srv.metrics_url == f"http://127.0.0.1:{srv.metrics_port}/metrics"
    engine = srv.engine
    before, steps_before = scrape(srv.metrics_port), engine.steps

    base = [stub.Generate(pb.GenerateRequest(prompt="The capital of France is", max_new_tokens=8), timeout=120)]
    chunks = list(stub.GenerateStream(pb.GenerateRequest(prompt="Three colors are", max_new_tokens=6), timeout=120))
    base.append(chunks[-1])  # the last message has the counts
    assert sum(len(c.token_ids) for c in chunks) == chunks[-1].completion_tokens
    lora = stub.Generate(pb.GenerateRequest(prompt="Water boils at", adapter_id="lora1", max_new_tokens=5),
                         timeout=120)
    for req, code in [(pb.GenerateRequest(prompt="hi", adapter_id="no-such-adapter"), grpc.StatusCode.NOT_FOUND),
                      (pb.GenerateRequest(prompt=""), grpc.StatusCode.INVALID_ARGUMENT)]:
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(req, timeout=30)
        assert err.value.code() == code
    after = scrape(srv.metrics_port)

    # requests: exactly the calls made, under the right labels, and nothing else
    assert delta(after, before, "quiver_requests_total", adapter="", status="ok") == 2
    assert delta(after, before, "quiver_requests_total", adapter="lora1", status="ok") == 1
    assert delta(after, before, "quiver_requests_total", adapter="<unknown>", status="not_found") == 1
    assert delta(after, before, "quiver_requests_total", adapter="", status="invalid_argument") == 1
    assert total(after, "quiver_requests_total") - total(before, "quiver_requests_total") == 5
    assert not any(n == "quiver_requests_total" and ("adapter", "no-such-adapter") in labels for n, labels in after)

    # tokens: what the responses returned
    assert delta(after, before, "quiver_generation_tokens_total", adapter="") == sum(r.completion_tokens for r in base)
    assert delta(after, before, "quiver_generation_tokens_total", adapter="lora1") == lora.completion_tokens
    assert delta(after, before, "quiver_prompt_tokens_total", adapter="") == sum(r.prompt_tokens for r in base)
    assert delta(after, before, "quiver_prompt_tokens_total", adapter="lora1") == lora.prompt_tokens

    # latencies: one sample per successful request
    ok = base + [lora]
    assert delta(after, before, "quiver_time_to_first_token_seconds_count") == 3
    assert delta(after, before, "quiver_request_duration_seconds_count") == 3
    assert delta(after, before, "quiver_time_per_output_token_seconds_count") == \
        sum(r.completion_tokens > 1 for r in ok)
    ttft = delta(after, before, "quiver_time_to_first_token_seconds_sum")
    assert 0 < ttft <= delta(after, before, "quiver_request_duration_seconds_sum")

    # engine: every forward pass counted once, with its batch size and time
    steps = engine.steps - steps_before
    assert steps > 0
    decode = delta(after, before, "quiver_engine_steps_total", kind="decode")
    prefill = delta(after, before, "quiver_engine_steps_total", kind="prefill")
    assert decode + prefill == steps and prefill == 3  # one prompt at a time, each one chunk
    assert delta(after, before, "quiver_engine_batch_size_count") == steps
    assert delta(after, before, "quiver_engine_step_duration_seconds_count") == steps
    assert delta(after, before, "quiver_engine_step_duration_seconds_sum") > 0

    # state: idle again, the KV cache whole, the adapter resident
    assert value(after, "quiver_kv_blocks") == engine.blocks.num_blocks > 0
    assert value(after, "quiver_kv_blocks_used") == 0 <= value(after, "quiver_kv_blocks")
    assert value(after, "quiver_requests_running") == 0 and value(after, "quiver_requests_waiting") == 0
    assert value(after, "quiver_adapter_slots") == 2 and value(after, "quiver_adapter_slots_used") == 1
    assert value(after, "quiver_adapter_slots_pinned") == 0 and value(after, "quiver_adapters_cpu") == 1
    assert delta(after, before, "quiver_adapter_slot_loads_total") == 1
    assert delta(after, before, "quiver_adapter_disk_load_duration_seconds_count") == 1
    assert value(after, "quiver_model_info", model=srv.loaded.name, quantize="none", dtype="float32",
                 device="cpu") == 1


def test_kv_blocks_used_while_a_request_runs_and_a_cancel_is_counted(served):
    from quiver.server.pb import quiver_pb2 as pb

    srv, stub = served
    before = scrape(srv.metrics_port)
    call = stub.GenerateStream(pb.GenerateRequest(prompt="Tell me a long story", max_new_tokens=200), timeout=60)
    got = len(next(call).token_ids)
    during = scrape(srv.metrics_port)
    assert 0 < value(during, "quiver_kv_blocks_used") <= value(during, "quiver_kv_blocks")
    assert value(during, "quiver_requests_running") == 1
    call.cancel()
    for _ in range(100):  # the engine takes the cancel on its own thread
        after = scrape(srv.metrics_port)
        if total(after, "quiver_requests_total") > total(before, "quiver_requests_total"):
            break
        threading.Event().wait(0.1)
    assert delta(after, before, "quiver_requests_total", adapter="", status="cancelled") == 1
    assert total(after, "quiver_requests_total") - total(before, "quiver_requests_total") == 1
    assert delta(after, before, "quiver_generation_tokens_total", adapter="") >= got
    assert delta(after, before, "quiver_time_to_first_token_seconds_count") == 0  # ok requests only
    assert value(after, "quiver_kv_blocks_used") == 0


# ---- deploy/ files against the names the server exports ----

def dashboard_exprs() -> list[str]:
    dash = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v.get("definition")]
    return exprs


def test_dashboard_is_importable_json():
    dash = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)) and len(panels) >= 10
    for p in panels:
        assert p["type"] in ("timeseries", "stat", "table", "gauge") and p["targets"], p["title"]
        assert {"x", "y", "w", "h"} <= set(p["gridPos"]) and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        for t in p["targets"]:
            assert t["refId"] and t["expr"] and t["datasource"]["uid"] == "${datasource}"
    names = {v["name"] for v in dash["templating"]["list"]}
    assert "datasource" in names
    for e in dashboard_exprs():  # every $variable is defined (or one of Grafana's own)
        for var in re.findall(r"\$(\w+)", e):
            assert var in names or var.startswith("__"), (var, e)
    text = " ".join(dashboard_exprs())
    for needed in ("histogram_quantile(0.5, sum by (le) (rate(quiver_time_to_first_token_seconds_bucket",
                   "histogram_quantile(0.99, sum by (le) (rate(quiver_time_per_output_token_seconds_bucket",
                   "quiver_generation_tokens_total", "quiver_kv_blocks_used", "quiver_adapter_slot_loads_total",
                   "quiver_engine_step_duration_seconds_bucket", "quiver_requests_running", "quiver_requests_waiting"):
        assert needed in text, needed


def test_dashboard_uses_only_exported_metric_names(served):
    from quiver.server.pb import quiver_pb2 as pb

    srv, stub = served
    stub.Generate(pb.GenerateRequest(prompt="Hello", max_new_tokens=2), timeout=60)  # labeled series exist
    exported = {name for name, _ in scrape(srv.metrics_port)}
    used = {n for e in dashboard_exprs() for n in re.findall(r"\bquiver_[a-z0-9_]+", e)}
    assert len(used) >= 15
    assert used <= exported, sorted(used - exported)


def test_prometheus_and_compose_agree_on_the_metrics_port():
    yaml = pytest.importorskip("yaml")
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "quiver")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    host, port = job["static_configs"][0]["targets"][0].split(":")
    assert int(port) == DEFAULT_METRICS_PORT
    compose = yaml.safe_load((DEPLOY / "compose.yml").read_text())
    services = compose["services"]
    assert host in services and services[host]["build"]["dockerfile"] == "Dockerfile"
    assert (DEPLOY / services[host]["build"]["context"] / "Dockerfile").is_file()
    cmd = services[host]["command"]
    assert cmd[cmd.index("--metrics-port") + 1] == port and f"{port}:{port}" in services[host]["ports"]
    mounts = {m.split(":")[0] for s in services.values() for m in s.get("volumes", [])}
    for path in mounts:
        assert (DEPLOY / path).is_file(), path
    assert {"./prometheus.yml", "./grafana-dashboard.json"} <= mounts
    assert f"EXPOSE 50051 {port}" in (DEPLOY.parent / "Dockerfile").read_text()
