"""Scratch: NF4 word-kernel variants against the current kernel, fused 7B decode shapes."""
import json, os, sys, statistics, torch
from . import nf4_words as W
from . import words_variants as V
from .nf4 import NF4Weight, NF4_CODE, _tile_locks
from .bench_nf4 import time_graph

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}
dev = torch.device("cuda")


def synth(N, K, g):
    C = K // 64
    q = torch.randint(0, 256, (C, N, 32), generator=g, dtype=torch.uint8, device=dev)
    absmax = torch.rand(C, N, generator=g, device=dev) * 0.1 + 0.01
    return NF4Weight(qweight=q, absmax=absmax, code=torch.tensor(NF4_CODE, device=dev), shape=(N, K))


def launch(variant, x, words, absmax, absmax16, join, cfg):
    G16, N = words.shape
    G = G16 // 16
    K = G * 128
    M = x.shape[0]
    S = int(cfg["split_k"]); gps = -(-G // S); S = -(-G // gps)
    bm, bn = cfg["block_m"], cfg["block_n"]
    grid = (-(-N // bn), -(-M // bm), S)
    out = torch.empty((M, N), dtype=x.dtype, device=dev)
    ws = torch.empty((S, M, N), dtype=torch.float32, device=dev) if S > 1 else out
    locks = _tile_locks(dev) if S > 1 else absmax
    import triton.language as tl
    common = dict(DOT_TY=tl.bfloat16, USE_ASM=True, HAS_BIAS=False, SPLIT_K=S, BLOCK_M=bm, BLOCK_N=bn,
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if variant == "v2":
        V.words_kernel_v2[grid](x, words, absmax, absmax, absmax, out, ws, locks, M, N, gps, G, x.stride(0), x.stride(1),
                                words.stride(0), absmax.stride(0), asm=V.pair_asm(x.dtype), asm_lo=V.half_asm(x.dtype, 0),
                                asm_hi=V.half_asm(x.dtype, 1), JOIN=join, **common)
    else:
        V.words_kernel_v3[grid](x, words, absmax16, absmax, absmax, out, ws, locks, M, N, gps, G, x.stride(0), x.stride(1),
                                words.stride(0), absmax16.stride(0), asm="", asm_lo=V.scaled_asm(x.dtype, 0),
                                asm_hi=V.scaled_asm(x.dtype, 1), **common)
    return out


def main():
    out_path = sys.argv[1]
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for label, (N, K) in SHAPES.items():
        copies = max(2, int(450e6 // (N * K // 2)))
        ws = [synth(N, K, g) for _ in range(copies)]
        words = [W.words_from_nf4(w) for w in ws]
        am = [w.absmax for w in ws]
        am16 = [a.to(torch.bfloat16) for a in am]
        ref_w = W.dequantize_words(words[0], am[0], torch.float32)
        for M in (1, 16, 32):
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            exact = x.double() @ ref_w.double().T
            scale = exact.abs().max().item()
            cfg = W.pick_words_config(M, N, K, dev)
            variants = [("orig", None), ("v2j1", ("v2", 1)), ("v2j2", ("v2", 2)), ("v3", ("v3", 0))]
            for name, spec in variants:
                try:
                    if spec is None:
                        f = lambda i: W.triton_nf4_words_linear(x, words[i], am[i])
                    else:
                        f = lambda i, spec=spec: launch(spec[0], x, words[i], am[i], am16[i], spec[1], cfg)
                    y = f(0)
                    err = (y.double() - exact).abs().max().item() / scale
                    rms = ((y.double() - exact).pow(2).mean().sqrt() / exact.pow(2).mean().sqrt()).item()
                    ms = time_graph(lambda: [f(i) for i in range(copies)], reps=20)
                    us = ms * 1e3 / copies
                    row = dict(shape=label, M=M, variant=name, us=round(us, 2), max_rel=err, rms_rel=rms, cfg=cfg)
                except Exception as e:  # noqa: BLE001
                    row = dict(shape=label, M=M, variant=name, error=repr(e)[:300])
                print(json.dumps(row), flush=True)
                rows.append(row)
        del ws, words, am, am16
        torch.cuda.empty_cache()
    json.dump(rows, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main()
