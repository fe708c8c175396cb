"""LoRA expands in the NF4 word kernel's tiles against their own launch (H200 probe).

    python3 docs/results/h200/expand_probe.py --batch 32 --layers 8 --reps 30

Llama-2-7B shapes: q|k|v (12288x4096, three rank-16 members) and o (4096x4096, one member),
`--layers` distinct weights each (more bytes than L2), 32 adapters, token t on slot t % 32.
One CUDA graph per variant over all layers (h zeroed once, as a step does); µs per layer, the
median of `--reps` replays; variants alternated twice. Variants:
  none         the base linears only
  shrink       + the LoRA shrinks in the word kernel's launch, no expand
  separate     + the group expand launch after each linear (the default before TILE_EXPAND)
  tile         the expand in the tiles (nf4_words.EXPAND_MODE 0)
  tile-nomath  tickets and the wait for the shrinks, no products (EXPAND_MODE 1)
  tile-nowait  tickets only (EXPAND_MODE 2)
  tile-noorder products without tickets or wait (EXPAND_MODE 3; y is wrong, timing only)
Also prints the compiled variants' registers and spills.
"""

from __future__ import annotations

import argparse

import torch

import quiver.kernels.nf4_words as W
from quiver.kernels.bench_nf4 import replay_ms
from quiver.kernels.lora_group import GroupMember, lora_group

VARIANTS = ("none", "shrink", "separate", "tile", "tile-nomath", "tile-nowait", "tile-noorder")
MODES = {"tile": 0, "tile-nomath": 1, "tile-nowait": 2, "tile-noorder": 3}


def members(widths, K, T, S, R, dev):
    out, col = [], 0
    for n in widths:
        a = torch.randn(S, R, K, device=dev, dtype=torch.bfloat16) * 0.02
        b = (torch.randn(S, R, n, device=dev, dtype=torch.bfloat16) * 0.02).transpose(1, 2)  # rank-major, as the pool
        out.append(GroupMember(a, b, torch.full((S,), R, dtype=torch.int32, device=dev),
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
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    dev, H, S, R = torch.device("cuda"), 4096, 32, 16
    torch.manual_seed(0)
    layers = [(weight(3 * H, H, dev), weight(H, H, dev)) for _ in range(args.layers)]
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
                    elif variant in ("shrink", "separate"):
                        y = W.triton_nf4_words_linear(x, w, a, shrink=(ts, group))
                        if variant == "separate":
                            lora_group(x, ts, group, y, shrunk=True)
                        ys.append(y)
                    else:
                        W.EXPAND_MODE = MODES[variant]
                        ys.append(W.triton_nf4_words_linear(x, w, a, shrink=(ts, group), expand=True))
                        W.EXPAND_MODE = 0
            return ys

        variants = args.variants.split(",")
        ref = run("separate")
        got = run("tile")
        err = max(((g.float() - r.float()).abs().max() / r.float().abs().max()).item() for g, r in zip(got, ref))
        print(f"batch {T}: tile against separate, worst relative difference {err:.2e}", flush=True)
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
        base = min(times["separate"]) if "separate" in times else None
        if base:
            print("| vs separate | " + " | ".join(f"{base / min(times[v]):.3f}x" for v in variants) + " |", flush=True)
    try:
        for key, k in W._nf4_words_kernel.device_caches[0][0].items():
            c = getattr(k, "metadata", None)
            print("compiled:", getattr(k, "n_regs", "?"), "regs,", getattr(k, "n_spills", "?"), "spills,",
                  getattr(c, "shared", "?"), "B shared |", str(key)[:300])
    except Exception as exc:  # the cache layout is Triton's own
        print("no register report:", exc)


if __name__ == "__main__":
    main()
