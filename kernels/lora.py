"""Batched multi-LoRA kernels (Punica / S-LoRA style): one launch per layer and projection
serves any mix of adapters and ranks.

Contract
--------
Adapter weights live in a fixed pool of ``S`` slots, stacked and zero/garbage-padded to the
pool's max rank ``R``:

    a_stack  [S, R, H_in]   (LoRA A of every slot; rows >= ranks[s] are ignored)
    b_stack  [S, H_out, R]  (LoRA B of every slot; cols >= ranks[s] are ignored; dense along R,
                             or along H_out: the adapter pool stores it rank-major)
    ranks    [S]  int32     true rank of each slot, 0 < ranks[s] <= R
    scaling  [S]  float32   alpha / r (or whatever multiplier the adapter wants)

Tokens point at slots, either per token (BGMV, the decode path) or per contiguous segment
(SGMV, the prefill path):

    token_slot [T]   int32  slot of each token, -1 = no adapter
    seg_indptr [G+1] int32  tokens of segment g are seg_indptr[g] : seg_indptr[g+1]
    seg_slot   [G]   int32  slot of each segment, -1 = no adapter (empty segments allowed)

Operations (``s`` = slot of the token, ``r = ranks[s]``):

    lora_shrink(x [T,H_in], a_stack, token_slot, ranks)             -> h [T,R] float32
        h[t, :r] = x[t] @ a_stack[s, :r].T ; h[t, r:] = 0 ; h[t] = 0 when s == -1
    lora_expand(h [T,R], b_stack, token_slot, ranks, scaling, y [T,H_out])   (in place)
        y[t] += scaling[s] * h[t, :r] @ b_stack[s, :, :r].T ; y[t] untouched when s == -1
    sgmv_shrink / sgmv_expand: the same with s taken from the token's segment; tokens outside
        every segment (t >= seg_indptr[G]) behave like s == -1.
    apply_lora(x, a_stack, b_stack, token_slot, ranks, scaling, y): shrink then expand.

Numerics: products accumulate in float32. ``h`` is always float32 (it is tiny, [T, R], and
keeping it in fp32 avoids one rounding and allows split-K atomics). ``y`` is updated as
``y = round_to_y_dtype(float32(y) + scaling * delta)``. The Triton SGMV expand feeds h to the
tensor cores in b_stack's dtype (one bf16/fp16 rounding of h), BGMV stays in fp32.
Supported dtypes for x, a_stack, h, b_stack, y: float32, float16, bfloat16. x and a_stack must
share a dtype; h, b_stack and y may each be any of the three.

Implementations: ``reference_*`` (pure PyTorch, the spec and the CPU path) and ``triton_*``
(the GPU path) share the positional signature; Triton variants additionally take keyword-only
tuning knobs (block sizes, split-K, warps). The public function (``lora_shrink`` ...) uses
Triton when every tensor is on CUDA, or when env ``QUIVER_FORCE_TRITON=1`` (tests set it
together with ``TRITON_INTERPRET=1`` to run the Triton kernels on CPU), else the reference.
Triton is optional: without it this module imports and only the references run.

Not checked on device (it would need a host sync): slot ids in [-1, S), ranks in [1, R],
seg_indptr monotone with seg_indptr[0] == 0 and seg_indptr[G] <= T. Violations are undefined
behaviour on the Triton path; the references assert them.
"""

from __future__ import annotations

import contextlib
import os

import torch

try:  # Triton is optional: the package must import without it.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAS_TRITON = False

from .pdl import pdl_kwargs, pdl_start

__all__ = [
    "HAS_TRITON",
    "use_triton",
    "segments_from_slots",
    "reference_lora_shrink",
    "reference_lora_expand",
    "reference_sgmv_shrink",
    "reference_sgmv_expand",
    "triton_lora_shrink",
    "triton_lora_expand",
    "triton_sgmv_shrink",
    "triton_sgmv_expand",
    "lora_shrink",
    "lora_expand",
    "sgmv_shrink",
    "sgmv_expand",
    "apply_lora",
]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# ---------------------------------------------------------------------------------------------
# Default tuning knobs (bf16, R in {8..64}, H in {2k..8k}). The BGMV ones come from the sweep
# of kernels/bench_lora_group.py on an H200 (docs/results/h200/gpu_lora_group_*.json: the engine's
# q|k|v group + o of 32 layers, batches 1-128, pool rank 16 and mixed ranks 8-64 in a pool of 64);
# the SGMV ones are untuned first guesses.
#
# BGMV shrink: one program per (token, rank block, K split). Each program streams a
#   [BLOCK_R, BLOCK_K] tile of A per iteration; split-K (fp32 atomics into h) is used when
#   there are too few (token x rank-block) programs to fill the GPU (decode at small batch).
#   8 warps and ~8 programs per SM were best or within 3% at every batch (1.37x faster than
#   4 warps / 2 per SM at batch 32).
BGMV_SHRINK_BLOCK_K = 128
BGMV_SHRINK_MAX_BLOCK_R = 32
BGMV_SHRINK_TARGET_PROGRAMS = 1056  # ~8 programs per SM on a 132-SM H100 / H200
BGMV_SHRINK_MAX_SPLIT_K = 32
BGMV_SHRINK_NUM_WARPS = 8
# BGMV expand: one program per (token, BLOCK_N outputs); loop over the slot's rank in
#   BLOCK_R chunks (rank-bound loop, masked tail). The tile is chosen by the pool rank R
#   (bgmv_expand_tile): what was best is ~2048 B-elements of row span per program.
BGMV_EXPAND_BLOCK_R = 16


def bgmv_expand_tile(R: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) of the BGMV expand for a pool of rank R: measured best 128 outputs
    with 2 warps at R = 16 and 32 outputs with 4 warps at R = 64 (R = 32 interpolated)."""
    if R <= 16:
        return 128, 2
    return max(32, 2048 // _next_pow2(R)), 4


# SGMV shrink: one program per (segment, BLOCK_M tokens, rank block, K split); tl.dot of a
#   [BLOCK_M, BLOCK_K] x-tile with a [BLOCK_K, BLOCK_R] A^T-tile (all >= 16 for tensor cores).
SGMV_SHRINK_BLOCK_M = 64
SGMV_SHRINK_BLOCK_K = 64
SGMV_SHRINK_MAX_BLOCK_R = 64
SGMV_SHRINK_TARGET_PROGRAMS = 264
SGMV_SHRINK_MAX_SPLIT_K = 16
SGMV_SHRINK_NUM_WARPS = 4
# SGMV expand: one program per (segment, BLOCK_M tokens, BLOCK_N outputs); loop over the
#   slot's rank in BLOCK_R (>= 16) chunks with tl.dot.
SGMV_EXPAND_BLOCK_M = 64
SGMV_EXPAND_BLOCK_N = 128
SGMV_EXPAND_BLOCK_R = 16
SGMV_EXPAND_NUM_WARPS = 4

_MAX_GRID_YZ = 65535  # CUDA limit of grid dims 1 and 2


# ---------------------------------------------------------------------------------------------
# Dispatch and argument checks


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton path should run for these tensors.

    QUIVER_FORCE_TRITON=1 forces it (and raises if Triton is missing); otherwise Triton runs
    when it is importable and every tensor is on CUDA.
    """
    if os.environ.get("QUIVER_FORCE_TRITON", "") == "1":
        if not HAS_TRITON:
            raise RuntimeError("QUIVER_FORCE_TRITON=1 but triton is not importable")
        return True
    return HAS_TRITON and all(t.is_cuda for t in tensors)


