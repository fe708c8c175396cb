"""Command line of the load generator: `python -m quiver.loadtest` (and `quiver bench`).

    python -m quiver.loadtest --target 127.0.0.1:50051 --duration 60 --out run.json \
        --adapters 8 --popularity zipf --alpha 1.0 --arrival gamma --rate 4 --cv 2 \
        --input-len uniform:8:256 --output-len lognormal:64:0.5 --md run.md

Contract: `main(argv) -> int` parses argv (None = sys.argv[1:]), runs the load, prints the
markdown report to stdout (and --md), writes the JSON report to --out, and returns 0; 1 when
requests were sent but none completed; 2 when the run could not start (unreachable server,
no adapters to use); argparse exits 2 on bad flags. `add_arguments(parser)` and
`run(args) -> int` let `quiver bench` reuse the same flags as a subcommand.
Prompts are N random common words (~N tokens, see workload.make_prompt).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from quiver.loadtest.client import LoadTestError, RunConfig, run_load
from quiver.loadtest.report import summarize, to_markdown
from quiver.loadtest.workload import ARRIVALS, POPULARITY, LengthDist, WorkloadSpec


def _length(spec: str) -> LengthDist:
    try:
        return LengthDist.parse(spec)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT of a Quiver server")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of issuing requests (default 30)")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--md", default=None, help="also write the markdown report here")
    p.add_argument("--adapters", type=int, default=None,
                   help="adapters to spread requests over; 0 = base model only (default 0, or the "
                        "number of --adapter-ids)")
    p.add_argument("--adapter-ids", default=None,
                   help="comma-separated adapter ids in popularity order (default: ListAdapters)")
    p.add_argument("--popularity", choices=POPULARITY, default="zipf", help="adapter popularity (default zipf)")
    p.add_argument("--alpha", type=float, default=1.0,
                   help="zipf exponent / S-LoRA power-law parameter (default 1.0)")
    p.add_argument("--arrival", choices=ARRIVALS, default="poisson", help="arrival process (default poisson)")
    p.add_argument("--rate", type=float, default=2.0, help="open loop: mean requests per second (default 2)")
    p.add_argument("--cv", type=float, default=2.0, help="gamma: coefficient of variation of gaps (default 2)")
    p.add_argument("--concurrency", type=int, default=8, help="closed loop: requests in flight (default 8)")
    p.add_argument("--input-len", type=_length, default=LengthDist("uniform", 8, 256),
                   help="prompt words (~tokens): fixed:N | uniform:LO:HI | lognormal:MEAN:SIGMA (default uniform:8:256)")
    p.add_argument("--output-len", type=_length, default=LengthDist("uniform", 8, 128),
                   help="max_new_tokens, same forms (default uniform:8:128); EOS may end a request earlier")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo-ttft", type=float, default=1000.0, help="TTFT SLO in ms (default 1000)")
    p.add_argument("--slo-tpot", type=float, default=200.0, help="TPOT SLO in ms (default 200)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="GenerateStream, measuring TTFT/TPOT (default); --no-stream uses unary Generate")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="per-request deadline and bound on waiting for in-flight requests after --duration")
    p.add_argument("--connect-timeout", type=float, default=10.0,
                   help="seconds to wait for the server to accept connections and be SERVING (default 10)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> list[str] | None:
    ids = [x.strip() for x in args.adapter_ids.split(",") if x.strip()] if args.adapter_ids else None
    if args.adapters is None:
        args.adapters = len(ids) if ids else 0
    for name in ("duration", "rate", "cv", "alpha", "timeout", "connect_timeout"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.adapters < 0 or args.concurrency < 1:
        p.error("--adapters must be >= 0 and --concurrency >= 1")
    return ids


def params_of(args: argparse.Namespace, adapter_ids: list[str]) -> dict:
    skip = {"no_progress", "func", "command"}
    params = {k: (str(v) if isinstance(v, LengthDist) else v) for k, v in vars(args).items() if k not in skip}
    params["zipf_exponent"] = args.alpha if args.popularity == "zipf" and args.adapters else None
    params["adapter_ids"] = [a for a in adapter_ids if a]
    params["prompt_units"] = "random common words, ~1 token each"
    return params


def run(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    ids = _check(parser or argparse.ArgumentParser(), args)
    spec = WorkloadSpec(arrival=args.arrival, rate=args.rate, cv=args.cv, popularity=args.popularity,
                        alpha=args.alpha, input_len=args.input_len, output_len=args.output_len, seed=args.seed)
    cfg = RunConfig(target=args.target, duration=args.duration, stream=args.stream, timeout=args.timeout,
                    connect_timeout=args.connect_timeout, concurrency=args.concurrency,
                    progress_file=None if args.no_progress else sys.stderr)
    try:
        res = asyncio.run(run_load(cfg, spec, args.adapters, ids))
    except LoadTestError as exc:
        print(f"quiver-loadtest: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nquiver-loadtest: interrupted", file=sys.stderr)
        return 130
    report = summarize(res.results, res.wall_s, params_of(args, res.adapter_ids), args.slo_ttft, args.slo_tpot)
    report["client"] = {"max_issue_lag_ms": round(res.max_issue_lag_s * 1000, 3)}
    md = to_markdown(report)
    print(md, end="")
    if args.md:
        with open(args.md, "w") as f:
            f.write(md)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    sent, done = report["requests"]["sent"], report["requests"]["completed"]
    if sent == 0:
        print("quiver-loadtest: no request was due within --duration (raise --rate or --duration)", file=sys.stderr)
    elif done == 0:
        code, detail = next(iter(report["error_examples"].items()))
        print(f"quiver-loadtest: all {sent} requests failed, e.g. {code}: {detail}", file=sys.stderr)
        return 1
    return 0


def build_parser(prog: str = "python -m quiver.loadtest") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Load generator for a Quiver server (S-LoRA-style workload)")
    add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    return run(parser.parse_args(argv), parser)
