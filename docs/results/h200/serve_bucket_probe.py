"""The gRPC server under the load generator with the prefill path's row padding on and off in
one run (kernels/nf4_words.PREFILL_M_BUCKET = 64, then 1 = none, alternated), or with the
mixed-step graphs on and off (--mixed on,off,on,off; the padding then stays at 64): as
`python -m quiver.loadtest.bench_serve --model llama2-7b --layers 32 --quantize nf4 --overlap on`,
closed loop, 32 requests in flight, 128 prompt and 128 new tokens, no adapters.

    python3 docs/results/h200/serve_bucket_probe.py [--buckets 64,1,64,1 | --mixed on,off,on,off] [--warmup 15] [--duration 25]
        [--adapters 32] [--paged on,off,on,off] [--overlap-mixed on,off,on,off]

--paged: paged mixed steps (server/engine/mixed_graphs.PAGED_MAX_KEYS; off = 0) alternated,
mixed-step graphs on, instead of --buckets. Needs docs/results/h200/paged_mixed_steps_r14.patch
applied (measured in round 14 and not kept, docs/BENCHMARKS.md).

--overlap-mixed: server/engine/engine.OVERLAP_MIXED alternated (a step that the mixed-step graphs
take is launched before the step before's tokens come to the host), instead of --buckets.

--adapters N: N random rank-16 LoRA adapters (q, k, v, o) served from a temporary adapter
directory (N slots, the server's default pool rank), the requests spread uniformly over them.
The servers' start-up log lines (graph captures, warm-up) are printed.
"""
import argparse
import json
import logging
import tempfile

import torch

import quiver.kernels.nf4_words as nf4_words
import quiver.server.engine.engine as engine_mod
import quiver.server.engine.mixed_graphs as mixed_graphs
from quiver.loadtest.bench_engine import random_llama, word_tokenizer
from quiver.loadtest.bench_serve import serve_and_load, write_adapters
from quiver.server.config import ServerConfig

ap = argparse.ArgumentParser()
ap.add_argument("--buckets", default="64,1,64,1")
ap.add_argument("--warmup", type=float, default=15.0)
ap.add_argument("--duration", type=float, default=25.0)
ap.add_argument("--layers", type=int, default=32)
ap.add_argument("--mixed", default=None, help="comma list of on | off: mixed-step graphs, alternated instead of --buckets")
ap.add_argument("--adapters", type=int, default=0)
ap.add_argument("--paged", default=None, help="comma list of on | off: paged mixed steps, alternated instead of --buckets")
ap.add_argument("--overlap-mixed", default=None, help="comma list of on | off: engine.OVERLAP_MIXED, alternated")
args = ap.parse_args()
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
load_args = argparse.Namespace(concurrency=32, max_model_len=1024, warmup=args.warmup, duration=args.duration,
                               arrival="closed", rate=2.0, input_len="fixed:128", output_len="fixed:128",
                               mixed_graphs="auto", adapters=args.adapters, popularity="uniform",
                               adapter_slots=max(16, args.adapters), max_rank=ServerConfig.max_rank)
loaded = random_llama(args.layers, "nf4", torch.bfloat16, torch.device("cuda"), tokenizer=word_tokenizer(32000))
if args.adapters:
    load_args.adapter_dir = tempfile.mkdtemp()
    write_adapters(loaded, args.adapters, 16, load_args.adapter_dir)
serve_and_load(loaded, "on", load_args, measure=False)  # the first server of a process compiles
settings = [("m_bucket", int(b)) for b in args.buckets.split(",")] if args.mixed is None else \
    [("mixed_graphs", m) for m in args.mixed.split(",")]
settings = [("paged", p) for p in args.paged.split(",")] if args.paged else settings
settings = [("overlap_mixed", o) for o in args.overlap_mixed.split(",")] if args.overlap_mixed else settings
PAGED = getattr(mixed_graphs, "PAGED_MAX_KEYS", 0)
for name, value in settings:
    if name == "m_bucket":
        nf4_words.PREFILL_M_BUCKET = value
    elif name == "overlap_mixed":
        engine_mod.OVERLAP_MIXED = value == "on"
    elif name == "paged":
        mixed_graphs.PAGED_MAX_KEYS = PAGED if value == "on" else 0
    else:
        load_args.mixed_graphs = value
    r = serve_and_load(loaded, "on", load_args)
    print(json.dumps({name: value, "adapters": args.adapters, "output_tok_per_s": r["output_tok_per_s"], "ttft_ms": r["ttft_ms"],
                      "tpot_ms": r["tpot_ms"], "requests": r["requests"], "engine_steps": r["engine_steps"]}),
          flush=True)