def _require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("triton is not importable; use the reference_* functions")


def _device_ctx(t: torch.Tensor):
    """Launch on the tensor's GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _mapped(token_slot: torch.Tensor, slot_map: torch.Tensor | None) -> torch.Tensor:
    """The stack slot of every token: slot_map[token_slot + 1], or token_slot itself."""
    if slot_map is None:
        return token_slot
    assert slot_map.dim() == 1 and slot_map.dtype == torch.int32, "slot_map must be [S'+1] int32"
    return slot_map[token_slot.long() + 1]


def _h_out(out: torch.Tensor | None, T: int, R: int, device: torch.device) -> torch.Tensor:
    if out is None:
        return torch.zeros(T, R, dtype=torch.float32, device=device)
    assert out.shape == (T, R) and out.dtype == torch.float32 and out.stride(1) == 1, \
        f"out must be [T, R] = {(T, R)} float32 with contiguous rows"
    return out


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


B_DENSE_DIMS = (1, 2)  # B stacks [S, H_out, R]: rows ([S, H_out, R] contiguous, or a view of its
# first ranks) or rank-major (the adapter pool's banks); the kernels read them through every stride


def _check_float(t: torch.Tensor, name: str, ndim: int, dense_dims: tuple[int, ...] = (-1,)) -> None:
    """Rows may be strided (a slice of a fused projection's output; the first ranks of a pool's
    A rows): the kernels take the other strides, one of dense_dims must be dense."""
    assert isinstance(t, torch.Tensor), f"{name} must be a tensor"
    assert t.dim() == ndim, f"{name} must be {ndim}-D, got shape {tuple(t.shape)}"
    assert t.dtype in FLOAT_DTYPES, f"{name} dtype {t.dtype} not in {FLOAT_DTYPES}"
    assert any(t.stride(d) == 1 for d in dense_dims), \
        f"{name} must be dense along dim {dense_dims}, strides {t.stride()}"


def _check_index(t: torch.Tensor, name: str, length: int | None, dtype=torch.int32) -> None:
    assert isinstance(t, torch.Tensor), f"{name} must be a tensor"
    assert t.dim() == 1, f"{name} must be 1-D, got shape {tuple(t.shape)}"
    assert t.dtype == dtype, f"{name} must be {dtype}, got {t.dtype}"
    assert t.is_contiguous(), f"{name} must be contiguous"
    if length is not None:
        assert t.shape[0] == length, f"{name} has length {t.shape[0]}, expected {length}"


def _check_same_device(**tensors: torch.Tensor) -> None:
    devs = {name: t.device for name, t in tensors.items()}
    first = next(iter(devs.values()))
    assert all(d == first for d in devs.values()), f"tensors on different devices: {devs}"


def _check_shrink_args(x, a_stack, ranks) -> tuple[int, int, int, int]:
    _check_float(x, "x", 2)
    _check_float(a_stack, "a_stack", 3)
    T, H_in = x.shape
    S, R, H_a = a_stack.shape
    assert H_a == H_in, f"a_stack H_in {H_a} != x H_in {H_in}"
    assert a_stack.dtype == x.dtype, f"a_stack dtype {a_stack.dtype} != x dtype {x.dtype}"
    assert S >= 1 and R >= 1 and H_in >= 1, f"empty pool/rank/hidden: a_stack {tuple(a_stack.shape)}"
    _check_index(ranks, "ranks", S)
    return T, H_in, S, R


def _check_expand_args(h, b_stack, ranks, scaling, y) -> tuple[int, int, int, int]:
    _check_float(h, "h", 2)
    _check_float(b_stack, "b_stack", 3, B_DENSE_DIMS)
    _check_float(y, "y", 2)
    T, R = h.shape
    S, H_out, R_b = b_stack.shape
    assert R_b == R, f"b_stack rank dim {R_b} != h rank dim {R}"
    assert y.shape == (T, H_out), f"y shape {tuple(y.shape)} != (T={T}, H_out={H_out})"
    assert S >= 1 and R >= 1 and H_out >= 1, f"empty pool/rank/hidden: b_stack {tuple(b_stack.shape)}"
    _check_index(ranks, "ranks", S)
    _check_index(scaling, "scaling", S, dtype=torch.float32)
    return T, H_out, S, R


def _check_reference_values(ranks: torch.Tensor, R: int, slots: torch.Tensor, S: int) -> None:
    """Host-side value checks, done by the references only (they sync anyway)."""
    if ranks.numel():
        assert int(ranks.min()) >= 1 and int(ranks.max()) <= R, f"ranks must be in [1, {R}]: {ranks.tolist()}"
    if slots.numel():
        assert int(slots.min()) >= -1 and int(slots.max()) < S, f"slot ids must be in [-1, {S})"


def _check_segments_values(seg_indptr: torch.Tensor, T: int) -> None:
    ip = seg_indptr.tolist()
    assert ip[0] == 0, f"seg_indptr[0] must be 0, got {ip[0]}"
    assert all(b >= a for a, b in zip(ip, ip[1:])), "seg_indptr must be non-decreasing"
    assert ip[-1] <= T, f"seg_indptr[-1]={ip[-1]} > T={T}"


# ---------------------------------------------------------------------------------------------
# Helpers


def segments_from_slots(token_slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Group runs of equal consecutive slots into SGMV segments.

    token_slot: [T] int32
    returns (seg_indptr [G+1] int32, seg_slot [G] int32), on token_slot's device.

        seg_indptr = [0]; seg_slot = []
        for t in range(T):
            if t == 0 or token_slot[t] != token_slot[t-1]:
                seg_slot.append(token_slot[t]); seg_indptr.append(t)   # open a segment
        seg_indptr = seg_indptr[:1] + seg_indptr[2:] + [T]   (i.e. run boundaries)

    Runs of -1 become segments with slot -1 (the kernels skip them). Syncs on CUDA.
    """
    _check_index(token_slot, "token_slot", None)
    dev = token_slot.device
    if token_slot.numel() == 0:
        return torch.zeros(1, dtype=torch.int32, device=dev), torch.zeros(0, dtype=torch.int32, device=dev)
    vals, counts = torch.unique_consecutive(token_slot, return_counts=True)
    seg_indptr = torch.zeros(vals.numel() + 1, dtype=torch.int32, device=dev)
    seg_indptr[1:] = torch.cumsum(counts, 0).to(torch.int32)
    return seg_indptr, vals.to(torch.int32).contiguous()


