"""Benchmark of the batched multi-LoRA kernels on a Llama-2-7B attention shape (CUDA only).

Contract: ``python -m quiver.kernels.bench_lora [--out results.json]`` times one decode step's
LoRA delta for every q, k, v, o projection of every layer (default: hidden 4096, 32 layers,
rank 16, 32 distinct adapters, bf16; each (layer, projection) has its own adapter pool so
nothing stays in L2) at batch sizes 1, 8, 32, 128 (one token per sequence, token t uses adapter
t % 32), for:

    base     plain bf16 y = x @ W.T, W [4096, 4096], for the same 4 * 32 projections
    bgmv     quiver lora_shrink + lora_expand (Triton, per-token slots)
    sgmv     quiver sgmv_shrink + sgmv_expand on the same tokens sorted by adapter
    naive    gathered bmm: A = a_stack[slot], B = b_stack[slot], y += s * bmm(B, bmm(A, x))

Each variant is timed eagerly and (unless --no-graph) replayed from a CUDA graph, with
triton.testing.do_bench (L2 flushed between reps; median ms per step). Prints a markdown
table with ms per step and ratios (bgmv/base = LoRA overhead relative to the base
projections it rides on; naive/bgmv = speed-up over the gathered-bmm baseline) and writes
JSON with --out. Before timing it checks bgmv and sgmv against the naive result.
``--allow-cpu`` runs the same flow on CPU at whatever (tiny) shape is given, for smoke tests
only (needs TRITON_INTERPRET=1 and QUIVER_FORCE_TRITON=1 to exercise the Triton path).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from .lora import HAS_TRITON, lora_expand, lora_shrink, segments_from_slots, sgmv_expand, sgmv_shrink

PROJECTIONS = ("q", "k", "v", "o")


def _parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m quiver.kernels.bench_lora", description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--adapters", type=int, default=32, help="distinct adapters (= pool slots)")
    p.add_argument("--batch-sizes", default="1,8,32,128")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--warmup-ms", type=int, default=25)
    p.add_argument("--rep-ms", type=int, default=200)
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph timings")
    p.add_argument("--out", default=None, help="write results as JSON here")
    p.add_argument("--allow-cpu", action="store_true", help="smoke test on CPU (tiny shapes)")
    return p.parse_args(argv)


def _time_ms(fn, device: torch.device, warmup_ms: int, rep_ms: int) -> float:
    """Median ms of fn()."""
    if device.type == "cuda":
        if HAS_TRITON:
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(20):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _capture(fn):
    """CUDA graph of fn (warmed up on a side stream first, so Triton has compiled)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize()
    return g


def _make_pools(args, device, dtype):
    """One adapter pool per (layer, projection): a [S, R, H], b [S, H, R]."""
    H, R, S = args.hidden, args.rank, args.adapters
    gen = torch.Generator(device=device).manual_seed(0)
    pools = []
    for _ in range(args.layers * len(PROJECTIONS)):
        a = (torch.randn(S, R, H, device=device, generator=gen) / H**0.5).to(dtype)
        b = (torch.randn(S, H, R, device=device, generator=gen) / R**0.5).to(dtype)
        pools.append((a, b))
    ranks = torch.full((S,), R, dtype=torch.int32, device=device)
    scaling = torch.full((S,), 2.0, dtype=torch.float32, device=device)
    return pools, ranks, scaling


def _make_base(args, device, dtype):
    H = args.hidden
    gen = torch.Generator(device=device).manual_seed(1)
    return [(torch.randn(H, H, device=device, generator=gen) / H**0.5).to(dtype) for _ in range(args.layers * len(PROJECTIONS))]


