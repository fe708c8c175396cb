"""The LoRA expand of the fused q|k|v projection and the rotary + KV-cache write in one launch.

After the fused q|k|v matmul y [T, Nq + Nk + Nv] the decoder layer computes

    lora_group(x, token_slot, members, y)      # shrink (one launch) + expand into y (one launch)
    q_out = rope_kv(q, k, v, cos, sin, ...)    # q, k, v: column views of y

`group_expand_rope_kv` runs the expand and rope_kv in one launch, after `group_shrink`: the
grid is the group expand's (T x column blocks over all members, each adding its block's delta
into y in place); the last program of a row to finish (a self-resetting counter per row) runs
rope_kv's row body on it. Numerics are exactly those of the two kernels it replaces.
"""

from __future__ import annotations

import torch

from .fused import _rows, reference_rope_kv, triton_rope_kv
from .lora import BGMV_EXPAND_BLOCK_R, HAS_TRITON, _device_ctx, bgmv_expand_tile, reference_lora_expand, use_triton
from .lora_group import GroupMember, _check, expand_args, expand_blocks, triton_group_expand
from .pdl import pdl_kwargs, pdl_start

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .fused import _rope_kv_row
    from .lora_group import _group_expand_block

__all__ = ["group_expand_rope_kv", "reference_group_expand_rope_kv", "triton_group_expand_rope_kv"]

NUM_WARPS = 4  # the rotary row body needs more threads than the expand's 2-warp tile
ROPE_HEADS = 4  # heads per step of the rotary row (registers: the expand programs share the kernel)


def reference_group_expand_rope_kv(token_slot: torch.Tensor, members: list[GroupMember], y: torch.Tensor,
                                   widths: list[int], cos, sin, k_cache, v_cache, slot_mapping) -> torch.Tensor:
    """lora_expand of every member into y (in place), then rope_kv on y's q, k, v columns."""
    for m in members:
        reference_lora_expand(m.h, m.b, token_slot, m.ranks, m.scaling, y[:, m.col:m.col + m.b.shape[1]],
                              slot_map=m.slot_map)
    q, k, v = y.split(widths, dim=-1)
    return reference_rope_kv(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)


if HAS_TRITON:

    @triton.jit
    def _group_expand_rope_kernel(
        slot_ptr, y_ptr, h0, h1, h2, b0, b1, b2, m0, m1, m2, r0, r1, r2, s0, s1, s2, n0, n1, n2, c0, c1, c2,
        nb0, nb1, stride_ht, stride_bs0, stride_bs1, stride_bs2, stride_bn, stride_yt,
        qo_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, kv_slot_ptr, lock_ptr, NB, k_col, v_col, H, KVH, D, stride_cs,
        BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_KVH: tl.constexpr,
        BLOCK_D: tl.constexpr, PDL: tl.constexpr = False,
    ):
        pdl_start(PDL)
        t = tl.program_id(0)
        _group_expand_block(slot_ptr, y_ptr, h0, h1, h2, b0, b1, b2, m0, m1, m2, r0, r1, r2, s0, s1, s2, n0, n1, n2,
                            c0, c1, c2, nb0, nb1, stride_ht, stride_bs0, stride_bs1, stride_bs2, stride_bn, stride_yt,
                            t, tl.program_id(1), BLOCK_N, BLOCK_R)
        tl.debug_barrier()
        done = tl.atomic_add(lock_ptr + t, 1, sem="acq_rel", scope="gpu")
        if done == NB - 1:  # every column block of row t is in y: rotary and cache write
            _rope_kv_row(y_ptr, qo_ptr, y_ptr + k_col, y_ptr + v_col, cos_ptr, sin_ptr, kc_ptr, vc_ptr, kv_slot_ptr,
                         t.to(tl.int64), H, KVH, D, stride_yt, stride_yt, stride_yt, stride_cs,
                         BLOCK_H, BLOCK_KVH, BLOCK_D)
            tl.atomic_xchg(lock_ptr + t, 0)  # re-arm for the next launch


def triton_group_expand_rope_kv(token_slot: torch.Tensor, members: list[GroupMember], y: torch.Tensor,
                                widths: list[int], cos, sin, k_cache, v_cache, slot_mapping) -> torch.Tensor:
    from .nf4 import LOCKS_SIZE, _tile_locks

    T = y.shape[0]
    _rows(y, "y"), _rows(cos, "cos"), _rows(sin, "sin")
    assert len(widths) == 3 and sum(widths) == y.shape[1], "widths: q, k, v columns of y"
    for m in members:
        assert m.h.shape[0] == T and 0 <= m.col and m.col + m.b.shape[1] <= y.shape[1]
    D = cos.shape[1]
    assert D % 2 == 0 and sin.shape == cos.shape and sin.stride() == cos.stride()
    H, KVH = widths[0] // D, widths[1] // D
    assert widths[1] == widths[2] and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert tuple(k_cache.shape[1:]) == (KVH, D)
    if T > LOCKS_SIZE:  # more rows than counters (a long prefill): the two launches
        triton_group_expand(token_slot, members, y)
        return triton_rope_kv(*y.split(widths, dim=-1), cos, sin, k_cache, v_cache, slot_mapping)
    q_out = torch.empty((T, H * D), dtype=y.dtype, device=y.device)
    if T == 0:
        return q_out
    block_n = bgmv_expand_tile(members[0].b.shape[2])[0]
    nb = expand_blocks(members, block_n)
    with _device_ctx(y):
        _group_expand_rope_kernel[(T, nb)](
            token_slot, y, *expand_args(members, block_n), y.stride(0),
            q_out, cos, sin, k_cache, v_cache, slot_mapping, _tile_locks(y.device), nb, widths[0],
            widths[0] + widths[1], H, KVH, D, cos.stride(0),
            BLOCK_N=block_n, BLOCK_R=BGMV_EXPAND_BLOCK_R, BLOCK_H=min(triton.next_power_of_2(H), ROPE_HEADS),
            BLOCK_KVH=min(triton.next_power_of_2(KVH), ROPE_HEADS), BLOCK_D=triton.next_power_of_2(D),
            num_warps=NUM_WARPS,
            enable_fp_fusion=False, **pdl_kwargs(y))
    return q_out


def group_expand_rope_kv(x: torch.Tensor, token_slot: torch.Tensor, members: list[GroupMember], y: torch.Tensor,
                         widths: list[int], cos, sin, k_cache, v_cache, slot_mapping) -> torch.Tensor:
    """lora_group(x, token_slot, members, y) then rope_kv on y's q | k | v columns (widths),
    with the shrink already done (group_shrink filled every m.h); returns the rotated q and
    writes the cache rows. x is only checked against the members."""
    _check(x, token_slot, members, y)
    if use_triton(y, token_slot, cos, k_cache):
        return triton_group_expand_rope_kv(token_slot, members, y, widths, cos, sin, k_cache, v_cache, slot_mapping)
    return reference_group_expand_rope_kv(token_slot, members, y, widths, cos, sin, k_cache, v_cache, slot_mapping)
