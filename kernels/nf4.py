"""NF4 (bitsandbytes 4-bit NormalFloat) base linear: y = x @ W^T with dequantization fused.

Contract
--------
The format of record is bitsandbytes' NF4 storage (``bnb.nn.Params4bit`` /
``bnb.functional.quantize_4bit``): for a weight W [N out, K in] flattened row-major,

    packed [N*K/2, 1] uint8    byte i = (q[2i] << 4) | q[2i+1]   (first nibble in the high bits)
    absmax [N*K/bs]            one scale per block of bs (= blocksize, 64 by default) values
                               of the flattened weight; with compress_statistics=True it is
                               stored uint8 and dequantized as
                               dequantize_blockwise(absmax, state2) + offset
    code   [16] float32        the NF4 table (bnb.functional.get_4bit_type("nf4"))
    W[n, k] = dtype(code[q[n*K + k]] * absmax[(n*K + k) // bs])     (product in float32)

``nf4_weight_from_bnb`` converts that, once at load, into an ``NF4Weight``: the same 4-bit codes
and the same float32 scales, only re-laid-out for the kernel (nothing is re-quantized;
``NF4Weight.bnb_packed()`` gives back bnb's bytes exactly):

    qweight [K/64, N, 32] uint8   chunk-major: byte j of (chunk c, row n) holds
                                  q[n, 64c + j] in the high nibble and q[n, 64c + 32 + j] in
                                  the low nibble, so a chunk of 64 inputs splits into two
                                  contiguous halves and an [N-block, chunk] tile is contiguous.
    absmax  [K/64, N] float32     the (double-dequantized) bnb block scale of each 64-chunk
                                  (a bnb block of 64*r values is repeated r times).

Requirements: quant_type "nf4", K % 64 == 0, blocksize % 64 == 0 (bnb's default 64, 128, ...;
blocksize 32 is refused). Callers fall back to bitsandbytes for anything else.

Operations (all take x [..., K] float32 | float16 | bfloat16 and return [..., N] in x.dtype):

    reference_nf4_linear(x, w, bias)  pure PyTorch: x @ w.dequantize(x.dtype).T (+ bias); equal
                                      to x @ bnb.functional.dequantize_4bit(packed, state).T
    triton_nf4_linear(x, w, bias)     Triton W4A16 kernels that read the 4-bit codes + scales and
                                      dequantize in registers (never materialize W), float32
                                      accumulation: a GEMV kernel for M <= gemv_max_m (decode),
                                      a tl.dot GEMM kernel up to DEQUANT_MIN_M, both with
                                      optional single-launch split-K; from DEQUANT_MIN_M tokens
                                      (prefill) W is dequantized by a Triton kernel and cuBLAS
                                      does the GEMM.
    triton_nf4_dequantize(w, dtype)   W [N, K] materialized by a Triton kernel.
    nf4_linear(x, w, bias)            Triton when x is on CUDA (or env QUIVER_FORCE_TRITON=1, which
                                      CPU tests use with TRITON_INTERPRET=1), else the reference.

Numerics: the GEMM and dequant paths round each dequantized weight to x.dtype exactly like bnb
(dtype(code * absmax)) and accumulate in float32 (fp32 inputs use IEEE fp32 dot, no TF32); the
GEMV path keeps the weights in float32 (sum_k code*x in fp32, times absmax per chunk), so it
is slightly *more* precise than the bnb reference. The bias is added in float32 before the
final rounding. Results differ from the reference only by accumulation order / that rounding.

This module imports nothing from quiver; triton is optional (the references always work) and
bitsandbytes is imported lazily, only by helpers that need it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from .lora import HAS_TRITON, _device_ctx, tl, triton, use_triton  # Triton stays optional (see kernels/lora.py)
from .pdl import _interpreting

__all__ = [
    "HAS_TRITON",
    "NF4_CODE",
    "NF4Weight",
    "nf4_weight_from_bnb",
    "reference_nf4_linear",
    "triton_nf4_linear",
    "triton_nf4_dequantize",
    "nf4_linear",
    "use_triton",
    "pick_config",
    "prepare_split_k",
]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# bitsandbytes' NF4 table (bnb.functional.get_4bit_type("nf4")), as float32 values.
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

CHUNK = 64  # K granularity of the kernel layout (one absmax per (chunk, row))
HALF = CHUNK // 2  # bytes per (chunk, row)

# ---------------------------------------------------------------------------------------------
# Default tuning knobs. FIRST GUESSES for H100 / bf16 / Llama-7B shapes: they were NOT measured
# on a GPU when written (no device was available); `python -m quiver.kernels.bench_nf4 --sweep`
# measures alternatives and prints the best per shape, update these from its output.
#
# The launch plan per shape is cached (_plan): call `_plan.cache_clear()` after changing these.
#
# Static analysis used to pick them (Triton 3.9 AOT compile for sm_90a, cuobjdump register
# counts): per loop iteration a thread holds ~4-5 registers per packed byte it loads (the two
# table lookups and the x values it multiplies), so the bytes in flight per SM are bounded by the
# register file to ~8-14 KB whatever the tile shape; the defaults keep ~16 B per thread per
# iteration and rely on occupancy plus one iteration of register prefetch.
#
# GEMV kernel (M <= GEMV_MAX_M): one program per (row m, BLOCK_N outputs, K split). Each loop
#   iteration streams a [GEMV_CHUNKS chunks, BLOCK_N rows, 32 bytes] tile (2 KB at the defaults,
#   16 B per thread, ~80 registers) while the next one is prefetched, looks the 16-entry table up
#   (L1-resident gather), FMAs with x in fp32, reduces each 64-chunk and scales it by its absmax.
#   No tensor cores: one FMA per weight is cheaper than the operand shuffles of an MMA at M == 1.
GEMV_MAX_M = 1
GEMV_BLOCK_N = 8  # N=4096 -> 512 programs at M=1: no split-K needed
GEMV_CHUNKS = 8  # 8 chunks = 512 inputs per iteration
GEMV_NUM_WARPS = 4
GEMV_NUM_STAGES = 1  # the loop is pipelined by hand; Triton's pipeliner would stage the table
#                      gathers through shared memory
# GEMM kernel (M > GEMV_MAX_M): one program per (BLOCK_M x BLOCK_N output tile, K split), loop
#   over CHUNKS 64-chunks per iteration: load [CHUNKS, 32, BLOCK_N] packed bytes + [CHUNKS,
#   BLOCK_N] scales (prefetched one iteration ahead), dequantize both nibble halves to x.dtype,
#   two tl.dot (K = 32*CHUNKS each) with the matching halves of x. num_stages=1 on purpose (see
#   GEMV_NUM_STAGES). GROUP_M swizzles the program order so consecutive programs share weight
#   tiles in L2. Configs per M bucket: (max_M, BLOCK_M, BLOCK_N, CHUNKS, num_warps, num_stages)
MM_CONFIGS = (
    # M <= 16 and M <= 32: from the H100 sweep (docs/results/gpu_nf4_sweep.json,
    # `python -m quiver.kernels.bench_nf4 --sweep --m 8 32`): BLOCK_N 64 beat 32 on every shape
    # (M=8: 19.9 vs 22.5 us on 4096x4096; M=32: 24.0 vs 33.1 us).
    (16, 16, 64, 1, 4, 1),  # GEMV-like decode batches: BLOCK_M=16 (tl.dot minimum) + split-K
    (32, 32, 64, 2, 4, 1),
    (128, 64, 64, 1, 4, 1),  # ~125 regs, wgmma
    (1 << 62, 128, 128, 1, 8, 1),  # ~167 regs (prefill: compute-bound, not tuned)
)
MM_GROUP_M = 8
# Large M (prefill) is compute-bound: from DEQUANT_MIN_M tokens on, the weight is dequantized to
#   x.dtype by a Triton kernel into a temporary [N, K] (reads 0.56 B/weight, writes 2) and the
#   product is left to cuBLAS (torch.nn.functional.linear); the dequant pass costs ~N*K*2.6 bytes
#   of traffic, small next to an M >= 1024 GEMM, and cuBLAS is expected to beat this file's
#   register-dequant tl.dot kernel there (unmeasured; the sweep can check at --m 1024).
DEQUANT_MIN_M = 1024
DEQUANT_BLOCK_N = 64
# Split-K: when the (M, N) grid has fewer than SPLITK_TARGET_PROGRAMS_PER_SM * SMs programs, K is
#   split so it does; every split keeps >= SPLITK_MIN_CHUNKS chunks. Partial sums go to a float32
#   [S, M, N] workspace; the last split of each output tile to finish (atomic tile counter) sums
#   them in split order, adds the bias and writes the output: deterministic, one launch.
SPLITK_TARGET_PROGRAMS_PER_SM = 3
SPLITK_MAX = 8
SPLITK_MIN_CHUNKS = 8
SPLITK_MAX_M = 128  # never split K above this M (partials would cost more than they save)
SPLITK_MODE = "fixup"  # "fixup": last split of a tile reduces (1 launch); "reduce": 2nd kernel
REDUCE_BLOCK = 1024

_DEFAULT_SMS = 132  # H100 SXM; used when no CUDA device is visible (interpreter runs)
_MAX_GRID_YZ = 65535


# ---------------------------------------------------------------------------------------------
# The weight container


@dataclass
class NF4Weight:
    """bitsandbytes NF4 weight W [N, K] re-laid-out for the kernels (values exactly bnb's).

    qweight   [K/64, N, 32] uint8   chunk-major packed codes (see module docstring)
    absmax    [K/64, N]     float32 scale of every (64-chunk, row)
    code      [16]          float32 NF4 table
    shape     (N, K)        (out_features, in_features)
    blocksize int           bnb's quantization block size (absmax granularity before expansion)
    dtype     torch.dtype   dtype of the weight bnb quantized (quant_state.dtype), informational

        W[n, 64c + j]      = code[qweight[c, n, j] >> 4] * absmax[c, n]     (j < 32)
        W[n, 64c + 32 + j] = code[qweight[c, n, j] & 15] * absmax[c, n]
    """

    qweight: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    shape: tuple[int, int]
    blocksize: int = 64
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        N, K = (int(s) for s in self.shape)
        self.shape = (N, K)
        assert K % CHUNK == 0, f"K={K} must be a multiple of {CHUNK}"
        C = K // CHUNK
        assert self.qweight.dtype == torch.uint8, f"qweight dtype {self.qweight.dtype} != uint8"
        assert tuple(self.qweight.shape) == (C, N, HALF), f"qweight {tuple(self.qweight.shape)} != {(C, N, HALF)}"
        assert self.absmax.dtype == torch.float32, f"absmax dtype {self.absmax.dtype} != float32"
        assert tuple(self.absmax.shape) == (C, N), f"absmax {tuple(self.absmax.shape)} != {(C, N)}"
        assert self.code.dtype == torch.float32 and tuple(self.code.shape) == (16,), "code must be [16] float32"
        assert self.qweight.is_contiguous() and self.absmax.is_contiguous() and self.code.is_contiguous()
        devs = {self.qweight.device, self.absmax.device, self.code.device}
        assert len(devs) == 1, f"NF4Weight tensors on different devices: {devs}"

    # -- properties ------------------------------------------------------------------------
    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def nbytes(self) -> int:
        """Bytes the kernels read per full pass over the weight (codes + scales + table)."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.absmax, self.code))

    def to(self, device: torch.device | str) -> NF4Weight:
        return NF4Weight(
            qweight=self.qweight.to(device),
            absmax=self.absmax.to(device),
            code=self.code.to(device),
            shape=self.shape,
            blocksize=self.blocksize,
            dtype=self.dtype,
        )

    # -- conversions -----------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """The 4-bit code of every weight: [N, K] uint8 in 0..15 (q[n, k] of the docstring)."""
        N, K = self.shape
        q = self.qweight
        idx = torch.stack((q >> 4, q & 15), dim=2)  # [C, N, 2, 32]
        return idx.permute(1, 0, 2, 3).reshape(N, K)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W [N, K] in `dtype` (default self.dtype): dtype(code[q] * absmax), product in float32.

        Pure PyTorch. dequantize() (dtype = the quantized weight's dtype) is bit-identical to
        bnb.functional.dequantize_4bit(packed, state); any dtype rounds the fp32 product once.
        """
        N, K = self.shape
        C = K // CHUNK
        vals = self.code[self.codes().long()].view(N, C, CHUNK)  # [N, C, 64] float32
        w = vals * self.absmax.t().unsqueeze(-1)  # [N, C, 64] float32
        return w.reshape(N, K).to(dtype or self.dtype)

    def bnb_packed(self) -> torch.Tensor:
        """bnb's packed storage [N*K/2, 1] uint8 (inverse of the load-time re-layout)."""
        q = self.codes().reshape(-1, 2)
        return ((q[:, 0] << 4) | q[:, 1]).to(torch.uint8).reshape(-1, 1)

    @staticmethod
    def from_bnb(param: Any, quant_state: Any = None) -> NF4Weight:
        return nf4_weight_from_bnb(param, quant_state)


def _dequantize_absmax(qs: Any) -> torch.Tensor:
    """bnb block scales as float32 [n_blocks] (flattened weight order).

    Plain:  qs.absmax
    Nested (compress_statistics=True):
            code2[absmax_u8[i]] * absmax2[i // bs2] + offset      (= bnb's
            dequantize_blockwise(qs.absmax, qs.state2) + qs.offset, same two fp32 roundings)
    """
    if not getattr(qs, "nested", False):
        return qs.absmax.float().reshape(-1)
    s2 = qs.state2
    a = qs.absmax.reshape(-1)
    assert a.dtype == torch.uint8, f"nested absmax must be uint8, got {a.dtype}"
    code2 = s2.code.to(device=a.device, dtype=torch.float32)
    absmax2 = s2.absmax.to(device=a.device, dtype=torch.float32).reshape(-1)
    blk = torch.arange(a.numel(), device=a.device) // int(s2.blocksize)
    vals = code2[a.long()] * absmax2[blk]
    offset = qs.offset
    if isinstance(offset, torch.Tensor):
        offset = offset.to(device=a.device, dtype=torch.float32)
    else:
        offset = torch.tensor(float(offset), dtype=torch.float32, device=a.device)
    return (vals + offset).float()


def nf4_weight_from_bnb(param: Any, quant_state: Any = None) -> NF4Weight:
    """Build an NF4Weight from bitsandbytes storage (done once at load).

    param:       a quantized bnb.nn.Params4bit, a bnb.nn.Linear4bit (its .weight is used), or the
                 raw packed tensor [N*K/2, 1] (any quant_storage dtype; its bytes are used)
    quant_state: bnb QuantState; defaults to param.quant_state

        q      = nibbles of packed (high first)            -> [N, K] codes
        absmax = dequantize_blockwise(qs.absmax, qs.state2) + qs.offset   if qs.nested
                 qs.absmax                                               otherwise
        return NF4Weight(relayout(q), absmax expanded to 64-chunks, qs.code, (N, K), bs)

    The result lives on the device of the packed tensor and does not alias it (the caller may
    free the bnb module afterwards). Raises ValueError for unsupported formats (not NF4, not
    quantized yet, K % 64 != 0, blocksize % 64 != 0, bnb's CPU-repacked layout).
    """
    if isinstance(param, torch.nn.Module):
        param = param.weight
    qs = quant_state if quant_state is not None else getattr(param, "quant_state", None)
    if qs is None:
        raise ValueError("no QuantState: the Params4bit is not quantized yet (move it to a device first)")
    if getattr(param, "bnb_quantized", True) is False:
        raise ValueError("Params4bit is not quantized yet (call .to(device) first)")
    if getattr(qs, "quant_type", "nf4") != "nf4":
        raise ValueError(f"only NF4 is supported, got quant_type={qs.quant_type!r}")
    if getattr(qs, "packing_format_for_cpu", False):
        raise ValueError("weight was repacked for bitsandbytes' CPU kernel; convert it before its first CPU forward")
    shape = tuple(int(s) for s in qs.shape)
    if len(shape) != 2:
        raise ValueError(f"expected a 2-D weight shape, got {shape}")
    N, K = shape
    bs = int(qs.blocksize)
    if K % CHUNK != 0:
        raise ValueError(f"in_features K={K} must be a multiple of {CHUNK}")
    if bs % CHUNK != 0:
        raise ValueError(f"blocksize {bs} must be a multiple of {CHUNK}")

    data = param.data if isinstance(param, torch.Tensor) else param
    packed = data.detach().contiguous().view(torch.uint8).reshape(-1)
    if packed.numel() != N * K // 2:
        raise ValueError(f"packed storage has {packed.numel()} bytes, expected N*K/2 = {N * K // 2}")
    dev = packed.device
    C = K // CHUNK

    # codes [N, K] -> chunk-major bytes [C, N, 32]
    q = torch.stack((packed >> 4, packed & 15), dim=1).reshape(N, C, 2, HALF)
    qweight = ((q[:, :, 0, :] << 4) | q[:, :, 1, :]).to(torch.uint8).permute(1, 0, 2).contiguous()

    # block scales [N*K/bs] -> per (chunk, row) [C, N]; a chunk never straddles two blocks
    blocks = _dequantize_absmax(qs).to(dev)
    n_blocks = -(-(N * K) // bs)
    if blocks.numel() != n_blocks:
        raise ValueError(f"absmax has {blocks.numel()} blocks, expected {n_blocks}")
    start = (torch.arange(N, device=dev)[:, None] * K + torch.arange(C, device=dev)[None, :] * CHUNK)
    absmax = blocks[start // bs].t().contiguous().float()  # [C, N]

    code = qs.code if getattr(qs, "code", None) is not None else torch.tensor(NF4_CODE)
    code = code.to(device=dev, dtype=torch.float32).reshape(-1).contiguous()
    if code.numel() != 16:
        raise ValueError(f"code table has {code.numel()} entries, expected 16")
    return NF4Weight(qweight=qweight, absmax=absmax, code=code, shape=(N, K), blocksize=bs, dtype=qs.dtype)


# ---------------------------------------------------------------------------------------------
# Argument checks / dispatch


def _check_args(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None) -> tuple[int, int]:
    assert isinstance(w, NF4Weight), f"w must be an NF4Weight, got {type(w)}"
    assert isinstance(x, torch.Tensor) and x.dim() >= 1, "x must be a tensor [..., K]"
    assert x.dtype in FLOAT_DTYPES, f"x dtype {x.dtype} not in {FLOAT_DTYPES}"
    N, K = w.shape
    assert x.shape[-1] == K, f"x [..., {x.shape[-1]}] does not match in_features K={K}"
    assert x.device == w.device, f"x on {x.device}, weight on {w.device}"
    if bias is not None:
        assert bias.shape == (N,), f"bias shape {tuple(bias.shape)} != ({N},)"
        assert bias.dtype in FLOAT_DTYPES, f"bias dtype {bias.dtype}"
        assert bias.device == x.device, f"bias on {bias.device}, x on {x.device}"
    return N, K


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=16)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _DEFAULT_SMS


# ---------------------------------------------------------------------------------------------
# Reference (pure PyTorch)


def reference_nf4_linear(
    x: torch.Tensor,  # [..., K] float32 | float16 | bfloat16
    w: NF4Weight,  # W [N, K]
    bias: torch.Tensor | None = None,  # [N] float
) -> torch.Tensor:  # [..., N] x.dtype
    """y = x @ W^T (+ bias), W dequantized in PyTorch (no bitsandbytes).

        W = dtype_x(code[q] * absmax)          # [N, K], bit-identical to bnb's dequantize_4bit
        y = x @ W.T ; if bias: y = y + bias
    """
    N, K = _check_args(x, w, bias)
    W = w.dequantize(x.dtype)
    y = x @ W.t()
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y


# ---------------------------------------------------------------------------------------------
# Triton kernels. Written as plain functions and jitted lazily (`_kernels()`), so whether they run
# compiled or in the interpreter follows TRITON_INTERPRET at first *use*, not at import.


def _nf4_gemv_kernel(
    x_ptr,  # [M, K] (strided)
    q_ptr,  # [C, N, 32] uint8
    absmax_ptr,  # [C, N] float32
    code_ptr,  # [16] float32
    bias_ptr,  # [N] or dummy
    out_ptr,  # [M, N] contiguous, x.dtype
    ws_ptr,  # [S, M, N] float32 split-K partials (dummy when SPLIT_K == 1)
    lock_ptr,  # [>= M * cdiv(N, BLOCK_N)] int32 zeroed tile counters (FIXUP only)
    M,
    N,
    C,
    stride_xm,
    stride_xk,
    chunks_per_split,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    FIXUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHUNKS: tl.constexpr,
):
    # out[m, n] = sum_c absmax[c, n] * sum_j (code[hi] * x[m, 64c+j] + code[lo] * x[m, 64c+32+j])
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, CHUNKS)
    offs_j = tl.arange(0, 32)
    n_mask = offs_n < N
    c_begin = pid_s * chunks_per_split
    c_end = tl.minimum(C, c_begin + chunks_per_split)
    x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
    q_tile = q_ptr + offs_n[None, :, None] * 32 + offs_j[None, None, :]  # [1, BLOCK_N, 32]
    a_tile = absmax_ptr + offs_n[None, :]  # [1, BLOCK_N]
    acc = tl.zeros([CHUNKS, BLOCK_N], dtype=tl.float32)
    # software prefetch (by hand: Triton's pipeliner would also stage the table gathers in shared
    # memory): the packed bytes and scales of iteration i+1 are loaded before computing i
    cc = c_begin + offs_c  # [CHUNKS]
    c_mask = cc < c_end
    b_nxt = tl.load(q_tile + cc[:, None, None] * (N * 32), mask=c_mask[:, None, None] & n_mask[None, :, None],
                    other=0)
    am_nxt = tl.load(a_tile + cc[:, None] * N, mask=c_mask[:, None] & n_mask[None, :], other=0.0)
    for c0 in range(c_begin, c_end, CHUNKS):
        cc = c0 + offs_c
        c_mask = cc < c_end
        b = b_nxt.to(tl.int32)  # [CHUNKS, BLOCK_N, 32]
        am = am_nxt  # [CHUNKS, BLOCK_N]
        cn = cc + CHUNKS
        cn_mask = cn < c_end
        b_nxt = tl.load(q_tile + cn[:, None, None] * (N * 32), mask=cn_mask[:, None, None] & n_mask[None, :, None],
                        other=0)
        am_nxt = tl.load(a_tile + cn[:, None] * N, mask=cn_mask[:, None] & n_mask[None, :], other=0.0)
        w_hi = tl.load(code_ptr + (b >> 4))
        w_lo = tl.load(code_ptr + (b & 15))
        k_hi = cc[:, None] * 64 + offs_j[None, :]  # [CHUNKS, 32]
        xa = tl.load(x_row + k_hi * stride_xk, mask=c_mask[:, None], other=0.0).to(tl.float32)
        xb = tl.load(x_row + (k_hi + 32) * stride_xk, mask=c_mask[:, None], other=0.0).to(tl.float32)
        s = tl.sum(w_hi * xa[:, None, :] + w_lo * xb[:, None, :], axis=2)  # [CHUNKS, BLOCK_N]
        acc += s * am
    y = tl.sum(acc, axis=0)  # [BLOCK_N]
    o_off = pid_m.to(tl.int64) * N + offs_n
    if SPLIT_K > 1:
        # partial -> workspace; with FIXUP the last split of this tile to finish sums all partials
        # (in split order: deterministic) and writes the output. Otherwise a reduce kernel does.
        tl.store(ws_ptr + pid_s.to(tl.int64) * M * N + o_off, y, mask=n_mask)
        if FIXUP:
            tile = pid_m * tl.num_programs(1) + pid_n
            tl.debug_barrier()  # every thread's partial store precedes the release below
            done = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel", scope="gpu")
            if done == SPLIT_K - 1:
                y = tl.zeros([BLOCK_N], dtype=tl.float32)
                for si in tl.static_range(SPLIT_K):
                    y += tl.load(ws_ptr + si * M * N + o_off, mask=n_mask, other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                tl.store(out_ptr + o_off, y.to(out_ptr.dtype.element_ty), mask=n_mask)
                tl.atomic_xchg(lock_ptr + tile, 0)  # re-arm for the next launch
    else:
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + o_off, y.to(out_ptr.dtype.element_ty), mask=n_mask)


def _nf4_mm_kernel(
    x_ptr,  # [M, K] (strided)
    q_ptr,  # [C, N, 32] uint8
    absmax_ptr,  # [C, N] float32
    code_ptr,  # [16] float32
    bias_ptr,  # [N] or dummy
    out_ptr,  # [M, N] contiguous, x.dtype
    ws_ptr,  # [S, M, N] float32 split-K partials (dummy when SPLIT_K == 1)
    lock_ptr,  # [>= cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N)] int32 zeroed tile counters (FIXUP only)
    M,
    N,
    C,
    stride_xm,
    stride_xk,
    chunks_per_split,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    FIXUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
    CHUNKS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    # out[m, n] = sum_c ( x[m, 64c:64c+32] @ dtype(code[hi] * absmax[c, n])
    #                   + x[m, 64c+32:64c+64] @ dtype(code[lo] * absmax[c, n]) )
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    group_id = pid // width
    first_m = group_id * GROUP_M
    group_size = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_size
    pid_n = (pid % width) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, 32)
    m_mask = offs_m < M
    n_mask = offs_n < N
    c_begin = pid_s * chunks_per_split
    c_end = tl.minimum(C, c_begin + chunks_per_split)

    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # [BLOCK_M, 1]
    offs_u = tl.arange(0, CHUNKS)
    q_tile = q_ptr + offs_u[:, None, None] * (N * 32) + offs_j[None, :, None] + offs_n[None, None, :] * 32
    a_tile = absmax_ptr + offs_u[:, None] * N + offs_n[None, :]  # [CHUNKS, BLOCK_N]
    kk = tl.arange(0, CHUNKS * 32)  # K index of the dot: (chunk u, j) -> input 64u + j (+ 32 for lo)
    x_tile = x_rows + ((kk // 32) * 64 + kk % 32)[None, :] * stride_xk  # [BLOCK_M, CHUNKS*32]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # Software pipelining by hand (run with num_stages=1): the packed bytes, scales and x halves of
    # the next CHUNKS chunks are loaded into registers while the current ones are computed.
    # (Triton's own pipeliner would also stage the 16-entry table gathers through shared memory
    # as fp32, which costs more.) Chunks >= c_end load as 0 (scale 0 => weight 0, x 0).
    u_ok = (c_begin + offs_u) < c_end
    k_ok = (c_begin + kk // 32) < c_end
    b_nxt = tl.load(q_tile + c_begin * (N * 32), mask=u_ok[:, None, None] & n_mask[None, None, :], other=0)
    am_nxt = tl.load(a_tile + c_begin * N, mask=u_ok[:, None] & n_mask[None, :], other=0.0)
    xa_nxt = tl.load(x_tile + (c_begin * 64) * stride_xk, mask=m_mask[:, None] & k_ok[None, :], other=0.0)
    xb_nxt = tl.load(x_tile + (c_begin * 64 + 32) * stride_xk, mask=m_mask[:, None] & k_ok[None, :], other=0.0)
    for c0 in range(c_begin, c_end, CHUNKS):
        b = b_nxt.to(tl.int32)  # [CHUNKS, 32, BLOCK_N]
        am = am_nxt  # [CHUNKS, BLOCK_N]
        xa = xa_nxt  # [BLOCK_M, CHUNKS*32]  x[:, 64c + j]
        xb = xb_nxt  # [BLOCK_M, CHUNKS*32]  x[:, 64c + 32 + j]
        cn = c0 + CHUNKS
        u_ok = (cn + offs_u) < c_end
        k_ok = (cn + kk // 32) < c_end
        b_nxt = tl.load(q_tile + cn * (N * 32), mask=u_ok[:, None, None] & n_mask[None, None, :], other=0)
        am_nxt = tl.load(a_tile + cn * N, mask=u_ok[:, None] & n_mask[None, :], other=0.0)
        xa_nxt = tl.load(x_tile + (cn * 64) * stride_xk, mask=m_mask[:, None] & k_ok[None, :], other=0.0)
        xb_nxt = tl.load(x_tile + (cn * 64 + 32) * stride_xk, mask=m_mask[:, None] & k_ok[None, :], other=0.0)
        w_hi = (tl.load(code_ptr + (b >> 4)) * am[:, None, :]).to(x_ptr.dtype.element_ty)
        w_lo = (tl.load(code_ptr + (b & 15)) * am[:, None, :]).to(x_ptr.dtype.element_ty)
        w_hi = tl.reshape(w_hi, (CHUNKS * 32, BLOCK_N))
        w_lo = tl.reshape(w_lo, (CHUNKS * 32, BLOCK_N))
        if UPCAST_DOT:  # interpreter only: its bf16 tl.dot is wrong; fp32 dot of the same values
            xa = xa.to(tl.float32)
            xb = xb.to(tl.float32)
            w_hi = w_hi.to(tl.float32)
            w_lo = w_lo.to(tl.float32)
        acc = tl.dot(xa, w_hi, acc, input_precision=DOT_PRECISION)
        acc = tl.dot(xb, w_lo, acc, input_precision=DOT_PRECISION)
    out_mask = m_mask[:, None] & n_mask[None, :]
    o_off = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    if SPLIT_K > 1:
        # partial -> workspace; with FIXUP the last split of this tile to finish sums all partials
        # (in split order: deterministic) and writes the output. Otherwise a reduce kernel does.
        tl.store(ws_ptr + pid_s.to(tl.int64) * M * N + o_off, acc, mask=out_mask)
        if FIXUP:
            tl.debug_barrier()  # every thread's partial store precedes the release below
            done = tl.atomic_add(lock_ptr + pid, 1, sem="acq_rel", scope="gpu")
            if done == SPLIT_K - 1:
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for si in tl.static_range(SPLIT_K):
                    acc += tl.load(ws_ptr + si * M * N + o_off, mask=out_mask, other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
                tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
                tl.atomic_xchg(lock_ptr + pid, 0)  # re-arm for the next launch
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def _splitk_reduce_kernel(
    part_ptr,  # [S, M*N] float32
    bias_ptr,  # [N] or dummy
    out_ptr,  # [M*N] (contiguous [M, N])
    MN,
    N,
    SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # out = dtype(sum_s part[s] + bias)
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _nf4_dequant_kernel(
    q_ptr,  # [C, N, 32] uint8
    absmax_ptr,  # [C, N] float32
    code_ptr,  # [16] float32
    w_ptr,  # [N, K] contiguous, output dtype
    N,
    K,
    BLOCK_N: tl.constexpr,
):
    # W[n, 64c + j] = dtype(code[hi] * absmax[c, n]); W[n, 64c + 32 + j] = dtype(code[lo] * absmax[c, n])
    pid_c = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, 32)
    n_mask = offs_n < N
    b = tl.load(q_ptr + pid_c * (N * 32) + offs_n[:, None] * 32 + offs_j[None, :], mask=n_mask[:, None], other=0)
    b = b.to(tl.int32)  # [BLOCK_N, 32]
    am = tl.load(absmax_ptr + pid_c * N + offs_n, mask=n_mask, other=0.0)[:, None]
    w_off = offs_n.to(tl.int64)[:, None] * K + pid_c * 64 + offs_j[None, :]
    tl.store(w_ptr + w_off, (tl.load(code_ptr + (b >> 4)) * am).to(w_ptr.dtype.element_ty), mask=n_mask[:, None])
    tl.store(w_ptr + w_off + 32, (tl.load(code_ptr + (b & 15)) * am).to(w_ptr.dtype.element_ty), mask=n_mask[:, None])


_JITTED: dict[bool, tuple] = {}


def _kernels(interp: bool | None = None):
    """(gemv, mm, reduce, dequant) jitted for the current TRITON_INTERPRET mode (cached per mode)."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not importable; use reference_nf4_linear")
    if interp is None:
        interp = _interpreting()
    ks = _JITTED.get(interp)
    if ks is None:
        ks = tuple(triton.jit(f) for f in (_nf4_gemv_kernel, _nf4_mm_kernel, _splitk_reduce_kernel,
                                           _nf4_dequant_kernel))
        _JITTED[interp] = ks
    return ks


# ---------------------------------------------------------------------------------------------
# Launch configuration


def pick_config(M: int, N: int, K: int, device: torch.device | None = None, **overrides: Any) -> dict:
    """Launch config for an [M, K] x [N, K]^T problem (defaults above; keyword overrides win).

    Returns dict(kernel="gemv"|"mm"|"dequant", block_n, chunks, split_k, num_warps, num_stages,
    plus block_m, group_m for mm). Kernel: gemv for M <= gemv_max_m, dequant (+ cuBLAS) for
    M >= DEQUANT_MIN_M, mm otherwise. Split-K (when not given) is chosen so that the grid has at
    least SPLITK_TARGET_PROGRAMS_PER_SM * SMs programs, keeping >= SPLITK_MIN_CHUNKS chunks each.
    """
    device = device if device is not None else torch.device("cpu")
    ov = {k: v for k, v in overrides.items() if v is not None}
    gemv_max_m = ov.pop("gemv_max_m", GEMV_MAX_M)
    kernel = ov.pop("kernel", None) or ("gemv" if M <= gemv_max_m else "dequant" if M >= DEQUANT_MIN_M else "mm")
    assert kernel in ("gemv", "mm", "dequant"), f"kernel must be 'gemv', 'mm' or 'dequant', got {kernel!r}"
    C = K // CHUNK
    if kernel == "dequant":
        cfg = dict(kernel="dequant", block_n=DEQUANT_BLOCK_N, num_warps=4, num_stages=1)
        cfg.update(ov)
        cfg["split_k"] = 1
        return cfg
    if kernel == "gemv":
        cfg = dict(kernel="gemv", block_n=GEMV_BLOCK_N, chunks=GEMV_CHUNKS, num_warps=GEMV_NUM_WARPS,
                   num_stages=GEMV_NUM_STAGES)
        cfg.update(ov)
        tiles = M * _cdiv(N, cfg["block_n"])
    else:
        for max_m, bm, bn, nc, nw, ns in MM_CONFIGS:
            if M <= max_m:
                break
        cfg = dict(kernel="mm", block_m=bm, block_n=bn, chunks=nc, group_m=MM_GROUP_M, num_warps=nw, num_stages=ns)
        cfg.update(ov)
        tiles = _cdiv(M, cfg["block_m"]) * _cdiv(N, cfg["block_n"])
    if "split_k" not in cfg:
        split = 1
        if M <= SPLITK_MAX_M:
            target = SPLITK_TARGET_PROGRAMS_PER_SM * _num_sms(device)
            if tiles < target:
                split = min(_cdiv(target, tiles), SPLITK_MAX, max(1, C // SPLITK_MIN_CHUNKS))
        cfg["split_k"] = max(1, split)
    return cfg


def _pow2(v: int, name: str, lo: int) -> None:
    assert v >= lo and (v & (v - 1)) == 0, f"{name}={v} must be a power of two >= {lo}"


# ---------------------------------------------------------------------------------------------
# Triton wrapper


_LOCKS: dict[tuple, torch.Tensor] = {}
LOCKS_SIZE = 1 << 16  # tile counters per (device, stream); grids with more tiles use "reduce"


def _tile_locks(device: torch.device) -> torch.Tensor:
    """Zeroed int32 tile counters for split-K fixup, one buffer per (device, current stream).

    The kernels leave them zeroed again (self-resetting), so they are allocated once. If the
    first use happens during CUDA-graph capture the zero-fill is captured too (harmless: one
    memset node per replay); `prepare_split_k()` on the capture stream avoids it. A captured
    graph keeps the counters of its capture stream: do not replay two graphs captured on the
    same stream concurrently on different streams.
    """
    if device.type == "cuda":
        key = (device.type, device.index, torch.cuda.current_stream(device).cuda_stream)
    else:
        key = (device.type, device.index, 0)
    locks = _LOCKS.get(key)
    if locks is None:
        locks = _LOCKS[key] = torch.zeros(LOCKS_SIZE, dtype=torch.int32, device=device)
    return locks


def prepare_split_k(device: torch.device | str | None = None) -> None:
    """Allocate the split-K tile counters of the current stream of `device` (do it before
    capturing a CUDA graph, on the stream that will capture, to keep split-K single-launch)."""
    dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    _tile_locks(dev)


def triton_nf4_dequantize(
    w: NF4Weight,  # W [N, K]
    dtype: torch.dtype = torch.bfloat16,  # float32 | float16 | bfloat16
    *,
    block_n: int | None = None,
    out: torch.Tensor | None = None,  # optional [N, K] dtype buffer to write into
) -> torch.Tensor:  # W [N, K] dtype
    """W = dtype(code[q] * absmax) materialized by a Triton kernel (same values as w.dequantize).

        for c in range(K // 64), n in range(N):   # grid (K/64, N/BLOCK_N)
            W[n, 64c + j]      = dtype(code[qweight[c, n, j] >> 4] * absmax[c, n])
            W[n, 64c + 32 + j] = dtype(code[qweight[c, n, j] & 15] * absmax[c, n])
    """
    assert isinstance(w, NF4Weight), f"w must be an NF4Weight, got {type(w)}"
    assert dtype in FLOAT_DTYPES, f"dtype {dtype} not in {FLOAT_DTYPES}"
    N, K = w.shape
    C = K // CHUNK
    if out is None:
        out = torch.empty((N, K), dtype=dtype, device=w.device)
    assert out.shape == (N, K) and out.dtype == dtype and out.is_contiguous() and out.device == w.device
    bn = int(block_n or DEQUANT_BLOCK_N)
    _pow2(bn, "block_n", 1)
    grid = (C, _cdiv(N, bn))
    assert grid[1] <= _MAX_GRID_YZ, f"grid too large: {grid}"
    assert N * K < 2**63
    deq_k = _kernels()[3]
    with _device_ctx(out):
        deq_k[grid](w.qweight, w.absmax, w.code, out, N, K, BLOCK_N=bn, num_warps=4, num_stages=1)
    return out


def triton_nf4_linear(
    x: torch.Tensor,  # [..., K] float32 | float16 | bfloat16
    w: NF4Weight,  # W [N, K], same device as x
    bias: torch.Tensor | None = None,  # [N] float
    *,
    kernel: str | None = None,  # "gemv" | "mm" | "dequant" | None (by M, see pick_config)
    gemv_max_m: int | None = None,
    block_m: int | None = None,  # mm only, power of two >= 16
    block_n: int | None = None,  # power of two (>= 16 for mm)
    chunks: int | None = None,  # 64-chunks per loop iteration, power of two
    group_m: int | None = None,  # mm only: L2 swizzle group
    split_k: int | None = None,  # K splits (1 = no split); None = heuristic
    split_k_mode: str | None = None,  # "fixup" (default, 1 launch) | "reduce" (2 launches)
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:  # [..., N] x.dtype
    """y = x @ W^T (+ bias) with NF4 dequantization fused into the Triton kernel.

        M = prod(x.shape[:-1]); x2 = x.reshape(M, K)
        if M <= gemv_max_m:            # GEMV kernel, grid (M, N/BLOCK_N, S), fp32 FMAs
            y[m, n] = sum_c absmax[c,n] * sum_{k in chunk c} code[q[n,k]] * x[m,k]
        elif M < DEQUANT_MIN_M:        # GEMM kernel, grid (M/BLOCK_M * N/BLOCK_N, S), tl.dot
            y[m, n] = sum_c x[m, chunk c] @ dtype(code[q[n, chunk c]] * absmax[c,n])
        else:                          # prefill: W = triton_nf4_dequantize(w, x.dtype); cuBLAS
            y = x2 @ W.T
        split_k = S > 1: split s covers a contiguous range of chunks and writes a float32
            partial [S, M, N]; "fixup": the last split of each output tile to finish (per-tile
            atomic counter) sums the S partials in order and writes y, one launch;
            "reduce": a second kernel sums them. Both are deterministic.
        y = dtype_x(y + bias)

    Keyword knobs override pick_config()'s defaults (see the module-level constants).
    Split-K fixup uses per-(device, stream) counters: split-K launches of one stream are
    serialized as usual, launches on different streams use different counters.
    """
    N, K = _check_args(x, w, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if M == 0:
        return x.new_empty((*lead, N))
    interp = _interpreting()
    plan = _plan(M, N, K, x.dtype, x.device, interp, kernel, gemv_max_m, block_m, block_n, chunks, group_m,
                 split_k, split_k_mode, num_warps, num_stages)
    if plan.kernel == "dequant":
        W = triton_nf4_dequantize(w, x.dtype, block_n=plan.constexprs["BLOCK_N"])
        y = torch.nn.functional.linear(x2, W, None if bias is None else bias.to(x.dtype))
        return y.reshape(*lead, N)
    assert w.qweight.is_contiguous() and w.absmax.is_contiguous()
    S = plan.split_k
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    has_bias = bias is not None
    bias_arg = bias.contiguous() if has_bias else w.absmax  # dummy pointer when no bias
    ws = out  # dummy when S == 1
    locks = w.absmax  # dummy unless fixup
    fixup = False
    if S > 1:
        ws = torch.empty((S, M, N), dtype=torch.float32, device=x.device)
        if plan.fixup:
            locks, fixup = _tile_locks(x.device), True
    gemv_k, mm_k, red_k, _ = _kernels(interp)
    launch = gemv_k if plan.kernel == "gemv" else mm_k
    with _device_ctx(x):
        launch[plan.grid](x2, w.qweight, w.absmax, w.code, bias_arg, out, ws, locks, M, N, K // CHUNK,
                          x2.stride(0), x2.stride(1), plan.chunks_per_split, HAS_BIAS=has_bias, FIXUP=fixup,
                          **plan.constexprs)
        if S > 1 and not fixup:
            red_k[(_cdiv(M * N, REDUCE_BLOCK),)](ws, bias_arg, out, M * N, N, SPLIT_K=S, HAS_BIAS=has_bias,
                                                 BLOCK=REDUCE_BLOCK, num_warps=4)
    return out.reshape(*lead, N)


@dataclass(frozen=True)
class _Plan:
    kernel: str  # "gemv" | "mm" | "dequant"
    grid: tuple
    split_k: int
    chunks_per_split: int
    fixup: bool  # split-K reduced in-kernel (when split_k > 1)
    constexprs: dict  # kernel meta-parameters, num_warps, num_stages


@functools.lru_cache(maxsize=4096)
def _plan(M, N, K, dtype, device, interpreting, kernel, gemv_max_m, block_m, block_n, chunks, group_m, split_k,
          split_k_mode, num_warps, num_stages) -> _Plan:
    """Launch plan of triton_nf4_linear (cached: the wrapper's per-call cost is part of decode)."""
    C = K // CHUNK
    cfg = pick_config(M, N, K, device, kernel=kernel, gemv_max_m=gemv_max_m, block_m=block_m,
                      block_n=block_n, chunks=chunks, group_m=group_m, split_k=split_k,
                      num_warps=num_warps, num_stages=num_stages)
    bn = int(cfg["block_n"])
    if cfg["kernel"] == "dequant":
        _pow2(bn, "block_n", 1)
        return _Plan("dequant", (), 1, C, False, dict(BLOCK_N=bn))
    S = int(cfg["split_k"])
    assert S >= 1, f"split_k={S}"
    S = min(S, C)
    cps = _cdiv(C, S)
    S = _cdiv(C, cps)  # drop empty splits
    mode = split_k_mode or SPLITK_MODE
    assert mode in ("fixup", "reduce"), f"split_k_mode must be 'fixup' or 'reduce', got {mode!r}"
    nc = int(cfg["chunks"])
    _pow2(nc, "chunks", 1)
    assert C * N * HALF < 2**31, "weight too large for int32 offsets"
    assert M * N * S < 2**31, f"M*N*split_k = {M * N * S} too large"
    meta = dict(SPLIT_K=S, BLOCK_N=bn, CHUNKS=nc, num_warps=int(cfg["num_warps"]), num_stages=int(cfg["num_stages"]))
    if cfg["kernel"] == "gemv":
        _pow2(bn, "block_n", 1)
        grid = (M, _cdiv(N, bn), S)
        assert grid[1] <= _MAX_GRID_YZ and S <= _MAX_GRID_YZ, f"grid too large: {grid}"
        tiles = M * grid[1]
    else:
        bm = int(cfg["block_m"])
        _pow2(bm, "block_m", 16)
        _pow2(bn, "block_n", 16)
        gm = int(cfg["group_m"])
        assert gm >= 1, f"group_m={gm}"
        tiles = _cdiv(M, bm) * _cdiv(N, bn)
        grid = (tiles, S)
        assert S <= _MAX_GRID_YZ
        upcast = interpreting and dtype == torch.bfloat16  # the interpreter's bf16 tl.dot is wrong
        meta.update(BLOCK_M=bm, GROUP_M=gm, UPCAST_DOT=upcast,
                    DOT_PRECISION="ieee" if (dtype == torch.float32 or upcast) else "tf32")
    return _Plan(cfg["kernel"], grid, S, cps, S > 1 and mode == "fixup" and tiles <= LOCKS_SIZE, meta)


# ---------------------------------------------------------------------------------------------
# Dispatcher


def nf4_linear(
    x: torch.Tensor,  # [..., K] float32 | float16 | bfloat16
    w: NF4Weight,  # W [N, K], same device as x
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [..., N] x.dtype
    """y = x @ W^T (+ bias): triton_nf4_linear when use_triton(x) (CUDA, or QUIVER_FORCE_TRITON=1),
    reference_nf4_linear otherwise."""
    if use_triton(x):
        return triton_nf4_linear(x, w, bias)
    return reference_nf4_linear(x, w, bias)