def _bench_batch(args, T, pools, ranks, scaling, base_w, device, dtype, use_graph):
    H, S = args.hidden, args.adapters
    gen = torch.Generator(device=device).manual_seed(T)
    x = torch.randn(T, H, device=device, generator=gen).to(dtype)
    y = torch.zeros(T, H, device=device, dtype=dtype)
    slots = (torch.arange(T, device=device) % S).to(torch.int32)
    slots_long = slots.long()
    scale_tok = scaling[slots_long][:, None]
    # SGMV on the same tokens sorted by adapter (what a scheduler would do for prefill)
    order = torch.argsort(slots_long, stable=True)
    x_sorted = x[order].contiguous()
    seg_indptr, seg_slot = segments_from_slots(slots[order].contiguous())
    max_seg_len = int((seg_indptr[1:] - seg_indptr[:-1]).max())

    def step_base():
        for w in base_w:
            torch.mm(x, w.t(), out=y)

    def step_bgmv():
        for a, b in pools:
            h = lora_shrink(x, a, slots, ranks)
            lora_expand(h, b, slots, ranks, scaling, y)

    def step_sgmv():
        for a, b in pools:
            h = sgmv_shrink(x_sorted, a, seg_indptr, seg_slot, ranks, max_seg_len)
            sgmv_expand(h, b, seg_indptr, seg_slot, ranks, scaling, y, max_seg_len)

    def naive_one(a, b, out):
        h = torch.bmm(a[slots_long], x[:, :, None])  # [T, R, 1]
        out += (torch.bmm(b[slots_long], h)[:, :, 0] * scale_tok).to(out.dtype)

    def step_naive():
        for a, b in pools:
            naive_one(a, b, y)

    # correctness check on the first projection before timing
    a0, b0 = pools[0]
    y_naive = torch.zeros_like(y)
    naive_one(a0, b0, y_naive)
    y_bgmv = lora_expand(lora_shrink(x, a0, slots, ranks), b0, slots, ranks, scaling, torch.zeros_like(y))
    y_sgmv = sgmv_expand(
        sgmv_shrink(x_sorted, a0, seg_indptr, seg_slot, ranks, max_seg_len),
        b0, seg_indptr, seg_slot, ranks, scaling, torch.zeros_like(y), max_seg_len,
    )  # fmt: skip
    ref = y_naive.float()
    scale = ref.abs().max().clamp_min(1e-6)
    err_bgmv = float((y_bgmv.float() - ref).abs().max() / scale)
    err_sgmv = float((y_sgmv.float()[torch.argsort(order)] - ref).abs().max() / scale)

    steps = {"base": step_base, "bgmv": step_bgmv, "sgmv": step_sgmv, "naive": step_naive}
    row = {"batch": T, "rel_err_bgmv": err_bgmv, "rel_err_sgmv": err_sgmv}
    for name, fn in steps.items():
        row[f"{name}_ms"] = _time_ms(fn, device, args.warmup_ms, args.rep_ms)
        if use_graph:
            g = _capture(fn)
            row[f"{name}_graph_ms"] = _time_ms(g.replay, device, args.warmup_ms, args.rep_ms)
            del g
    # bytes the LoRA step must move at least: distinct adapters' A and B, plus x, y (r+w)
    n_proj = len(pools)
    distinct = min(T, S)
    elt = torch.tensor([], dtype=dtype).element_size()
    lora_bytes = n_proj * (distinct * 2 * args.rank * H * elt + 3 * T * H * elt)
    best_bgmv = row.get("bgmv_graph_ms", row["bgmv_ms"])
    row["bgmv_GBps"] = lora_bytes / (best_bgmv * 1e-3) / 1e9
    return row


def _ratio(a, b):
    return a / b if b else float("nan")


def _table(rows, use_graph) -> str:
    modes = ["eager"] + (["graph"] if use_graph else [])
    lines = [
        "| batch | mode | base mm (ms) | bgmv (ms) | sgmv (ms) | naive bmm (ms) | bgmv/base | sgmv/base | naive/bgmv | bgmv GB/s | rel err bgmv / sgmv |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        for m in modes:
            sfx = "_ms" if m == "eager" else "_graph_ms"
            base, bgmv, sgmv, naive = (r[f"{k}{sfx}"] for k in ("base", "bgmv", "sgmv", "naive"))
            lines.append(
                f"| {r['batch']} | {m} | {base:.3f} | {bgmv:.3f} | {sgmv:.3f} | {naive:.3f} | "
                f"{_ratio(bgmv, base):.3f} | {_ratio(sgmv, base):.3f} | {_ratio(naive, bgmv):.2f} | "
                f"{r['bgmv_GBps']:.0f} | {r['rel_err_bgmv']:.1e} / {r['rel_err_sgmv']:.1e} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parse_args(argv)
    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif args.allow_cpu:
        device = torch.device("cpu")
    else:
        print("bench_lora needs a CUDA device (use --allow-cpu with tiny shapes for a smoke test)", file=sys.stderr)
        return 2
    if device.type == "cuda" and not HAS_TRITON:
        print("bench_lora needs triton on CUDA", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    use_graph = device.type == "cuda" and not args.no_graph
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]

    pools, ranks, scaling = _make_pools(args, device, dtype)
    base_w = _make_base(args, device, dtype)
    rows = []
    for T in batch_sizes:
        rows.append(_bench_batch(args, T, pools, ranks, scaling, base_w, device, dtype, use_graph))
        print(f"batch {T}: done", file=sys.stderr, flush=True)

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    n_proj = args.layers * len(PROJECTIONS)
    print(
        f"\nLoRA delta of {n_proj} projections ({args.layers} layers x q,k,v,o; hidden {args.hidden}, rank {args.rank}, "
        f"{args.adapters} adapters, {args.dtype}) per decode step on {dev_name}; median ms per step.\n"
    )
    print(_table(rows, use_graph))
    if args.out:
        result = {
            "device": dev_name,
            "torch": torch.__version__,
            "triton": __import__("triton").__version__ if HAS_TRITON else None,
            "config": {k: v for k, v in vars(args).items() if k not in ("out", "allow_cpu")},
            "projections": n_proj,
            "rows": rows,
        }
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
