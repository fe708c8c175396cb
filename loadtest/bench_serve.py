"""End-to-end serving benchmark: a Quiver gRPC server driven by the load generator, with
overlapped steps on and off, in one run.

    python -m quiver.loadtest.bench_serve                          # CPU: embedded model
    python -m quiver.loadtest.bench_serve --model llama2-7b --layers 32 --quantize nf4 \
        --warmup 30 --duration 30 --overlap off,on,off,on --concurrency 32 \
        --input-len fixed:128 --output-len fixed:128 --out serve.json

The model is loaded once (`--model llama2-7b`: a Llama-2-7B-shaped model with random weights
built on the device and a word-level tokenizer, so no weights are needed). For each setting of
`--overlap` (default `on,off`) a server is started on a free local port over that model and
`python -m quiver.loadtest` runs against it in its own process (the client does not share the
server's interpreter), closed loop at `--concurrency` by default, first for `--warmup` seconds
unmeasured (the first steps of each new shape compile Triton kernels; a cold server's first
seconds measure compilation, not serving), then for `--duration`. Before the first setting one
more server of that setting runs the warm-up load alone: on the device the first server of a
process ran worst whichever setting it had (docs/BENCHMARKS.md, round 10). Reported per setting: the
load generator's req/s, output tok/s, TTFT and TPOT percentiles, and output tok/s as a ratio
against the first setting.

`--adapters N` writes N random LoRA adapters (rank `--adapter-rank`, q, k, v, o, PEFT format)
into a temporary adapter directory that every server serves, with `--adapter-slots` slots
(default max(16, N)) at `--max-rank`; the load generator spreads its requests over them by
`--popularity` (default uniform, so every adapter is in use).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

from quiver.loadtest.bench_engine import random_llama, word_tokenizer
from quiver.server.cli import SWITCH
from quiver.server.config import EngineConfig, ModelConfig, ServerConfig
from quiver.server.loader import load_model

def serve_and_load(loaded, overlap: str, args, measure: bool = True) -> dict | None:
    """Starts a server over `loaded`, runs the load generator against it, stops the server;
    returns the load generator's JSON report with the setting added (measure=False: the
    warm-up load only, None)."""
    from quiver.server.app import Server

    cfg = EngineConfig(max_num_seqs=args.concurrency, max_model_len=args.max_model_len,
                       max_num_batched_tokens=max(512, args.concurrency), overlap=SWITCH[overlap],
                       mixed_graphs=SWITCH[args.mixed_graphs])
    adapter_dir = getattr(args, "adapter_dir", None)
    server_cfg = ServerConfig(port=0) if adapter_dir is None else \
        ServerConfig(port=0, adapter_dir=adapter_dir, adapter_slots=args.adapter_slots, max_rank=args.max_rank)
    server = Server(server_cfg, ModelConfig(), cfg, loaded=loaded)
    port = server.start()
    try:
        if args.warmup > 0:
            load(port, args, args.warmup)
        if not measure:
            return None
        before = server.engine.steps
        report = load(port, args, args.duration)
        report["overlap"] = overlap
        report["adapters"] = getattr(args, "adapters", 0)
        report["engine_steps"] = server.engine.steps - before  # of the measured load
        return report
    finally:
        server.stop(0)
        if loaded.device.type == "cuda":
            torch.cuda.empty_cache()


def load(port: int, args, duration: float) -> dict:
    """Runs the load generator against the server on `port`; returns its JSON report."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "report.json")
        cmd = [sys.executable, "-m", "quiver.loadtest", "--target", f"127.0.0.1:{port}",
               "--duration", str(duration), "--arrival", args.arrival, "--rate", str(args.rate),
               "--concurrency", str(args.concurrency), "--input-len", args.input_len,
               "--output-len", args.output_len, "--no-progress", "--out", out]
        if getattr(args, "adapters", 0):
            cmd += ["--adapter-ids", ",".join(adapter_ids(args.adapters)), "--popularity", args.popularity]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 300)
        if done.returncode != 0:
            raise RuntimeError(f"load generator failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        with open(out) as f:
            return json.load(f)


def adapter_ids(n: int) -> list[str]:
    return [f"bench-{i}" for i in range(n)]


def write_adapters(loaded, n: int, rank: int, root: str) -> None:
    """N random LoRA adapters on q, k, v, o in PEFT format under root/bench-<i>."""
    from pathlib import Path

    from quiver.adapters.lora import save_lora
    from quiver.adapters.weights import LoraDelta
    from quiver.adapters.base import BaseSpec
    from quiver.loadtest.bench_engine import random_lora

    base = BaseSpec.from_model(loaded.model)
    for i, name in enumerate(adapter_ids(n)):
        w = random_lora(i, base, rank, ["q_proj", "k_proj", "v_proj", "o_proj"], torch.device("cpu"))
        deltas = {key: LoraDelta(d.a.bfloat16(), d.b.bfloat16(), d.scale) for key, d in w.lora.items()}
        save_lora(Path(root) / name, deltas, base_model=loaded.name)


def table(reports: list[dict]) -> str:
    lines = ["| overlap | req/s | output tok/s | vs first | TTFT p50 / p99 ms | TPOT p50 / p99 ms | completed |",
             "|---|---|---|---|---|---|---|"]
    first = reports[0]["output_tok_per_s"]
    for r in reports:
        ttft, tpot = r["ttft_ms"], r["tpot_ms"]
        lines.append(f"| {r['overlap']} | {r['req_per_s']:.2f} | {r['output_tok_per_s']:.0f} | "
                     f"{r['output_tok_per_s'] / first:.3f}x | {ttft['p50']:.1f} / {ttft['p99']:.1f} | "
                     f"{tpot['p50']:.2f} / {tpot['p99']:.2f} | {r['requests']['completed']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="embedded", help="embedded | llama2-7b | a local model path")
    ap.add_argument("--layers", type=int, default=32, help="depth of the llama2-7b shape")
    ap.add_argument("--quantize", default="nf4", choices=("nf4", "int8", "none"))
    ap.add_argument("--overlap", default="on,off", help="comma list of on, off, auto: one server run each")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of measured load per setting")
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds of unmeasured load first, per setting")
    ap.add_argument("--arrival", default="closed", help="arrival process of the load generator (default closed)")
    ap.add_argument("--rate", type=float, default=2.0, help="open loop: requests per second")
    ap.add_argument("--concurrency", type=int, default=32, help="requests in flight (and the server's max_num_seqs)")
    ap.add_argument("--input-len", default="fixed:128")
    ap.add_argument("--output-len", default="fixed:128")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--mixed-graphs", default="auto", choices=tuple(SWITCH),
                    help="the servers' mixed-step graphs (quiver serve --mixed-graphs)")
    ap.add_argument("--adapters", type=int, default=0, help="random LoRA adapters the requests spread over (0: base only)")
    ap.add_argument("--adapter-rank", type=int, default=16)
    ap.add_argument("--adapter-slots", type=int, default=None, help="adapters resident at once (default max(16, N))")
    ap.add_argument("--max-rank", type=int, default=ServerConfig.max_rank, help="the servers' adapter pool rank")
    ap.add_argument("--popularity", default="uniform", help="the load generator's adapter popularity")
    ap.add_argument("--out", default=None, help="JSON results file")
    args = ap.parse_args(argv)
    if args.adapters < 0:
        ap.error("--adapters must be >= 0")
    args.adapter_slots = args.adapter_slots or max(16, args.adapters)
    settings = args.overlap.split(",")
    if not settings or any(s not in SWITCH for s in settings):
        ap.error(f"--overlap takes a comma list of {', '.join(SWITCH)}")
    if args.model == "llama2-7b":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        loaded = random_llama(args.layers, args.quantize, dtype, device, tokenizer=word_tokenizer(32000))
    else:
        loaded = load_model(ModelConfig(model=None if args.model == "embedded" else args.model,
                                        quantize=args.quantize))
    tmp = tempfile.TemporaryDirectory() if args.adapters else None
    if tmp is not None:
        write_adapters(loaded, args.adapters, args.adapter_rank, tmp.name)
        args.adapter_dir = tmp.name
    if args.warmup > 0:  # the first server of a process pays for compiling kernels: one unmeasured
        serve_and_load(loaded, settings[0], args, measure=False)
    reports = []
    for overlap in settings:
        reports.append(serve_and_load(loaded, overlap, args))
        print(json.dumps({k: reports[-1][k] for k in ("overlap", "adapters", "req_per_s", "output_tok_per_s", "ttft_ms",
                                                      "tpot_ms", "requests", "engine_steps")}), flush=True)
    print(table(reports))
    if args.out:
        info = {"device": torch.cuda.get_device_name() if loaded.device.type == "cuda" else "cpu",
                "model": loaded.name, "quantize": args.quantize, "args": vars(args), "reports": reports}
        with open(args.out, "w") as f:
            json.dump(info, f, indent=2)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
