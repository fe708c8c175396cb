"""The prefill path's NF4 dequantize kernel (kernels/nf4_words._words_dequant_kernel, launched
with BLOCK_N = DEQUANT_BLOCK_N and 4 warps) against other launch configs and two variants, in
one run, on the linears of a Llama-2-7B layer:

  * the kept kernel at BLOCK_N 32-256 and 2-8 warps;
  * MULTI: the same body over GP word groups per program (the absmax and index math of a
    program amortized over more stores);
  * BARE: no table lookup (the nibble itself, times absmax: wrong values, an upper bound on
    what a cheaper lookup could gain).

Printed per shape: us per launch (median of CUDA-event timed launches over 4 weight sets that do
not fit in L2), GB/s moved, the ratio against the kept launch, and whether the output equals it
bit for bit.

    python3 docs/results/h200/dequant_sweep_probe.py
"""
import statistics

import torch
import triton
import triton.language as tl

from quiver.kernels.nf4_words import DEQUANT_BLOCK_N, _code_table, _words_dequant_kernel


@triton.jit
def MULTI(w_ptr, absmax_ptr, code_ptr, out_ptr, N, K, G, stride_w, stride_am, BLOCK_N: tl.constexpr,
          GP: tl.constexpr):
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, 16)
    n_mask = offs_n < N
    ty = out_ptr.dtype.element_ty
    for j in tl.static_range(GP):
        g = tl.program_id(0) * GP + j
        g_mask = n_mask & (offs_n * 0 + g < G)  # [BLOCK_N]: this group exists
        mask = g_mask[None, :] & (offs_r[:, None] < 16)
        w = tl.load(w_ptr + (g * 16 + offs_r)[:, None] * stride_w + offs_n[None, :], mask=mask, other=0)
        am0 = tl.load(absmax_ptr + (2 * g) * stride_am + offs_n, mask=g_mask, other=0.0)[None, :]
        am1 = tl.load(absmax_ptr + (2 * g + 1) * stride_am + offs_n, mask=g_mask, other=0.0)[None, :]
        row = out_ptr + offs_n.to(tl.int64)[None, :] * K + g * 128 + offs_r[:, None]
        for s in tl.static_range(8):
            am = am0 if s < 4 else am1
            tl.store(row + 16 * s, (tl.load(code_ptr + ((w >> (4 * s)) & 15)) * am).to(ty), mask=mask)


@triton.jit
def BARE(w_ptr, absmax_ptr, code_ptr, out_ptr, N, K, stride_w, stride_am, BLOCK_N: tl.constexpr):
    g = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, 16)
    n_mask = offs_n < N
    w = tl.load(w_ptr + (g * 16 + offs_r)[:, None] * stride_w + offs_n[None, :], mask=n_mask[None, :], other=0)
    am0 = tl.load(absmax_ptr + (2 * g) * stride_am + offs_n, mask=n_mask, other=0.0)[None, :]
    am1 = tl.load(absmax_ptr + (2 * g + 1) * stride_am + offs_n, mask=n_mask, other=0.0)[None, :]
    row = out_ptr + offs_n.to(tl.int64)[None, :] * K + g * 128 + offs_r[:, None]
    ty = out_ptr.dtype.element_ty
    for s in tl.static_range(8):
        am = am0 if s < 4 else am1
        tl.store(row + 16 * s, (((w >> (4 * s)) & 15).to(tl.float32) * am).to(ty), mask=n_mask[None, :])


def launch(kind, words, absmax, out, bn, nw, gp=1):
    G16, N = words.shape
    K, G = G16 // 16 * 128, G16 // 16
    code = _code_table(torch.float32, words.device)
    if kind == "multi":
        MULTI[(-(-G // gp), -(-N // bn))](words, absmax, code, out, N, K, G, words.stride(0), absmax.stride(0),
                                          BLOCK_N=bn, GP=gp, num_warps=nw)
    else:
        kernel = _words_dequant_kernel if kind == "kept" else BARE
        kernel[(G, -(-N // bn))](words, absmax, code, out, N, K, words.stride(0), absmax.stride(0), BLOCK_N=bn,
                                 num_warps=nw)
    return out


def time_us(fn, sets, reps=30):
    for s in sets:
        fn(*s)
    torch.cuda.synchronize()
    ts = []
    for i in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(*sets[i % len(sets)])
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3)
    return statistics.median(ts)


VARIANTS = [("kept", bn, nw, 1) for bn in (32, 64, 128, 256) for nw in (2, 4, 8)]
VARIANTS += [("multi", bn, nw, gp) for bn in (64, 128) for nw in (4, 8) for gp in (2, 4)]
VARIANTS += [("bare", DEQUANT_BLOCK_N, 4, 1), ("bare", 128, 8, 1)]

if __name__ == "__main__":
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), "triton", triton.__version__, flush=True)
    for N, K in [(4096, 4096), (12288, 4096), (22016, 4096), (4096, 11008)]:
        sets = [(torch.randint(-2**31, 2**31 - 1, (K // 128 * 16, N), dtype=torch.int32, device="cuda"),
                 torch.rand(K // 64, N, device="cuda") * 0.05,
                 torch.empty(N, K, dtype=torch.bfloat16, device="cuda")) for _ in range(4)]
        moved = N * K // 2 + N * K // 64 * 4 + N * K * 2
        ref = launch("kept", *sets[0], DEQUANT_BLOCK_N, 4).clone()
        base = time_us(lambda w, a, o: launch("kept", w, a, o, DEQUANT_BLOCK_N, 4), sets)
        print(f"{N}x{K}: kept launch (BLOCK_N {DEQUANT_BLOCK_N}, 4 warps) {base:.1f} us, "
              f"{moved / base / 1e3:.0f} GB/s", flush=True)
        for kind, bn, nw, gp in VARIANTS:
            try:
                same = torch.equal(launch(kind, *sets[0], bn, nw, gp), ref)
                t = time_us(lambda w, a, o: launch(kind, w, a, o, bn, nw, gp), sets)
            except Exception as exc:  # a config that does not compile or fit: reported, the sweep goes on
                print(f"  {kind} BLOCK_N {bn} warps {nw} GP {gp}: failed ({type(exc).__name__})", flush=True)
                continue
            print(f"  {kind} BLOCK_N {bn} warps {nw} GP {gp}: {t:.1f} us, {moved / t / 1e3:.0f} GB/s, "
                  f"{base / t:.2f}x, equal {same}", flush=True)
