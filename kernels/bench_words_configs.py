"""Scratch: launch configs of the NF4 word kernel on the fused 7B decode shapes (H200)."""
import json, sys, torch
from . import nf4_words as W
from .bench_words_variants import SHAPES, synth, dev
from .bench_nf4 import time_graph


def cands(M, N, K):
    d = W.pick_words_config(M, N, K, dev)
    out = [dict(d)]
    for bn, nw in [(64, 4), (128, 4), (128, 8), (256, 8)]:
        for ns in (3, 5):
            for sm in (1, 2):
                c = dict(d, block_n=bn, num_warps=nw, num_stages=ns)
                tiles = -(-N // bn) * -(-M // c["block_m"])
                s = max(1, int(round(d["split_k"] * d["block_n"] / bn * sm)))
                s = 1 << (s.bit_length() - 1)
                c["split_k"] = min(s, 16)
                if c not in out:
                    out.append(c)
    return out


def main():
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for label, (N, K) in SHAPES.items():
        copies = max(2, int(450e6 // (N * K // 2)))
        ws = [synth(N, K, g) for _ in range(copies)]
        words = [W.words_from_nf4(w) for w in ws]
        am = [w.absmax for w in ws]
        for M in (1, 32):
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            res = []
            for c in cands(M, N, K):
                try:
                    us = time_graph(lambda: [W.triton_nf4_words_linear(x, words[i], am[i], **c) for i in range(copies)],
                                    reps=15) * 1e3 / copies
                    res.append((us, c))
                except Exception as e:  # noqa: BLE001
                    torch.cuda.synchronize()
                    print("failed", c, repr(e)[:120], flush=True)
            res.sort(key=lambda t: t[0])
            default_us = next(us for us, c in res if c == W.pick_words_config(M, N, K, dev))
            print(f"{label} M={M}: default {default_us:.2f} us; best:", flush=True)
            for us, c in res[:4]:
                print(f"   {us:7.2f} us {c}", flush=True)
            rows.append(dict(shape=label, M=M, default_us=default_us, ranked=[dict(us=u, cfg=c) for u, c in res]))
        del ws, words, am
        torch.cuda.empty_cache()
    json.dump(rows, open(sys.argv[1], "w"), indent=1)


if __name__ == "__main__":
    main()
