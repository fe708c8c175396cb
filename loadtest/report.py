"""Turns per-request results into the load-test report: a JSON-able dict and a markdown table.

Contract:
- `percentile(values, q)`: q in [0, 100], linear interpolation between the closest ranks
  (numpy's default "linear" method); None for no values.
- `summarize(results, wall_s, params, slo_ttft_ms, slo_tpot_ms)` -> dict with:
  requests {sent, completed, failed}; wall_s (start of issuing to the end of the drain, so
  >= --duration); req_per_s = completed / wall_s;
  output_tok_per_s = completion tokens of completed requests / wall_s; ttft_ms, tpot_ms,
  latency_ms each {p50, p90, p99, mean, n} over completed requests that have the value;
  slo {ttft_ms, tpot_ms, attainment}: fraction of ALL sent requests that completed with
  TTFT <= slo_ttft and TPOT <= slo_tpot (TPOT counts as met when a request has < 2 output
  tokens; attainment is None when TTFT was not measured, i.e. unary calls);
  errors {gRPC status name: count}; per_adapter {id or "<base>": {sent, completed}};
  tokens {prompt_mean, completion_mean}; params as given.
- `to_markdown(report)` -> str: a workload line, a summary table and a latency table.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass


@dataclass
class Result:
    """One request as the client saw it; times are seconds after the run started."""

    idx: int
    adapter_id: str
    sent_at: float
    end_at: float | None = None
    first_token_at: float | None = None  # streaming only
    prompt_tokens: int = 0
    completion_tokens: int = 0
    code: str | None = None  # gRPC status name on failure, None on success
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.code is None and self.end_at is not None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.sent_at

    @property
    def tpot(self) -> float | None:
        if self.first_token_at is None or self.end_at is None or self.completion_tokens < 2:
            return None
        return (self.end_at - self.first_token_at) / (self.completion_tokens - 1)

    @property
    def latency(self) -> float | None:
        return None if self.end_at is None else self.end_at - self.sent_at


def percentile(values, q: float) -> float | None:
    """q-th percentile (0..100) with linear interpolation between closest ranks."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def stats_ms(seconds: list[float]) -> dict:
    ms = [s * 1000.0 for s in seconds]
    out = {f"p{q}": _round(percentile(ms, q)) for q in (50, 90, 99)}
    out["mean"] = _round(sum(ms) / len(ms)) if ms else None
    out["n"] = len(ms)
    return out


def _round(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


def summarize(results: list[Result], wall_s: float, params: dict, slo_ttft_ms: float,
              slo_tpot_ms: float) -> dict:
    ok = [r for r in results if r.ok]
    wall = max(wall_s, 1e-9)
    out_tokens = sum(r.completion_tokens for r in ok)
    measured = any(r.ttft is not None for r in ok)
    met = sum(1 for r in ok if r.ttft is not None and r.ttft * 1000 <= slo_ttft_ms
              and (r.tpot is None or r.tpot * 1000 <= slo_tpot_ms))
    per_adapter: dict[str, dict] = {}
    for r in results:
        entry = per_adapter.setdefault(r.adapter_id or "<base>", {"sent": 0, "completed": 0})
        entry["sent"] += 1
        entry["completed"] += r.ok
    return {
        "params": params,
        "requests": {"sent": len(results), "completed": len(ok), "failed": len(results) - len(ok)},
        "wall_s": round(wall_s, 3),
        "req_per_s": round(len(ok) / wall, 4),
        "output_tok_per_s": round(out_tokens / wall, 3),
        "ttft_ms": stats_ms([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": stats_ms([r.tpot for r in ok if r.tpot is not None]),
        "latency_ms": stats_ms([r.latency for r in ok]),
        "slo": {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms,
                "attainment": round(met / len(results), 4) if results and measured else None},
        "errors": dict(sorted(Counter(r.code for r in results if not r.ok).items())),
        "error_examples": {code: detail[:300] for code, detail in
                           ((r.code, r.detail) for r in reversed(results) if not r.ok)},
        "tokens": {"prompt_mean": _round(sum(r.prompt_tokens for r in ok) / len(ok), 2) if ok else None,
                   "completion_mean": _round(out_tokens / len(ok), 2) if ok else None},
        "per_adapter": dict(sorted(per_adapter.items(), key=lambda kv: -kv[1]["sent"])),
    }


def _fmt(x, nd: int = 1) -> str:
    if x is None:
        return "-"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def to_markdown(report: dict) -> str:
    p, req, slo = report["params"], report["requests"], report["slo"]
    load = (f"closed loop, concurrency {p.get('concurrency')}" if p.get("arrival") == "closed"
            else f"{p.get('arrival')} arrivals at {p.get('rate')} req/s" +
            (f" (cv {p.get('cv')})" if p.get("arrival") == "gamma" else ""))
    adapters = (f"{p.get('adapters')} adapters, {p.get('popularity')} alpha={p.get('alpha')}"
                if p.get("adapters") else "base model only")
    att = "-" if slo["attainment"] is None else f"{100 * slo['attainment']:.1f}%"
    lines = [f"**Quiver load test** — {p.get('target')}, {p.get('duration')} s, {load}; {adapters}; "
             f"input {p.get('input_len')}, output {p.get('output_len')}; "
             f"{'stream' if p.get('stream') else 'unary'}, seed {p.get('seed')}", "",
             "| sent | completed | failed | wall s | req/s | output tok/s | SLO attainment |",
             "|---:|---:|---:|---:|---:|---:|---:|",
             f"| {req['sent']} | {req['completed']} | {req['failed']} | {_fmt(report['wall_s'], 2)} | "
             f"{_fmt(report['req_per_s'], 3)} | {_fmt(report['output_tok_per_s'], 1)} | "
             f"{att} "
             f"(TTFT ≤ {_fmt(slo['ttft_ms'], 0)} ms, TPOT ≤ {_fmt(slo['tpot_ms'], 0)} ms) |", "",
             "| ms | p50 | p90 | p99 | mean | n |", "|---|---:|---:|---:|---:|---:|"]
    for name, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("end-to-end", "latency_ms")):
        s = report[key]
        lines.append(f"| {name} | {_fmt(s['p50'])} | {_fmt(s['p90'])} | {_fmt(s['p99'])} | {_fmt(s['mean'])} "
                     f"| {s['n']} |")
    if report["errors"]:
        lines += ["", "Errors: " + ", ".join(f"{code} × {n}" for code, n in report["errors"].items())]
    return "\n".join(lines) + "\n"
