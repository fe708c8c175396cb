"""Load generator: workload statistics (fixed seeds), percentiles, the report, a fake server
(adapters, errors, closed loop), the real server end to end, and an unreachable target."""

from __future__ import annotations

import io
import json
import math
import random
import socket
import subprocess
import sys
import time
from concurrent import futures
from contextlib import redirect_stderr, redirect_stdout

import grpc
import numpy as np
import pytest

from quiver.loadtest.cli import main
from quiver.loadtest.client import Tally, render
from quiver.loadtest.report import Result, percentile, summarize, to_markdown
from quiver.loadtest.workload import (AdapterSampler, LengthDist, WorkloadSpec, arrival_times, choose_adapters,
                                      make_prompt, plan_requests, popularity_weights, request_stream)
from quiver.server.pb import quiver_pb2 as pb
from quiver.server.pb import quiver_pb2_grpc as pb_grpc


# ---- percentiles -------------------------------------------------------------------------
def test_percentile_matches_numpy_linear():
    rng = random.Random(0)
    for n in (1, 2, 3, 10, 101):
        xs = [rng.uniform(-5, 50) for _ in range(n)]
        for q in (0, 1, 25, 50, 90, 99, 99.9, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), abs=1e-12)
    assert percentile([], 50) is None
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([3, 1, 2], 100) == 3
    assert percentile([10, 20], 90) == pytest.approx(19.0)
    with pytest.raises(ValueError):
        percentile([1], 101)


# ---- arrivals ----------------------------------------------------------------------------
def _gaps(process, rate, cv=1.0, n=20000, seed=1):
    it = arrival_times(process, rate, random.Random(seed), cv)
    times = [next(it) for _ in range(n)]
    return np.diff([0.0] + times)


def test_poisson_gaps_mean_and_cv():
    g = _gaps("poisson", rate=4.0)
    assert g.mean() == pytest.approx(0.25, rel=0.03)
    assert g.std() / g.mean() == pytest.approx(1.0, rel=0.05)
    assert (g > 0).all()


@pytest.mark.parametrize("cv", [0.5, 2.0, 3.0])
def test_gamma_gaps_mean_and_cv(cv):
    g = _gaps("gamma", rate=2.0, cv=cv, n=40000)
    assert g.mean() == pytest.approx(0.5, rel=0.05)
    assert g.std() / g.mean() == pytest.approx(cv, rel=0.1)


def test_arrivals_stop_at_duration_and_reject_closed():
    times = list(arrival_times("poisson", 10.0, random.Random(3), duration=200.0))
    assert times == sorted(times) and times[-1] < 200.0
    assert len(times) == pytest.approx(2000, rel=0.1)
    with pytest.raises(ValueError):
        next(arrival_times("closed", 1.0, random.Random(0)))
    with pytest.raises(ValueError):
        next(arrival_times("poisson", 0.0, random.Random(0)))


# ---- adapter popularity ------------------------------------------------------------------
def _freqs(sampler, n=40000, seed=2):
    rng = random.Random(seed)
    counts = np.bincount([sampler.index(rng) for _ in range(n)], minlength=len(sampler.ids))
    return counts / n


@pytest.mark.parametrize("alpha", [1.0, 1.5])
def test_zipf_rank_frequencies(alpha):
    f = _freqs(AdapterSampler([f"a{i}" for i in range(8)], "zipf", alpha))
    assert f.argmax() == 0
    assert all(f[i] > f[i + 1] * 0.95 for i in range(7))  # decreasing (up to noise at the tail)
    slope = np.polyfit(np.log(np.arange(1, 9)), np.log(f), 1)[0]
    assert slope == pytest.approx(-alpha, abs=0.1)
    assert f[0] / f[3] == pytest.approx(4 ** alpha, rel=0.15)
    expected = popularity_weights(8, "zipf", alpha)
    assert np.abs(f - expected).max() < 0.01


def test_powerlaw_is_slora_numpy_power():
    n, alpha = 10, 0.3
    w = popularity_weights(n, "powerlaw", alpha)
    assert sum(w) == pytest.approx(1.0) and w == sorted(w, reverse=True)
    ref = np.bincount((np.random.default_rng(0).power(alpha, 200000) * n).astype(int), minlength=n) / 200000
    assert np.abs(np.array(w) - ref).max() < 0.01
    assert popularity_weights(4, "powerlaw", 1.0) == pytest.approx([0.25] * 4)


