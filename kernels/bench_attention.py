"""Sweep of the paged decode attention kernel's launch configs (CUDA only).

    python -m quiver.kernels.bench_attention [--batch 1,32,128] [--context 150] [--heads 32]
                                             [--kv-heads 32] [--layers 8] [--out FILE.json]
                                             [--block-n 16,32 --num-warps 2,4 --num-stages 1
                                              --num-splits 1,2 --pipeline 0,1]   (the grid)

Workload: one decode step's attention over `--layers` layers, each with its own paged K/V cache
(block size 16, the blocks of every sequence scattered over the cache as a running server
leaves them), B sequences of `--context` keys, head dim 128, bf16: the Llama-2-7B shape by
default (32 heads, no GQA). The layers' caches together are far larger than the L2, so every
key comes from HBM. One step = `--layers` kernel calls captured in a CUDA graph; time = median
of replays. Reported per batch: the defaults (kernels/attention.py), every config of the grid
(BLOCK_N, warps, stages, split bound) fastest first, and the bandwidth each reaches: K and V
bytes read over the time, against the device-to-device copy bandwidth measured in the same run.
The best config is checked against reference_paged_decode_attention before it is reported.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch

from quiver.kernels.attention import reference_paged_decode_attention, triton_paged_decode_attention
from quiver.kernels.bench_nf4 import copy_bandwidth, time_graph, write_sweep

GRID = dict(block_n=(16, 32, 64, 128), num_warps=(2, 4, 8), num_stages=(1, 3), num_splits=(1, 2), pipeline=(False,))
BLOCK_SIZE, HEAD_DIM = 16, 128


def build(args, B: int, device):
    """Per layer: (k_cache, v_cache); shared block tables (scattered blocks) and context lengths."""
    per_seq = -(-(args.context + 16) // BLOCK_SIZE)  # room for a few more tokens, as the engine keeps
    n_blocks = B * per_seq + 8
    g = torch.Generator(device="cpu").manual_seed(B)
    tables = torch.randperm(n_blocks, generator=g)[: B * per_seq].view(B, per_seq).to(torch.int32).to(device)
    ctx = torch.full((B,), args.context, dtype=torch.int32, device=device)
    shape = (n_blocks * BLOCK_SIZE, args.kv_heads, HEAD_DIM)
    caches = [(torch.randn(shape, device=device, dtype=torch.bfloat16),
               torch.randn(shape, device=device, dtype=torch.bfloat16)) for _ in range(args.layers)]
    q = torch.randn(B, args.heads, HEAD_DIM, device=device, dtype=torch.bfloat16)
    return q, caches, tables, ctx


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m quiver.kernels.bench_attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", default="1,32,128")
    p.add_argument("--context", type=int, default=150)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--out", default=None)
    for knob, vals in GRID.items():
        p.add_argument("--" + knob.replace("_", "-"), default=",".join(str(int(v)) for v in vals),
                       help=f"values of the grid's {knob} (comma-separated; default %(default)s)")
    args = p.parse_args(argv)
    grid = {knob: tuple(type(vals[0])(int(v)) for v in getattr(args, knob).split(",")) for knob, vals in GRID.items()}
    if not torch.cuda.is_available():
        print("bench_attention needs a CUDA device", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev) * 1e9
    scale = HEAD_DIM ** -0.5
    rows = []
    for B in [int(b) for b in args.batch.split(",")]:
        q, caches, tables, ctx = build(args, B, dev)
        kv_bytes = args.layers * B * args.context * 2 * args.kv_heads * HEAD_DIM * 2

        def timed(cfg):
            def step():
                for k, v in caches:
                    triton_paged_decode_attention(q, k, v, tables, ctx, BLOCK_SIZE, scale, **cfg)
            return time_graph(step, reps=args.reps)

        default_ms = timed({})
        ranked = []
        for vals in itertools.product(*grid.values()):
            cfg = dict(zip(grid, vals))
            try:
                ranked.append((timed(cfg), cfg))
            except Exception as e:  # a config may not compile (registers, shared memory)
                torch.cuda.synchronize()
                print(f"  B={B} {cfg}: {type(e).__name__}: {str(e)[:160]}", file=sys.stderr)
        ranked.sort(key=lambda t: t[0])
        best_ms, best = ranked[0]
        k0, v0 = caches[0]
        got = triton_paged_decode_attention(q, k0, v0, tables, ctx, BLOCK_SIZE, scale, **best).float()
        ref = reference_paged_decode_attention(q, k0, v0, tables, ctx, BLOCK_SIZE, scale).float()
        err = float((got - ref).abs().max() / ref.abs().max())
        row = dict(batch=B, default_ms=default_ms, best_ms=best_ms, best=best, rel_err_best=err,
                   default_TBps=kv_bytes / (default_ms * 1e-3) / 1e12, best_TBps=kv_bytes / (best_ms * 1e-3) / 1e12,
                   ranked=[dict(ms=ms, cfg=c) for ms, c in ranked])
        rows.append(row)
        print(f"B={B}: default {default_ms:.3f} ms ({row['default_TBps']:.2f} TB/s), best {best_ms:.3f} ms "
              f"({row['best_TBps']:.2f} TB/s) {best}; next {[(round(ms, 3), c) for ms, c in ranked[1:4]]}", flush=True)
        del caches
        torch.cuda.empty_cache()
    print(f"\nPaged decode attention, {args.layers} layers, {args.heads} heads / {args.kv_heads} kv heads, "
          f"context {args.context}, bf16, on {torch.cuda.get_device_name()}; copy {bw / 1e12:.2f} TB/s\n")
    print("| batch | default ms | default TB/s | best ms | best TB/s | default / best | rel err best | best config |")
    print("|---:|---:|---:|---:|---:|---:|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['default_ms']:.3f} | {r['default_TBps']:.2f} | {r['best_ms']:.3f} | "
              f"{r['best_TBps']:.2f} | {r['default_ms'] / r['best_ms']:.2f}x | {r['rel_err_best']:.1e} | {r['best']} |")
    if args.out:
        write_sweep(args.out, bw, args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
