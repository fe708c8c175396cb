"""NF4 W4A16 decode GEMM over a 32-bit word layout, with the NF4 table looked up in registers.

Why a second NF4 kernel: the byte-layout kernel of kernels/nf4.py looks the 16-entry table up
with a gather load per weight. That load depends on the weight load before it, so Triton's
pipeliner cannot run ahead, and every weight pays a memory round trip plus an fp32 scale
multiply and a rounding. Here (CUDA, 16-bit activations):

  * weights are int32 words; word (g, r, n) holds in nibble s (bits 4s..4s+3) the code of
    W[n, 128g + 16s + r] (r < 16, s < 8): one [BLOCK_N, 16] word tile gives eight [BLOCK_N, 16]
    weight operands, operand s covering inputs 128g + 16s .. +16, all inside one 64-block of
    absmax;
  * the product is computed transposed, y^T[n, m] = sum_k W[n, k] x[m, k]: the dequantized
    weights are the A operand of the dot and stay in registers (on Hopper Triton emits wgmma
    with A from registers and x^T read from shared memory), the words go global -> shared ->
    registers in the operand's layout (no weight code is written back to shared memory);
  * the table lookup is eight PTX `prmt` byte permutes per four weights (no memory access);
    it yields the bare NF4 code in the activation dtype;
  * the absmax scale is applied after the dot, once per 64 inputs per output:
        y[m, n] = sum_c absmax[c, n] * sum_{k in 64-block c} x[m, k] * code[q[n, k]]
    instead of once per weight;
  * no load depends on another, so num_stages > 1 pipelines the word tiles.

Numerics: the codes are rounded to the activation dtype (bf16 keeps 8 significant bits), the
products accumulate in float32 and each 64-block sum is scaled in float32. bitsandbytes rounds
code * absmax to bf16 instead; both are one bf16 rounding of the same weight, so outputs agree
to bf16 accuracy (tested against bitsandbytes' dequantized reference), not bit for bit.

One batch row (M <= GEMV_MAX_M) takes a CUDA-core path instead (`_words_gemv_tile`, GEMV): a
tensor-core tile pads one token to 16 rows; there each program takes one row, the same words and
the same `prmt` lookup, multiplies the codes by x in float32 and scales each 64-block by absmax.
Split-K partials of either path are summed by the tile's last split in the same launch.

Layout (`words_from_nf4(NF4Weight) -> words [K/128 * 16, N] int32`) is made once at load from
the same 4-bit codes; absmax stays NF4Weight.absmax [K/64, N] float32. Requires K % 128 == 0.
Under TRITON_INTERPRET=1 (CPU tests) the table lookup is a gather from a float32 table and the
dot runs in float32; the layout, the per-block scaling and the split-K are the same code.
"""

from __future__ import annotations

import functools
import os

import torch

from .lora import HAS_TRITON, _device_ctx, tl, triton, use_triton
from .nf4 import NF4_CODE, NF4Weight, _interpreting, _num_sms
from .lora_group import check_members, group_shrink, shrink_plan
from .pdl import pdl_kwargs, pdl_start, prefetch_enabled, prefetch_l2

__all__ = ["WORD_K", "words_from_nf4", "dequantize_words", "triton_nf4_words_linear", "triton_words_dequantize",
           "reference_words_linear", "nf4_words_linear", "pick_words_config"]

WORD_K = 128  # inputs per word group (8 nibbles x 16 rows)

