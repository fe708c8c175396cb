"""End to end through a real gRPC channel on localhost: health, reflection, Generate and
GenerateStream from several clients at once, error statuses, the CLI client, clean shutdown."""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stdout

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conftest import hf_greedy
from quiver.server.app import Server
from quiver.server.config import EngineConfig, ModelConfig, ServerConfig
from quiver.server.pb import quiver_pb2 as pb
from quiver.server.pb import quiver_pb2_grpc as pb_grpc

PROMPTS = ["The capital of France is", "def add(a, b):", "Three colors are", "Water boils at",
           "Once upon a time, a small robot", "The best way to learn is"]
NEW = 12


@pytest.fixture(scope="module")
def server(fp32_model):
    srv = Server(ServerConfig(port=0), ModelConfig(), EngineConfig(max_model_len=256, max_num_batched_tokens=64),
                 loaded=fp32_model)
    port = srv.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(channel).result(timeout=30)
    yield srv, channel
    channel.close()
    srv.stop()
    assert not srv.engine._thread.is_alive(), "engine thread did not stop"


def test_health_and_reflection(server):
    _, channel = server
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.SERVING
    assert health.Check(health_pb2.HealthCheckRequest(service="quiver.v1.Quiver")).status == \
        health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in resp.list_services_response.service}
    assert {"quiver.v1.Quiver", "grpc.health.v1.Health"} <= names


def test_parallel_generate_and_stream(server, fp32_model):
    _, channel = server
    stub = pb_grpc.QuiverStub(channel)
    tok = fp32_model.tokenizer
    expected = {p: hf_greedy(fp32_model, tok(p)["input_ids"], NEW) for p in PROMPTS}

    def unary(p):
        r = stub.Generate(pb.GenerateRequest(prompt=p, max_new_tokens=NEW), timeout=120)
        return p, list(r.token_ids), r.text, r.finish_reason, r.completion_tokens

    def stream(p):
        ids, text, last = [], "", None
        for msg in stub.GenerateStream(pb.GenerateRequest(prompt=p, max_new_tokens=NEW), timeout=120):
            ids += msg.token_ids
            text += msg.text
            last = msg
        return p, ids, text, last.finish_reason, last.completion_tokens

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(unary, p) for p in PROMPTS] + [pool.submit(stream, p) for p in PROMPTS]
        results = [f.result() for f in futures]
    for p, ids, text, reason, n in results:
        assert ids == expected[p], p
        assert text == tok.decode(ids, skip_special_tokens=True)
        assert reason in ("length", "stop") and n == len(ids)


def test_chat_messages_use_template(server, fp32_model):
    _, channel = server
    stub = pb_grpc.QuiverStub(channel)
    req = pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="What is the capital of France?")],
                             max_new_tokens=10)
    resp = stub.Generate(req, timeout=60)
    tok = fp32_model.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert resp.prompt_tokens == len(ids)
    assert list(resp.token_ids) == hf_greedy(fp32_model, ids, 10)
    assert "Paris" in resp.text


def test_stop_string_and_seeded_sampling(server):
    _, channel = server
    stub = pb_grpc.QuiverStub(channel)
    full = stub.Generate(pb.GenerateRequest(prompt="1, 2, 3, 4,", max_new_tokens=12), timeout=60).text
    assert " 6," in full, full
    cut = stub.Generate(pb.GenerateRequest(prompt="1, 2, 3, 4,", max_new_tokens=12, stop=[" 6,"]), timeout=60)
    assert cut.finish_reason == "stop" and cut.text == full[: full.index(" 6,")]
    req = pb.GenerateRequest(prompt="Once upon a time", max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    a, b = stub.Generate(req, timeout=60), stub.Generate(req, timeout=60)
    assert list(a.token_ids) == list(b.token_ids)
    req.seed = 8
    other = [list(stub.Generate(req, timeout=60).token_ids) for _ in range(1)]
    greedy = stub.Generate(pb.GenerateRequest(prompt="Once upon a time", max_new_tokens=10, top_k=1,
                                              temperature=1.0), timeout=60)
    zero_t = stub.Generate(pb.GenerateRequest(prompt="Once upon a time", max_new_tokens=10), timeout=60)
    assert list(greedy.token_ids) == list(zero_t.token_ids)
    assert other[0] != list(a.token_ids) or list(a.token_ids) != list(greedy.token_ids)


@pytest.mark.parametrize("req,code", [
    (pb.GenerateRequest(prompt=""), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(prompt="hi", max_new_tokens=-1), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(prompt="hi", temperature=-0.5), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(prompt="hi", top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(prompt="word " * 400), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(prompt="hi", messages=[pb.ChatMessage(role="user", content="x")]),
     grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(messages=[pb.ChatMessage(role="robot", content="x")]), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(prompt="hi", adapter_id="no-such-adapter"), grpc.StatusCode.NOT_FOUND),
])
def test_bad_requests_get_clear_status(server, req, code):
    _, channel = server
    stub = pb_grpc.QuiverStub(channel)
    for call in (stub.Generate, lambda r, timeout: list(stub.GenerateStream(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as info:
            call(req, timeout=30)
        assert info.value.code() == code
        assert info.value.details()


def test_unimplemented_rpcs(server):
    _, channel = server
    stub = pb_grpc.QuiverStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.DeleteAdapter(pb.DeleteAdapterRequest(adapter_id="x"), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_cancelled_stream_frees_its_sequence(server):
    srv, channel = server
    stub = pb_grpc.QuiverStub(channel)
    call = stub.GenerateStream(pb.GenerateRequest(prompt="Tell me a long story", max_new_tokens=200), timeout=60)
    next(call)
    call.cancel()
    done = threading.Event()
    for _ in range(100):
        if not srv.engine.scheduler.has_work():
            done.set()
            break
        threading.Event().wait(0.1)
    assert done.is_set(), "cancelled request still running"
    assert srv.engine.blocks.num_free == srv.engine.blocks.num_blocks


def test_cli_generate(server):
    from quiver.server.cli import main

    srv, _ = server
    out = io.StringIO()
    with redirect_stdout(out):
        rc = main(["generate", "The capital of France is", "--target", f"127.0.0.1:{srv.port}",
                   "--max-new-tokens", "5"])
    assert rc == 0 and "Paris" in out.getvalue()
