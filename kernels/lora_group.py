"""Multi-LoRA over a fused projection group (q|k|v, gate|up) in two launches instead of 2 per member.

Contract: the members of a group share their input x [T, H_in] and write disjoint column ranges
of one output y [T, sum N] (the fused matmul's output). Member i has its own pool stack
(a [S, R, H_in], b [S, N_i, R], ranks, scaling), slot map and zero-filled shrink buffer
h [T, R] float32; all members' a stacks share shape and strides (same H_in, same pool R).

    lora_group(x, token_slot, members, y):
        for each member m (s = m.slot_map[token_slot[t] + 1], r = m.ranks[s]):
            m.h[t, :r] = x[t] @ m.a[s, :r].T
            y[t, m.col : m.col + N_m] += m.scaling[s] * m.h[t, :r] @ m.b[s, :, :r].T

exactly kernels/lora.py's lora_shrink + lora_expand per member (the reference runs those);
the Triton path runs one shrink launch over all members (grid axis 2 = member x K split) and one
expand launch whose column blocks span the members. Up to MAX_MEMBERS members.

The shrink half can also run inside the launch of the NF4 word kernel that computes y from the
same x (`shrink_plan` gives its programs; kernels/nf4_words.py): then
`lora_group(..., shrunk=True)` runs the expand only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .lora import (B_DENSE_DIMS, BGMV_EXPAND_BLOCK_R, BGMV_SHRINK_BLOCK_K, BGMV_SHRINK_MAX_BLOCK_R,
                   BGMV_SHRINK_MAX_SPLIT_K, BGMV_SHRINK_NUM_WARPS, BGMV_SHRINK_TARGET_PROGRAMS, HAS_TRITON, _cdiv,
                   _check_float, _device_ctx, _next_pow2, _split_k, bgmv_expand_tile, lora_expand, lora_shrink,
                   use_triton)
from .pdl import pdl_kwargs, pdl_start

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .lora import _bgmv_expand_body, _bgmv_shrink_body

__all__ = ["GroupMember", "ShrinkPlan", "check_members", "group_shrink", "lora_group", "reference_lora_group", "shrink_plan",
           "triton_lora_group", "MAX_MEMBERS"]

MAX_MEMBERS = 3
# Pools of rank <= FLAT_MAX_RANK: the BGMV loads wait for the token's slot only, not its rank
# (kernels/lora.py R_FLAT); a slot of lower rank reads the pool's rows and masks the rest. Larger
# pools keep the rank-bound loops, which read no row past a slot's rank, except the expand's
# first rank block (EARLY_FIRST: loaded as soon as the slot is known, the rest rank-bound).
# QUIVER_LORA_EARLY=0: the rank-bound loops everywhere.


def lora_early() -> bool:
    return os.environ.get("QUIVER_LORA_EARLY", "1") != "0"  # read at every launch

FLAT_MAX_RANK = 16


@dataclass
class GroupMember:
    a: torch.Tensor  # [S, R, H_in]
    b: torch.Tensor  # [S, N, R]
    ranks: torch.Tensor  # [S] int32
    scaling: torch.Tensor  # [S] float32
    slot_map: torch.Tensor  # [S'+1] int32
    h: torch.Tensor  # [T, R] float32, zero-filled
    col: int  # first column of this member in y


def reference_lora_group(x: torch.Tensor, token_slot: torch.Tensor, members: list[GroupMember],
                         y: torch.Tensor) -> torch.Tensor:
    for m in members:
        n = m.b.shape[1]
        h = lora_shrink(x, m.a, token_slot, m.ranks, slot_map=m.slot_map, out=m.h)
        lora_expand(h, m.b, token_slot, m.ranks, m.scaling, y[:, m.col:m.col + n], slot_map=m.slot_map)
    return y


if HAS_TRITON:

    @triton.jit
    def _pick(i, v0, v1, v2):
        return tl.where(i == 0, v0, tl.where(i == 1, v1, v2))

    @triton.jit
    def _group_shrink_program(x_ptr, slot_ptr, a0, a1, a2, m0, m1, m2, r0, r1, r2, h0, h1, h2, pid_t, pid_r, pid_z,
                              H_in, K_PER_SPLIT, stride_xt, stride_as, stride_ar, stride_ht,
                              BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                              R_FLAT: tl.constexpr):
        """One shrink program: token pid_t, rank block pid_r, member x K split pid_z (also run
        by the NF4 word kernel's extra programs, kernels/nf4_words.py)."""
        g = pid_z // SPLIT_K
        _bgmv_shrink_body(x_ptr, _pick(g, a0, a1, a2), slot_ptr, _pick(g, m0, m1, m2), _pick(g, r0, r1, r2),
                          _pick(g, h0, h1, h2), pid_t, pid_r, pid_z % SPLIT_K, H_in,
                          K_PER_SPLIT, stride_xt, stride_as, stride_ar, stride_ht, BLOCK_R, BLOCK_K, SPLIT_K, True,
                          R_FLAT)

    @triton.jit
    def _group_shrink_kernel(x_ptr, slot_ptr, a0, a1, a2, m0, m1, m2, r0, r1, r2, h0, h1, h2, H_in, K_PER_SPLIT,
                             stride_xt, stride_as, stride_ar, stride_ht,
                             BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                             R_FLAT: tl.constexpr = 0, PDL: tl.constexpr = False):
        pdl_start(PDL)
        _group_shrink_program(x_ptr, slot_ptr, a0, a1, a2, m0, m1, m2, r0, r1, r2, h0, h1, h2, tl.program_id(0),
                              tl.program_id(1), tl.program_id(2), H_in, K_PER_SPLIT, stride_xt, stride_as, stride_ar,
                              stride_ht, BLOCK_R, BLOCK_K, SPLIT_K, R_FLAT)

    @triton.jit
    def _group_expand_kernel(slot_ptr, y_ptr, h0, h1, h2, b0, b1, b2, m0, m1, m2, r0, r1, r2, s0, s1, s2,
                             n0, n1, n2, c0, c1, c2, nb0, nb1, stride_ht, stride_bs0, stride_bs1, stride_bs2,
                             stride_bn, stride_br0, stride_br1, stride_br2, stride_yt,
                             BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                             R_FLAT: tl.constexpr = 0, EARLY_FIRST: tl.constexpr = False,
                             PDL: tl.constexpr = False):
        pdl_start(PDL)
        pid_n = tl.program_id(1)
        g = (pid_n >= nb0).to(tl.int32) + (pid_n >= nb0 + nb1).to(tl.int32)
        first = _pick(g, 0, nb0, nb0 + nb1)
        col = _pick(g, c0, c1, c2)
        _bgmv_expand_body(_pick(g, h0, h1, h2), _pick(g, b0, b1, b2), slot_ptr, _pick(g, m0, m1, m2),
                          _pick(g, r0, r1, r2), _pick(g, s0, s1, s2), y_ptr + col, tl.program_id(0), pid_n - first,
                          _pick(g, n0, n1, n2), stride_ht, _pick(g, stride_bs0, stride_bs1, stride_bs2), stride_bn,
                          _pick(g, stride_br0, stride_br1, stride_br2), stride_yt, BLOCK_N, BLOCK_R, True, R_FLAT,
                          EARLY_FIRST)


    @triton.jit
    def _group_expand_rows_kernel(slot_ptr, y_ptr, h0, h1, h2, b0, b1, b2, m0, m1, m2, r0, r1, r2, s0, s1, s2,
                                  n0, n1, n2, c0, c1, c2, nb0, nb1, T, R, stride_ht, stride_bs0, stride_bs1,
                                  stride_bs2, stride_bn, stride_br0, stride_br1, stride_br2, stride_yt,
                                  BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                                  PDL: tl.constexpr = False):
        """The group expand over BLOCK_T tokens x BLOCK_N outputs per program, the whole pool
        rank (R <= BLOCK_R) at once: the tokens' B rows are one [BLOCK_T, BLOCK_N, BLOCK_R]
        load, which waits only for the slots (the slot's rank masks the products); y and h are
        loaded before the slots are known."""
        pdl_start(PDL)
        pid_n = tl.program_id(1)
        g = (pid_n >= nb0).to(tl.int32) + (pid_n >= nb0 + nb1).to(tl.int32)
        h_ptr, b_ptr, map_ptr = _pick(g, h0, h1, h2), _pick(g, b0, b1, b2), _pick(g, m0, m1, m2)
        H_out = _pick(g, n0, n1, n2)
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        n = (pid_n - _pick(g, 0, nb0, nb0 + nb1)) * BLOCK_N + tl.arange(0, BLOCK_N)
        r = tl.arange(0, BLOCK_R)
        t_mask = t < T
        tn_mask = t_mask[:, None] & (n < H_out)[None, :]
        y_rows = y_ptr + _pick(g, c0, c1, c2) + t.to(tl.int64)[:, None] * stride_yt + n[None, :]
        yv = tl.load(y_rows, mask=tn_mask, other=0.0).to(tl.float32)
        hv = tl.load(h_ptr + t.to(tl.int64)[:, None] * stride_ht + r[None, :],
                     mask=t_mask[:, None] & (r < R)[None, :], other=0.0)
        slot = tl.load(map_ptr + tl.load(slot_ptr + t, mask=t_mask, other=-1) + 1, mask=t_mask, other=-1)
        has = slot >= 0
        sc = tl.maximum(slot, 0).to(tl.int64)
        b_rows = b_ptr + sc[:, None, None] * _pick(g, stride_bs0, stride_bs1, stride_bs2) \
            + n.to(tl.int64)[None, :, None] * stride_bn + r[None, None, :] * _pick(g, stride_br0, stride_br1, stride_br2)
        bv = tl.load(b_rows, mask=(tn_mask & has[:, None])[:, :, None] & (r < R)[None, None, :], other=0.0)
        rank = tl.load(_pick(g, r0, r1, r2) + sc, mask=has, other=0)
        scale = tl.load(_pick(g, s0, s1, s2) + sc, mask=has, other=0.0)
        prod = tl.where((r[None, :] < rank[:, None])[:, None, :], bv.to(tl.float32) * hv[:, None, :], 0.0)
        acc = tl.sum(prod, axis=2)  # [BLOCK_T, BLOCK_N]
        tl.store(y_rows, (yv + scale[:, None] * acc).to(y_ptr.dtype.element_ty), mask=tn_mask & has[:, None])


def check_members(x, token_slot, members, y=None) -> None:
    """The layout the group kernels assume (y: the expand's output, when there is one)."""
    assert 1 <= len(members) <= MAX_MEMBERS, f"1 to {MAX_MEMBERS} members"
    T = x.shape[0]
    a0 = members[0].a
    for m in members:
        assert m.a.shape == a0.shape and m.a.stride() == a0.stride() and m.a.dtype == x.dtype, "a stacks differ"
        _check_float(m.a, "a", 3)
        # B's rank stride may differ (a rank-major bank's is its width); the output stride may not
        assert m.b.shape[2] == a0.shape[1] and m.b.stride(1) == members[0].b.stride(1), "b stacks differ"
        _check_float(m.b, "b", 3, B_DENSE_DIMS)
        assert m.h.shape == (T, a0.shape[1]) and m.h.dtype == torch.float32 and m.h.stride() == members[0].h.stride()
        assert y is None or (0 <= m.col and m.col + m.b.shape[1] <= y.shape[1])
    assert x.stride(-1) == 1 and (y is None or y.stride(-1) == 1), "rows must be unit-stride"
    assert token_slot.dtype == torch.int32 and token_slot.shape == (T,)


@dataclass
class ShrinkPlan:
    """The group shrink's launch: grid (T, n_rb, split_k * G) of programs, its arguments in
    `_group_shrink_program`'s order (x and token_slot first) and its block sizes."""
    T: int
    n_rb: int
    split_k: int
    G: int
    args: tuple
    block_r: int
    block_k: int
    r_flat: int  # the pool rank where the loads need not wait for the rank (_flat), else 0

    @property
    def programs(self) -> int:
        return self.T * self.n_rb * self.split_k * self.G


def shrink_plan(x: torch.Tensor, token_slot: torch.Tensor, members: list[GroupMember], *,
                block_k: int = BGMV_SHRINK_BLOCK_K, max_block_r: int = BGMV_SHRINK_MAX_BLOCK_R,
                target: int = BGMV_SHRINK_TARGET_PROGRAMS) -> ShrinkPlan:
    T, H_in = x.shape
    ms = members + [members[0]] * (MAX_MEMBERS - len(members))  # padding members are never picked
    G = len(members)
    R = members[0].a.shape[1]
    block_r = min(_next_pow2(R), max_block_r)
    n_rb = _cdiv(R, block_r)
    split_k = _split_k(T * n_rb * G, H_in, block_k, target, BGMV_SHRINK_MAX_SPLIT_K)
    k_per_split = _cdiv(_cdiv(H_in, split_k), block_k) * block_k
    a = members[0].a
    args = (x, token_slot, *[m.a for m in ms], *[m.slot_map for m in ms], *[m.ranks for m in ms],
            *[m.h for m in ms], H_in, k_per_split, x.stride(0), a.stride(0), a.stride(1), members[0].h.stride(0))
    return ShrinkPlan(T, n_rb, split_k, G, args, block_r, block_k, _flat(R, block_r))


def _flat(R: int, block_r: int) -> int:
    """R_FLAT of a pool of rank R whose kernel takes rank blocks of block_r: R, or 0 (rank-bound)."""
    return R if R <= min(block_r, FLAT_MAX_RANK) and lora_early() else 0


def triton_group_shrink(x: torch.Tensor, token_slot: torch.Tensor, members: list[GroupMember], *,
                        block_k: int = BGMV_SHRINK_BLOCK_K, max_block_r: int = BGMV_SHRINK_MAX_BLOCK_R,
                        target: int = BGMV_SHRINK_TARGET_PROGRAMS, num_warps: int = BGMV_SHRINK_NUM_WARPS) -> None:
    """Every member's h (+)= x A^T in one launch."""
    check_members(x, token_slot, members)
    plan = shrink_plan(x, token_slot, members, block_k=block_k, max_block_r=max_block_r, target=target)
    with _device_ctx(x):
        _group_shrink_kernel[(plan.T, plan.n_rb, plan.split_k * plan.G)](
            *plan.args, BLOCK_R=plan.block_r, BLOCK_K=plan.block_k, SPLIT_K=plan.split_k, R_FLAT=plan.r_flat,
            num_warps=num_warps, **pdl_kwargs(x))


def expand_rows() -> int:
    """Tokens per program of the group expand (QUIVER_EXPAND_ROWS, read at every launch; 1: one
    token per program, the rank-bound kernel); pools of rank above EXPAND_ROWS_MAX_RANK take 1."""
    return int(os.environ.get("QUIVER_EXPAND_ROWS", EXPAND_ROWS))


EXPAND_ROWS = 1
EXPAND_ROWS_MAX_RANK = 64
EXPAND_ROWS_ELEMENTS = 8192  # B elements per program (BLOCK_T x BLOCK_N x BLOCK_R)
EXPAND_ROWS_WARPS = 2


def triton_group_expand(token_slot: torch.Tensor, members: list[GroupMember], y: torch.Tensor, *,
                        block_n: int | None = None, block_r: int = BGMV_EXPAND_BLOCK_R,
                        num_warps: int | None = None, rows: int | None = None) -> None:
    """y[:, member columns] += scaling * h B^T for every member, in one launch. rows: tokens
    per program (expand_rows()); above 1, `_group_expand_rows_kernel`."""
    ms = members + [members[0]] * (MAX_MEMBERS - len(members))
    T, G, R = y.shape[0], len(members), members[0].a.shape[1]
    rows = expand_rows() if rows is None else rows
    if rows > 1 and R <= EXPAND_ROWS_MAX_RANK:
        br = max(16, _next_pow2(R))
        bn = block_n or 128
        bt = max(1, min(rows, _next_pow2(T), EXPAND_ROWS_ELEMENTS // (bn * br)))
        nbs = [_cdiv(m.b.shape[1], bn) for m in ms]
        with _device_ctx(y):
            _group_expand_rows_kernel[(_cdiv(T, bt), sum(nbs[:G]))](
                token_slot, y, *[m.h for m in ms], *[m.b for m in ms], *[m.slot_map for m in ms],
                *[m.ranks for m in ms], *[m.scaling for m in ms], *[m.b.shape[1] for m in ms], *[m.col for m in ms],
                nbs[0], nbs[1], T, R, members[0].h.stride(0), *[m.b.stride(0) for m in ms], members[0].b.stride(1),
                *[m.b.stride(2) for m in ms], y.stride(0),
                BLOCK_T=bt, BLOCK_N=bn, BLOCK_R=br, num_warps=num_warps or EXPAND_ROWS_WARPS, **pdl_kwargs(y))
        return
    tile_n, tile_warps = bgmv_expand_tile(R)
    block_n, num_warps = block_n or tile_n, num_warps or tile_warps
    nbs = [_cdiv(m.b.shape[1], block_n) for m in ms]
    with _device_ctx(y):
        _group_expand_kernel[(T, sum(nbs[:G]))](
            token_slot, y, *[m.h for m in ms], *[m.b for m in ms], *[m.slot_map for m in ms], *[m.ranks for m in ms],
            *[m.scaling for m in ms], *[m.b.shape[1] for m in ms], *[m.col for m in ms], nbs[0], nbs[1],
            members[0].h.stride(0), *[m.b.stride(0) for m in ms], members[0].b.stride(1),
            *[m.b.stride(2) for m in ms], y.stride(0),
            BLOCK_N=block_n, BLOCK_R=block_r, R_FLAT=_flat(R, block_r), EARLY_FIRST=R > block_r and lora_early(),
            num_warps=num_warps, **pdl_kwargs(y))


def triton_lora_group(x: torch.Tensor, token_slot: torch.Tensor, members: list[GroupMember],
                      y: torch.Tensor, *, shrunk: bool = False, shrink_block_k: int = BGMV_SHRINK_BLOCK_K,
                      shrink_max_block_r: int = BGMV_SHRINK_MAX_BLOCK_R,
                      shrink_target: int = BGMV_SHRINK_TARGET_PROGRAMS,
                      shrink_num_warps: int = BGMV_SHRINK_NUM_WARPS, expand_block_n: int | None = None,
                      expand_block_r: int = BGMV_EXPAND_BLOCK_R,
                      expand_num_warps: int | None = None) -> torch.Tensor:
    """Keyword arguments are tuning knobs (kernels/bench_lora_group.py sweeps them); the
    defaults are kernels/lora.py's BGMV constants and bgmv_expand_tile(pool rank). shrunk:
    the members' h already hold x A^T (the NF4 word kernel ran the shrink), expand only."""
    check_members(x, token_slot, members, y)
    if x.shape[0] == 0:
        return y
    if not shrunk:
        triton_group_shrink(x, token_slot, members, block_k=shrink_block_k, max_block_r=shrink_max_block_r,
                            target=shrink_target, num_warps=shrink_num_warps)
    triton_group_expand(token_slot, members, y, block_n=expand_block_n, block_r=expand_block_r,
                        num_warps=expand_num_warps)
    return y


def group_shrink(x: torch.Tensor, token_slot: torch.Tensor, members: list[GroupMember]) -> None:
    """The shrink half of lora_group: every member's h (+)= x A^T (h zero-filled before)."""
    if x.shape[0] == 0:
        return
    x = x.contiguous()  # the kernels take unit-stride rows
    if use_triton(x, token_slot):
        triton_group_shrink(x, token_slot, members)
    else:
        for m in members:
            lora_shrink(x, m.a, token_slot, m.ranks, slot_map=m.slot_map, out=m.h)


def lora_group(x: torch.Tensor, token_slot: torch.Tensor, members: list[GroupMember], y: torch.Tensor,
               shrunk: bool = False) -> torch.Tensor:
    """See the module docstring; Triton for CUDA tensors (or QUIVER_FORCE_TRITON=1), else the
    reference. shrunk: the members' h already hold x A^T (group_shrink or the NF4 word kernel)."""
    if use_triton(x, token_slot, y):
        return triton_lora_group(x, token_slot, members, y, shrunk=shrunk)
    if not shrunk:
        return reference_lora_group(x, token_slot, members, y)
    for m in members:
        lora_expand(m.h, m.b, token_slot, m.ranks, m.scaling, y[:, m.col:m.col + m.b.shape[1]], slot_map=m.slot_map)
    return y