# Decode configs per M bucket: (max_M, BLOCK_M, BLOCK_N, num_warps, num_stages, max split_k), from the
# H100 ablations of the fused decode shapes (docs/results/gpu_nf4_words_wgmma.json): with the
# weights as the wgmma A operand, BLOCK_N 128 and 3 stages were best or within noise at M <= 16 for
# every shape, and above M = 16 for wide outputs (fused q|k|v, gate|up: the activation tile
# costs as many bytes per step as the weight tile); narrow outputs (o, down) above M = 32 take
# BLOCK_N 64 with 8 warps. split_k is chosen per shape (pick_words_config).
WORDS_CONFIGS = (
    (16, 16, 128, 4, 3, 8),
    (32, 32, 128, 4, 3, 4),
    (64, 64, 128, 4, 3, 4),
    (128, 64, 128, 4, 3, 4),  # two M tiles (not tuned)
)
WIDE_N = 8192  # narrower outputs above M = 16 take NARROW_CONFIG
NARROW_CONFIG = {32: dict(block_n=64, split=8), 128: dict(block_n=64, num_warps=8, split=4)}
SPLIT_TARGET_PER_SM = 8  # H200 sweep (docs/results/h200/gpu_nf4_words_configs.json): gate|up at M=1 split 8, 6% faster than 4
SPLIT_MAX_ROWS = 256  # split * M: bound on the float32 split-K partials
# batch rows up to GEMV_MAX_M (env QUIVER_NF4_GEMV_MAX_M, read per call; 0: never) run one program per row on the CUDA cores (_words_gemv_tile), the
# weights re-read per row (from L2 when the programs of both rows run together)
GEMV_MAX_M = 1
# H200 sweep at M=1 (docs/results/h200/gpu_nf4_words_gemv.json): BLOCK_N 64, 4 warps, K split
# until ~16 programs per SM (at most 32): 6-13% faster than the tensor-core path on every shape;
# at M=2 the re-read weights make it 35-45% slower, hence GEMV_MAX_M = 1. Loading the next word
# group into registers before this one's arithmetic (measured there as `prefetch`) gained nothing.
GEMV_CONFIG = dict(block_n=64, num_warps=4, num_stages=1, split=32, per_sm=16)
WORDS_MAX_M = 128  # above: prefill path (Triton dequantize + cuBLAS)
# Narrow outputs (N < WIDE_N: o_proj, down_proj) take the prefill path from NARROW_MAX_M + 1 rows:
# H200, `bench_nf4 --prefill --m 64 96 128` (docs/results/h200/gpu_nf4_prefill_r13b.json), word
# kernel defaults against dequantize + cuBLAS, us per linear: 4096x4096 30.1 / 29.6 at M=64,
# 50.6 / 35.7 at 96, 51.1 / 34.3 at 128; 4096x11008 70.5 / 80.9, 128.6 / 83.9, 129.5 / 83.4. Wide
# outputs stay on the word kernel up to WORDS_MAX_M (11008x4096: 43.5-69.4 against 76.6-78.2).
NARROW_MAX_M = 64
# The prefill path's rows are padded to a multiple of this: cuBLAS spends 139-189 us of host
# time on a matmul shape it has not seen and 14-16 us on one it has (H200,
# docs/results/h200/mm_host_probe.log), and an eager step's M is new nearly every step.
PREFILL_M_BUCKET = 64
DEQUANT_BLOCK_N = 64
# LoRA shrinks in the word kernel's launch: ~2 programs per SM of 256-input blocks (its 4 warps),
# not the standalone shrink's ~8 of 128 with 8 warps. H200 engine step, batch 32, 32 rank-16
# adapters (docs/results/h200/gpu_engine_r7_*.json): adapters' GPU cost +6.8% against +10.0% with
# 528 programs and +10.3% with the standalone defaults.
BASE_SHRINK_TARGET = 264
BASE_SHRINK_BLOCK_K = 256
PREFETCH_GROUPS = 4  # word groups per program prefetched into L2 under PDL (4 x 16 rows)


def words_from_nf4(w: NF4Weight) -> torch.Tensor:
    """[K/128 * 16, N] int32 word layout of an NF4Weight (the same codes, re-laid-out)."""
    N, K = w.shape
    assert K % WORD_K == 0, f"K={K} must be a multiple of {WORD_K}"
    q = w.codes().to(torch.int32)  # [N, K] codes 0..15
    G = K // WORD_K
    q = q.view(N, G, 8, 16)  # [n, g, s, r]: k = 128g + 16s + r
    shifts = (torch.arange(8, device=q.device, dtype=torch.int32) * 4).view(1, 1, 8, 1)
    words = (q << shifts).sum(dim=2, dtype=torch.int64)  # [n, g, r], nibble s at bits 4s
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.permute(1, 2, 0).reshape(G * 16, N).contiguous()