def test_uniform_popularity_and_base_model():
    f = _freqs(AdapterSampler(list("abcde"), "uniform"))
    assert np.abs(f - 0.2).max() < 0.015
    base = AdapterSampler([], "zipf")
    assert base.ids == [""] and base(random.Random(0)) == ""
    with pytest.raises(ValueError):
        popularity_weights(3, "pareto", 1.0)


def test_choose_adapters_cycles():
    assert choose_adapters(["x", "y", "z"], 2) == ["x", "y"]
    assert choose_adapters(["x", "y"], 5) == ["x", "y", "x", "y", "x"]
    assert choose_adapters([], 0) == [""]
    with pytest.raises(ValueError):
        choose_adapters([], 3)


# ---- lengths, prompts, schedule ----------------------------------------------------------
def test_length_distributions():
    rng = random.Random(5)
    assert LengthDist.parse("fixed:7").sample(rng) == 7
    u = [LengthDist.parse("uniform:4:16").sample(rng) for _ in range(20000)]
    assert min(u) == 4 and max(u) == 16 and np.mean(u) == pytest.approx(10, rel=0.02)
    ln = np.array([LengthDist.parse("lognormal:100:0.5").sample(rng) for _ in range(40000)])
    assert ln.mean() == pytest.approx(100, rel=0.03) and ln.min() >= 1
    assert np.median(ln) == pytest.approx(100 * math.exp(-0.125), rel=0.03)
    assert str(LengthDist.parse("uniform:4:16")) == "uniform:4:16"
    for bad in ("fixed", "fixed:0", "uniform:9:3", "uniform:1.5:3", "lognormal:10", "normal:3:1", "fixed:x"):
        with pytest.raises(ValueError):
            LengthDist.parse(bad)


def test_prompt_and_schedule_are_seeded():
    p = make_prompt(random.Random(0), 12)
    assert len(p.split()) == 12
    spec = WorkloadSpec(arrival="gamma", rate=5.0, cv=2.0, input_len=LengthDist("uniform", 4, 16),
                        output_len=LengthDist("fixed", 4), seed=3)
    a, b = plan_requests(spec, ["x", "y", "z"], 20.0), plan_requests(spec, ["x", "y", "z"], 20.0)
    assert a == b and len(a) > 20 and all(r.at < 20.0 for r in a)
    assert all(len(r.prompt.split()) == r.input_len and 4 <= r.input_len <= 16 and r.max_new_tokens == 4 for r in a)
    faster = plan_requests(WorkloadSpec(**{**spec.__dict__, "rate": 10.0}), ["x", "y", "z"], 20.0)
    assert [r.adapter_id for r in faster[:20]] == [r.adapter_id for r in a[:20]]  # separate RNG streams
    assert plan_requests(WorkloadSpec(**{**spec.__dict__, "seed": 4}), ["x", "y", "z"], 20.0) != a
    assert len({r.prompt for r in a}) == len(a) and a[5].prompt == a[5].prompt
    closed = request_stream(spec, [""])
    assert [next(closed).at for _ in range(3)] == [0.0, 0.0, 0.0]


