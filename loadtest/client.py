"""Async gRPC driver of the load generator: one `grpc.aio` channel, one task per request.

Contract:
- `run_load(cfg, spec, n_adapters, adapter_ids)` (a coroutine) waits at most
  cfg.connect_timeout for the channel to connect and for health to report quiver.v1.Quiver
  SERVING, resolves the adapter ids (explicit ones, else ListAdapters; the first N, cycled when
  N exceeds what the server has), then issues requests for cfg.duration seconds: open loop
  ("poisson", "gamma") from a schedule drawn before the start, each arrival starting a task;
  closed loop ("closed") with cfg.concurrency workers each sending its next request as soon as
  the previous one ends (50 ms later after a failure). After cfg.duration no request is
  issued; in-flight ones get at most cfg.timeout + 1 s more (each RPC also has a cfg.timeout
  deadline), then are cancelled and recorded as CANCELLED. Returns a LoadResult; raises LoadTestError with a clear message when
  the server cannot be reached or the adapters cannot be resolved.
- Requests: prompt = N random words, max_new_tokens = the output length, temperature 0.
  Streaming: TTFT = time to the first message carrying token ids; end = the last message.
- A plain-text progress bar goes to cfg.progress_file (stderr) about 4 times a second.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, field
from typing import TextIO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from quiver.loadtest.report import Result
from quiver.loadtest.workload import PlannedRequest, WorkloadSpec, choose_adapters, plan_requests, request_stream
from quiver.server.pb import quiver_pb2 as pb
from quiver.server.pb import quiver_pb2_grpc as pb_grpc

SERVICE = "quiver.v1.Quiver"


class LoadTestError(RuntimeError):
    """A fatal problem before or instead of a run (unreachable server, no adapters...)."""


@dataclass
class RunConfig:
    target: str
    duration: float
    stream: bool = True
    timeout: float = 120.0
    connect_timeout: float = 10.0
    concurrency: int = 8
    progress_file: TextIO | None = field(default_factory=lambda: sys.stderr)


@dataclass
class LoadResult:
    results: list[Result]
    wall_s: float
    adapter_ids: list[str]
    max_issue_lag_s: float = 0.0  # how late the client issued an open-loop arrival at worst


@dataclass
class Tally:
    sent: int = 0
    ok: int = 0
    err: int = 0


async def wait_ready(channel: grpc.aio.Channel, target: str, bound: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + bound
    try:
        await asyncio.wait_for(channel.channel_ready(), bound)
    except asyncio.TimeoutError:
        raise LoadTestError(f"cannot connect to {target}: nothing answered within {bound:g} s "
                            f"(is `quiver serve` running there?)") from None
    health = health_pb2_grpc.HealthStub(channel)
    status = "no answer"
    while True:
        try:
            resp = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE),
                                      timeout=max(0.2, deadline - loop.time()))
            if resp.status == health_pb2.HealthCheckResponse.SERVING:
                return
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.NOT_FOUND):
                return  # no health service for it: go ahead, requests will tell
            status = exc.code().name
        if loop.time() >= deadline:
            raise LoadTestError(f"{target} is not serving after {bound:g} s (health: {status}; model still loading?)")
        await asyncio.sleep(0.25)


async def resolve_adapters(stub, n: int, explicit: list[str] | None, timeout: float) -> list[str]:
    if n == 0:
        return [""]
    available = list(explicit or [])
    if not available:
        try:
            resp = await stub.ListAdapters(pb.ListAdaptersRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise LoadTestError(f"ListAdapters failed: {exc.code().name}: {exc.details()}") from None
        available = [a.adapter_id for a in resp.adapters]
        if not available:
            raise LoadTestError(f"--adapters {n} but the server lists no adapters "
                                "(start it with --adapter-dir, or use --adapters 0 / --adapter-ids)")
    return choose_adapters(available, n)


async def send_one(stub, req: PlannedRequest, t0: float, stream: bool, timeout: float,
                   results: list[Result], tally: Tally) -> Result:
    loop = asyncio.get_running_loop()
    msg = pb.GenerateRequest(adapter_id=req.adapter_id, prompt=req.prompt, max_new_tokens=req.max_new_tokens,
                             temperature=0.0)
    r = Result(req.idx, req.adapter_id, loop.time() - t0)
    results.append(r)
    tally.sent += 1
    try:
        if stream:
            n_tokens = 0
            async for m in stub.GenerateStream(msg, timeout=timeout):
                now = loop.time() - t0
                n_tokens += len(m.token_ids)
                if r.first_token_at is None and m.token_ids:
                    r.first_token_at = now
                if m.finish_reason:
                    r.prompt_tokens, r.completion_tokens = m.prompt_tokens, m.completion_tokens or n_tokens
            r.end_at = loop.time() - t0
            r.completion_tokens = r.completion_tokens or n_tokens
            if r.first_token_at is None:  # no token-carrying message (e.g. EOS first): first answer
                r.first_token_at = r.end_at
        else:
            resp = await stub.Generate(msg, timeout=timeout)
            r.end_at = loop.time() - t0
            r.prompt_tokens, r.completion_tokens = resp.prompt_tokens, resp.completion_tokens
    except grpc.aio.AioRpcError as exc:
        r.code, r.detail = exc.code().name, exc.details() or ""
    except asyncio.CancelledError:
        r.code, r.detail = "CANCELLED", "still running when the drain timeout ended"
        tally.err += 1
        raise
    except Exception as exc:  # noqa: BLE001 - a client-side bug must not stop the run
        r.code, r.detail = "CLIENT_ERROR", repr(exc)
    if r.code is None:
        tally.ok += 1
    else:
        r.end_at = None
        tally.err += 1
    return r


def render(tally: Tally, elapsed: float, duration: float, width: int = 20) -> str:
    frac = min(1.0, elapsed / duration) if duration > 0 else 1.0
    bar = "#" * round(frac * width) + "." * (width - round(frac * width))
    line = f"[{bar}] {min(elapsed, duration):.1f}/{duration:g}s  sent {tally.sent}  done {tally.ok}  err {tally.err}"
    if elapsed > duration:
        line += f"  draining {tally.sent - tally.ok - tally.err} in flight ({elapsed - duration:.1f}s)"
    return line


async def _progress(tally: Tally, t0: float, duration: float, out: TextIO) -> None:
    loop, last = asyncio.get_running_loop(), 0
    try:
        while True:
            line = render(tally, loop.time() - t0, duration)
            out.write("\r" + line + " " * max(0, last - len(line)))
            out.flush()
            last = len(line)
            await asyncio.sleep(0.25)
    except asyncio.CancelledError:
        out.write("\r" + render(tally, loop.time() - t0, duration) + " " * 8 + "\n")
        out.flush()
        raise


async def _drain(tasks: set, bound: float) -> None:
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=bound)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


async def run_load(cfg: RunConfig, spec: WorkloadSpec, n_adapters: int = 0,
                   adapter_ids: list[str] | None = None) -> LoadResult:
    async with grpc.aio.insecure_channel(cfg.target) as channel:
        await wait_ready(channel, cfg.target, cfg.connect_timeout)
        stub = pb_grpc.QuiverStub(channel)
        ids = await resolve_adapters(stub, n_adapters, adapter_ids, cfg.connect_timeout)
        closed = spec.arrival == "closed"
        plan = [] if closed else plan_requests(spec, ids, cfg.duration)
        loop = asyncio.get_running_loop()
        results: list[Result] = []
        tally, tasks, lag = Tally(), set(), 0.0
        t0 = loop.time()
        bar = asyncio.create_task(_progress(tally, t0, cfg.duration, cfg.progress_file)) if cfg.progress_file else None
        try:
            if closed:
                it = request_stream(spec, ids)

                async def worker() -> None:
                    while loop.time() - t0 < cfg.duration:
                        r = await send_one(stub, next(it), t0, cfg.stream, cfg.timeout, results, tally)
                        if not r.ok:  # a failing server must not turn the loop into a busy spin
                            await asyncio.sleep(0.05)

                tasks = {asyncio.create_task(worker()) for _ in range(cfg.concurrency)}
                await asyncio.wait(tasks, timeout=cfg.duration)
            else:
                for req in plan:
                    delay = req.at - (loop.time() - t0)
                    if delay > 0:
                        await asyncio.sleep(delay)
                    lag = max(lag, -delay)
                    tasks.add(asyncio.create_task(send_one(stub, req, t0, cfg.stream, cfg.timeout, results, tally)))
                await asyncio.sleep(max(0.0, cfg.duration - (loop.time() - t0)))
            await _drain({t for t in tasks if not t.done()}, cfg.timeout + 1.0)
            wall = loop.time() - t0
        finally:
            if bar is not None:
                bar.cancel()
                await asyncio.gather(bar, return_exceptions=True)
        return LoadResult(sorted(results, key=lambda r: r.idx), wall, ids, lag)
