"""Paged decode attention (vLLM PagedAttention / FlashDecoding style): one query token per
sequence, keys and values read straight from Quiver's paged KV cache.

Contract
--------
KV cache (one layer, see quiver.server.model.KVCache):

    k_cache, v_cache [num_blocks * block_size, KVH, D]   flat slots, same dtype as q
    block_tables     [B, max_blocks] int32               physical block ids of each row
    context_lens     [B] int32                           keys of row b (incl. the new token)

Key j of row b (0 <= j < context_lens[b]) lives at slot

    slot(b, j) = block_tables[b, j // block_size] * block_size + j % block_size

Optionally each row also attends to up to P extra "prefix" keys given by flat slot ids
(prefix tuning's virtual tokens when they are not block-aligned, so cannot be folded into
block_tables):

    prefix_slots     [B, P] int32 (or int64)             flat cache slots, -1 = none

Operation (``H`` query heads, a multiple of KVH; query head h reads kv head h // (H // KVH)):

    paged_decode_attention(q [B, H, D], k_cache, v_cache, block_tables, context_lens,
                           block_size, scale, prefix_slots=None) -> out [B, H, D] (q.dtype)

        for b, h:
            slots = [prefix_slots[b, i] for i if prefix_slots[b, i] >= 0]      (if given)
                  + [slot(b, j) for j in range(context_lens[b])]
            if not slots: out[b, h] = 0                  # padding row of a CUDA-graph bucket
            else:
                K = k_cache[slots, kvh(h)]; V = v_cache[slots, kvh(h)]        # [L, D]
                out[b, h] = softmax(scale * q[b, h] . K^T) @ V

Rows with no key at all (context_lens[b] == 0 and no valid prefix slot) produce exact zeros
and read nothing from the cache or from block_tables. Block-table entries at or past
cdiv(context_lens[b], block_size) are never read (they may hold garbage).

Numerics: q.K^T, the softmax (online, base 2, max-subtracted) and P.V accumulate in float32;
fp16/bf16 probabilities are rounded to the cache dtype once before the P.V tensor-core dot
(as FlashAttention does); float32 inputs use IEEE fp32 dots (no TF32). Split-K partials and
their log-sum-exp are float32; the output is rounded to q.dtype once.
Supported: dtypes float32/float16/bfloat16 (q, k_cache, v_cache all the same); any head dim D
(64 and 128 are the real ones; the Triton path pads D to max(16, next_pow2(D)) with masks,
free when D is a power of two >= 16); any block_size >= 1 (8/16/32 in practice).

Triton design (``triton_paged_decode_attention``): FlashDecoding split-K.
  * Kernel 1, grid (B, KVH, NUM_SPLITS [+1 when prefix_slots is given]). Program (b, g, s)
    handles all GROUP = H // KVH query heads of kv head g (K/V tiles are loaded once per
    group), over the context range [s * TPS, (s+1) * TPS) ∩ [0, context_lens[b]) in
    BLOCK_N-token tiles gathered through block_tables (BLOCK_N is independent of block_size).
    GQA groups are padded to >= 16 rows and use tl.dot; MHA (GROUP == 1) uses a broadcast
    multiply + tl.sum. The extra last split (index NUM_SPLITS) handles prefix_slots.
    Programs whose split starts past the row's end do no loads and write nothing.
    It writes normalised partial outputs [B, H, S, D] and their log2-sum-exp [B, H, S], or,
    when there is a single split and no prefix, the final output directly (no 2nd kernel).
  * Kernel 2, grid (B, H): combines the splits that kernel 1 wrote (it recomputes which from
    context_lens) by log-sum-exp weights.
  NUM_SPLITS and TPS (tokens per split) depend only on B, KVH and max_blocks * block_size
  (the static shape of block_tables), never on the values of context_lens: the launch is
  CUDA-graph capturable (no host sync, no .item(), no data-dependent Python control flow).
  A graph captured with some block_tables/context_lens/q storage replays correctly for any
  new contents of those tensors.

Implementations: ``reference_paged_decode_attention`` (pure PyTorch; the spec and the CPU
path) and ``triton_paged_decode_attention`` share the positional signature; the Triton one
additionally takes keyword-only tuning knobs. ``paged_decode_attention`` uses Triton when
every tensor is on CUDA or env ``QUIVER_FORCE_TRITON=1`` (see quiver.kernels.lora.use_triton),
else the reference. Triton is optional: without it this module imports and the reference runs.

Not checked on device (it would need a host sync): 0 <= context_lens[b] <= max_blocks *
block_size, block ids in [0, num_blocks), prefix slots in [-1, num_blocks * block_size).
Violations are undefined behaviour on the Triton path; the reference asserts them.
"""