# ---------------------------------------------------------------------------------------------
# References (pure PyTorch; the specification and the CPU path)


def reference_lora_shrink(
    x: torch.Tensor,  # [T, H_in]      float32 | float16 | bfloat16
    a_stack: torch.Tensor,  # [S, R, H_in] same dtype as x
    token_slot: torch.Tensor,  # [T]      int32, -1 = no adapter
    ranks: torch.Tensor,  # [S]            int32, 0 < ranks[s] <= R
    *,
    slot_map: torch.Tensor | None = None,  # [S'+1] int32: slot of the stack = slot_map[token_slot + 1]
    out: torch.Tensor | None = None,  # [T, R] float32, zero-filled: written instead of a new h
) -> torch.Tensor:  # h [T, R] float32
    """BGMV shrink (reference).

        h = zeros(T, R, float32)
        for t in range(T):
            s = token_slot[t]
            if s >= 0:
                r = ranks[s]
                h[t, :r] = float32(x[t]) @ float32(a_stack[s, :r]).T
        return h
    """
    T, H_in, S, R = _check_shrink_args(x, a_stack, ranks)
    _check_index(token_slot, "token_slot", T)
    _check_same_device(x=x, a_stack=a_stack, token_slot=token_slot, ranks=ranks)
    token_slot = _mapped(token_slot, slot_map)
    _check_reference_values(ranks, R, token_slot, S)
    h = _h_out(out, T, R, x.device)
    for s in torch.unique(token_slot).tolist():
        if s < 0:
            continue
        r = int(ranks[s])
        idx = (token_slot == s).nonzero().squeeze(1)
        h[idx, :r] = x[idx].float() @ a_stack[s, :r].float().T
    return h


def reference_lora_expand(
    h: torch.Tensor,  # [T, R]            float (usually float32 from shrink)
    b_stack: torch.Tensor,  # [S, H_out, R]
    token_slot: torch.Tensor,  # [T]      int32, -1 = no adapter
    ranks: torch.Tensor,  # [S]            int32
    scaling: torch.Tensor,  # [S]          float32
    y: torch.Tensor,  # [T, H_out]         updated in place
    *,
    slot_map: torch.Tensor | None = None,  # [S'+1] int32: slot of the stack = slot_map[token_slot + 1]
) -> torch.Tensor:  # y
    """BGMV expand (reference), in place on y; returns y.

        for t in range(T):
            s = token_slot[t]
            if s >= 0:
                r = ranks[s]
                y[t] = y.dtype(float32(y[t]) + scaling[s] * (float32(h[t, :r]) @ float32(b_stack[s, :, :r]).T))
    """
    T, H_out, S, R = _check_expand_args(h, b_stack, ranks, scaling, y)
    _check_index(token_slot, "token_slot", T)
    _check_same_device(h=h, b_stack=b_stack, token_slot=token_slot, ranks=ranks, scaling=scaling, y=y)
    token_slot = _mapped(token_slot, slot_map)
    _check_reference_values(ranks, R, token_slot, S)
    for s in torch.unique(token_slot).tolist():
        if s < 0:
            continue
        r = int(ranks[s])
        idx = (token_slot == s).nonzero().squeeze(1)
        delta = (h[idx, :r].float() @ b_stack[s, :, :r].float().T) * scaling[s]
        y[idx] = (y[idx].float() + delta).to(y.dtype)
    return y


def reference_sgmv_shrink(
    x: torch.Tensor,  # [T, H_in]
    a_stack: torch.Tensor,  # [S, R, H_in]
    seg_indptr: torch.Tensor,  # [G+1]    int32
    seg_slot: torch.Tensor,  # [G]        int32, -1 = no adapter
    ranks: torch.Tensor,  # [S]            int32
    max_seg_len: int | None = None,  # ignored (the Triton grid needs it)
) -> torch.Tensor:  # h [T, R] float32
    """SGMV shrink (reference).

        h = zeros(T, R, float32)
        for g in range(G):
            s = seg_slot[g]; lo, hi = seg_indptr[g], seg_indptr[g+1]
            if s >= 0 and hi > lo:
                r = ranks[s]
                h[lo:hi, :r] = float32(x[lo:hi]) @ float32(a_stack[s, :r]).T
        return h
    """
    T, H_in, S, R = _check_shrink_args(x, a_stack, ranks)
    G = seg_slot.shape[0]
    _check_index(seg_slot, "seg_slot", None)
    _check_index(seg_indptr, "seg_indptr", G + 1)
    _check_same_device(x=x, a_stack=a_stack, seg_indptr=seg_indptr, seg_slot=seg_slot, ranks=ranks)
    _check_reference_values(ranks, R, seg_slot, S)
    _check_segments_values(seg_indptr, T)
    h = torch.zeros(T, R, dtype=torch.float32, device=x.device)
    ip = seg_indptr.tolist()
    for g, s in enumerate(seg_slot.tolist()):
        lo, hi = ip[g], ip[g + 1]
        if s < 0 or hi <= lo:
            continue
        r = int(ranks[s])
        h[lo:hi, :r] = x[lo:hi].float() @ a_stack[s, :r].float().T
    return h


def reference_sgmv_expand(
    h: torch.Tensor,  # [T, R]
    b_stack: torch.Tensor,  # [S, H_out, R]
    seg_indptr: torch.Tensor,  # [G+1]    int32
    seg_slot: torch.Tensor,  # [G]        int32, -1 = no adapter
    ranks: torch.Tensor,  # [S]            int32
    scaling: torch.Tensor,  # [S]          float32
    y: torch.Tensor,  # [T, H_out]         updated in place
    max_seg_len: int | None = None,  # ignored (the Triton grid needs it)
) -> torch.Tensor:  # y
    """SGMV expand (reference), in place on y; returns y.

        for g in range(G):
            s = seg_slot[g]; lo, hi = seg_indptr[g], seg_indptr[g+1]
            if s >= 0 and hi > lo:
                r = ranks[s]
                y[lo:hi] = y.dtype(float32(y[lo:hi]) + scaling[s] * (float32(h[lo:hi, :r]) @ float32(b_stack[s, :, :r]).T))
    """
    T, H_out, S, R = _check_expand_args(h, b_stack, ranks, scaling, y)
    G = seg_slot.shape[0]
    _check_index(seg_slot, "seg_slot", None)
    _check_index(seg_indptr, "seg_indptr", G + 1)
    _check_same_device(h=h, b_stack=b_stack, seg_indptr=seg_indptr, seg_slot=seg_slot, ranks=ranks, scaling=scaling, y=y)
    _check_reference_values(ranks, R, seg_slot, S)
    _check_segments_values(seg_indptr, T)
    ip = seg_indptr.tolist()
    for g, s in enumerate(seg_slot.tolist()):
        lo, hi = ip[g], ip[g + 1]
        if s < 0 or hi <= lo:
            continue
        r = int(ranks[s])
        delta = (h[lo:hi, :r].float() @ b_stack[s, :, :r].float().T) * scaling[s]
        y[lo:hi] = (y[lo:hi].float() + delta).to(y.dtype)
    return y


