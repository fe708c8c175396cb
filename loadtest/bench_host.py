"""Host-work benchmark: what one decode step costs the engine thread besides the model.

    python -m quiver.loadtest.bench_host [--batch 32] [--adapters 32] [--steps 200] [--tokenizer real|null]
                                         [--temperature 0.8 --top-p 0.9]   (default: greedy)
                                         [--vocab N]   (logits width; 0 = the model's vocabulary)
                                         [--logit-std 4]   (spread of the random logits)

On a GPU the decode step's model runs as one CUDA-graph replay; everything else on the engine
thread (scheduling, the adapter batch, writing the graph's inputs, sampling, handing tokens to
the requests, detokenizing) runs while the GPU waits. This benchmark measures that part on any
machine: the embedded model prefills `--batch` sequences for real, then the model call of each
decode step is replaced by what the CUDA-graph path does on the host (DecodeGraphs.fill into
its pinned mirrors) plus fixed random logits, and `--steps` engine steps are timed. The logits
are `--vocab` wide (default 128): on a GPU the argmax and the sampling filters run on the
device, so narrow logits keep their cost out of a host measurement; `--vocab 0` (the model's
vocabulary, on this machine's CPU) measures the sampling math too. The logits are Gaussian with
standard deviation `--logit-std` (default 4: like a language model's, most of the probability
sits on a few percent of the vocabulary).
`--tokenizer null` leaves detokenization out, as the engine benchmark (bench_engine) does.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from quiver.adapters.base import BaseSpec
from quiver.adapters.manager import AdapterConfig, AdapterManager
from quiver.loadtest.bench_engine import NullTokenizer, bench_adapter
from quiver.server.config import EngineConfig, ModelConfig, SamplingParams
from quiver.server.engine.engine import Engine
from quiver.server.engine.graphs import DecodeGraphs
from quiver.server.loader import load_model


def host_step(batch: int, n_adapters: int, steps: int, tokenizer: str, prompt_len: int = 32,
              temperature: float = 0.0, top_p: float = 1.0, vocab: int = 128, logit_std: float = 4.0) -> dict:
    """{host_ms_per_step, tokens}: tokens handed out during the timed steps (batch * steps)."""
    loaded = load_model(ModelConfig(model=None, quantize="none"))
    manager = None
    if n_adapters:
        base = BaseSpec.from_model(loaded.model)
        manager = AdapterManager(AdapterConfig(tempfile.mkdtemp(), num_slots=min(n_adapters, batch), max_rank=16,
                                               cpu_cache=n_adapters + 1), base, loaded.name, loaded.dtype, loaded.device)
        for i in range(n_adapters):
            manager.add(bench_adapter(i, base, [16], ["q_proj", "k_proj", "v_proj", "o_proj"], ["lora"], loaded.device))
    max_len = prompt_len + steps + 16
    cfg = EngineConfig(max_num_seqs=batch, max_num_batched_tokens=batch * prompt_len, max_model_len=max_len,
                       num_blocks=batch * (-(-max_len // 16) + 1) + 8)
    engine = Engine(loaded, cfg, adapters=manager)
    if tokenizer == "null":
        engine.tokenizer = NullTokenizer()
    g = torch.Generator().manual_seed(0)
    for i in range(batch):
        ref = manager.resolve(f"bench-{i % n_adapters}") if n_adapters else None
        engine.submit(torch.randint(3, 1000, (prompt_len,), generator=g).tolist(),
                      SamplingParams(max_new_tokens=steps + 8, ignore_eos=True, temperature=temperature,
                                     top_p=top_p, seed=i), adapter=ref)
    inbox, engine._inbox = engine._inbox, []
    engine._take(inbox)
    while engine.scheduler.waiting or any(s.num_computed < s.num_tokens - 1 for s in engine.scheduler.running):
        engine.step()  # the real prefill
    graphs = DecodeGraphs(engine.runner.model, engine.kv, batch, cfg.max_blocks_per_seq + 8, 0, torch.device("cpu"))
    prefix_blocks = manager.prefix_block_list if manager is not None else (lambda seq: [])
    logits = torch.randn(batch, vocab or loaded.model.embed.shape[0]) * logit_std

    def host_only(scheduled, feed=None):
        graphs.fill(scheduled, engine.runner.blocks, prefix_blocks, feed)
        return logits[: len(scheduled)]

    engine.runner.run = host_only
    for _ in range(3):
        engine.step()
    before = sum(len(s.output_ids) for s in engine.scheduler.running)
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    ms = (time.perf_counter() - t0) / steps * 1e3
    return {"host_ms_per_step": ms, "tokens": sum(len(s.output_ids) for s in engine.scheduler.running) - before}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--tokenizer", choices=("real", "null"), default="real")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--vocab", type=int, default=128, help="logits width; 0 = the model's vocabulary")
    ap.add_argument("--logit-std", type=float, default=4.0)
    args = ap.parse_args(argv)
    r = host_step(args.batch, args.adapters, args.steps, args.tokenizer, temperature=args.temperature,
                  top_p=args.top_p, vocab=args.vocab, logit_std=args.logit_std)
    print(json.dumps({"batch": args.batch, "adapters": args.adapters, "tokenizer": args.tokenizer,
                      "temperature": args.temperature, "top_p": args.top_p, "vocab": args.vocab, "logit_std": args.logit_std, **r,
                      "host_us_per_sequence": r["host_ms_per_step"] * 1e3 / args.batch}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
