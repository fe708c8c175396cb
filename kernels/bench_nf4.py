"""Benchmark: Quiver's Triton NF4 linear vs bf16 torch matmul vs bitsandbytes (CUDA only).

    python -m quiver.kernels.bench_nf4 [--out FILE.json] [--layers 8] [--m 1 8 32 128]
    python -m quiver.kernels.bench_nf4 --sweep [--m 1 8] [--out sweep.json]
    python -m quiver.kernels.bench_nf4 --prefill --m 128 256 512 [--layers 4]

Workload: the linears of one Llama-2-7B decode step. Per layer: q, k, v, o [4096 x 4096],
gate, up [11008 x 4096], down [4096 x 11008]; 32 layers. `--layers L` distinct layers of
weights are built (L=8: ~0.9 GB NF4, ~3.2 GB bf16, far beyond the 50 MB L2, so every weight
comes from HBM) and one pass over them is timed, then scaled by 32 / L.

Each method's pass (L * 7 linears, batch M tokens) is captured in a CUDA graph and replayed, timed
with CUDA events (median of --reps replays): this is GPU time without Python launch overhead,
which is what a graph-captured decode step costs. The eager column times the same pass launched
from Python (includes launch overhead; the server's eager mode pays it).

    bf16 : torch.nn.functional.linear(x, W_bf16)
    bnb  : bnb.matmul_4bit(x, W4.t(), quant_state)  (what bnb.nn.Linear4bit.forward runs; NF4,
           blocksize 64, compress_statistics=True)
    ours : quiver.kernels.nf4.triton_nf4_linear(x, NF4Weight) with the module defaults

GB/s of ours = bytes it must read (4-bit codes + fp32 scales + activations) and write, per second.
Correctness: at every (M, shape), max|ours - x @ dequantize_4bit(W4).T| (bnb's own dequantized
bf16 weights through cuBLAS), absolute and relative to max|ref|.

--sweep times alternative kernel configs per (M, shape) (each over all distinct weights of that
shape) and prints the best, to update the defaults at the top of kernels/nf4.py. It compiles
~20-35 configs per M: run it one or two M values at a time (e.g. --m 1 8, then --m 32 128 1024).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from quiver.kernels import nf4

HIDDEN, INTER, N_LAYERS = 4096, 11008, 32
DEVICE = "cuda"
# (name, N out, K in)
LAYER_LINEARS = (
    ("q", HIDDEN, HIDDEN),
    ("k", HIDDEN, HIDDEN),
    ("v", HIDDEN, HIDDEN),
    ("o", HIDDEN, HIDDEN),
    ("gate", INTER, HIDDEN),
    ("up", INTER, HIDDEN),
    ("down", HIDDEN, INTER),
)
METHODS = ("bf16", "bnb", "ours", "words")
SHAPES = {"qkvo 4096x4096": (HIDDEN, HIDDEN), "gate/up 11008x4096": (INTER, HIDDEN),
          "down 4096x11008": (HIDDEN, INTER)}


# ---------------------------------------------------------------------------------------------
# timing


_STREAM = None


def time_graph(fn, reps: int = 20, warmup: int = 2) -> float:
    """Median ms of one replay of a CUDA graph capturing fn()."""
    global _STREAM
    if _STREAM is None:
        _STREAM = torch.cuda.Stream()
    s = _STREAM
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):  # the warm-up stream: its split-K counters already exist
        fn()
    g.replay()
    torch.cuda.synchronize()
    ms = replay_ms(g, reps)
    del g
    return ms


def replay_ms(graph, reps: int) -> float:
    """Median ms of `reps` replays of a captured CUDA graph, each between CUDA events."""
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def copy_bandwidth(device: torch.device) -> float | None:
    """Device-to-device copy bandwidth, bytes read plus written per second (GB/s); None on CPU.

    A decode step must at least stream every weight byte once, so the step's lower bound is
    weight bytes / this bandwidth (the convention of the performance issue: 2.9 TB/s on H100)."""
    if device.type != "cuda":
        return None
    x = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / 10
    del x, y
    return 2 * 2 * 1024**3 / dt / 1e9  # 2 GiB read + 2 GiB written


def write_sweep(path: str, bw: float, args, rows: list[dict]) -> None:
    """JSON of a kernel sweep (bench_lora_group, bench_attention): device, copy bandwidth (bytes/s in), rows."""
    with open(path, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), copy_TBps=bw / 1e12, config=vars(args), rows=rows), f,
                  indent=1)


def time_eager(fn, reps: int = 10, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def timed(fn, reps: int) -> tuple[float, str]:
    """(ms, how): CUDA-graph time, or eager time if the method cannot be captured."""
    try:
        return time_graph(fn, reps=reps), "graph"
    except Exception as e:  # pragma: no cover - depends on the library
        torch.cuda.synchronize()
        print(f"  (graph capture failed: {type(e).__name__}: {str(e)[:120]}; timing eager)", file=sys.stderr)
        return time_eager(fn, reps=reps), "eager"


# ---------------------------------------------------------------------------------------------
# weights


def build_layers(n_layers: int, seed: int = 0):
    """n_layers x 7 linears: dict(name, N, K, w_bf16, packed, qs, ours)."""
    import bitsandbytes.functional as bnbF

    g = torch.Generator(device=DEVICE).manual_seed(seed)
    layers = []
    for _ in range(n_layers):
        lin = []
        for name, N, K in LAYER_LINEARS:
            W = (torch.randn(N, K, device=DEVICE, generator=g) * 0.02).to(torch.bfloat16)
            packed, qs = bnbF.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
            ours = nf4.nf4_weight_from_bnb(packed, qs)
            lin.append(dict(name=name, N=N, K=K, w_bf16=W, packed=packed, qs=qs, ours=ours))
        layers.append(lin)
    torch.cuda.synchronize()
    return layers


def make_pass(layers, method: str, xs: dict, cfg: dict | None = None, only: tuple[int, int] | None = None):
    """Closure running every linear of every layer once (optionally only those of shape `only`)."""
    import bitsandbytes as bnb

    lins = [lin for layer in layers for lin in layer if only is None or (lin["N"], lin["K"]) == only]
    cfg = cfg or {}
    if method == "bf16":
        ops = [(xs[lin["K"]], lin["w_bf16"]) for lin in lins]
        return lambda: [torch.nn.functional.linear(x, w) for x, w in ops]
    if method == "bnb":
        ops = [(xs[lin["K"]], lin["packed"].t(), lin["qs"]) for lin in lins]
        return lambda: [bnb.matmul_4bit(x, wt, quant_state=qs) for x, wt, qs in ops]
    if method == "ours":
        ops = [(xs[lin["K"]], lin["ours"]) for lin in lins]
        return lambda: [nf4.triton_nf4_linear(x, w, **cfg) for x, w in ops]
    if method == "words":
        from quiver.kernels.nf4_words import triton_nf4_words_linear, words_from_nf4

        for lin in lins:
            if "words" not in lin:
                lin["words"] = words_from_nf4(lin["ours"])
        ops = [(xs[lin["K"]], lin["words"], lin["ours"].absmax) for lin in lins]
        return lambda: [triton_nf4_words_linear(x, w, am, **cfg) for x, w, am in ops]
    if method == "dequant":  # the prefill path above WORDS_MAX_M: W materialized, then cuBLAS
        from quiver.kernels.nf4_words import triton_words_dequantize, words_from_nf4

        for lin in lins:
            if "words" not in lin:
                lin["words"] = words_from_nf4(lin["ours"])
        ops = [(xs[lin["K"]], lin["words"], lin["ours"].absmax) for lin in lins]
        return lambda: [torch.nn.functional.linear(x, triton_words_dequantize(w, am, x.dtype)) for x, w, am in ops]
    raise ValueError(method)


def bytes_ours(lins, M: int) -> int:
    """HBM bytes our kernels must move for these linears at batch M (bf16 activations)."""
    total = 0
    for lin in lins:
        w = lin["ours"]
        total += w.qweight.numel() + w.absmax.numel() * 4 + M * lin["K"] * 2 + M * lin["N"] * 2
    return total


# ---------------------------------------------------------------------------------------------
# correctness


@torch.no_grad()
def check(layers, M: int) -> dict:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF

    out = {}
    for label, (N, K) in SHAPES.items():
        lin = next(lin for lin in layers[0] if (lin["N"], lin["K"]) == (N, K))
        x = torch.randn(M, K, device=DEVICE, dtype=torch.bfloat16)
        deq = bnbF.dequantize_4bit(lin["packed"], lin["qs"])
        ref = x @ deq.T
        y = nf4.triton_nf4_linear(x, lin["ours"])
        y_bnb = bnb.matmul_4bit(x, lin["packed"].t(), quant_state=lin["qs"])
        scale = ref.float().abs().max().item()
        d = (y.float() - ref.float()).abs().max().item()
        d_bnb = (y_bnb.float() - ref.float()).abs().max().item()
        out[label] = dict(max_abs=d, max_rel=d / max(scale, 1e-30), bnb_max_abs=d_bnb, ref_max=scale,
                          dequant_equal=bool(torch.equal(lin["ours"].dequantize(torch.bfloat16), deq)))
    return out


# ---------------------------------------------------------------------------------------------
# main benchmark


def run_bench(args) -> dict:
    layers = build_layers(args.layers)
    scale = N_LAYERS / args.layers
    all_lins = [lin for layer in layers for lin in layer]
    nf4_mb = sum(lin["ours"].nbytes for lin in all_lins) / 2**20
    bf16_mb = sum(lin["w_bf16"].numel() * 2 for lin in all_lins) / 2**20
    print(f"# {torch.cuda.get_device_name()} | {args.layers} distinct layers cycled (ours {nf4_mb:.0f} MiB, "
          f"bf16 {bf16_mb:.0f} MiB), times scaled x{scale:g} to {N_LAYERS} layers\n")
    rows = []
    for M in args.m:
        xs = {K: torch.randn(M, K, device=DEVICE, dtype=torch.bfloat16) for K in (HIDDEN, INTER)}
        r = dict(M=M, configs={label: nf4.pick_config(M, N, K, torch.device(DEVICE))
                               for label, (N, K) in SHAPES.items()})
        for method in METHODS:
            fn = make_pass(layers, method, xs)
            ms, how = timed(fn, args.reps)
            r[method] = ms * scale
            r[method + "_timing"] = how
            r[method + "_eager"] = time_eager(fn, reps=max(3, args.reps // 4)) * scale
        r["ours_GBps"] = bytes_ours(all_lins, M) * scale / (r["ours"] * 1e-3) / 1e9
        r["per_shape_us"] = {}
        for label, (N, K) in SHAPES.items():  # us per linear, over all distinct weights of the shape
            n_lin = sum(1 for lin in all_lins if (lin["N"], lin["K"]) == (N, K))
            r["per_shape_us"][label] = {
                method: timed(make_pass(layers, method, xs, only=(N, K)), args.reps)[0] * 1e3 / n_lin
                for method in METHODS}
        r["check"] = check(layers, M)
        rows.append(r)
        print(f"  M={M}: bf16 {r['bf16']:.3f} ms, bnb {r['bnb']:.3f} ms, ours {r['ours']:.3f} ms, "
              f"words {r['words']:.3f} ms", file=sys.stderr)
        del xs

    print("| M | bf16 ms/step | bnb NF4 ms/step | ours ms/step | speedup vs bf16 (bf16/ours) "
          "| speedup vs bnb (bnb/ours) | ours GB/s "
          "| eager: bf16 / bnb / ours ms | max abs diff vs bnb-dequant ref (rel) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for r in rows:
        worst = max(r["check"].values(), key=lambda c: c["max_rel"])
        print(f"| {r['M']} | {r['bf16']:.3f} | {r['bnb']:.3f} | {r['ours']:.3f} | {r['bf16'] / r['ours']:.2f}x "
              f"| {r['bnb'] / r['ours']:.2f}x | {r['ours_GBps']:.0f} "
              f"| {r['bf16_eager']:.2f} / {r['bnb_eager']:.2f} / {r['ours_eager']:.2f} "
              f"| {worst['max_abs']:.3g} ({worst['max_rel']:.2e}) |")
    print("\nword-layout kernel (kernels/nf4_words.py, what the server runs when K % 128 == 0):\n")
    print("| M | bf16 ms/step | bnb NF4 ms/step | byte kernel ms/step | word kernel ms/step | bf16 / word | bnb / word |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['M']} | {r['bf16']:.3f} | {r['bnb']:.3f} | {r['ours']:.3f} | {r['words']:.3f} "
              f"| {r['bf16'] / r['words']:.2f}x | {r['bnb'] / r['words']:.2f}x |")
    print("\nper linear (us, CUDA graph):\n")
    print("| M | shape | bf16 | bnb | ours | bf16/ours | bnb/ours | ours GB/s (weights only) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        for label, t in r["per_shape_us"].items():
            N, K = SHAPES[label]
            gbs = weight_bytes(N, K) / (t["ours"] * 1e-6) / 1e9
            print(f"| {r['M']} | {label} | {t['bf16']:.1f} | {t['bnb']:.1f} | {t['ours']:.1f} (words {t['words']:.1f}) "
                  f"| {t['bf16'] / t['ours']:.2f}x | {t['bnb'] / t['ours']:.2f}x | {gbs:.0f} |")
    print("\ntiming: CUDA graph replay unless noted:",
          {r["M"]: {m: r[m + "_timing"] for m in METHODS} for r in rows})
    print("\nper-shape check (max abs diff ours / bnb's own matmul_4bit, vs x @ dequantize_4bit(W).T):")
    for r in rows:
        for label, c in r["check"].items():
            print(f"  M={r['M']:>4} {label:<20} ours {c['max_abs']:.3g} (rel {c['max_rel']:.2e})  "
                  f"bnb {c['bnb_max_abs']:.3g}  |ref|max {c['ref_max']:.3g}  dequant bit-equal {c['dequant_equal']}")
    return dict(rows=rows)


# ---------------------------------------------------------------------------------------------
# config sweep


def sweep_candidates(M: int) -> list[dict]:
    """Alternative configs for triton_nf4_linear at batch M (the default is timed as well)."""
    c: list[dict] = []
    if M <= 4:
        for bn, ch, nw in [(4, 8, 4), (8, 4, 4), (8, 8, 4), (8, 16, 4), (16, 4, 4), (16, 8, 4), (8, 8, 2),
                           (16, 8, 8), (32, 4, 4), (32, 8, 8), (4, 16, 4)]:
            for sk in (1, 2):
                c.append(dict(kernel="gemv", block_n=bn, chunks=ch, num_warps=nw, num_stages=1, split_k=sk))
        for bn, ch in [(16, 2), (32, 1), (32, 2), (64, 1)]:
            c.append(dict(kernel="mm", block_m=16, block_n=bn, chunks=ch, num_warps=4, num_stages=1))
    elif M <= 16:
        for bn, ch in [(16, 2), (16, 4), (32, 1), (32, 2), (32, 4), (64, 1), (64, 2)]:
            for sk in (1, 2, 4, 8):
                c.append(dict(kernel="mm", block_m=16, block_n=bn, chunks=ch, num_warps=4, num_stages=1, split_k=sk))
        for sk in (2, 4):
            c.append(dict(kernel="mm", block_m=16, block_n=32, chunks=2, num_warps=4, num_stages=3, split_k=sk))
            c.append(dict(kernel="mm", block_m=16, block_n=32, chunks=2, num_warps=4, num_stages=1, split_k=sk,
                          split_k_mode="reduce"))
        c.append(dict(kernel="gemv", gemv_max_m=16))
    elif M <= 64:
        for bm, bn, ch in [(32, 32, 1), (32, 32, 2), (32, 64, 1), (32, 64, 2), (16, 32, 2), (64, 64, 1)]:
            for sk in (1, 2, 4):
                c.append(dict(kernel="mm", block_m=bm, block_n=bn, chunks=ch, num_warps=4, num_stages=1, split_k=sk))
        c.append(dict(kernel="mm", block_m=32, block_n=32, chunks=2, num_warps=4, num_stages=3))
    else:
        for bm, bn, ch, nw in [(64, 64, 1, 4), (64, 64, 2, 4), (64, 128, 1, 4), (64, 128, 1, 8), (128, 64, 1, 4),
                               (128, 64, 1, 8), (128, 128, 1, 8), (32, 64, 2, 4)]:
            for sk in (1, 2):
                c.append(dict(kernel="mm", block_m=bm, block_n=bn, chunks=ch, num_warps=nw, num_stages=1, split_k=sk))
        c.append(dict(kernel="mm", block_m=64, block_n=64, chunks=1, num_warps=4, num_stages=3))
        c.append(dict(kernel="dequant"))  # Triton dequant + cuBLAS (the default from DEQUANT_MIN_M)
        c.append(dict(kernel="mm"))  # the tl.dot kernel's bucket defaults (for M >= DEQUANT_MIN_M)
    return c


def words_candidates(M: int) -> list[dict]:
    """Configs of the word-layout kernel (kernels/nf4_words.py) at batch M."""
    bm = 16 if M <= 16 else 32 if M <= 32 else 64
    c = []
    for bn, nw in [(32, 4), (64, 4), (128, 4), (128, 8), (16, 4)]:
        for ns in (2, 4):
            for sk in (1, 2, 4):
                c.append(dict(block_m=bm, block_n=bn, num_warps=nw, num_stages=ns, split_k=sk))
    return c


def rank_configs(layers, method: str, xs: dict, cands: list[dict], shape: tuple[int, int], n_lin: int,
                 reps: int, tag: str) -> list[tuple[float, dict]]:
    """(us per linear, cfg) of every config that runs, fastest first; failures are reported."""
    res = []
    for cfg in cands:
        try:
            us = time_graph(make_pass(layers, method, xs, cfg, only=shape), reps=reps) * 1e3 / n_lin
        except Exception as e:  # a config may not compile (e.g. out of shared memory)
            torch.cuda.synchronize()
            print(f"  {tag} {cfg}: failed {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
            continue
        res.append((us, cfg))
    return sorted(res, key=lambda t: t[0])


def weight_bytes(N: int, K: int) -> int:
    """Bytes of one NF4 linear's codes and float32 absmax."""
    return N * K // 2 + (K // 64) * N * 4