# ---------------------------------------------------------------------------------------------
# Triton kernels

if HAS_TRITON:

    @triton.jit
    def _token_slot(slot_ptr, map_ptr, t, HAS_MAP: tl.constexpr):
        """(slot clamped to >= 0 as int64, whether token t has an adapter in this stack)."""
        slot = tl.load(slot_ptr + t)
        if HAS_MAP:
            slot = tl.load(map_ptr + slot + 1)
        return tl.maximum(slot, 0).to(tl.int64), slot >= 0

    @triton.jit
    def _token_rank(slot_ptr, map_ptr, rank_ptr, t, HAS_MAP: tl.constexpr):
        """(slot clamped to >= 0 as int64, rank; 0 where token t has no adapter in this stack)."""
        slot_c, has = _token_slot(slot_ptr, map_ptr, t, HAS_MAP)
        return slot_c, tl.where(has, tl.load(rank_ptr + slot_c), 0)

    @triton.jit
    def _bgmv_shrink_body(x_ptr, a_ptr, slot_ptr, map_ptr, rank_ptr, h_ptr, t, pid_r, pid_k, H_in, K_PER_SPLIT,
                          stride_xt, stride_as, stride_ar, stride_ht,
                          BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                          HAS_MAP: tl.constexpr, R_FLAT: tl.constexpr = 0):
        """R_FLAT (the pool rank, when one rank block holds it): A's loads wait only for the
        token's slot, not for its rank too (rows past the rank are read and not stored)."""
        k_lo = pid_k * K_PER_SPLIT
        k_hi = tl.minimum(k_lo + K_PER_SPLIT, H_in)
        r_lo = pid_r * BLOCK_R
        r_offs = r_lo + tl.arange(0, BLOCK_R)
        if R_FLAT > 0:
            slot_c, has = _token_slot(slot_ptr, map_ptr, t, HAS_MAP)
            rank = tl.where(has, tl.load(rank_ptr + slot_c), 0)
            r_mask = r_offs < R_FLAT
            k_hi = tl.where(has, k_hi, k_lo)  # no adapter: zero iterations
        else:
            slot_c, rank = _token_rank(slot_ptr, map_ptr, rank_ptr, t, HAS_MAP)
            r_mask = r_offs < rank
            # No adapter, or this rank block is past the slot's rank: zero iterations.
            k_hi = tl.where(r_lo < rank, k_hi, k_lo)
        k_offs = tl.arange(0, BLOCK_K)
        x_row = x_ptr + t.to(tl.int64) * stride_xt
        a_rows = a_ptr + slot_c * stride_as + r_offs[:, None].to(tl.int64) * stride_ar
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k in range(k_lo, k_hi, BLOCK_K):
            kk = k + k_offs
            k_mask = kk < k_hi
            xv = tl.load(x_row + kk, mask=k_mask, other=0.0).to(tl.float32)
            av = tl.load(a_rows + kk[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)
            acc += tl.sum(av.to(tl.float32) * xv[None, :], axis=1)
        # (bounds are folded into the comparisons: scalar & vector masks trip the interpreter)
        out_mask = r_offs < tl.where(k_lo < k_hi, rank, 0)
        h_row = h_ptr + t.to(tl.int64) * stride_ht + r_offs
        if SPLIT_K == 1:
            tl.store(h_row, acc, mask=out_mask)
        else:
            tl.atomic_add(h_row, acc, mask=out_mask)

    @triton.jit
    def _bgmv_shrink_kernel(
        x_ptr,  # [T, H_in]
        a_ptr,  # [S, R, H_in]
        slot_ptr,  # [T] int32
        map_ptr,  # [S'+1] int32 slot map (HAS_MAP) or dummy
        rank_ptr,  # [S] int32
        h_ptr,  # [T, R] float32, zero-initialised
        H_in,
        K_PER_SPLIT,  # multiple of BLOCK_K
        stride_xt,
        stride_as,
        stride_ar,
        stride_ht,
        BLOCK_R: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr,
        HAS_MAP: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        pdl_start(PDL)
        _bgmv_shrink_body(x_ptr, a_ptr, slot_ptr, map_ptr, rank_ptr, h_ptr, tl.program_id(0), tl.program_id(1),
                          tl.program_id(2), H_in, K_PER_SPLIT, stride_xt, stride_as, stride_ar, stride_ht,
                          BLOCK_R, BLOCK_K, SPLIT_K, HAS_MAP)

    @triton.jit
    def _bgmv_expand_body(h_ptr, b_ptr, slot_ptr, map_ptr, rank_ptr, scale_ptr, y_ptr, t, pid_n, H_out,
                          stride_ht, stride_bs, stride_bn, stride_br, stride_yt,
                          BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, HAS_MAP: tl.constexpr,
                          R_FLAT: tl.constexpr = 0, EARLY_FIRST: tl.constexpr = False):
        """R_FLAT (the pool rank, <= BLOCK_R): one rank block; y and h are loaded before the
        token's slot is known and B's load waits only for the slot (its rank masks after).
        EARLY_FIRST (a pool of more than one rank block): the first block so, the rest of the
        slot's rank in the rank-bound loop. B is read through both strides: a pool stores it
        rank-major (stride_bn 1), so a view of its first ranks is dense."""
        n_offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n_offs < H_out
        r_offs = tl.arange(0, BLOCK_R)
        h_row = h_ptr + t.to(tl.int64) * stride_ht
        y_row = y_ptr + t.to(tl.int64) * stride_yt + n_offs
        if R_FLAT > 0:
            yv = tl.load(y_row, mask=n_mask, other=0.0).to(tl.float32)
            hv = tl.load(h_row + r_offs, mask=r_offs < R_FLAT, other=0.0).to(tl.float32)
            slot_c, has = _token_slot(slot_ptr, map_ptr, t, HAS_MAP)
            b_rows = b_ptr + slot_c * stride_bs + n_offs[:, None].to(tl.int64) * stride_bn
            bv = tl.load(b_rows + r_offs[None, :] * stride_br, mask=(n_offs < tl.where(has, H_out, 0))[:, None]
                         & (r_offs < R_FLAT)[None, :], other=0.0)
            rank = tl.where(has, tl.load(rank_ptr + slot_c), 0)
            scale = tl.load(scale_ptr + slot_c)
            acc = tl.sum(tl.where((r_offs < rank)[None, :], bv.to(tl.float32) * hv[None, :], 0.0), axis=1)
            y_mask = n_offs < tl.where(has, H_out, 0)
        elif EARLY_FIRST:
            yv = tl.load(y_row, mask=n_mask, other=0.0).to(tl.float32)
            hv = tl.load(h_row + r_offs).to(tl.float32)  # the pool holds more than BLOCK_R ranks
            slot_c, has = _token_slot(slot_ptr, map_ptr, t, HAS_MAP)
            b_rows = b_ptr + slot_c * stride_bs + n_offs[:, None].to(tl.int64) * stride_bn
            bv = tl.load(b_rows + r_offs[None, :] * stride_br, mask=(n_offs < tl.where(has, H_out, 0))[:, None],
                         other=0.0)
            rank = tl.where(has, tl.load(rank_ptr + slot_c), 0)
            scale = tl.load(scale_ptr + slot_c)
            acc = tl.sum(tl.where((r_offs < rank)[None, :], bv.to(tl.float32) * hv[None, :], 0.0), axis=1)
            for k in range(BLOCK_R, rank, BLOCK_R):  # ranks past the first block
                rr = k + r_offs
                rk_mask = rr < rank
                hv = tl.load(h_row + rr, mask=rk_mask, other=0.0).to(tl.float32)
                bv = tl.load(b_rows + rr[None, :] * stride_br, mask=n_mask[:, None] & rk_mask[None, :], other=0.0)
                acc += tl.sum(bv.to(tl.float32) * hv[None, :], axis=1)
            y_mask = n_offs < tl.where(has, H_out, 0)
        else:
            slot_c, rank = _token_rank(slot_ptr, map_ptr, rank_ptr, t, HAS_MAP)
            b_rows = b_ptr + slot_c * stride_bs + n_offs[:, None].to(tl.int64) * stride_bn
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for k in range(0, rank, BLOCK_R):  # rank-bound loop; 0 iterations without adapter
                rr = k + r_offs
                rk_mask = rr < rank
                hv = tl.load(h_row + rr, mask=rk_mask, other=0.0).to(tl.float32)
                bv = tl.load(b_rows + rr[None, :] * stride_br, mask=n_mask[:, None] & rk_mask[None, :], other=0.0)
                acc += tl.sum(bv.to(tl.float32) * hv[None, :], axis=1)
            scale = tl.load(scale_ptr + slot_c)
            y_mask = n_offs < tl.where(rank > 0, H_out, 0)
            yv = tl.load(y_row, mask=y_mask, other=0.0).to(tl.float32)
        tl.store(y_row, (yv + scale * acc).to(y_ptr.dtype.element_ty), mask=y_mask)

    @triton.jit
    def _bgmv_expand_kernel(
        h_ptr,  # [T, R]
        b_ptr,  # [S, H_out, R]
        slot_ptr,  # [T] int32
        map_ptr,  # [S'+1] int32 slot map (HAS_MAP) or dummy
        rank_ptr,  # [S] int32
        scale_ptr,  # [S] float32
        y_ptr,  # [T, H_out], in place
        H_out,
        stride_ht,
        stride_bs,
        stride_bn,
        stride_br,
        stride_yt,
        BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr,
        HAS_MAP: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        pdl_start(PDL)
        _bgmv_expand_body(h_ptr, b_ptr, slot_ptr, map_ptr, rank_ptr, scale_ptr, y_ptr, tl.program_id(0),
                          tl.program_id(1), H_out, stride_ht, stride_bs, stride_bn, stride_br, stride_yt, BLOCK_N,
                          BLOCK_R, HAS_MAP)

    @triton.jit
    def _sgmv_shrink_kernel(
        x_ptr,  # [T, H_in]
        a_ptr,  # [S, R, H_in]
        indptr_ptr,  # [G+1] int32
        seg_slot_ptr,  # [G] int32
        rank_ptr,  # [S] int32
        h_ptr,  # [T, R] float32, zero-initialised
        H_in,
        K_PER_SPLIT,
        stride_xt,
        stride_as,
        stride_ar,
        stride_ht,
        BLOCK_M: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr,
        FP32_IEEE: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_rk = tl.program_id(1)
        g = tl.program_id(2)
        pid_r = pid_rk // SPLIT_K
        pid_k = pid_rk % SPLIT_K
        seg_lo = tl.load(indptr_ptr + g)
        seg_hi = tl.load(indptr_ptr + g + 1)
        slot = tl.load(seg_slot_ptr + g)
        slot_c = tl.maximum(slot, 0).to(tl.int64)
        rank = tl.where(slot >= 0, tl.load(rank_ptr + slot_c), 0)
        m_lo = seg_lo + pid_m * BLOCK_M
        m_offs = m_lo + tl.arange(0, BLOCK_M)
        m_mask = m_offs < seg_hi
        r_lo = pid_r * BLOCK_R
        r_offs = r_lo + tl.arange(0, BLOCK_R)
        r_mask = r_offs < rank
        k_lo = pid_k * K_PER_SPLIT
        k_hi = tl.minimum(k_lo + K_PER_SPLIT, H_in)
        k_hi = tl.where((r_lo < rank) & (m_lo < seg_hi), k_hi, k_lo)
        k_offs = tl.arange(0, BLOCK_K)
        x_rows = x_ptr + m_offs[:, None].to(tl.int64) * stride_xt
        a_cols = a_ptr + slot_c * stride_as + r_offs[None, :].to(tl.int64) * stride_ar  # A^T tile
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k in range(k_lo, k_hi, BLOCK_K):
            kk = k + k_offs
            k_mask = kk < k_hi
            xv = tl.load(x_rows + kk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            av = tl.load(a_cols + kk[:, None], mask=k_mask[:, None] & r_mask[None, :], other=0.0)
            if FP32_IEEE:
                acc = tl.dot(xv, av, acc, input_precision="ieee")
            else:
                acc = tl.dot(xv, av, acc)
        out_mask = m_mask[:, None] & (r_offs < tl.where(k_lo < k_hi, rank, 0))[None, :]
        h_tile = h_ptr + m_offs[:, None].to(tl.int64) * stride_ht + r_offs[None, :]
        if SPLIT_K == 1:
            tl.store(h_tile, acc, mask=out_mask)
        else:
            tl.atomic_add(h_tile, acc, mask=out_mask)

    @triton.jit
    def _sgmv_expand_kernel(
        h_ptr,  # [T, R]
        b_ptr,  # [S, H_out, R]
        indptr_ptr,  # [G+1] int32
        seg_slot_ptr,  # [G] int32
        rank_ptr,  # [S] int32
        scale_ptr,  # [S] float32
        y_ptr,  # [T, H_out], in place
        H_out,
        stride_ht,
        stride_bs,
        stride_bn,
        stride_br,
        stride_yt,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr,
        FP32_IEEE: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        g = tl.program_id(2)
        seg_lo = tl.load(indptr_ptr + g)
        seg_hi = tl.load(indptr_ptr + g + 1)
        slot = tl.load(seg_slot_ptr + g)
        slot_c = tl.maximum(slot, 0).to(tl.int64)
        rank = tl.where(slot >= 0, tl.load(rank_ptr + slot_c), 0)
        m_lo = seg_lo + pid_m * BLOCK_M
        rank = tl.where(m_lo < seg_hi, rank, 0)  # past the segment's end: nothing to do
        m_offs = m_lo + tl.arange(0, BLOCK_M)
        m_mask = m_offs < seg_hi
        n_offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n_offs < H_out
        r_offs = tl.arange(0, BLOCK_R)
        h_rows = h_ptr + m_offs[:, None].to(tl.int64) * stride_ht
        b_cols = b_ptr + slot_c * stride_bs + n_offs[None, :].to(tl.int64) * stride_bn  # B^T tile
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, rank, BLOCK_R):
            rr = k + r_offs
            rk_mask = rr < rank
            hv = tl.load(h_rows + rr[None, :], mask=m_mask[:, None] & rk_mask[None, :], other=0.0)
            bv = tl.load(b_cols + rr[:, None] * stride_br, mask=rk_mask[:, None] & n_mask[None, :], other=0.0)
            if FP32_IEEE:
                acc = tl.dot(hv.to(tl.float32), bv, acc, input_precision="ieee")
            else:
                acc = tl.dot(hv.to(bv.dtype), bv, acc)
        scale = tl.load(scale_ptr + slot_c)
        y_mask = m_mask[:, None] & (n_offs < tl.where(rank > 0, H_out, 0))[None, :]
        y_tile = y_ptr + m_offs[:, None].to(tl.int64) * stride_yt + n_offs[None, :]
        yv = tl.load(y_tile, mask=y_mask, other=0.0).to(tl.float32)
        tl.store(y_tile, (yv + scale * acc).to(y_ptr.dtype.element_ty), mask=y_mask)


def _split_k(n_programs: int, H_in: int, block_k: int, target: int, max_split: int) -> int:
    """How many K splits bring the grid to ~target programs (1 if it is already full)."""
    if n_programs >= target:
        return 1
    return max(1, min(max_split, _cdiv(target, n_programs), _cdiv(H_in, block_k)))


# ---------------------------------------------------------------------------------------------
# Triton wrappers


def triton_lora_shrink(
    x: torch.Tensor,  # [T, H_in]      float32 | float16 | bfloat16, contiguous
    a_stack: torch.Tensor,  # [S, R, H_in] same dtype as x, contiguous
    token_slot: torch.Tensor,  # [T]      int32, -1 = no adapter
    ranks: torch.Tensor,  # [S]            int32, 0 < ranks[s] <= R
    *,
    block_r: int | None = None,  # default min(next_pow2(R), BGMV_SHRINK_MAX_BLOCK_R)
    block_k: int = BGMV_SHRINK_BLOCK_K,
    split_k: int | None = None,  # default: enough to reach BGMV_SHRINK_TARGET_PROGRAMS
    num_warps: int = BGMV_SHRINK_NUM_WARPS,
    slot_map: torch.Tensor | None = None,  # [S'+1] int32: slot of the stack = slot_map[token_slot + 1]
    out: torch.Tensor | None = None,  # [T, R] float32, zero-filled: written instead of a new h
) -> torch.Tensor:  # h [T, R] float32
    """BGMV shrink (Triton). Grid (T, cdiv(R, BLOCK_R), SPLIT_K), one token per program.

        h = zeros(T, R, float32)
        for t, rb, ks in grid:                          # in parallel
            s = token_slot[t]; r = ranks[s] if s >= 0 else 0
            if rb * BLOCK_R >= r: continue               # no work beyond the slot's rank
            rows = [rb*BLOCK_R, (rb+1)*BLOCK_R) ∩ [0, r)
            part = sum over k in split ks (BLOCK_K chunks) of a_stack[s, rows, k] * x[t, k]
            h[t, rows] (+)= part                         # atomic add when SPLIT_K > 1
        return h

    With SPLIT_K > 1 the fp32 summation order is not deterministic.
    """
    _require_triton()
    T, H_in, S, R = _check_shrink_args(x, a_stack, ranks)
    _check_index(token_slot, "token_slot", T)
    _check_same_device(x=x, a_stack=a_stack, token_slot=token_slot, ranks=ranks)
    h = _h_out(out, T, R, x.device)
    if T == 0:
        return h
    block_r = block_r or min(_next_pow2(R), BGMV_SHRINK_MAX_BLOCK_R)
    n_rb = _cdiv(R, block_r)
    if split_k is None:
        split_k = _split_k(T * n_rb, H_in, block_k, BGMV_SHRINK_TARGET_PROGRAMS, BGMV_SHRINK_MAX_SPLIT_K)
    assert split_k >= 1 and n_rb <= _MAX_GRID_YZ and split_k <= _MAX_GRID_YZ
    k_per_split = _cdiv(_cdiv(H_in, split_k), block_k) * block_k
    grid = (T, n_rb, split_k)
    with _device_ctx(x):
        _bgmv_shrink_kernel[grid](
            x, a_stack, token_slot, token_slot if slot_map is None else slot_map, ranks, h,
            H_in, k_per_split,
            x.stride(0), a_stack.stride(0), a_stack.stride(1), h.stride(0),
            BLOCK_R=block_r, BLOCK_K=block_k, SPLIT_K=split_k, HAS_MAP=slot_map is not None,
            num_warps=num_warps, **pdl_kwargs(x),
        )  # fmt: skip
    return h


def triton_lora_expand(
    h: torch.Tensor,  # [T, R]            float32 (or float16/bfloat16), contiguous
    b_stack: torch.Tensor,  # [S, H_out, R] dense along R or H_out (a pool's rank-major bank)
    token_slot: torch.Tensor,  # [T]      int32, -1 = no adapter
    ranks: torch.Tensor,  # [S]            int32
    scaling: torch.Tensor,  # [S]          float32
    y: torch.Tensor,  # [T, H_out]         contiguous, updated in place
    *,
    block_n: int | None = None,  # default: bgmv_expand_tile(R)
    block_r: int = BGMV_EXPAND_BLOCK_R,
    num_warps: int | None = None,  # default: bgmv_expand_tile(R)
    slot_map: torch.Tensor | None = None,  # [S'+1] int32: slot of the stack = slot_map[token_slot + 1]
) -> torch.Tensor:  # y
    """BGMV expand (Triton), in place on y; returns y. Grid (T, cdiv(H_out, BLOCK_N)).

        for t, nb in grid:                               # in parallel
            s = token_slot[t]
            if s < 0: continue                           # y[t] untouched
            cols = [nb*BLOCK_N, (nb+1)*BLOCK_N) ∩ [0, H_out)
            acc = sum over k in range(0, ranks[s]) (BLOCK_R chunks) of b_stack[s, cols, k] * h[t, k]
            y[t, cols] = y.dtype(float32(y[t, cols]) + scaling[s] * acc)
    """
    _require_triton()
    T, H_out, S, R = _check_expand_args(h, b_stack, ranks, scaling, y)
    _check_index(token_slot, "token_slot", T)
    _check_same_device(h=h, b_stack=b_stack, token_slot=token_slot, ranks=ranks, scaling=scaling, y=y)
    if T == 0:
        return y
    tile_n, tile_warps = bgmv_expand_tile(R)
    block_n, num_warps = block_n or tile_n, num_warps or tile_warps
    n_nb = _cdiv(H_out, block_n)
    assert n_nb <= _MAX_GRID_YZ
    grid = (T, n_nb)
    with _device_ctx(y):
        _bgmv_expand_kernel[grid](
            h, b_stack, token_slot, token_slot if slot_map is None else slot_map, ranks, scaling, y,
            H_out,
            h.stride(0), b_stack.stride(0), b_stack.stride(1), b_stack.stride(2), y.stride(0),
            BLOCK_N=block_n, BLOCK_R=block_r, HAS_MAP=slot_map is not None,
            num_warps=num_warps, **pdl_kwargs(y),
        )  # fmt: skip
    return y


def _max_seg_len(seg_indptr: torch.Tensor, max_seg_len: int | None) -> int:
    if max_seg_len is not None:
        return int(max_seg_len)
    if seg_indptr.numel() <= 1:
        return 0
    return int((seg_indptr[1:] - seg_indptr[:-1]).max())  # host sync


def triton_sgmv_shrink(
    x: torch.Tensor,  # [T, H_in]         contiguous
    a_stack: torch.Tensor,  # [S, R, H_in] same dtype as x, contiguous
    seg_indptr: torch.Tensor,  # [G+1]    int32
    seg_slot: torch.Tensor,  # [G]        int32, -1 = no adapter
    ranks: torch.Tensor,  # [S]            int32
    max_seg_len: int | None = None,  # >= longest segment; None: computed (host sync)
    *,
    block_m: int = SGMV_SHRINK_BLOCK_M,
    block_r: int | None = None,  # default clamp(next_pow2(R), 16, SGMV_SHRINK_MAX_BLOCK_R)
    block_k: int = SGMV_SHRINK_BLOCK_K,
    split_k: int | None = None,
    num_warps: int = SGMV_SHRINK_NUM_WARPS,
) -> torch.Tensor:  # h [T, R] float32
    """SGMV shrink (Triton). Grid (cdiv(max_seg_len, BLOCK_M), cdiv(R, BLOCK_R) * SPLIT_K, G).

        h = zeros(T, R, float32)
        for mb, (rb, ks), g in grid:                     # in parallel
            s = seg_slot[g]; r = ranks[s] if s >= 0 else 0
            rows = [seg_indptr[g] + mb*BLOCK_M, +BLOCK_M) ∩ [.., seg_indptr[g+1])
            if rows empty or rb * BLOCK_R >= r: continue
            cols = [rb*BLOCK_R, (rb+1)*BLOCK_R) ∩ [0, r)
            h[rows, cols] (+)= tl.dot(x[rows, ks-th K range], a_stack[s, cols, ks-th K range].T)
        return h

    Tokens beyond max_seg_len into a segment are silently skipped: pass a true bound.
    """
    _require_triton()
    T, H_in, S, R = _check_shrink_args(x, a_stack, ranks)
    G = seg_slot.shape[0]
    _check_index(seg_slot, "seg_slot", None)
    _check_index(seg_indptr, "seg_indptr", G + 1)
    _check_same_device(x=x, a_stack=a_stack, seg_indptr=seg_indptr, seg_slot=seg_slot, ranks=ranks)
    assert G <= _MAX_GRID_YZ, f"too many segments: {G} > {_MAX_GRID_YZ}"
    h = torch.zeros(T, R, dtype=torch.float32, device=x.device)
    msl = _max_seg_len(seg_indptr, max_seg_len)
    if T == 0 or G == 0 or msl <= 0:
        return h
    block_r = block_r or min(max(_next_pow2(R), 16), SGMV_SHRINK_MAX_BLOCK_R)
    assert block_m >= 16 and block_r >= 16 and block_k >= 16, "tl.dot needs tiles >= 16"
    n_rb = _cdiv(R, block_r)
    n_mb = _cdiv(msl, block_m)
    if split_k is None:
        split_k = _split_k(n_mb * n_rb * G, H_in, block_k, SGMV_SHRINK_TARGET_PROGRAMS, SGMV_SHRINK_MAX_SPLIT_K)
    assert split_k >= 1 and n_rb * split_k <= _MAX_GRID_YZ
    k_per_split = _cdiv(_cdiv(H_in, split_k), block_k) * block_k
    grid = (n_mb, n_rb * split_k, G)
    with _device_ctx(x):
        _sgmv_shrink_kernel[grid](
            x, a_stack, seg_indptr, seg_slot, ranks, h,
            H_in, k_per_split,
            x.stride(0), a_stack.stride(0), a_stack.stride(1), h.stride(0),
            BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, SPLIT_K=split_k,
            FP32_IEEE=x.dtype == torch.float32,
            num_warps=num_warps,
        )  # fmt: skip
    return h


def triton_sgmv_expand(
    h: torch.Tensor,  # [T, R]            contiguous
    b_stack: torch.Tensor,  # [S, H_out, R] dense along R or H_out (a pool's rank-major bank)
    seg_indptr: torch.Tensor,  # [G+1]    int32
    seg_slot: torch.Tensor,  # [G]        int32, -1 = no adapter
    ranks: torch.Tensor,  # [S]            int32
    scaling: torch.Tensor,  # [S]          float32
    y: torch.Tensor,  # [T, H_out]         contiguous, updated in place
    max_seg_len: int | None = None,  # >= longest segment; None: computed (host sync)
    *,
    block_m: int = SGMV_EXPAND_BLOCK_M,
    block_n: int = SGMV_EXPAND_BLOCK_N,
    block_r: int = SGMV_EXPAND_BLOCK_R,
    num_warps: int = SGMV_EXPAND_NUM_WARPS,
) -> torch.Tensor:  # y
    """SGMV expand (Triton), in place on y; returns y. Grid (cdiv(max_seg_len, BLOCK_M), cdiv(H_out, BLOCK_N), G).

        for mb, nb, g in grid:                           # in parallel
            s = seg_slot[g]
            rows = [seg_indptr[g] + mb*BLOCK_M, +BLOCK_M) ∩ [.., seg_indptr[g+1])
            if s < 0 or rows empty: continue             # y untouched
            cols = [nb*BLOCK_N, (nb+1)*BLOCK_N) ∩ [0, H_out)
            acc = sum over k in range(0, ranks[s]) (BLOCK_R chunks) of
                  tl.dot(b_dtype(h[rows, k]), b_stack[s, cols, k].T)   # fp32 accumulate
            y[rows, cols] = y.dtype(float32(y[rows, cols]) + scaling[s] * acc)
    """
    _require_triton()
    T, H_out, S, R = _check_expand_args(h, b_stack, ranks, scaling, y)
    G = seg_slot.shape[0]
    _check_index(seg_slot, "seg_slot", None)
    _check_index(seg_indptr, "seg_indptr", G + 1)
    _check_same_device(h=h, b_stack=b_stack, seg_indptr=seg_indptr, seg_slot=seg_slot, ranks=ranks, scaling=scaling, y=y)
    assert G <= _MAX_GRID_YZ, f"too many segments: {G} > {_MAX_GRID_YZ}"
    msl = _max_seg_len(seg_indptr, max_seg_len)
    if T == 0 or G == 0 or msl <= 0:
        return y
    assert block_m >= 16 and block_n >= 16 and block_r >= 16, "tl.dot needs tiles >= 16"
    n_nb = _cdiv(H_out, block_n)
    assert n_nb <= _MAX_GRID_YZ
    grid = (_cdiv(msl, block_m), n_nb, G)
    with _device_ctx(y):
        _sgmv_expand_kernel[grid](
            h, b_stack, seg_indptr, seg_slot, ranks, scaling, y,
            H_out,
            h.stride(0), b_stack.stride(0), b_stack.stride(1), b_stack.stride(2), y.stride(0),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r,
            FP32_IEEE=b_stack.dtype == torch.float32,
            num_warps=num_warps,
        )  # fmt: skip
    return y


# ---------------------------------------------------------------------------------------------
# Public dispatching API


def lora_shrink(
    x: torch.Tensor,  # [T, H_in]
    a_stack: torch.Tensor,  # [S, R, H_in]
    token_slot: torch.Tensor,  # [T] int32, -1 = no adapter
    ranks: torch.Tensor,  # [S] int32
    *,
    slot_map: torch.Tensor | None = None,  # [S'+1] int32 or None
    out: torch.Tensor | None = None,  # [T, R] float32 zero-filled, or None
) -> torch.Tensor:  # h [T, R] float32
    """BGMV shrink: h[t, :r] = x[t] @ a_stack[s, :r].T (s = token_slot[t], r = ranks[s]);
    h is 0 elsewhere and for s == -1. With slot_map, s = slot_map[token_slot[t] + 1] (one
    launch instead of a gather first). With out, h is written there (it must be zero-filled).
    See reference_lora_shrink for the pseudo-code."""
    if use_triton(x, a_stack, token_slot, ranks):
        return triton_lora_shrink(x, a_stack, token_slot, ranks, slot_map=slot_map, out=out)
    return reference_lora_shrink(x, a_stack, token_slot, ranks, slot_map=slot_map, out=out)


def lora_expand(
    h: torch.Tensor,  # [T, R]
    b_stack: torch.Tensor,  # [S, H_out, R]
    token_slot: torch.Tensor,  # [T] int32, -1 = no adapter
    ranks: torch.Tensor,  # [S] int32
    scaling: torch.Tensor,  # [S] float32
    y: torch.Tensor,  # [T, H_out], updated in place
    *,
    slot_map: torch.Tensor | None = None,  # [S'+1] int32 or None
) -> torch.Tensor:  # y
    """BGMV expand, in place: y[t] += scaling[s] * h[t, :r] @ b_stack[s, :, :r].T; rows with
    s == -1 untouched; slot_map as in lora_shrink. See reference_lora_expand for the pseudo-code."""
    if use_triton(h, b_stack, token_slot, ranks, scaling, y):
        return triton_lora_expand(h, b_stack, token_slot, ranks, scaling, y, slot_map=slot_map)
    return reference_lora_expand(h, b_stack, token_slot, ranks, scaling, y, slot_map=slot_map)


def sgmv_shrink(
    x: torch.Tensor,  # [T, H_in]
    a_stack: torch.Tensor,  # [S, R, H_in]
    seg_indptr: torch.Tensor,  # [G+1] int32
    seg_slot: torch.Tensor,  # [G] int32, -1 = no adapter
    ranks: torch.Tensor,  # [S] int32
    max_seg_len: int | None = None,  # >= longest segment (avoids a host sync on CUDA)
) -> torch.Tensor:  # h [T, R] float32
    """SGMV shrink: for each segment g with slot s >= 0,
    h[lo:hi, :r] = x[lo:hi] @ a_stack[s, :r].T; 0 elsewhere. See reference_sgmv_shrink."""
    if use_triton(x, a_stack, seg_indptr, seg_slot, ranks):
        return triton_sgmv_shrink(x, a_stack, seg_indptr, seg_slot, ranks, max_seg_len)
    return reference_sgmv_shrink(x, a_stack, seg_indptr, seg_slot, ranks, max_seg_len)


def sgmv_expand(
    h: torch.Tensor,  # [T, R]
    b_stack: torch.Tensor,  # [S, H_out, R]
    seg_indptr: torch.Tensor,  # [G+1] int32
    seg_slot: torch.Tensor,  # [G] int32, -1 = no adapter
    ranks: torch.Tensor,  # [S] int32
    scaling: torch.Tensor,  # [S] float32
    y: torch.Tensor,  # [T, H_out], updated in place
    max_seg_len: int | None = None,  # >= longest segment (avoids a host sync on CUDA)
) -> torch.Tensor:  # y
    """SGMV expand, in place: for each segment g with slot s >= 0,
    y[lo:hi] += scaling[s] * h[lo:hi, :r] @ b_stack[s, :, :r].T. See reference_sgmv_expand."""
    if use_triton(h, b_stack, seg_indptr, seg_slot, ranks, scaling, y):
        return triton_sgmv_expand(h, b_stack, seg_indptr, seg_slot, ranks, scaling, y, max_seg_len)
    return reference_sgmv_expand(h, b_stack, seg_indptr, seg_slot, ranks, scaling, y, max_seg_len)


def apply_lora(
    x: torch.Tensor,  # [T, H_in]
    a_stack: torch.Tensor,  # [S, R, H_in]
    b_stack: torch.Tensor,  # [S, H_out, R]
    token_slot: torch.Tensor,  # [T] int32, -1 = no adapter
    ranks: torch.Tensor,  # [S] int32
    scaling: torch.Tensor,  # [S] float32
    y: torch.Tensor,  # [T, H_out], updated in place
) -> torch.Tensor:  # y
    """BGMV shrink + expand, in place: y[t] += scaling[s] * (x[t] @ A_s[:r].T) @ B_s[:, :r].T."""
    h = lora_shrink(x, a_stack, token_slot, ranks)
    return lora_expand(h, b_stack, token_slot, ranks, scaling, y)