from __future__ import annotations

import torch

from .lora import FLOAT_DTYPES, HAS_TRITON, _cdiv, _check_same_device, _device_ctx, _next_pow2, _require_triton, \
    use_triton
from .pdl import pdl_kwargs, pdl_start

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = [
    "decode_split_plan",
    "reference_paged_decode_attention",
    "triton_paged_decode_attention",
    "paged_decode_attention",
]

# ---------------------------------------------------------------------------------------------
# Default tuning knobs (bf16 / D 128 / block_size 16). The MHA ones are from the sweep of
# kernels/bench_attention.py on an H200 (docs/results/h200/gpu_attention_sweep.json, Llama-2-7B
# shape, 150-key contexts): BLOCK_N 16 with 2 warps was best or within 3% at batch 32 and 128
# (1.7x / 2.0x faster than the earlier BLOCK_N 64 / 4 warps), and two splits at batch 1. The
# GQA (tl.dot) ones are first guesses, not timed yet. Register use was checked by compiling for
# sm_90 without a device (cuobjdump):
# bf16 D 128, GQA tl.dot path: BLOCK_N 32 / 4 warps -> 180 regs, no spill (BLOCK_N 64 / 4 warps
# spills); MHA tl.sum path: BLOCK_N 64 / 4 warps -> 184 regs, no spill; fp32 tl.dot needs 8
# warps not to spill. num_stages does not change the bf16 kernels (the gathered loads are not
# software-pipelined); latency is hidden by running several programs per SM.
#
# Kernel 1 streams BLOCK_N keys per iteration (gathered from BLOCK_N / block_size cache blocks).
DECODE_BLOCK_N_DOT = 32  # GQA/MQA: the query-head group is one tl.dot tile
DECODE_BLOCK_N_SUM = 16  # MHA: broadcast multiply + tl.sum
# Split-K: aim for ~TARGET programs (B * KVH * splits), ~4 per SM on a 132-SM H100, with at
# least MIN_TOKENS_PER_SPLIT keys of the *maximum* context per split and at most MAX_SPLITS.
DECODE_TARGET_PROGRAMS = 528
DECODE_MIN_TOKENS_PER_SPLIT = 64
DECODE_MAX_SPLITS = 64
DECODE_NUM_WARPS = 4
DECODE_NUM_WARPS_SUM = 2  # MHA
DECODE_NUM_WARPS_FP32_DOT = 8
DECODE_NUM_STAGES = 2
# Software pipeline of kernel 1's key loop (PIPELINE): the next tile's K/V loads (and the block
# ids of the one after) are issued before this tile's arithmetic, so an iteration does not wait
# on a block-table load and then on the K/V loads it addresses.
DECODE_PIPELINE_SUM = False
DECODE_PIPELINE_DOT = False
# Kernel 2 reads the partials of REDUCE_CHUNK splits per iteration.
REDUCE_CHUNK = 16
REDUCE_NUM_WARPS = 4

_LOG2E = 1.4426950408889634
_MAX_GRID_YZ = 65535  # CUDA limit of grid dims 1 and 2
_INDEX_DTYPES = (torch.int32, torch.int64)


# ---------------------------------------------------------------------------------------------
# Argument checks (shapes/dtypes only: no host syncs, so they are capture-safe)