def sweep_cases(layers, ms):
    """(M, label, N, K, xs, n_lin) for every batch size and linear shape of a sweep."""
    for M in ms:
        xs = {K: torch.randn(M, K, device=DEVICE, dtype=torch.bfloat16) for K in (HIDDEN, INTER)}
        for label, (N, K) in SHAPES.items():
            n_lin = sum(1 for layer in layers for lin in layer if (lin["N"], lin["K"]) == (N, K))
            yield M, label, N, K, xs, n_lin


def run_words_sweep(args) -> dict:
    """Per (M, shape): bf16, bnb, the byte-layout kernel's defaults and the word-kernel configs."""
    layers = build_layers(args.layers)
    results = []
    for M, label, N, K, xs, n_lin in sweep_cases(layers, args.m):
        base = {m: time_graph(make_pass(layers, m, xs, only=(N, K)), reps=args.reps) * 1e3 / n_lin
                for m in ("bf16", "bnb", "ours")}
        res = rank_configs(layers, "words", xs, words_candidates(M), (N, K), n_lin, args.reps, f"M={M} {label}")
        print(f"M={M} {label}: bf16 {base['bf16']:.1f} us, bnb {base['bnb']:.1f}, bytes-kernel {base['ours']:.1f}")
        for us, cfg in res[:4]:
            print(f"   words {us:8.1f} us  {weight_bytes(N, K) / (us * 1e-6) / 1e9:6.0f} GB/s  {cfg}")
        results.append(dict(M=M, shape=label, **{f"{k}_us": v for k, v in base.items()},
                            ranked=[dict(us=us, cfg=cfg) for us, cfg in res]))
    return dict(words_sweep=results)