# ---- report ------------------------------------------------------------------------------
def test_summarize_and_markdown():
    rs = [Result(0, "a", 0.0, end_at=1.0, first_token_at=0.2, prompt_tokens=8, completion_tokens=5),   # tpot 200
          Result(1, "a", 0.5, end_at=1.0, first_token_at=0.6, prompt_tokens=8, completion_tokens=1),   # no tpot
          Result(2, "b", 1.0, end_at=5.0, first_token_at=3.0, prompt_tokens=8, completion_tokens=3),   # ttft 2000
          Result(3, "", 1.5, code="NOT_FOUND", detail="adapter 'c' not found")]
    rep = summarize(rs, wall_s=5.0, params={"arrival": "poisson", "rate": 1.0, "adapters": 2}, slo_ttft_ms=1000,
                    slo_tpot_ms=200)
    assert rep["requests"] == {"sent": 4, "completed": 3, "failed": 1}
    assert rep["req_per_s"] == pytest.approx(0.6) and rep["output_tok_per_s"] == pytest.approx(1.8)
    assert rep["ttft_ms"]["p50"] == pytest.approx(200) and rep["ttft_ms"]["n"] == 3
    assert rep["tpot_ms"]["n"] == 2 and rep["tpot_ms"]["p50"] == pytest.approx(600)
    assert rep["latency_ms"]["p99"] == pytest.approx(percentile([1000, 500, 4000], 99), abs=1e-3)
    assert rep["slo"]["attainment"] == pytest.approx(0.5)  # requests 0 and 1 of 4 sent
    assert rep["errors"] == {"NOT_FOUND": 1} and "not found" in rep["error_examples"]["NOT_FOUND"]
    assert rep["per_adapter"]["a"] == {"sent": 2, "completed": 2} and rep["per_adapter"]["<base>"]["completed"] == 0
    md = to_markdown(rep)
    assert "| TTFT |" in md and "50.0%" in md and "NOT_FOUND × 1" in md
    json.dumps(rep)
    unary = summarize([Result(0, "", 0.0, end_at=1.0, completion_tokens=3)], 1.0, {}, 1000, 200)
    assert unary["slo"]["attainment"] is None and unary["ttft_ms"]["p50"] is None
    assert "| TTFT | - |" in to_markdown(unary)


def test_progress_line():
    line = render(Tally(sent=24, ok=20, err=1), 12.0, 30.0)
    assert line == "[########............] 12.0/30s  sent 24  done 20  err 1"
    assert "draining 3 in flight" in render(Tally(sent=24, ok=20, err=1), 32.0, 30.0)


# ---- against a fake server (fast, no model) -----------------------------------------------
class FakeQuiver(pb_grpc.QuiverServicer):
    """ListAdapters: a, b, c; adapter "c" is NOT_FOUND; streams one token per 10 ms."""

    def __init__(self):
        self.seen: list[str] = []

    def ListAdapters(self, request, context):
        return pb.ListAdaptersResponse(adapters=[pb.AdapterInfo(adapter_id=x) for x in "abc"])

    def _check(self, request, context):
        self.seen.append(request.adapter_id)
        if request.adapter_id == "c":
            context.abort(grpc.StatusCode.NOT_FOUND, "adapter 'c' not found")

    def GenerateStream(self, request, context):
        self._check(request, context)
        for i in range(request.max_new_tokens):
            time.sleep(0.01)
            yield pb.GenerateStreamResponse(text=" x", token_ids=[i])
        yield pb.GenerateStreamResponse(finish_reason="length", prompt_tokens=len(request.prompt.split()),
                                        completion_tokens=request.max_new_tokens)

    def Generate(self, request, context):
        self._check(request, context)
        time.sleep(0.01 * request.max_new_tokens)
        return pb.GenerateResponse(text=" x" * request.max_new_tokens, finish_reason="length",
                                   prompt_tokens=len(request.prompt.split()), completion_tokens=request.max_new_tokens)


