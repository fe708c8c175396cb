"""LoRA expand, residual add and RMSNorm of one projection's output in one kernel.

After the attention output projection the decoder layer computes

    y1 = lora_expand(h, B, token_slot, ranks, scaling, y)   # y += scaling[s] * h[:, :r] @ B[s, :, :r].T
    out, total = add_rms_norm(y1, residual, weight, eps)     # total = y1 + residual; out = norm(total)

`lora_add_rms_norm` does both in one launch, one program per token row (the BGMV expand is
otherwise a launch of its own, T x H/128 programs). Numerics are those of the two kernels it
replaces: the delta is summed in float32 over BLOCK_R chunks of the rank and rounded into y's
dtype with y, then the residual add rounds again and the norm reduces in float32 (the order of
the norm's float32 sum differs: ~1 ulp before the rounding to the activation dtype).

Grid (T, N / BLOCK_C): each program adds the delta and the residual to one column chunk, writes
total (the residual stream the layer returns) and its chunk's sum of squares; the last program
of a row to finish (a self-resetting counter per row) sums the partial squares in chunk order
and writes the normalized row. split=False runs one program per row over all chunks instead.
"""

from __future__ import annotations

import torch

from .fused import _rows, reference_add_rms_norm
from .lora import (HAS_TRITON, _check_expand_args, _check_index, _check_same_device, _device_ctx, _require_triton,
                   reference_lora_expand, use_triton)
from .pdl import pdl_kwargs, pdl_start

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["lora_add_rms_norm", "reference_lora_add_rms_norm", "triton_lora_add_rms_norm"]

BLOCK_C = 512  # columns per chunk
BLOCK_R = 16  # rank per inner step (as the BGMV expand's default)
NUM_WARPS = 4
SPLIT = True  # grid (T, N / BLOCK_C), the last program of a row normalizes it; False: one program per row


def reference_lora_add_rms_norm(h, b_stack, token_slot, ranks, scaling, y, residual, weight, eps, *, slot_map=None):
    """(norm(y1 + residual), y1 + residual) with y1 = lora_expand(h, ..., y.clone()) (y is not modified)."""
    y1 = reference_lora_expand(h, b_stack, token_slot, ranks, scaling, y.clone(), slot_map=slot_map)
    return reference_add_rms_norm(y1, residual, weight, eps)