def dequantize_words(words: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W [N, K] from the word layout (the spec of the layout; float32 product like bnb)."""
    G16, N = words.shape
    G = G16 // 16
    w = words.view(G, 16, N).to(torch.int64) & 0xFFFFFFFF
    nib = torch.stack([(w >> (4 * s)) & 15 for s in range(8)], dim=1)  # [g, s, r, n]
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=words.device)
    vals = code[nib].permute(3, 0, 1, 2).reshape(N, G * WORD_K)  # k = 128g + 16s + r
    scale = absmax.t().repeat_interleave(64, dim=1)  # [N, K]
    return (vals * scale).to(dtype)


def _prmt_table(dtype: torch.dtype) -> tuple[int, ...]:
    """(hi bytes x4, lo bytes x4) of the 16 codes in dtype, packed 4 per 32-bit register."""
    bits = torch.tensor(NF4_CODE, dtype=torch.float32).to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF
    hi = [(int(b) >> 8) & 0xFF for b in bits]
    lo = [int(b) & 0xFF for b in bits]
    pack = lambda v, i: v[i] | v[i + 1] << 8 | v[i + 2] << 16 | v[i + 3] << 24  # noqa: E731
    return tuple(pack(hi, i) for i in range(0, 16, 4)) + tuple(pack(lo, i) for i in range(0, 16, 4))


@functools.lru_cache(maxsize=4)
def _prmt_asm(dtype: torch.dtype) -> str:
    """PTX: one int32 word ($8) -> its eight nibbles' codes ($0..$7, 16-bit)."""
    th0, th1, th2, th3, tl0, tl1, tl2, tl3 = (f"0x{v:08x}" for v in _prmt_table(dtype))
    half = """
    {shift_s}
    and.b32 s, s, 0x7777;
    shr.b32 b, $8, {shift_b};
    and.b32 b, b, 0x4444;
    or.b32 b, b, 0x3210;
    prmt.b32 ha, {th0}, {th1}, s;
    prmt.b32 hb, {th2}, {th3}, s;
    prmt.b32 hi, ha, hb, b;
    prmt.b32 la, {tl0}, {tl1}, s;
    prmt.b32 lb, {tl2}, {tl3}, s;
    prmt.b32 lo, la, lb, b;
    prmt.b32 p, lo, hi, 0x5140;
    prmt.b32 q, lo, hi, 0x7362;
    mov.b32 {{{o0}, {o1}}}, p;
    mov.b32 {{{o2}, {o3}}}, q;
    """
    tables = dict(th0=th0, th1=th1, th2=th2, th3=th3, tl0=tl0, tl1=tl1, tl2=tl2, tl3=tl3)
    body = half.format(shift_s="mov.b32 s, $8;", shift_b=1, o0="$0", o1="$1", o2="$2", o3="$3", **tables)
    body += half.format(shift_s="shr.b32 s, $8, 16;", shift_b=17, o0="$4", o1="$5", o2="$6", o3="$7", **tables)
    return "{\n.reg .b32 s, b, ha, hb, hi, la, lb, lo, p, q;\n" + body + "}"


if HAS_TRITON:
    from .lora_group import _group_shrink_program

    @triton.jit
    def _nibble_codes(w, code_ptr, asm: tl.constexpr, ty: tl.constexpr, USE_ASM: tl.constexpr):
        if USE_ASM:
            i16 = tl.int16
            c0, c1, c2, c3, c4, c5, c6, c7 = tl.inline_asm_elementwise(
                asm, "=h,=h,=h,=h,=h,=h,=h,=h,r", [w], dtype=(i16, i16, i16, i16, i16, i16, i16, i16), is_pure=True,
                pack=1)
            c0 = c0.to(ty, bitcast=True)
            c1 = c1.to(ty, bitcast=True)
            c2 = c2.to(ty, bitcast=True)
            c3 = c3.to(ty, bitcast=True)
            c4 = c4.to(ty, bitcast=True)
            c5 = c5.to(ty, bitcast=True)
            c6 = c6.to(ty, bitcast=True)
            c7 = c7.to(ty, bitcast=True)
        else:
            c0 = tl.load(code_ptr + (w & 15))
            c1 = tl.load(code_ptr + ((w >> 4) & 15))
            c2 = tl.load(code_ptr + ((w >> 8) & 15))
            c3 = tl.load(code_ptr + ((w >> 12) & 15))
            c4 = tl.load(code_ptr + ((w >> 16) & 15))
            c5 = tl.load(code_ptr + ((w >> 20) & 15))
            c6 = tl.load(code_ptr + ((w >> 24) & 15))
            c7 = tl.load(code_ptr + ((w >> 28) & 15))
        return c0, c1, c2, c3, c4, c5, c6, c7

    @triton.jit
    def _xt_slice(x_cols, kbase, s: tl.constexpr, offs_r, m_mask, stride_xk, ty: tl.constexpr):
        """x^T [16, BLOCK_M]: inputs kbase + 16s .. +16 of the batch rows (the dot's B operand)."""
        return tl.load(x_cols + (kbase + 16 * s + offs_r)[:, None] * stride_xk, mask=m_mask[None, :],
                       other=0.0).to(ty)

    @triton.jit
    def _words_tile(x_ptr, w_ptr, absmax_ptr, code_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr, M, N, groups_per_split, G,
                    stride_xm, stride_xk, stride_w, stride_am, pid_n, pid_m, pid_s, asm: tl.constexpr,
                    DOT_TY: tl.constexpr, USE_ASM: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr):
        """One output tile [BLOCK_N, BLOCK_M] over split pid_s of the word groups."""
        g_begin = pid_s * groups_per_split
        g_end = tl.minimum(G, g_begin + groups_per_split)
        if PDL and PREFETCH > 0 and BLOCK_N >= 32:
            # the weights depend on no kernel: start streaming them while the kernel before runs
            n_lines = pid_n * BLOCK_N + tl.arange(0, BLOCK_N // 32) * 32  # one 128-byte line per 32 columns
            n_lines = tl.minimum(n_lines, N - 1)
            last = tl.maximum(16 * tl.minimum(g_end - g_begin, PREFETCH) - 1, 0)
            rows = 16 * g_begin + tl.minimum(tl.arange(0, 16 * PREFETCH), last)
            prefetch_l2(w_ptr + rows[:, None] * stride_w + n_lines[None, :])
            arows = 2 * g_begin + tl.minimum(tl.arange(0, 2 * PREFETCH), last // 8)
            prefetch_l2(absmax_ptr + arows[:, None] * stride_am + n_lines[None, :])
        pdl_start(PDL)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, 16)
        m_mask = offs_m < M
        n_mask = offs_n < N
        # transposed product acc[n, m] = sum_k W[n, k] x[m, k]: the dequantized weights are the
        # dot's A operand, used from registers (Hopper wgmma takes A from registers, B = x^T
        # from shared memory), so no weight code goes through shared memory
        x_cols = x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm
        w_tile = w_ptr + offs_r[None, :] * stride_w + offs_n[:, None]  # [BLOCK_N, 16] words
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for g in range(g_begin, g_end):
            w = tl.load(w_tile + g * 16 * stride_w, mask=n_mask[:, None], other=0)
            am0 = tl.load(absmax_ptr + (2 * g) * stride_am + offs_n, mask=n_mask, other=0.0)
            am1 = tl.load(absmax_ptr + (2 * g + 1) * stride_am + offs_n, mask=n_mask, other=0.0)
            c0, c1, c2, c3, c4, c5, c6, c7 = _nibble_codes(w, code_ptr, asm, DOT_TY, USE_ASM)
            kb = g * 128
            p = tl.dot(c0, _xt_slice(x_cols, kb, 0, offs_r, m_mask, stride_xk, DOT_TY))
            p = tl.dot(c1, _xt_slice(x_cols, kb, 1, offs_r, m_mask, stride_xk, DOT_TY), p)
            p = tl.dot(c2, _xt_slice(x_cols, kb, 2, offs_r, m_mask, stride_xk, DOT_TY), p)
            p = tl.dot(c3, _xt_slice(x_cols, kb, 3, offs_r, m_mask, stride_xk, DOT_TY), p)
            acc += p * am0[:, None]
            p = tl.dot(c4, _xt_slice(x_cols, kb, 4, offs_r, m_mask, stride_xk, DOT_TY))
            p = tl.dot(c5, _xt_slice(x_cols, kb, 5, offs_r, m_mask, stride_xk, DOT_TY), p)
            p = tl.dot(c6, _xt_slice(x_cols, kb, 6, offs_r, m_mask, stride_xk, DOT_TY), p)
            p = tl.dot(c7, _xt_slice(x_cols, kb, 7, offs_r, m_mask, stride_xk, DOT_TY), p)
            acc += p * am1[:, None]
        _tile_store(acc, offs_n, offs_m, n_mask, m_mask, bias_ptr, out_ptr, ws_ptr, lock_ptr, M, N, pid_n, pid_m, pid_s,
                    HAS_BIAS, SPLIT_K, BLOCK_M, BLOCK_N)

    @triton.jit
    def _words_gemv_tile(x_ptr, w_ptr, absmax_ptr, code_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr, M, N, groups_per_split,
                         G, stride_xm, stride_xk, stride_w, stride_am, pid_n, pid_m, pid_s, asm: tl.constexpr,
                         DOT_TY: tl.constexpr, USE_ASM: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                         BLOCK_N: tl.constexpr, PDL: tl.constexpr):
        """One batch row (pid_m) over BLOCK_N outputs and split pid_s of the word groups, on the
        CUDA cores: no tensor-core tile of 16 rows for one token. acc[r, n] sums, in float32, the
        products of the inputs 128g + 16s + r; the 16 rows are summed once at the end."""
        pdl_start(PDL)
        g_begin = pid_s * groups_per_split
        g_end = tl.minimum(G, g_begin + groups_per_split)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, 16)
        n_mask = offs_n < N
        w_tile = w_ptr + offs_r[:, None] * stride_w + offs_n[None, :]  # [16, BLOCK_N] words
        x_row = x_ptr + pid_m.to(tl.int64) * stride_xm + offs_r * stride_xk
        acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
        for g in range(g_begin, g_end):
            w = tl.load(w_tile + g * 16 * stride_w, mask=n_mask[None, :], other=0)
            am0 = tl.load(absmax_ptr + (2 * g) * stride_am + offs_n, mask=n_mask, other=0.0)
            am1 = tl.load(absmax_ptr + (2 * g + 1) * stride_am + offs_n, mask=n_mask, other=0.0)
            xg = x_row + g * 128 * stride_xk
            c0, c1, c2, c3, c4, c5, c6, c7 = _nibble_codes(w, code_ptr, asm, DOT_TY, USE_ASM)
            p = c0.to(tl.float32) * tl.load(xg).to(tl.float32)[:, None]
            p += c1.to(tl.float32) * tl.load(xg + 16 * stride_xk).to(tl.float32)[:, None]
            p += c2.to(tl.float32) * tl.load(xg + 32 * stride_xk).to(tl.float32)[:, None]
            p += c3.to(tl.float32) * tl.load(xg + 48 * stride_xk).to(tl.float32)[:, None]
            q = c4.to(tl.float32) * tl.load(xg + 64 * stride_xk).to(tl.float32)[:, None]
            q += c5.to(tl.float32) * tl.load(xg + 80 * stride_xk).to(tl.float32)[:, None]
            q += c6.to(tl.float32) * tl.load(xg + 96 * stride_xk).to(tl.float32)[:, None]
            q += c7.to(tl.float32) * tl.load(xg + 112 * stride_xk).to(tl.float32)[:, None]
            acc += p * am0[None, :] + q * am1[None, :]
        y = tl.sum(acc, axis=0)[:, None]  # [BLOCK_N, 1]
        offs_m = pid_m + tl.arange(0, 1)
        _tile_store(y, offs_n, offs_m, n_mask, offs_m < M, bias_ptr, out_ptr, ws_ptr, lock_ptr, M, N, pid_n, pid_m,
                    pid_s, HAS_BIAS, SPLIT_K, 1, BLOCK_N)

    @triton.jit
    def _tile_store(acc, offs_n, offs_m, n_mask, m_mask, bias_ptr, out_ptr, ws_ptr, lock_ptr, M, N, pid_n, pid_m, pid_s,
                    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """out[m, n] = acc[n, m] (+ bias); under split-K the partial goes to the workspace and the
        last split of the tile to finish sums the partials in split order (deterministic) and
        writes the output: one launch (as kernels/nf4.py)."""
        out_mask = n_mask[:, None] & m_mask[None, :]
        o_off = offs_m.to(tl.int64)[None, :] * N + offs_n[:, None]
        if SPLIT_K > 1:
            tl.store(ws_ptr + pid_s.to(tl.int64) * M * N + o_off, acc, mask=out_mask)
            tl.debug_barrier()
            tile = pid_m * tl.num_programs(0) + pid_n
            done = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel", scope="gpu")
            if done == SPLIT_K - 1:
                acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
                for si in tl.static_range(SPLIT_K):
                    acc += tl.load(ws_ptr + si * M * N + o_off, mask=out_mask, other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
                tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
                tl.atomic_xchg(lock_ptr + tile, 0)  # re-arm for the next launch
        else:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
            tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _nf4_words_kernel(
        x_ptr,  # [M, K]
        w_ptr,  # [G*16, N] int32
        absmax_ptr,  # [2G, N] float32
        code_ptr,  # [16] in the dot dtype (interpreter path only)
        bias_ptr,  # [N] or dummy
        out_ptr,  # [M, N] x.dtype
        ws_ptr,  # [S, M, N] float32 split-K partials (dummy when SPLIT_K == 1)
        lock_ptr,  # zeroed int32 tile counters (split-K)
        M,
        N,
        groups_per_split,
        G,
        stride_xm,
        stride_xk,
        stride_w,  # row stride of the words (N, or more for a column slice of a fused weight)
        stride_am,  # row stride of absmax
        # LoRA shrink programs of the same x (kernels/lora_group.py), after the tile programs
        # along grid axis 2; dummies when SHRINK is False
        slot_ptr, sa0, sa1, sa2, sm0, sm1, sm2, sr0, sr1, sr2, sh0, sh1, sh2, sh_K, sh_k_per_split,
        sh_stride_xt, sh_stride_as, sh_stride_ar, sh_stride_ht,
        sh_T,
        sh_n_rb,
        sh_programs,
        asm: tl.constexpr,
        DOT_TY: tl.constexpr,
        USE_ASM: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        SPLIT_K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        PDL: tl.constexpr = False,
        PREFETCH: tl.constexpr = 0,  # word groups prefetched into L2 before waiting (PDL only)
        SHRINK: tl.constexpr = False,
        SH_BLOCK_R: tl.constexpr = 16,
        SH_BLOCK_K: tl.constexpr = 128,
        SH_SPLIT_K: tl.constexpr = 1,
        SH_R_FLAT: tl.constexpr = 0,
        GEMV: tl.constexpr = False,  # one batch row per program on the CUDA cores (_words_gemv_tile)
    ):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_s = tl.program_id(2)
        if SHRINK and pid_s >= SPLIT_K:
            # a LoRA shrink program: it reads the same x as the tiles and shares their launch
            idx = ((pid_s - SPLIT_K) * tl.num_programs(1) + pid_m) * tl.num_programs(0) + pid_n
            if idx < sh_programs:
                pdl_start(PDL)
                rest = idx // sh_T
                _group_shrink_program(x_ptr, slot_ptr, sa0, sa1, sa2, sm0, sm1, sm2, sr0, sr1, sr2, sh0, sh1, sh2,
                                      idx % sh_T, rest % sh_n_rb, rest // sh_n_rb, sh_K, sh_k_per_split, sh_stride_xt,
                                      sh_stride_as, sh_stride_ar, sh_stride_ht, SH_BLOCK_R, SH_BLOCK_K, SH_SPLIT_K,
                                      SH_R_FLAT)
        elif GEMV:
            _words_gemv_tile(x_ptr, w_ptr, absmax_ptr, code_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr, M, N,
                             groups_per_split, G, stride_xm, stride_xk, stride_w, stride_am, pid_n, pid_m, pid_s, asm,
                             DOT_TY, USE_ASM, HAS_BIAS, SPLIT_K, BLOCK_N, PDL)
        else:
            _words_tile(x_ptr, w_ptr, absmax_ptr, code_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr, M, N,
                        groups_per_split, G, stride_xm, stride_xk, stride_w, stride_am, pid_n, pid_m, pid_s, asm,
                        DOT_TY, USE_ASM, HAS_BIAS, SPLIT_K, BLOCK_M, BLOCK_N, PDL, PREFETCH)

    @triton.jit
    def _words_dequant_kernel(w_ptr, absmax_ptr, code_ptr, out_ptr, N, K, stride_w, stride_am,
                              BLOCK_N: tl.constexpr):
        # out[n, 128g + 16s + r] = dtype(code[nibble s of word (16g + r, n)] * absmax[2g + s // 4, n])
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
            tl.store(row + 16 * s, (tl.load(code_ptr + ((w >> (4 * s)) & 15)) * am).to(ty), mask=n_mask[None, :])


def pick_words_config(M: int, N: int, K: int, device: torch.device, **overrides) -> dict:
    """Launch config at batch M (the bucket's defaults; keyword overrides win). The bucket's
    split_k is a maximum: K is split (powers of two) only while the grid has fewer than
    SPLIT_TARGET_PER_SM programs per SM and the float32 partials stay small
    (split * M <= SPLIT_MAX_ROWS)."""
    gemv = overrides.get("gemv")
    if gemv or (gemv is None and M <= int(os.environ.get("QUIVER_NF4_GEMV_MAX_M", GEMV_MAX_M))):
        g = GEMV_CONFIG
        bm, bn, nw, ns, sk = 1, g["block_n"], g["num_warps"], g["num_stages"], g["split"]
        cfg = dict(gemv=True, block_m=1, block_n=bn, num_warps=nw, num_stages=ns)
    else:
        for max_m, bm, bn, nw, ns, sk in WORDS_CONFIGS:
            if M <= max_m:
                break
        if M > 16 and N < WIDE_N:
            narrow = NARROW_CONFIG[32 if M <= 32 else 128]
            bn, nw, sk = narrow["block_n"], narrow.get("num_warps", nw), narrow["split"]
        cfg = dict(block_m=bm, block_n=bn, num_warps=nw, num_stages=ns)
    cfg.update({k: v for k, v in overrides.items() if v is not None and k != "gemv"})
    if "split_k" not in cfg:
        tiles = (M if cfg.get("gemv") else -(-M // cfg["block_m"])) * -(-N // cfg["block_n"])
        target = (GEMV_CONFIG["per_sm"] if cfg.get("gemv") else SPLIT_TARGET_PER_SM) * _num_sms(device)
        split = 1
        while split < sk and tiles * split < target and split * 2 * M <= SPLIT_MAX_ROWS:
            split *= 2
        cfg["split_k"] = split
    return cfg


_CODES: dict = {}


def _code_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (dtype, device)
    if key not in _CODES:
        _CODES[key] = torch.tensor(NF4_CODE, dtype=torch.float32).to(dtype).to(device)
    return _CODES[key]


Shrink = tuple  # (token_slot [M] int32, [GroupMember]): LoRA shrinks of the same x (kernels/lora_group.py)


def triton_nf4_words_linear(x: torch.Tensor, words: torch.Tensor, absmax: torch.Tensor,
                            bias: torch.Tensor | None = None, shrink: Shrink | None = None,
                            **overrides) -> torch.Tensor:
    """y = x @ W^T (+ bias) for x [..., K] (float16 | bfloat16 on CUDA; any float under the
    interpreter), W in the word layout (words and absmax may be column slices: row strides are
    taken). Split-K partials are summed by the last split of each tile, in one launch.

    shrink = (token_slot, members): the same launch also runs the members' LoRA shrinks
    (m.h (+)= x A^T, as lora_group's shrink launch would) in extra programs after the output
    tiles: they fill the SMs the tiles leave idle, and their launch is saved."""
    from .nf4 import LOCKS_SIZE, _tile_locks

    _check_words(words, absmax)
    G16, N = words.shape
    K = G16 // 16 * WORD_K
    assert x.shape[-1] == K, f"x has K={x.shape[-1]}, the weight {K}"
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if M == 0:
        return x.new_empty((*lead, N))
    interp = _interpreting()
    use_asm = not interp
    assert interp or x.dtype in (torch.float16, torch.bfloat16), "the word kernel takes fp16/bf16 activations"
    dot_dtype = x.dtype if use_asm else torch.float32  # the interpreter's bf16 tl.dot is not exact
    ty = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dot_dtype]
    cfg = pick_words_config(M, N, K, x.device, **overrides)
    G = G16 // 16
    S = int(cfg["split_k"])
    gps = -(-G // S)
    S = -(-G // gps)
    gemv = bool(cfg.get("gemv"))
    bm, bn = (1 if gemv else int(cfg["block_m"])), int(cfg["block_n"])
    grid = (-(-N // bn), -(-M // bm), S)
    assert grid[0] * grid[1] <= LOCKS_SIZE and M * N * S < 2**31, f"problem too large: M={M} N={N} split {S}"
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    ws = torch.empty((S, M, N), dtype=torch.float32, device=x.device) if S > 1 else out
    locks = _tile_locks(x.device) if S > 1 else absmax
    has_bias = bias is not None
    bias_arg = bias.contiguous() if has_bias else absmax
    launch = {"maxnreg": int(cfg["maxnreg"])} if cfg.get("maxnreg") else {}  # a register cap (bench_nf4 sweeps)
    sh_args, sh_const = (absmax,) * 13 + (0,) * 9, {}
    if shrink is not None:
        token_slot, members = shrink
        check_members(x2, token_slot, members)  # before the launch: the programs trust the layout
        plan = shrink_plan(x2, token_slot, members, target=BASE_SHRINK_TARGET, block_k=BASE_SHRINK_BLOCK_K)
        grid = (grid[0], grid[1], S + -(-plan.programs // (grid[0] * grid[1])))
        sh_args = plan.args[1:] + (plan.T, plan.n_rb, plan.programs)
        sh_const = dict(SHRINK=True, SH_BLOCK_R=plan.block_r, SH_BLOCK_K=plan.block_k, SH_SPLIT_K=plan.split_k,
                        SH_R_FLAT=plan.r_flat)
    with _device_ctx(x):
        _nf4_words_kernel[grid](
            x2, words, absmax, _code_table(dot_dtype, x.device), bias_arg, out, ws, locks, M, N, gps, G,
            x2.stride(0), x2.stride(1), words.stride(0), absmax.stride(0), *sh_args,
            asm=_prmt_asm(x.dtype) if use_asm else "", DOT_TY=ty, USE_ASM=use_asm,
            HAS_BIAS=has_bias, SPLIT_K=S, BLOCK_M=bm, BLOCK_N=bn, GEMV=gemv,
            num_warps=int(cfg["num_warps"]), num_stages=int(cfg["num_stages"]), **launch, **sh_const, **_pdl_args(x))
    return out.reshape(*lead, N)


def _pdl_args(x: torch.Tensor) -> dict:
    kw = pdl_kwargs(x)
    if kw and prefetch_enabled():
        kw["PREFETCH"] = PREFETCH_GROUPS
    return kw


def _check_words(words: torch.Tensor, absmax: torch.Tensor) -> None:
    assert words.dtype == torch.int32 and words.dim() == 2 and words.shape[0] % 16 == 0, "words must be [G*16, N] int32"
    assert absmax.dtype == torch.float32 and tuple(absmax.shape) == (words.shape[0] // 8, words.shape[1]), \
        f"absmax {tuple(absmax.shape)} does not match words {tuple(words.shape)}"
    assert words.stride(1) == 1 and absmax.stride(1) == 1, "words and absmax rows must be contiguous"


def triton_words_dequantize(words: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W [N, K] in dtype, materialized by a Triton kernel (the prefill path: then cuBLAS)."""
    _check_words(words, absmax)
    G16, N = words.shape
    K = G16 // 16 * WORD_K
    out = torch.empty((N, K), dtype=dtype, device=words.device)
    with _device_ctx(words):
        _words_dequant_kernel[(G16 // 16, -(-N // DEQUANT_BLOCK_N))](
            words, absmax, _code_table(torch.float32, words.device), out, N, K, words.stride(0), absmax.stride(0),
            BLOCK_N=DEQUANT_BLOCK_N, num_warps=4)
    return out


def reference_words_linear(x: torch.Tensor, words: torch.Tensor, absmax: torch.Tensor,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    W = dequantize_words(words, absmax, x.dtype)
    return torch.nn.functional.linear(x, W, None if bias is None else bias.to(x.dtype))


def nf4_words_linear(x: torch.Tensor, words: torch.Tensor, absmax: torch.Tensor,
                     bias: torch.Tensor | None = None, shrink: Shrink | None = None) -> torch.Tensor:
    """Dispatch: decode batches (M <= WORDS_MAX_M; M <= NARROW_MAX_M for outputs narrower than
    WIDE_N) run the word kernel; larger M (prefill) dequantize W with a Triton kernel and leave
    the GEMM to cuBLAS, over rows padded to a multiple of PREFILL_M_BUCKET; the reference off CUDA.
    shrink (token_slot, members): the members' LoRA shrinks of x, in the word kernel's launch
    where it runs, else in their own (lora_group.group_shrink)."""
    M = x.numel() // x.shape[-1]
    x2 = x.reshape(-1, x.shape[-1])
    words_kernel = M <= WORDS_MAX_M and (M <= NARROW_MAX_M or words.shape[1] >= WIDE_N)
    if use_triton(x) and words_kernel and (x.dtype != torch.float32 or _interpreting()):
        if shrink is None or x2.stride(1) == 1:
            return triton_nf4_words_linear(x, words, absmax, bias, shrink=shrink)
        y = triton_nf4_words_linear(x, words, absmax, bias)
    elif not use_triton(x):
        y = reference_words_linear(x, words, absmax, bias)
    else:
        W = triton_words_dequantize(words, absmax, x.dtype)
        pad = -M % PREFILL_M_BUCKET
        xp = torch.nn.functional.pad(x2, (0, 0, 0, pad)) if pad else x2
        y = torch.nn.functional.linear(xp, W, None if bias is None else bias.to(x.dtype))
        y = y[:M].reshape(*x.shape[:-1], W.shape[0])
    if shrink is not None:
        group_shrink(x2, *shrink)
    return y
