"""The LoRA group expand over several tokens per program against one token per program (H200).

    python3 docs/results/h200/expand_rows_probe.py --batch 32,16 --layers 8 --reps 30

Llama-2-7B shapes: q|k|v (12288x4096, three rank-16 members) and o (4096x4096, one member),
`--layers` distinct weights each (more bytes than L2), 32 adapters, token t on slot t % 32, B
rank-major as the adapter pool stores it. One CUDA graph per variant over all layers (h zeroed
once, as a step does); µs per layer, the median of `--reps` replays, variants alternated twice:
  none       the NF4 base linears only
  shrink     + the LoRA shrinks in the word kernel's launch, no expand
  rows=1     + the group expand, one token per program (lora_group.EXPAND_ROWS 1)
  rows=K     + the group expand over K tokens per program (_group_expand_rows_kernel)
  rows=K/wW/nN  the same with W warps (default lora_group.EXPAND_ROWS_WARPS), N outputs per program
"""

from __future__ import annotations

import argparse

import torch

import quiver.kernels.nf4_words as W
from quiver.kernels import lora_group as LG
from quiver.kernels.bench_nf4 import replay_ms


def members(widths, K, T, S, R, dev):
    out, col = [], 0
    for n in widths:
        a = torch.randn(S, R, K, device=dev, dtype=torch.bfloat16) * 0.02
        b = (torch.randn(S, R, n, device=dev, dtype=torch.bfloat16) * 0.02).transpose(1, 2)  # rank-major, as the pool
        out.append(LG.GroupMember(a, b, torch.full((S,), R, dtype=torch.int32, device=dev),
                                  torch.ones(S, device=dev), torch.arange(-1, S, dtype=torch.int32, device=dev),
                                  torch.zeros(T, R, device=dev), col))
        col += n
    return out


def weight(N, K, dev):
    words = torch.randint(-2**31, 2**31 - 1, (K // 128 * 16, N), dtype=torch.int32, device=dev)
    return words, torch.rand(K // 64, N, device=dev) * 0.02 + 0.001


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", default="32")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--variants", default="none,shrink,rows=1,rows=2,rows=4,rows=8,rows=4/w4,rows=8/w8")
    args = ap.parse_args()
    dev, H, S, R = torch.device("cuda"), 4096, 32, 16
    torch.manual_seed(0)
    layers = [(weight(3 * H, H, dev), weight(H, H, dev)) for _ in range(args.layers)]
    variants = args.variants.split(",")
    for T in [int(b) for b in args.batch.split(",")]:
        x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
        ts = (torch.arange(T, dtype=torch.int32, device=dev) % S).contiguous()
        ms = [(members((H, H, H), H, T, S, R, dev), members((H,), H, T, S, R, dev)) for _ in range(args.layers)]
        hs = [m.h for pair in ms for group in pair for m in group]

        def run(variant):
            for h in hs:
                h.zero_()
            ys = []
            for ((wq, aq), (wo, ao)), (mq, mo) in zip(layers, ms):
                for (w, a), group in (((wq, aq), mq), ((wo, ao), mo)):
                    if variant == "none":
                        ys.append(W.triton_nf4_words_linear(x, w, a))
                        continue
                    y = W.triton_nf4_words_linear(x, w, a, shrink=(ts, group))
                    if variant.startswith("rows="):
                        rows, *opts = variant[5:].split("/")
                        opt = {o[0]: int(o[1:]) for o in opts}
                        LG.triton_group_expand(ts, group, y, rows=int(rows), num_warps=opt.get("w"),
                                               block_n=opt.get("n"))
                    ys.append(y)
            return ys

        ref = run("rows=1")
        for v in variants:
            if v.startswith("rows=") and v != "rows=1":
                got = run(v)
                err = max(((g.float() - r.float()).abs().max() / r.float().abs().max()).item() for g, r in zip(got, ref))
                print(f"batch {T}: {v} against rows=1, worst relative difference {err:.2e}", flush=True)
        graphs = {}
        for v in variants:
            run(v)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                run(v)
            graphs[v] = g
        times = {v: [] for v in variants}
        for _ in range(2):
            for v in variants:
                times[v].append(replay_ms(graphs[v], args.reps) * 1e3 / args.layers)
        print(f"| batch {T} | " + " | ".join(variants) + " |")
        print("|---" * (len(variants) + 1) + "|")
        for i in range(2):
            print(f"| run {i + 1} (us per layer) | " + " | ".join(f"{times[v][i]:.1f}" for v in variants) + " |")
        base = min(times["rows=1"])
        print("| rows=1 / variant | " + " | ".join(f"{base / min(times[v]):.3f}x" for v in variants) + " |", flush=True)


if __name__ == "__main__":
    main()