if HAS_TRITON:
    from .lora import _token_rank

    @triton.jit
    def _chunk_total(y_ptr, r_ptr, total_ptr, h_row, b_slot, cols, mask, rank, scale, stride_bn,
                     BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
        """total[cols] = dtype(dtype(y + scale * h[:rank] @ B[cols, :rank].T) + r), stored; returned
        as float32 (y, r, total: pointers to the row's first column; b_slot: the slot's B)."""
        acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        b_rows = b_slot + cols[:, None].to(tl.int64) * stride_bn
        r_offs = tl.arange(0, BLOCK_R)
        for k in range(0, rank, BLOCK_R):  # 0 iterations for a row without this adapter
            rr = k + r_offs
            rk_mask = rr < rank
            hv = tl.load(h_row + rr, mask=rk_mask, other=0.0).to(tl.float32)
            bv = tl.load(b_rows + rr[None, :], mask=mask[:, None] & rk_mask[None, :], other=0.0)
            acc += tl.sum(bv.to(tl.float32) * hv[None, :], axis=1)
        ty = y_ptr.dtype.element_ty
        y = tl.load(y_ptr + cols, mask=mask, other=0.0)
        y = tl.where(rank > 0, (y.to(tl.float32) + scale * acc).to(ty), y)
        r = tl.load(r_ptr + cols, mask=mask, other=0.0)
        x = (y.to(tl.float32) + r.to(tl.float32)).to(ty)
        tl.store(total_ptr + cols, x, mask=mask)
        return x.to(tl.float32)

    @triton.jit
    def _norm_row(total_ptr, w_ptr, out_ptr, N, rstd, BLOCK_C: tl.constexpr):
        """out = w * dtype(total * rstd) over the row (total, out: pointers to its first column)."""
        for c0 in range(0, N, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            mask = cols < N
            x = tl.load(total_ptr + cols, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
            hn = (x * rstd).to(total_ptr.dtype.element_ty).to(tl.float32)
            w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + cols, (w * hn).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _lora_add_rms_norm_kernel(
        y_ptr, r_ptr, w_ptr, out_ptr, total_ptr,  # [T, N] rows; weight [N]
        h_ptr,  # [T, R] shrink output
        b_ptr,  # [S, N, R]
        slot_ptr, map_ptr, rank_ptr, scale_ptr,
        N, stride_y, stride_r, stride_o, stride_t, stride_ht, stride_bs, stride_bn, eps,
        BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, HAS_MAP: tl.constexpr, PDL: tl.constexpr = False,
    ):
        # one program per row: every chunk, then the norm
        pdl_start(PDL)
        t = tl.program_id(0)
        row = t.to(tl.int64)
        slot_c, rank = _token_rank(slot_ptr, map_ptr, rank_ptr, t, HAS_MAP)
        scale = tl.load(scale_ptr + slot_c)
        ss = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for c0 in range(0, N, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            xf = _chunk_total(y_ptr + row * stride_y, r_ptr + row * stride_r, total_ptr + row * stride_t,
                              h_ptr + row * stride_ht, b_ptr + slot_c * stride_bs, cols, cols < N, rank, scale,
                              stride_bn, BLOCK_C, BLOCK_R)
            ss += xf * xf
        rstd = 1.0 / tl.sqrt(tl.sum(ss, axis=0) / N + eps)
        tl.debug_barrier()  # the norm reads back what every thread of the program wrote
        _norm_row(total_ptr + row * stride_t, w_ptr, out_ptr + row * stride_o, N, rstd, BLOCK_C)

    @triton.jit
    def _lora_add_rms_norm_split_kernel(
        y_ptr, r_ptr, w_ptr, out_ptr, total_ptr, h_ptr, b_ptr, slot_ptr, map_ptr, rank_ptr, scale_ptr,
        ss_ptr,  # [T, C] float32 partial sums of squares
        lock_ptr,  # zeroed int32 row counters (self-resetting)
        N, C, stride_y, stride_r, stride_o, stride_t, stride_ht, stride_bs, stride_bn, eps,
        C_POW2: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, HAS_MAP: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        # grid (T, C): program (t, c) does chunk c of row t; the last program of a row to finish
        # sums the C partial squares in chunk order and normalizes the row
        pdl_start(PDL)
        t = tl.program_id(0)
        c = tl.program_id(1)
        row = t.to(tl.int64)
        slot_c, rank = _token_rank(slot_ptr, map_ptr, rank_ptr, t, HAS_MAP)
        scale = tl.load(scale_ptr + slot_c)
        cols = c * BLOCK_C + tl.arange(0, BLOCK_C)
        xf = _chunk_total(y_ptr + row * stride_y, r_ptr + row * stride_r, total_ptr + row * stride_t,
                          h_ptr + row * stride_ht, b_ptr + slot_c * stride_bs, cols, cols < N, rank, scale,
                          stride_bn, BLOCK_C, BLOCK_R)
        tl.store(ss_ptr + row * C + c, tl.sum(xf * xf, axis=0))
        tl.debug_barrier()
        done = tl.atomic_add(lock_ptr + t, 1, sem="acq_rel", scope="gpu")
        if done == C - 1:
            offs_c = tl.arange(0, C_POW2)
            parts = tl.load(ss_ptr + row * C + offs_c, mask=offs_c < C, other=0.0, cache_modifier=".cg")
            rstd = 1.0 / tl.sqrt(tl.sum(parts, axis=0) / N + eps)
            _norm_row(total_ptr + row * stride_t, w_ptr, out_ptr + row * stride_o, N, rstd, BLOCK_C)
            tl.atomic_xchg(lock_ptr + t, 0)  # re-arm for the next launch


def triton_lora_add_rms_norm(h, b_stack, token_slot, ranks, scaling, y, residual, weight, eps, *, slot_map=None,
                             block_c: int = BLOCK_C, num_warps: int = NUM_WARPS, split: bool = SPLIT):
    _require_triton()
    T, N, S, R = _check_expand_args(h, b_stack, ranks, scaling, y)
    _check_index(token_slot, "token_slot", T)
    _check_same_device(h=h, b_stack=b_stack, token_slot=token_slot, ranks=ranks, scaling=scaling, y=y,
                       residual=residual, weight=weight)
    _rows(y, "y"), _rows(residual, "residual")
    assert tuple(residual.shape) == (T, N) and tuple(weight.shape) == (N,), "residual [T, N] and weight [N]"
    out = torch.empty((T, N), dtype=y.dtype, device=y.device)
    total = torch.empty_like(out)
    from .nf4 import LOCKS_SIZE, _tile_locks

    C = triton.cdiv(N, block_c)
    if T and split and C > 1 and T <= LOCKS_SIZE:  # (more rows than counters: one program per row)
        ss = torch.empty((T, C), dtype=torch.float32, device=y.device)
        with _device_ctx(y):
            _lora_add_rms_norm_split_kernel[(T, C)](
                y, residual, weight, out, total, h, b_stack, token_slot,
                token_slot if slot_map is None else slot_map, ranks, scaling, ss, _tile_locks(y.device),
                N, C, y.stride(0), residual.stride(0), out.stride(0), total.stride(0), h.stride(0),
                b_stack.stride(0), b_stack.stride(1), float(eps),
                C_POW2=triton.next_power_of_2(C), BLOCK_C=block_c, BLOCK_R=BLOCK_R, HAS_MAP=slot_map is not None, num_warps=num_warps,
                enable_fp_fusion=False, **pdl_kwargs(y))
    elif T:
        with _device_ctx(y):
            _lora_add_rms_norm_kernel[(T,)](
                y, residual, weight, out, total, h, b_stack, token_slot,
                token_slot if slot_map is None else slot_map, ranks, scaling,
                N, y.stride(0), residual.stride(0), out.stride(0), total.stride(0), h.stride(0),
                b_stack.stride(0), b_stack.stride(1), float(eps),
                BLOCK_C=block_c, BLOCK_R=BLOCK_R, HAS_MAP=slot_map is not None, num_warps=num_warps,
                enable_fp_fusion=False, **pdl_kwargs(y))
    return out, total


def lora_add_rms_norm(h: torch.Tensor, b_stack: torch.Tensor, token_slot: torch.Tensor, ranks: torch.Tensor,
                      scaling: torch.Tensor, y: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                      eps: float, *, slot_map: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(y1 + residual) * weight, y1 + residual), y1 = y + the LoRA delta (lora_expand);
    y itself is not modified."""
    if use_triton(h, b_stack, token_slot, ranks, scaling, y, residual, weight):
        return triton_lora_add_rms_norm(h, b_stack, token_slot, ranks, scaling, y, residual, weight, eps,
                                        slot_map=slot_map)
    return reference_lora_add_rms_norm(h, b_stack, token_slot, ranks, scaling, y, residual, weight, eps,
                                       slot_map=slot_map)