def _check_args(q, k_cache, v_cache, block_tables, context_lens, block_size, scale, prefix_slots):
    """Returns (B, H, D, KVH, max_blocks, P)."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        assert isinstance(t, torch.Tensor), f"{name} must be a tensor"
        assert t.dim() == 3, f"{name} must be 3-D, got shape {tuple(t.shape)}"
        assert t.dtype in FLOAT_DTYPES, f"{name} dtype {t.dtype} not in {FLOAT_DTYPES}"
        assert t.stride(-1) == 1, f"{name} must be contiguous in its last dim"
    B, H, D = q.shape
    n_slots, KVH, D_k = k_cache.shape
    assert k_cache.shape == v_cache.shape, f"k_cache {tuple(k_cache.shape)} != v_cache {tuple(v_cache.shape)}"
    assert k_cache.dtype == q.dtype and v_cache.dtype == q.dtype, (
        f"q/k_cache/v_cache dtypes differ: {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    assert D_k == D, f"head_dim of cache {D_k} != q head_dim {D}"
    assert KVH >= 1 and H % KVH == 0, f"H={H} must be a multiple of n_kv_heads={KVH}"
    assert isinstance(block_size, int) and block_size >= 1, f"block_size must be a positive int, got {block_size}"
    assert n_slots % block_size == 0, f"cache slots {n_slots} not a multiple of block_size {block_size}"
    assert isinstance(scale, (int, float)), f"scale must be a Python number (not a tensor), got {type(scale)}"
    assert isinstance(block_tables, torch.Tensor) and block_tables.dim() == 2, "block_tables must be [B, max_blocks]"
    assert block_tables.dtype == torch.int32, f"block_tables must be int32, got {block_tables.dtype}"
    assert block_tables.shape[0] == B, f"block_tables has {block_tables.shape[0]} rows, q has B={B}"
    assert block_tables.stride(1) == 1 or block_tables.shape[1] <= 1, "block_tables rows must be contiguous"
    assert isinstance(context_lens, torch.Tensor) and context_lens.dim() == 1, "context_lens must be [B]"
    assert context_lens.dtype == torch.int32, f"context_lens must be int32, got {context_lens.dtype}"
    assert context_lens.shape[0] == B and context_lens.is_contiguous(), f"context_lens must be contiguous [B={B}]"
    P = 0
    tensors = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, context_lens=context_lens)
    if prefix_slots is not None:
        assert isinstance(prefix_slots, torch.Tensor) and prefix_slots.dim() == 2, "prefix_slots must be [B, P]"
        assert prefix_slots.dtype in _INDEX_DTYPES, f"prefix_slots must be int32/int64, got {prefix_slots.dtype}"
        assert prefix_slots.shape[0] == B, f"prefix_slots has {prefix_slots.shape[0]} rows, q has B={B}"
        assert prefix_slots.stride(1) == 1 or prefix_slots.shape[1] <= 1, "prefix_slots rows must be contiguous"
        P = prefix_slots.shape[1]
        tensors["prefix_slots"] = prefix_slots
    _check_same_device(**tensors)
    return B, H, D, KVH, block_tables.shape[1], P


def _check_reference_values(k_cache, block_tables, context_lens, block_size, prefix_slots) -> None:
    """Host-side value checks, done by the reference only (it syncs anyway)."""
    n_slots = k_cache.shape[0]
    num_blocks = n_slots // block_size
    max_blocks = block_tables.shape[1]
    if context_lens.numel():
        lo, hi = int(context_lens.min()), int(context_lens.max())
        assert lo >= 0 and hi <= max_blocks * block_size, (
            f"context_lens must be in [0, {max_blocks * block_size}], got [{lo}, {hi}]")
        for b, n in enumerate(context_lens.tolist()):
            used = block_tables[b, : _cdiv(n, block_size)]
            if used.numel():
                assert int(used.min()) >= 0 and int(used.max()) < num_blocks, (
                    f"row {b}: block ids must be in [0, {num_blocks}), got {used.tolist()}")
    if prefix_slots is not None and prefix_slots.numel():
        assert int(prefix_slots.min()) >= -1 and int(prefix_slots.max()) < n_slots, (
            f"prefix_slots must be in [-1, {n_slots})")


def decode_split_plan(
    B: int, n_kv_heads: int, max_blocks: int, block_size: int, *, block_n: int = DECODE_BLOCK_N_DOT,
    num_splits: int | None = None,
) -> tuple[int, int]:
    """(num_splits, tokens_per_split) of the Triton kernel: a pure function of static shapes.

    tokens_per_split is a multiple of block_n and num_splits * tokens_per_split >=
    max_blocks * block_size (so every possible context is covered). ``num_splits`` is an
    upper bound request (None: the heuristic, ~DECODE_TARGET_PROGRAMS programs).
    """
    max_ctx = max(1, max_blocks * block_size)
    n_tiles = _cdiv(max_ctx, block_n)
    if num_splits is None:
        want = _cdiv(DECODE_TARGET_PROGRAMS, max(1, B * n_kv_heads))
        cap = min(DECODE_MAX_SPLITS, n_tiles, max(1, max_ctx // DECODE_MIN_TOKENS_PER_SPLIT))
        num_splits = max(1, min(want, cap))
    assert num_splits >= 1, f"num_splits must be >= 1, got {num_splits}"
    tiles_per_split = _cdiv(n_tiles, min(num_splits, n_tiles))
    num_splits = _cdiv(n_tiles, tiles_per_split)
    return num_splits, tiles_per_split * block_n


# ---------------------------------------------------------------------------------------------
# Reference (pure PyTorch; the specification and the CPU path)


def reference_paged_decode_attention(
    q: torch.Tensor,  # [B, H, D]                       float32 | float16 | bfloat16
    k_cache: torch.Tensor,  # [num_blocks * block_size, KVH, D] same dtype as q
    v_cache: torch.Tensor,  # [num_blocks * block_size, KVH, D] same dtype as q
    block_tables: torch.Tensor,  # [B, max_blocks]       int32
    context_lens: torch.Tensor,  # [B]                   int32, 0 = padding row
    block_size: int,
    scale: float,
    prefix_slots: torch.Tensor | None = None,  # [B, P]  int32/int64 flat slots, -1 = none
) -> torch.Tensor:  # out [B, H, D] q.dtype
    """Paged decode attention (reference): one gathered softmax per row, in float32.

        for b in range(B):
            slots = valid prefix_slots[b] ++ [slot(b, j) for j < context_lens[b]]
            if no slots: out[b] = 0; continue
            K, V = k_cache[slots], v_cache[slots]                     # [L, KVH, D]
            K, V = repeat each kv head H // KVH times                 # [L, H, D]
            out[b] = softmax(scale * q[b] K^T, over L) V              # per head
    """
    B, H, D, KVH, max_blocks, P = _check_args(q, k_cache, v_cache, block_tables, context_lens, block_size, scale,
                                              prefix_slots)
    _check_reference_values(k_cache, block_tables, context_lens, block_size, prefix_slots)
    group = H // KVH
    out = torch.zeros(B, H, D, dtype=q.dtype, device=q.device)
    for b, n in enumerate(context_lens.tolist()):
        pos = torch.arange(n, device=q.device)
        slots = block_tables[b, pos // block_size].long() * block_size + pos % block_size
        if prefix_slots is not None:
            pre = prefix_slots[b].long()
            slots = torch.cat([pre[pre >= 0], slots])
        if slots.numel() == 0:
            continue  # padding row: zeros
        k = k_cache[slots].float().repeat_interleave(group, dim=1)  # [L, H, D]
        v = v_cache[slots].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[b].float(), k) * scale  # [H, L]
        probs = torch.softmax(scores, dim=-1)
        out[b] = torch.einsum("hl,lhd->hd", probs, v).to(q.dtype)
    return out


# ---------------------------------------------------------------------------------------------
# Triton kernels

if HAS_TRITON:

    @triton.jit
    def _load_kv(k_base, v_base, slots, valid, stride_ks, stride_vs, HEAD_DIM: tl.constexpr,
                 BLOCK_D: tl.constexpr):
        """K and V tiles [BLOCK_N, BLOCK_D] of the given flat slots (zeros where ~valid)."""
        d = tl.arange(0, BLOCK_D)
        if BLOCK_D == HEAD_DIM:
            kv_mask = valid[:, None]
        else:
            kv_mask = valid[:, None] & (d < HEAD_DIM)[None, :]
        k = tl.load(k_base + slots[:, None] * stride_ks + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + slots[:, None] * stride_vs + d[None, :], mask=kv_mask, other=0.0)
        return k, v

    @triton.jit
    def _tile_slots(bt_row, t, hi, BLOCK_SIZE: tl.constexpr):
        """(flat cache slots, valid) of the context positions t (a tile; valid: t < hi)."""
        valid = t < hi
        blk = tl.load(bt_row + t // BLOCK_SIZE, mask=valid, other=0)
        return blk.to(tl.int64) * BLOCK_SIZE + (t % BLOCK_SIZE), valid

    @triton.jit
    def _attend_tile(
        q,  # [BLOCK_G, D] cache dtype (rows >= GROUP are 0)
        k_base,  # k_cache + kv_head * stride_kh
        v_base,
        slots,  # [BLOCK_N] int64 flat cache slots (anything where ~valid)
        valid,  # [BLOCK_N] bool
        stride_ks,
        stride_vs,
        qk_scale,  # scale * log2(e)
        m_i,  # [BLOCK_G] running max (log2 units), -inf initially
        l_i,  # [BLOCK_G] running sum of exp2
        acc,  # [BLOCK_G, D] float32 running sum of p * v
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,  # next_pow2(HEAD_DIM)
        USE_DOT: tl.constexpr,
        FP32_IEEE: tl.constexpr,
    ):
        """One online-softmax step over a BLOCK_N-key tile (loads, then _attend_kv)."""
        k, v = _load_kv(k_base, v_base, slots, valid, stride_ks, stride_vs, HEAD_DIM, BLOCK_D)
        return _attend_kv(q, k, v, valid, qk_scale, m_i, l_i, acc, USE_DOT, FP32_IEEE)

    @triton.jit
    def _attend_kv(q, k, v, valid, qk_scale, m_i, l_i, acc, USE_DOT: tl.constexpr, FP32_IEEE: tl.constexpr):
        """The online-softmax step over loaded K/V tiles. NaN-free even when every key of the
        tile (and of all previous tiles) is masked: the state then stays (-inf, 0, 0)."""
        if USE_DOT:
            if FP32_IEEE:
                qk = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                qk = tl.dot(q, tl.trans(k))  # [G, N] float32
        else:
            qk = tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)  # [G, N]
        qk = tl.where(valid[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_use)  # 0 while m_i == -inf
        p = tl.math.exp2(qk - m_use[:, None])  # 0 where masked
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if USE_DOT:
            if FP32_IEEE:
                pv = tl.dot(p, v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)  # [G, D] float32
        else:
            pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)  # [G, D]
        acc = acc * alpha[:, None] + pv
        return m_new, l_i, acc

    @triton.jit
    def _paged_decode_split_kernel(
        q_ptr,  # [B, H, D]
        k_ptr,  # [slots, KVH, D]
        v_ptr,  # [slots, KVH, D]
        bt_ptr,  # [B, max_blocks] int32
        ctx_ptr,  # [B] int32
        pre_ptr,  # [B, P] int32/int64 (dummy when not HAS_PREFIX)
        o_ptr,  # SINGLE: out [B, H, D] (q dtype); else partials [B, H, S_TOT, D] float32
        lse_ptr,  # [B, H, S_TOT] float32 log2-sum-exp (dummy when SINGLE)
        qk_scale,
        TOKENS_PER_SPLIT,  # multiple of BLOCK_N
        NUM_SPLITS,  # paged splits; split NUM_SPLITS is the prefix one (runtime: fewer compiles)
        P,
        stride_qb,
        stride_qh,
        stride_ks,
        stride_kh,
        stride_vs,
        stride_vh,
        stride_btb,
        stride_pb,
        stride_ob,
        stride_oh,
        stride_os,
        stride_lb,
        stride_lh,
        GROUP: tl.constexpr,  # H // KVH
        BLOCK_G: tl.constexpr,  # GROUP padded (>= 16 when USE_DOT)
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,  # next_pow2(HEAD_DIM)
        BLOCK_SIZE: tl.constexpr,  # KV cache block size
        BLOCK_N: tl.constexpr,  # keys per iteration
        HAS_PREFIX: tl.constexpr,
        SINGLE: tl.constexpr,  # NUM_SPLITS == 1 and not HAS_PREFIX: write out directly
        USE_DOT: tl.constexpr,
        FP32_IEEE: tl.constexpr,
        PDL: tl.constexpr = False,
        PIPELINE: tl.constexpr = False,  # the next tile's loads issued before this tile's arithmetic
    ):
        pdl_start(PDL)
        b = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1)
        s = tl.program_id(2)
        ctx = tl.load(ctx_ptr + b)
        lo = s * TOKENS_PER_SPLIT
        hi = tl.minimum(lo + TOKENS_PER_SPLIT, ctx)  # hi <= lo: nothing in this split
        if HAS_PREFIX:
            has_work = (lo < ctx) | (s == NUM_SPLITS)
        else:
            has_work = lo < ctx
        if SINGLE:
            has_work = s == 0  # writes zeros for padding rows
        # (scalar flags are folded into the comparisons: scalar & vector masks trip the interpreter)
        g = tl.arange(0, BLOCK_G)
        g_live = g < tl.where(has_work, GROUP, 0)
        d = tl.arange(0, BLOCK_D)
        if BLOCK_D == HEAD_DIM:
            gd_mask = g_live[:, None]
        else:
            gd_mask = g_live[:, None] & (d < HEAD_DIM)[None, :]
        heads = kvh * GROUP + g
        q = tl.load(q_ptr + b * stride_qb + heads[:, None].to(tl.int64) * stride_qh + d[None, :],
                    mask=gd_mask, other=0.0)  # [BLOCK_G, BLOCK_D]
        k_base = k_ptr + kvh.to(tl.int64) * stride_kh
        v_base = v_ptr + kvh.to(tl.int64) * stride_vh
        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        n_offs = tl.arange(0, BLOCK_N)
        bt_row = bt_ptr + b * stride_btb
        if PIPELINE:
            # software pipeline: tile i's K/V are loaded during tile i-1's arithmetic, and the
            # block ids of tile i+1 then too, so no iteration waits on two dependent loads
            slots, valid = _tile_slots(bt_row, lo + n_offs, hi, BLOCK_SIZE)
            k, v = _load_kv(k_base, v_base, slots, valid, stride_ks, stride_vs, HEAD_DIM, BLOCK_D)
            slots_n, valid_n = _tile_slots(bt_row, lo + BLOCK_N + n_offs, hi, BLOCK_SIZE)
            for start in range(lo, hi, BLOCK_N):
                k_n, v_n = _load_kv(k_base, v_base, slots_n, valid_n, stride_ks, stride_vs, HEAD_DIM, BLOCK_D)
                slots_nn, valid_nn = _tile_slots(bt_row, start + 2 * BLOCK_N + n_offs, hi, BLOCK_SIZE)
                m_i, l_i, acc = _attend_kv(q, k, v, valid, qk_scale, m_i, l_i, acc, USE_DOT, FP32_IEEE)
                k, v, valid = k_n, v_n, valid_n
                slots_n, valid_n = slots_nn, valid_nn
        else:
            for start in range(lo, hi, BLOCK_N):
                slots, valid = _tile_slots(bt_row, start + n_offs, hi, BLOCK_SIZE)
                m_i, l_i, acc = _attend_tile(q, k_base, v_base, slots, valid, stride_ks, stride_vs, qk_scale,
                                             m_i, l_i, acc, HEAD_DIM, BLOCK_D, USE_DOT, FP32_IEEE)
        if HAS_PREFIX:
            p_hi = tl.where(s == NUM_SPLITS, P, 0)
            pre_row = pre_ptr + b * stride_pb
            for start in range(0, p_hi, BLOCK_N):
                i = start + n_offs
                slot = tl.load(pre_row + i, mask=i < p_hi, other=-1).to(tl.int64)
                valid = slot >= 0
                m_i, l_i, acc = _attend_tile(q, k_base, v_base, tl.maximum(slot, 0), valid, stride_ks, stride_vs,
                                             qk_scale, m_i, l_i, acc, HEAD_DIM, BLOCK_D, USE_DOT, FP32_IEEE)
        has_keys = l_i > 0
        out = acc / tl.where(has_keys, l_i, 1.0)[:, None]  # exact 0 when no keys
        o_tile = heads[:, None].to(tl.int64) * stride_oh + d[None, :]
        if SINGLE:
            tl.store(o_ptr + b * stride_ob + o_tile, out.to(o_ptr.dtype.element_ty), mask=gd_mask)
        else:
            tl.store(o_ptr + b * stride_ob + s * stride_os + o_tile, out, mask=gd_mask)
            lse = tl.where(has_keys, m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
            tl.store(lse_ptr + b * stride_lb + heads.to(tl.int64) * stride_lh + s, lse, mask=g_live)

    @triton.jit
    def _paged_decode_reduce_kernel(
        part_ptr,  # [B, H, S_TOT, D] float32
        lse_ptr,  # [B, H, S_TOT] float32
        ctx_ptr,  # [B] int32
        out_ptr,  # [B, H, D]
        TOKENS_PER_SPLIT,
        NUM_SPLITS,  # paged splits
        stride_pb,
        stride_ph,
        stride_ps,
        stride_lb,
        stride_lh,
        stride_ob,
        stride_oh,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        HAS_PREFIX: tl.constexpr,  # split NUM_SPLITS holds the prefix partial
        S_POW2: tl.constexpr,  # next_pow2(NUM_SPLITS + HAS_PREFIX)
        CHUNK: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        pdl_start(PDL)
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        ctx = tl.load(ctx_ptr + b)
        n_valid = tl.minimum((ctx + TOKENS_PER_SPLIT - 1) // TOKENS_PER_SPLIT, NUM_SPLITS)  # splits written
        lse_row = lse_ptr + b * stride_lb + h * stride_lh
        sp = tl.arange(0, S_POW2)
        if HAS_PREFIX:
            ok = (sp < n_valid) | (sp == NUM_SPLITS)
        else:
            ok = sp < n_valid
        lse = tl.load(lse_row + sp, mask=ok, other=float("-inf"))
        m = tl.max(lse, axis=0)
        m_use = tl.where(m == float("-inf"), 0.0, m)
        denom = tl.sum(tl.math.exp2(lse - m_use), axis=0)
        d = tl.arange(0, BLOCK_D)
        d_mask = d < HEAD_DIM
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        part_row = part_ptr + b * stride_pb + h * stride_ph
        c_offs = tl.arange(0, CHUNK)
        for c in range(0, S_POW2, CHUNK):
            sc = c + c_offs
            if HAS_PREFIX:
                okc = (sc < n_valid) | (sc == NUM_SPLITS)
            else:
                okc = sc < n_valid
            w = tl.math.exp2(tl.load(lse_row + sc, mask=okc, other=float("-inf")) - m_use)  # [CHUNK]
            part = tl.load(part_row + sc[:, None] * stride_ps + d[None, :], mask=okc[:, None] & d_mask[None, :],
                           other=0.0)
            acc += tl.sum(w[:, None] * part, axis=0)
        out = acc / tl.where(denom > 0, denom, 1.0)  # exact 0 for rows without keys
        tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


# ---------------------------------------------------------------------------------------------
# Triton wrapper


def triton_paged_decode_attention(
    q: torch.Tensor,  # [B, H, D]                       last dim contiguous
    k_cache: torch.Tensor,  # [num_blocks * block_size, KVH, D] same dtype as q
    v_cache: torch.Tensor,  # [num_blocks * block_size, KVH, D] same dtype as q
    block_tables: torch.Tensor,  # [B, max_blocks]       int32
    context_lens: torch.Tensor,  # [B]                   int32, 0 = padding row
    block_size: int,
    scale: float,
    prefix_slots: torch.Tensor | None = None,  # [B, P]  int32/int64 flat slots, -1 = none
    *,
    block_n: int | None = None,  # None: DECODE_BLOCK_N_DOT / DECODE_BLOCK_N_SUM
    num_splits: int | None = None,  # upper bound; None = heuristic (decode_split_plan)
    use_dot: bool | None = None,  # None: tl.dot when H // KVH > 1, broadcast + tl.sum for MHA
    num_warps: int | None = None,  # None: DECODE_NUM_WARPS (_FP32_DOT for fp32 tl.dot, _SUM for MHA)
    num_stages: int = DECODE_NUM_STAGES,
    pipeline: bool | None = None,  # None: DECODE_PIPELINE_DOT / DECODE_PIPELINE_SUM
) -> torch.Tensor:  # out [B, H, D] q.dtype
    """Paged decode attention (Triton, FlashDecoding split-K); CUDA-graph capturable.

        S, TPS = decode_split_plan(B, KVH, max_blocks, block_size)   # static shapes only
        for b, g, s in grid(B, KVH, S [+1 prefix split]):            # in parallel
            keys = [s*TPS, (s+1)*TPS) ∩ [0, context_lens[b])           # (prefix split: prefix_slots[b])
            if keys empty: continue                                    # nothing loaded or written
            for tile of BLOCK_N keys: online softmax of q[b, heads of g] over K/V tile (fp32)
            part[b, heads, s] = acc / l ; lse[b, heads, s] = m + log2(l)
        for b, h in grid(B, H):                                       # only when S_TOT > 1
            out[b, h] = sum_s 2^(lse_s - M) part_s / sum_s 2^(lse_s - M)   # over written splits
    """
    _require_triton()
    B, H, D, KVH, max_blocks, P = _check_args(q, k_cache, v_cache, block_tables, context_lens, block_size, scale,
                                              prefix_slots)
    assert D >= 1, f"empty head_dim: q {tuple(q.shape)}"
    assert KVH <= _MAX_GRID_YZ, f"too many kv heads: {KVH}"
    out = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    group = H // KVH
    if use_dot is None:
        use_dot = group > 1
    if block_n is None:
        block_n = DECODE_BLOCK_N_DOT if use_dot else DECODE_BLOCK_N_SUM
    assert block_n >= 16 and block_n == _next_pow2(block_n), f"block_n must be a power of two >= 16, got {block_n}"
    if num_warps is None:
        if use_dot:
            num_warps = DECODE_NUM_WARPS_FP32_DOT if q.dtype == torch.float32 else DECODE_NUM_WARPS
        else:
            num_warps = DECODE_NUM_WARPS_SUM
    if pipeline is None:
        pipeline = DECODE_PIPELINE_DOT if use_dot else DECODE_PIPELINE_SUM
    block_g = max(16, _next_pow2(group)) if use_dot else _next_pow2(group)
    block_d = max(16, _next_pow2(D))  # masked when D is not a power of two (>= 16 for tl.dot)
    n_splits, tps = decode_split_plan(B, KVH, max_blocks, block_size, block_n=block_n, num_splits=num_splits)
    has_prefix = prefix_slots is not None and P > 0
    s_tot = n_splits + int(has_prefix)
    assert s_tot <= _MAX_GRID_YZ, f"too many splits: {s_tot}"
    single = s_tot == 1
    pre = prefix_slots if has_prefix else context_lens  # dummy pointer when there is no prefix
    pre_stride = prefix_slots.stride(0) if has_prefix else 0
    qk_scale = float(scale) * _LOG2E
    fp32_ieee = q.dtype == torch.float32
    if single:
        o_buf, lse = out, out  # lse unused
        so_b, so_h, so_s, sl_b, sl_h = out.stride(0), out.stride(1), 0, 0, 0
    else:
        o_buf = torch.empty(B, H, s_tot, D, dtype=torch.float32, device=q.device)
        lse = torch.empty(B, H, s_tot, dtype=torch.float32, device=q.device)
        so_b, so_h, so_s = o_buf.stride(0), o_buf.stride(1), o_buf.stride(2)
        sl_b, sl_h = lse.stride(0), lse.stride(1)
    with _device_ctx(q):
        _paged_decode_split_kernel[(B, KVH, s_tot)](
            q, k_cache, v_cache, block_tables, context_lens, pre, o_buf, lse,
            qk_scale, tps, n_splits, P,
            q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
            block_tables.stride(0), pre_stride,
            so_b, so_h, so_s, sl_b, sl_h,
            GROUP=group, BLOCK_G=block_g, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_SIZE=block_size, BLOCK_N=block_n,
            HAS_PREFIX=has_prefix, SINGLE=single, USE_DOT=use_dot, FP32_IEEE=fp32_ieee, PIPELINE=bool(pipeline),
            num_warps=num_warps, num_stages=num_stages, **pdl_kwargs(q),
        )  # fmt: skip
        if not single:
            s_pow2 = _next_pow2(s_tot)
            _paged_decode_reduce_kernel[(B, H)](
                o_buf, lse, context_lens, out,
                tps, n_splits,
                o_buf.stride(0), o_buf.stride(1), o_buf.stride(2),
                lse.stride(0), lse.stride(1),
                out.stride(0), out.stride(1),
                HEAD_DIM=D, BLOCK_D=block_d, HAS_PREFIX=has_prefix, S_POW2=s_pow2,
                CHUNK=min(REDUCE_CHUNK, s_pow2),
                num_warps=REDUCE_NUM_WARPS, **pdl_kwargs(q),
            )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# Public dispatching API


def paged_decode_attention(
    q: torch.Tensor,  # [B, H, D]
    k_cache: torch.Tensor,  # [num_blocks * block_size, KVH, D]
    v_cache: torch.Tensor,  # [num_blocks * block_size, KVH, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    context_lens: torch.Tensor,  # [B] int32, 0 = padding row (output 0)
    block_size: int,
    scale: float,
    prefix_slots: torch.Tensor | None = None,  # [B, P] int32/int64 flat slots, -1 = none
) -> torch.Tensor:  # out [B, H, D] q.dtype
    """out[b, h] = softmax(scale * q[b, h] . K_b^T) V_b over row b's paged keys (and valid
    prefix slots), kv head h // (H // KVH); zeros for rows without keys. See the module doc
    and reference_paged_decode_attention for the pseudo-code."""
    tensors = [q, k_cache, v_cache, block_tables, context_lens] + ([prefix_slots] if prefix_slots is not None else [])
    if use_triton(*tensors):
        return triton_paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, block_size, scale,
                                             prefix_slots)
    return reference_paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, block_size, scale,
                                            prefix_slots)
