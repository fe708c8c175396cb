"""The prefill path's NF4 dequantize kernel (kernels/nf4_words._words_dequant_kernel: stores of
[16, BLOCK_N] tiles, 32 bytes per output row and nibble) against a variant that stores each
output row's 128 values contiguously (JOINED_KERNEL below; measured in round 13 and not kept:
0.89-1.08x, docs/results/h200/dequant_probe_r13.log, where the two columns are printed
"round-12 form -> variant"), in one run: us per weight (median of CUDA-event timed launches over 4 weight sets
that do not fit in L2), bytes moved per second, outputs compared bit for bit, and the prefill
linear (dequantize + cuBLAS at 160 rows) with each.

    python3 docs/results/h200/dequant_probe.py
"""
import statistics

import torch
import triton
import triton.language as tl

from quiver.kernels.nf4_words import DEQUANT_BLOCK_N, _code_table, triton_words_dequantize


@triton.jit
def JOINED_KERNEL(w_ptr, absmax_ptr, code_ptr, out_ptr, N, K, stride_w, stride_am, BLOCK_N: tl.constexpr):
    # the variant: the eight [16 r, BLOCK_N] nibble tiles joined and permuted into one
    # [BLOCK_N, 128] tile, each output row's 128 values stored contiguously
    g = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, 16)
    n_mask = offs_n < N
    w = tl.load(w_ptr + (g * 16 + offs_r)[:, None] * stride_w + offs_n[None, :], mask=n_mask[None, :], other=0)
    am0 = tl.load(absmax_ptr + (2 * g) * stride_am + offs_n, mask=n_mask, other=0.0)[None, :]
    am1 = tl.load(absmax_ptr + (2 * g + 1) * stride_am + offs_n, mask=n_mask, other=0.0)[None, :]
    v0 = tl.load(code_ptr + (w & 15)) * am0
    v1 = tl.load(code_ptr + ((w >> 4) & 15)) * am0
    v2 = tl.load(code_ptr + ((w >> 8) & 15)) * am0
    v3 = tl.load(code_ptr + ((w >> 12) & 15)) * am0
    v4 = tl.load(code_ptr + ((w >> 16) & 15)) * am1
    v5 = tl.load(code_ptr + ((w >> 20) & 15)) * am1
    v6 = tl.load(code_ptr + ((w >> 24) & 15)) * am1
    v7 = tl.load(code_ptr + ((w >> 28) & 15)) * am1
    ty = out_ptr.dtype.element_ty
    v = tl.join(tl.join(tl.join(v0, v1), tl.join(v2, v3)), tl.join(tl.join(v4, v5), tl.join(v6, v7)))
    v = tl.reshape(tl.permute(v.to(ty), (1, 4, 3, 2, 0)), (BLOCK_N, 128))
    rows = out_ptr + offs_n.to(tl.int64)[:, None] * K + g * 128 + tl.arange(0, 128)[None, :]
    tl.store(rows, v, mask=n_mask[:, None])


def joined_dequantize(words, absmax, dtype):
    G16, N = words.shape
    K = G16 // 16 * 128
    out = torch.empty((N, K), dtype=dtype, device=words.device)
    JOINED_KERNEL[(G16 // 16, -(-N // DEQUANT_BLOCK_N))](words, absmax, _code_table(torch.float32, words.device), out,
                                                        N, K, words.stride(0), absmax.stride(0),
                                                        BLOCK_N=DEQUANT_BLOCK_N, num_warps=4)
    return out


def time_us(fn, sets, reps=20):
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


torch.manual_seed(0)
print(torch.cuda.get_device_name(), "triton", triton.__version__)
for N, K in [(4096, 4096), (12288, 4096), (22016, 4096), (4096, 11008), (11008, 4096)]:
    sets = [(torch.randint(-2**31, 2**31 - 1, (K // 128 * 16, N), dtype=torch.int32, device="cuda"),
             torch.rand(K // 64, N, device="cuda") * 0.05) for _ in range(4)]
    same = torch.equal(triton_words_dequantize(*sets[0], torch.bfloat16), joined_dequantize(*sets[0], torch.bfloat16))
    moved = N * K // 2 + N * K // 64 * 4 + N * K * 2
    old = time_us(lambda w, a: triton_words_dequantize(w, a, torch.bfloat16), sets)
    new = time_us(lambda w, a: joined_dequantize(w, a, torch.bfloat16), sets)
    x = torch.randn(160, K, device="cuda", dtype=torch.bfloat16)
    lin_old = time_us(lambda w, a: torch.nn.functional.linear(x, triton_words_dequantize(w, a, x.dtype)), sets)
    lin_new = time_us(lambda w, a: torch.nn.functional.linear(x, joined_dequantize(w, a, x.dtype)), sets)
    print(f"{N}x{K}: dequantize {old:.1f} -> {new:.1f} us ({old / new:.2f}x; {moved / old / 1e3:.0f} -> "
          f"{moved / new / 1e3:.0f} GB/s), equal {same}; dequantize + cuBLAS at M=160 {lin_old:.1f} -> {lin_new:.1f} us "
          f"({lin_old / lin_new:.2f}x)", flush=True)