# the defaults and the tensor-core path (the default above GEMV_MAX_M); x^T tiles loaded as rows
# and transposed were measured at commit 175fbd5 (no gain, removed)
WORDS_VARIANTS = ({}, {"gemv": False}, {"gemv": False, "num_stages": 4}, {"gemv": False, "maxnreg": 128})


def _compiled(fn) -> dict:
    """{cache key: (registers, spills)} of a JIT function's compiled kernels (best effort)."""
    out = {}
    for entry in getattr(fn, "device_caches", {}).values():
        cache = entry[0] if isinstance(entry, tuple) else entry
        for key, k in getattr(cache, "items", lambda: [])():
            out[key] = (getattr(k, "n_regs", None), getattr(k, "n_spills", None))
    return out


def run_words_variants(args) -> dict:
    """Per (M, shape): the word kernel's defaults against WORDS_VARIANTS, with each
    compiled kernel's registers and spills."""
    from quiver.kernels import nf4_words

    layers = build_layers(args.layers)
    results = []
    for M, label, N, K, xs, n_lin in sweep_cases(layers, args.m):
        row = dict(M=M, shape=label, variants=[])
        for var in WORDS_VARIANTS:
            before = _compiled(nf4_words._nf4_words_kernel)
            try:
                us = time_graph(make_pass(layers, "words", xs, dict(var), only=(N, K)), reps=args.reps) * 1e3 / n_lin
            except Exception as e:
                torch.cuda.synchronize()
                print(f"  M={M} {label} {var}: failed {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
                continue
            new = [v for k, v in _compiled(nf4_words._nf4_words_kernel).items() if k not in before]
            row["variants"].append(dict(cfg=var, us=us, regs_spills=new))
            print(f"M={M:3d} {label:8s} {str(var):40s} {us:7.1f} us  {weight_bytes(N, K) / (us * 1e-6) / 1e9:5.0f} GB/s"
                  f"  regs/spills {new}")
        results.append(row)
    return dict(words_variants=results)


def gemv_candidates() -> list[dict]:
    """Configs of the word kernel's CUDA-core path (one batch row per program)."""
    c = []
    for bn in (64, 128, 256):
        for nw in (2, 4):
            for ns in (1, 3):
                for sk in (8, 16, 32):
                    c.append(dict(gemv=True, block_n=bn, num_warps=nw, num_stages=ns, split_k=sk))
    return c


def run_words_gemv(args) -> dict:
    """Per (M, shape): bf16, the word kernel's tensor-core path (gemv=False) and its defaults,
    against the CUDA-core path's configs (gemv_candidates) ranked."""
    layers = build_layers(args.layers)
    results = []
    for M, label, N, K, xs, n_lin in sweep_cases(layers, args.m):
        base = {"bf16": time_graph(make_pass(layers, "bf16", xs, only=(N, K)), reps=args.reps) * 1e3 / n_lin}
        for tag, cfg in (("tensor_cores", dict(gemv=False)), ("default", {})):
            base[tag] = time_graph(make_pass(layers, "words", xs, cfg, only=(N, K)), reps=args.reps) * 1e3 / n_lin
        res = rank_configs(layers, "words", xs, gemv_candidates(), (N, K), n_lin, args.reps, f"M={M} {label}")
        print(f"M={M} {label}: bf16 {base['bf16']:.1f} us, tensor cores {base['tensor_cores']:.1f}, "
              f"default {base['default']:.1f}")
        for us, cfg in res[:6]:
            print(f"   gemv {us:8.1f} us  {weight_bytes(N, K) / (us * 1e-6) / 1e9:6.0f} GB/s  {cfg}")
        results.append(dict(M=M, shape=label, **{f"{k}_us": v for k, v in base.items()},
                            ranked=[dict(us=us, cfg=cfg) for us, cfg in res]))
    return dict(words_gemv=results)


def prefill_candidates() -> list[dict]:
    """Word-kernel configs for prefill-sized M: one tile of up to 256 rows (the wgmma N) or more."""
    return [dict(block_m=bm, block_n=bn, num_warps=nw, num_stages=ns, split_k=1)
            for bm in (64, 128, 256) for bn in (64, 128) for nw in (4, 8) for ns in (2, 3)
            if not (bm == 256 and bn == 128 and nw == 4)]  # a 128x256 float32 accumulator per 128 threads


def run_prefill(args) -> dict:
    """Per (M, shape): the prefill path (dequantize + cuBLAS), bf16 cuBLAS and word-kernel
    configs (prefill_candidates): where the word kernel wins, WORDS_MAX_M may rise."""
    layers = build_layers(args.layers)
    results = []
    for M, label, N, K, xs, n_lin in sweep_cases(layers, args.m):
        base = {m: time_graph(make_pass(layers, m, xs, only=(N, K)), reps=args.reps) * 1e3 / n_lin
                for m in ("bf16", "dequant", "words")}  # words: the word kernel's defaults at this M
        res = rank_configs(layers, "words", xs, prefill_candidates(), (N, K), n_lin, args.reps, f"M={M} {label}")
        best = res[0][0] if res else float("nan")
        print(f"M={M} {label}: bf16 {base['bf16']:.1f} us, dequant+cuBLAS {base['dequant']:.1f}, "
              f"words defaults {base['words']:.1f}, words best {best:.1f} ({base['dequant'] / best:.2f}x the prefill path)", flush=True)
        for us, cfg in res[:3]:
            print(f"   words {us:8.1f} us  {cfg}", flush=True)
        results.append(dict(M=M, shape=label, **{f"{k}_us": v for k, v in base.items()},
                            ranked=[dict(us=us, cfg=cfg) for us, cfg in res]))
    return dict(prefill=results)


def run_sweep(args) -> dict:
    layers = build_layers(args.layers)
    results = []
    for M, label, N, K, xs, n_lin in sweep_cases(layers, args.m):
        default = nf4.pick_config(M, N, K, torch.device(DEVICE))
        cands = [dict()] + sweep_candidates(M)
        t0 = time.time()
        res = rank_configs(layers, "ours", xs, cands, (N, K), n_lin, args.reps, f"M={M} {label}")
        bf16_us = time_graph(make_pass(layers, "bf16", xs, only=(N, K)), reps=args.reps) * 1e3 / n_lin
        default_us = next(us for us, cfg in res if cfg == {}) if any(cfg == {} for _, cfg in res) else float("nan")
        print(f"\nM={M} {label}: bf16 {bf16_us:.1f} us/linear; default {default} -> {default_us:.1f} us "
              f"({time.time() - t0:.0f}s sweep)")
        for us, cfg in res[:5]:
            print(f"   {us:8.1f} us  {weight_bytes(N, K) / (us * 1e-6) / 1e9:6.0f} GB/s  {cfg or 'default'}")
        results.append(dict(M=M, shape=label, bf16_us=bf16_us, default=default, default_us=default_us,
                            ranked=[dict(us=us, cfg=cfg) for us, cfg in res]))
    return dict(sweep=results)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write results as JSON to this file")
    ap.add_argument("--layers", type=int, default=8, help="distinct layers of weights to cycle (default 8)")
    ap.add_argument("--m", type=int, nargs="+", default=[1, 8, 32, 128], help="batch sizes (tokens)")
    ap.add_argument("--reps", type=int, default=20, help="timed replays per measurement (median)")
    ap.add_argument("--sweep", action="store_true", help="sweep kernel configs per (M, shape) instead")
    ap.add_argument("--words-sweep", action="store_true",
                    help="sweep the word-layout kernel (kernels/nf4_words.py) against bf16, bnb and the byte kernel")
    ap.add_argument("--words-variants", action="store_true",
                    help="time the word kernel's defaults against WORDS_VARIANTS")
    ap.add_argument("--words-gemv", action="store_true",
                    help="the word kernel's CUDA-core path (gemv_candidates) against its tensor-core path")
    ap.add_argument("--prefill", action="store_true",
                    help="prefill-sized M: the word kernel's configs against dequantize + cuBLAS")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_nf4 needs a CUDA device", file=sys.stderr)
        return 2
    if not nf4.HAS_TRITON:
        print("bench_nf4 needs triton", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    import bitsandbytes as bnb
    import triton

    meta = dict(device=torch.cuda.get_device_name(), sms=torch.cuda.get_device_properties(0).multi_processor_count,
                torch=torch.__version__, triton=triton.__version__, bitsandbytes=bnb.__version__,
                layers=args.layers, scaled_to_layers=N_LAYERS, ms=args.m, reps=args.reps)
    with torch.inference_mode():
        if args.words_variants:
            res = run_words_variants(args)
        elif args.words_gemv:
            res = run_words_gemv(args)
        elif args.prefill:
            res = run_prefill(args)
        else:
            res = run_words_sweep(args) if args.words_sweep else run_sweep(args) if args.sweep else run_bench(args)
    res["meta"] = meta
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1, default=str)
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