@pytest.fixture(scope="module")
def fake_server():
    svc = FakeQuiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    pb_grpc.add_QuiverServicer_to_server(svc, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield svc, f"127.0.0.1:{port}"
    server.stop(0)


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def test_fake_server_adapters_discovered_cycled_and_errors_counted(fake_server, tmp_path):
    svc, target = fake_server
    svc.seen.clear()
    out = tmp_path / "r.json"
    rc, stdout, stderr = _run(["--target", target, "--duration", "2", "--out", str(out), "--md", str(tmp_path / "r.md"),
                               "--adapters", "4", "--arrival", "gamma", "--rate", "20", "--cv", "1.5",
                               "--input-len", "uniform:4:16", "--output-len", "fixed:3", "--timeout", "10"])
    assert rc == 0, stderr
    rep = json.loads(out.read_text())
    assert rep["params"]["adapter_ids"] == ["a", "b", "c", "a"] and rep["params"]["zipf_exponent"] == 1.0
    assert set(svc.seen) <= {"a", "b", "c"} and rep["requests"]["sent"] == len(svc.seen) > 10
    assert rep["errors"].get("NOT_FOUND", 0) == svc.seen.count("c") > 0
    assert rep["requests"]["completed"] == len(svc.seen) - svc.seen.count("c")
    assert rep["per_adapter"]["a"]["sent"] > rep["per_adapter"]["b"]["sent"]  # ranks 1 and 4 both map to "a"
    assert rep["tpot_ms"]["p50"] >= 5 and rep["tokens"]["completion_mean"] == 3.0
    assert stdout == (tmp_path / "r.md").read_text() and "NOT_FOUND" in stdout
    assert "\r[" in stderr and "sent" in stderr


def test_fake_server_closed_loop_unary(fake_server, tmp_path):
    svc, target = fake_server
    svc.seen.clear()
    out = tmp_path / "c.json"
    rc, _, stderr = _run(["--target", target, "--duration", "1.5", "--out", str(out), "--arrival", "closed",
                          "--concurrency", "3", "--adapter-ids", "a,b", "--popularity", "uniform", "--no-stream",
                          "--output-len", "fixed:5", "--input-len", "fixed:4", "--no-progress"])
    assert rc == 0 and stderr == ""
    rep = json.loads(out.read_text())
    # 3 workers, ~50 ms per request: about 3 * 1.5 / 0.05 = 90 requests; only a and b used
    assert 10 < rep["requests"]["completed"] <= 100 and rep["errors"] == {}
    assert set(svc.seen) == {"a", "b"} and rep["slo"]["attainment"] is None
    assert rep["latency_ms"]["p50"] >= 45 and rep["ttft_ms"]["n"] == 0


def test_no_adapters_on_server_is_a_clear_error(tmp_path):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_QuiverServicer_to_server(pb_grpc.QuiverServicer(), server)  # every RPC UNIMPLEMENTED
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        rc, _, stderr = _run(["--target", f"127.0.0.1:{port}", "--duration", "1", "--adapters", "2"])
    finally:
        server.stop(0)
    assert rc == 2 and "ListAdapters failed: UNIMPLEMENTED" in stderr


# ---- the real server ---------------------------------------------------------------------
def test_end_to_end_real_server(fp32_model, tmp_path):
    from quiver.server.app import Server
    from quiver.server.config import EngineConfig, ModelConfig, ServerConfig

    srv = Server(ServerConfig(port=0), ModelConfig(), EngineConfig(max_model_len=256, max_num_batched_tokens=64),
                 loaded=fp32_model)
    port = srv.start()
    try:
        out, md = tmp_path / "e2e.json", tmp_path / "e2e.md"
        rc, stdout, stderr = _run(["--target", f"127.0.0.1:{port}", "--duration", "6", "--out", str(out),
                                   "--md", str(md), "--rate", "1.5", "--input-len", "uniform:4:16",
                                   "--output-len", "fixed:4", "--seed", "1", "--timeout", "60"])
    finally:
        srv.stop()
    assert rc == 0, stderr
    rep = json.loads(out.read_text())
    assert rep["requests"]["completed"] > 0 and rep["requests"]["failed"] == 0 and rep["errors"] == {}
    for key in ("ttft_ms", "tpot_ms", "latency_ms"):
        s = rep[key]
        assert s["n"] > 0 and 0 < s["p50"] <= s["p90"] <= s["p99"], (key, s)
    assert rep["output_tok_per_s"] > 0 and rep["req_per_s"] > 0 and rep["wall_s"] >= 6
    assert 0 <= rep["slo"]["attainment"] <= 1
    assert 4 <= rep["tokens"]["prompt_mean"] <= 16  # one token per prompt word on SmolLM2
    assert rep["params"]["input_len"] == "uniform:4:16" and rep["params"]["stream"] is True
    assert stdout == md.read_text() and "| TTFT |" in stdout


def test_unreachable_target_fails_fast_with_message():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "quiver.loadtest", "--target", f"127.0.0.1:{port}",
                           "--duration", "2", "--connect-timeout", "2"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert f"cannot connect to 127.0.0.1:{port}" in proc.stderr
    assert time.monotonic() - t < 30
