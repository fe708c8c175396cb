"""Tests of quiver.kernels (batched multi-LoRA BGMV/SGMV and per-slot vector ops).

Contract checked here:
  * every reference_* matches a naive per-token loop of plain torch matmuls (and a hand-made
    integer case), so the spec itself is verified;
  * every triton_* matches its reference on awkward shapes: rank 1, mixed ranks inside one
    batch, H not a power of two, slot -1 tokens, empty segments, T = 1, T = 0;
  * padding rows/cols beyond a slot's rank are never read (they hold NaN here);
  * rows with slot -1 are left bit-for-bit untouched by the in-place ops.
On CPU the Triton kernels run under TRITON_INTERPRET=1 at small shapes; tests marked ``gpu``
run at real shapes (H 4096, R 16/64, 32 slots, bf16) on a CUDA device.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import triton_runnable

CUDA = torch.cuda.is_available()
if not CUDA:  # must happen before triton is imported (kernels are decorated at import time)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import quiver.kernels as K  # noqa: E402
from quiver.kernels import lora as L  # noqa: E402
from quiver.kernels import scale as SC  # noqa: E402


_TRITON_OK, _TRITON_WHY = triton_runnable(L.HAS_TRITON, L._bgmv_shrink_kernel)
needs_triton = pytest.mark.skipif(not _TRITON_OK, reason=_TRITON_WHY)
DEV = "cuda" if CUDA else "cpu"

# (atol, rtol) per output dtype; values are O(1) by construction (see make_pool).
TOL = {
    torch.float32: (2e-4, 2e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (4e-2, 3e-2),
}

# The Triton interpreter computes bf16 tl.dot wrongly (numpy has no bf16; checked with triton
# 3.9: a 16x16 bf16 tl.dot returns ~1e10). BGMV uses no tl.dot, SGMV does: bf16 SGMV runs on GPU only.
CPU_DTYPES_BGMV = [torch.float32, torch.float16, torch.bfloat16]
CPU_DTYPES_SGMV = [torch.float32, torch.float16]


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    atol, rtol = TOL[dtype]
    out32, ref32 = out.float(), ref.float()
    assert out32.shape == ref32.shape, f"{what}: shape {tuple(out32.shape)} != {tuple(ref32.shape)}"
    assert torch.isfinite(out32).all(), f"{what}: non-finite values (padding was read?)"
    diff = (out32 - ref32).abs()
    bound = atol + rtol * ref32.abs()
    bad = diff > bound
    assert not bad.any(), (
        f"{what} [{dtype}]: max abs diff {diff.max().item():.3e} (tol atol={atol}, rtol={rtol}), "
        f"{int(bad.sum())}/{bad.numel()} elements out of tolerance"
    )


def rank_major(b: torch.Tensor) -> torch.Tensor:
    """The same B stack [S, H_out, R] stored rank-major, as the adapter pool's banks store it."""
    return b.transpose(1, 2).contiguous().transpose(1, 2)


def in_larger_pool(a: torch.Tensor, extra: int = 8) -> torch.Tensor:
    """The same A stack [S, R, H_in] as a view of the first R ranks of a larger stack (NaN past R)."""
    big = torch.full((a.shape[0], a.shape[1] + extra, a.shape[2]), float("nan"), dtype=a.dtype, device=a.device)
    big[:, :a.shape[1]] = a
    return big[:, :a.shape[1]]


def make_pool(ranks, H_in, H_out, dtype, device=DEV, R=None, seed=0):
    """Adapter pool with NaN padding beyond each slot's rank (kernels must never read it)."""
    g = torch.Generator().manual_seed(seed)
    S = len(ranks)
    R = R or max(ranks)
    a = torch.randn(S, R, H_in, generator=g) / H_in**0.5
    b = torch.randn(S, H_out, R, generator=g) / R**0.5
    for s, r in enumerate(ranks):
        a[s, r:] = float("nan")
        b[s, :, r:] = float("nan")
    scaling = torch.rand(S, generator=g) + 0.5
    return (
        a.to(dtype).to(device),
        b.to(dtype).to(device),
        torch.tensor(ranks, dtype=torch.int32, device=device),
        scaling.to(device),
    )


def make_x(T, H, dtype, device=DEV, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, H, generator=g).to(dtype).to(device)


def make_h(T, R, token_ranks, device=DEV, seed=2):
    """h [T, R] fp32 with NaN beyond each token's rank (expand must ignore it)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, R, generator=g)
    for t, r in enumerate(token_ranks):
        h[t, r:] = float("nan")
    return h.to(device)


def slots_t(slots, device=DEV):
    return torch.tensor(slots, dtype=torch.int32, device=device)


def token_ranks(slots, ranks, R):
    return [ranks[s] if s >= 0 else R for s in slots]


def slots_of_segments(seg_indptr, seg_slot, T):
    out = [-1] * T
    ip = seg_indptr.tolist()
    for g, s in enumerate(seg_slot.tolist()):
        for t in range(ip[g], ip[g + 1]):
            out[t] = s
    return out


# ---- naive per-token loops (plain torch matmuls): the check of the references ----------------


def naive_shrink(x, a, slots, ranks):
    T, R = x.shape[0], a.shape[1]
    h = torch.zeros(T, R, dtype=torch.float32, device=x.device)
    for t in range(T):
        s = int(slots[t])
        if s < 0:
            continue
        r = int(ranks[s])
        h[t, :r] = torch.matmul(a[s, :r].float(), x[t].float())
    return h


def naive_expand(h, b, slots, ranks, scaling, y):
    y = y.clone()
    for t in range(y.shape[0]):
        s = int(slots[t])
        if s < 0:
            continue
        r = int(ranks[s])
        delta = torch.matmul(b[s, :, :r].float(), h[t, :r].float()) * float(scaling[s])
        y[t] = (y[t].float() + delta).to(y.dtype)
    return y


# ---- cases --------------------------------------------------------------------------------------

# (id, pool ranks, R (pool max rank), token slots, H_in, H_out)
BGMV_CASES = [
    ("rank1_T1", [1], 1, [0], 49, 97),
    ("mixed_ranks", [1, 8, 16, 5], 16, [0, 1, 1, -1, 2, 3, 3, 3, -1], 49, 97),
    ("mixed_noslot_first", [4, 2, 16], 16, [-1, 2, 0, 1, 2, 2, -1, 0], 97, 49),
    ("all_noslot", [3, 16], 16, [-1, -1, -1], 49, 33),
    ("padded_R", [1, 5], 32, [1, 0, 1], 97, 97),
]

# (id, pool ranks, token count, segments as (length, slot) list, H_in, H_out)
SGMV_CASES = [
    ("T1", [8], 1, [(1, 0)], 49, 97),
    ("mixed_empty_noslot", [1, 8, 16, 5], 40, [(0, 2), (20, 1), (3, -1), (0, 0), (1, 0), (12, 3), (4, 2), (0, -1)], 49, 97),
    ("uncovered_tail", [16, 3], 24, [(5, 1), (17, 0)], 97, 49),  # tokens 22, 23 in no segment
    ("rank1_long", [1, 1], 35, [(35, 1)], 49, 33),
]


def make_segments(segs, device=DEV):
    ip = [0]
    for length, _ in segs:
        ip.append(ip[-1] + length)
    return (
        torch.tensor(ip, dtype=torch.int32, device=device),
        torch.tensor([s for _, s in segs], dtype=torch.int32, device=device),
    )


# ---- reference vs naive ------------------------------------------------------------------------


@pytest.mark.parametrize("case", BGMV_CASES, ids=[c[0] for c in BGMV_CASES])
def test_reference_bgmv_matches_naive_loop(case):
    _, ranks, R, slots, H_in, H_out = case
    a, b, rk, sc = make_pool(ranks, H_in, H_out, torch.float32, "cpu", R=R)
    st = slots_t(slots, "cpu")
    x = make_x(len(slots), H_in, torch.float32, "cpu")
    h_ref = L.reference_lora_shrink(x, a, st, rk)
    assert h_ref.dtype == torch.float32
    assert_close(h_ref, naive_shrink(x, a, st, rk), torch.float32, "reference shrink vs naive")
    h = make_h(len(slots), R, token_ranks(slots, ranks, R), "cpu")
    y0 = make_x(len(slots), H_out, torch.float32, "cpu", seed=3)
    y_ref = L.reference_lora_expand(h, b, st, rk, sc, y0.clone())
    assert_close(y_ref, naive_expand(h, b, st, rk, sc, y0), torch.float32, "reference expand vs naive")


@pytest.mark.parametrize("case", SGMV_CASES, ids=[c[0] for c in SGMV_CASES])
def test_reference_sgmv_matches_naive_loop(case):
    _, ranks, T, segs, H_in, H_out = case
    a, b, rk, sc = make_pool(ranks, H_in, H_out, torch.float32, "cpu")
    ip, ss = make_segments(segs, "cpu")
    slots = slots_of_segments(ip, ss, T)
    st = slots_t(slots, "cpu")
    x = make_x(T, H_in, torch.float32, "cpu")
    h_ref = L.reference_sgmv_shrink(x, a, ip, ss, rk)
    assert_close(h_ref, naive_shrink(x, a, st, rk), torch.float32, "reference sgmv shrink vs naive")
    R = a.shape[1]
    h = make_h(T, R, token_ranks(slots, ranks, R), "cpu")
    y0 = make_x(T, H_out, torch.float32, "cpu", seed=3)
    y_ref = L.reference_sgmv_expand(h, b, ip, ss, rk, sc, y0.clone())
    assert_close(y_ref, naive_expand(h, b, st, rk, sc, y0), torch.float32, "reference sgmv expand vs naive")


def test_reference_hand_computed():
    """Integer case small enough to check by hand."""
    a = torch.zeros(2, 2, 3)
    a[0, 0] = torch.tensor([1.0, 2.0, 3.0])  # slot 0: rank 1 (row 1 is padding)
    a[0, 1] = float("nan")
    a[1, 0] = torch.tensor([1.0, 0.0, 0.0])  # slot 1: rank 2
    a[1, 1] = torch.tensor([0.0, 1.0, 1.0])
    b = torch.zeros(2, 2, 2)
    b[0, :, 0] = torch.tensor([1.0, -1.0])
    b[0, :, 1] = float("nan")
    b[1] = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    ranks = torch.tensor([1, 2], dtype=torch.int32)
    scaling = torch.tensor([2.0, 0.5])
    x = torch.tensor([[1.0, 1.0, 1.0], [1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    st = torch.tensor([0, 1, -1], dtype=torch.int32)
    h = L.reference_lora_shrink(x, a, st, ranks)
    assert h.tolist() == [[6.0, 0.0], [1.0, 5.0], [0.0, 0.0]]
    y = L.reference_lora_expand(h, b, st, ranks, scaling, torch.ones(3, 2))
    # t0: 1 + 2 * 6 * [1, -1] ; t1: 1 + 0.5 * [1 + 5, 2 + 0] ; t2: untouched
    assert y.tolist() == [[13.0, -11.0], [4.0, 2.0], [1.0, 1.0]]
    ip, ss = L.segments_from_slots(st)
    assert L.reference_sgmv_shrink(x, a, ip, ss, ranks).tolist() == h.tolist()


def test_segments_from_slots():
    ip, ss = L.segments_from_slots(slots_t([3, 3, -1, -1, 0, 3, 3, 3], "cpu"))
    assert ip.dtype == torch.int32 and ss.dtype == torch.int32
    assert ip.tolist() == [0, 2, 4, 5, 8]
    assert ss.tolist() == [3, -1, 0, 3]
    ip, ss = L.segments_from_slots(slots_t([], "cpu"))
    assert ip.tolist() == [0] and ss.tolist() == []
    ip, ss = L.segments_from_slots(slots_t([7], "cpu"))
    assert ip.tolist() == [0, 1] and ss.tolist() == [7]


def test_reference_scale_and_add():
    y = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    vec = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 10.0, 10.0, 10.0]])
    st = torch.tensor([1, -1, 0], dtype=torch.int32)
    out = SC.reference_scale_by_slot(y.clone(), vec, st)
    assert out.tolist() == [[0, 10, 20, 30], [4, 5, 6, 7], [8, 18, 30, 44]]
    out = SC.reference_add_by_slot(y.clone(), vec, st)
    assert out.tolist() == [[10, 11, 12, 13], [4, 5, 6, 7], [9, 11, 13, 15]]


def test_reference_rejects_bad_values():
    a, b, rk, sc = make_pool([4, 2], 8, 8, torch.float32, "cpu")
    x = make_x(2, 8, torch.float32, "cpu")
    with pytest.raises(AssertionError):
        L.reference_lora_shrink(x, a, slots_t([0, 2], "cpu"), rk)  # slot out of range
    with pytest.raises(AssertionError):
        L.reference_lora_shrink(x, a, slots_t([0, 1], "cpu"), torch.tensor([4, 5], dtype=torch.int32))  # rank > R
    with pytest.raises(AssertionError):
        L.reference_lora_shrink(x, a.to(torch.float16), slots_t([0, 1], "cpu"), rk)  # dtype mismatch


# ---- Triton vs reference (CPU: interpreter) ------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", CPU_DTYPES_BGMV, ids=str)
@pytest.mark.parametrize("case", BGMV_CASES, ids=[c[0] for c in BGMV_CASES])
def test_triton_bgmv_shrink(case, dtype):
    _, ranks, R, slots, H_in, H_out = case
    a, _, rk, _ = make_pool(ranks, H_in, H_out, dtype, R=R)
    st = slots_t(slots)
    x = make_x(len(slots), H_in, dtype)
    ref = L.reference_lora_shrink(x, a, st, rk)
    for split_k in (None, 1, 2):  # None: heuristic (split-K atomics at these tiny T)
        out = L.triton_lora_shrink(x, a, st, rk, split_k=split_k, block_k=32)
        assert out.dtype == torch.float32
        assert_close(out, ref, dtype, f"bgmv shrink split_k={split_k}")
    view = in_larger_pool(a)
    assert_close(L.triton_lora_shrink(x, view, st, rk, block_k=32), ref, dtype, "bgmv shrink, view of a larger pool")


@needs_triton
@pytest.mark.parametrize("dtype", CPU_DTYPES_BGMV, ids=str)
@pytest.mark.parametrize("case", BGMV_CASES, ids=[c[0] for c in BGMV_CASES])
def test_triton_bgmv_expand(case, dtype):
    _, ranks, R, slots, H_in, H_out = case
    _, b, rk, sc = make_pool(ranks, H_in, H_out, dtype, R=R)
    st = slots_t(slots)
    h = make_h(len(slots), R, token_ranks(slots, ranks, R))
    y0 = make_x(len(slots), H_out, dtype, seed=3)
    ref = L.reference_lora_expand(h, b, st, rk, sc, y0.clone())
    for layout, stack in (("rows", b), ("rank-major", rank_major(b))):
        out = L.triton_lora_expand(h, stack, st, rk, sc, y0.clone(), block_n=32, block_r=4)
        assert_close(out, ref, dtype, f"bgmv expand, {layout}")
        none = st == -1
        assert torch.equal(out[none], y0[none]), "rows with slot -1 were modified"


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_bgmv_slot_map_and_out(impl):
    """slot_map: the stack's slot of a token is slot_map[token_slot + 1] (a pool slot whose
    adapter has nothing on this projection maps to -1); out: h lands in a given zeroed buffer."""
    if impl == "triton" and not _TRITON_OK:
        pytest.skip(_TRITON_WHY)
    shrink = L.reference_lora_shrink if impl == "reference" else L.triton_lora_shrink
    expand = L.reference_lora_expand if impl == "reference" else L.triton_lora_expand
    ranks, H_in, H_out = [4, 8, 2], 49, 33
    a, b, rk, sc = make_pool(ranks, H_in, H_out, torch.float32, R=8)
    token_slot = slots_t([0, 3, -1, 1, 2, 3, 0])  # pool slots; the stack has 3 slots
    slot_map = torch.tensor([-1, 2, 0, -1, 1], dtype=torch.int32, device=DEV)  # pool slot 2 -> none
    mapped = slots_t([2, 1, -1, 0, -1, 1, 2])
    x = make_x(len(mapped), H_in, torch.float32)
    out = torch.zeros(len(mapped), 8, device=DEV)
    h = shrink(x, a, token_slot, rk, slot_map=slot_map, out=out)
    assert h.data_ptr() == out.data_ptr()
    ref_h = naive_shrink(x, a, mapped, rk)
    assert_close(h, ref_h, torch.float32, "shrink with slot_map")
    assert h[4].abs().sum() == 0 and h[2].abs().sum() == 0
    y0 = make_x(len(mapped), H_out, torch.float32, seed=3)
    y = expand(ref_h, b, token_slot, rk, sc, y0.clone(), slot_map=slot_map)
    assert_close(y, naive_expand(ref_h, b, mapped, rk, sc, y0), torch.float32, "expand with slot_map")
    assert torch.equal(y[4], y0[4]) and not torch.equal(y[0], y0[0])


@needs_triton
@pytest.mark.parametrize("dtype", CPU_DTYPES_SGMV, ids=str)
@pytest.mark.parametrize("case", SGMV_CASES, ids=[c[0] for c in SGMV_CASES])
def test_triton_sgmv(case, dtype):
    _, ranks, T, segs, H_in, H_out = case
    a, b, rk, sc = make_pool(ranks, H_in, H_out, dtype)
    R = a.shape[1]
    ip, ss = make_segments(segs)
    slots = slots_of_segments(ip, ss, T)
    x = make_x(T, H_in, dtype)
    h_ref = L.reference_sgmv_shrink(x, a, ip, ss, rk)
    for split_k in (1, 3):
        h = L.triton_sgmv_shrink(x, a, ip, ss, rk, block_m=16, block_k=32, split_k=split_k)
        assert_close(h, h_ref, dtype, f"sgmv shrink split_k={split_k}")
    h_in = make_h(T, R, token_ranks(slots, ranks, R))
    y0 = make_x(T, H_out, dtype, seed=3)
    y_ref = L.reference_sgmv_expand(h_in, b, ip, ss, rk, sc, y0.clone())
    y = L.triton_sgmv_expand(h_in, b, ip, ss, rk, sc, y0.clone(), block_m=16, block_n=32, block_r=16)
    assert_close(y, y_ref, dtype, "sgmv expand")
    y = L.triton_sgmv_expand(h_in, rank_major(b), ip, ss, rk, sc, y0.clone(), block_m=16, block_n=32, block_r=16)
    assert_close(y, y_ref, dtype, "sgmv expand, rank-major B")
    none = slots_t(slots) == -1
    assert torch.equal(y[none], y0[none]), "rows with no adapter were modified"


@needs_triton
def test_triton_sgmv_matches_bgmv_and_default_blocks():
    """Same tokens through both paths (default block sizes, max_seg_len given / computed)."""
    ranks = [2, 16, 7]
    a, b, rk, sc = make_pool(ranks, 49, 97, torch.float32)
    slots = [1] * 5 + [-1] * 2 + [0] * 3 + [2] * 6
    st = slots_t(slots)
    ip, ss = L.segments_from_slots(st)
    x = make_x(len(slots), 49, torch.float32)
    h_b = L.triton_lora_shrink(x, a, st, rk)
    h_s = L.triton_sgmv_shrink(x, a, ip, ss, rk)
    h_s2 = L.triton_sgmv_shrink(x, a, ip, ss, rk, max_seg_len=6)
    assert_close(h_s, h_b, torch.float32, "sgmv vs bgmv shrink")
    assert_close(h_s2, h_b, torch.float32, "sgmv(max_seg_len) vs bgmv shrink")
    y0 = make_x(len(slots), 97, torch.float32, seed=3)
    y_b = L.triton_lora_expand(h_b, b, st, rk, sc, y0.clone())
    y_s = L.triton_sgmv_expand(h_b, b, ip, ss, rk, sc, y0.clone(), 6)
    assert_close(y_s, y_b, torch.float32, "sgmv vs bgmv expand")


@needs_triton
def test_triton_empty_batch():
    a, b, rk, sc = make_pool([4], 49, 97, torch.float32)
    x = torch.zeros(0, 49, device=DEV)
    st = slots_t([])
    assert L.triton_lora_shrink(x, a, st, rk).shape == (0, 4)
    h = torch.zeros(0, 4, device=DEV)
    assert L.triton_lora_expand(h, b, st, rk, sc, torch.zeros(0, 97, device=DEV)).shape == (0, 97)
    ip, ss = L.segments_from_slots(st)
    assert L.triton_sgmv_shrink(x, a, ip, ss, rk).shape == (0, 4)
    y = torch.ones(3, 97, device=DEV)
    zero_len = torch.zeros(2, dtype=torch.int32, device=DEV)  # one empty segment
    out = L.triton_sgmv_expand(torch.zeros(3, 4, device=DEV), b, zero_len, slots_t([0]), rk, sc, y)
    assert torch.equal(out, torch.ones(3, 97, device=DEV))


@needs_triton
@pytest.mark.parametrize("dtype", CPU_DTYPES_BGMV, ids=str)
def test_triton_scale_and_add_by_slot(dtype):
    g = torch.Generator().manual_seed(5)
    T, N, S = 7, 97, 3
    y0 = torch.randn(T, N, generator=g).to(dtype).to(DEV)
    vec = (torch.rand(S, N, generator=g) + 0.5).to(dtype).to(DEV)
    st = slots_t([2, -1, 0, 0, 1, -1, 2])
    none = st == -1
    for ref_fn, tri_fn, name in (
        (SC.reference_scale_by_slot, SC.triton_scale_by_slot, "scale_by_slot"),
        (SC.reference_add_by_slot, SC.triton_add_by_slot, "add_by_slot"),
    ):
        ref = ref_fn(y0.clone(), vec, st)
        out = tri_fn(y0.clone(), vec, st, block_n=32)
        assert_close(out, ref, dtype, name)
        assert torch.equal(out[none], y0[none]), f"{name}: rows with slot -1 were modified"
    assert SC.triton_scale_by_slot(torch.zeros(0, N, dtype=dtype, device=DEV), vec, slots_t([])).shape == (0, N)


@needs_triton
def test_dispatch(monkeypatch):
    a, b, rk, sc = make_pool([3, 8], 49, 33, torch.float32)
    st = slots_t([1, -1, 0])
    x = make_x(3, 49, torch.float32)
    calls = []
    real = L.triton_lora_shrink
    monkeypatch.setattr(L, "triton_lora_shrink", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    monkeypatch.setenv("QUIVER_FORCE_TRITON", "1")
    h_tri = L.lora_shrink(x, a, st, rk)
    assert calls == [1]
    assert_close(h_tri, L.reference_lora_shrink(x, a, st, rk), torch.float32, "lora_shrink (forced triton)")
    y = make_x(3, 33, torch.float32, seed=3)
    y_tri = K.apply_lora(x, a, b, st, rk, sc, y.clone())
    assert calls == [1, 1]
    calls.clear()
    monkeypatch.setenv("QUIVER_FORCE_TRITON", "0")
    if not CUDA:
        assert not L.use_triton(x, a, st, rk)
        h_ref = L.lora_shrink(x, a, st, rk)
        assert calls == [], "CPU tensors without QUIVER_FORCE_TRITON must use the reference"
        y_ref = K.apply_lora(x, a, b, st, rk, sc, y.clone())
        assert_close(y_tri, y_ref, torch.float32, "apply_lora triton vs reference")
        assert_close(h_tri, h_ref, torch.float32, "lora_shrink")


def test_imports_without_triton():
    """The package imports and the references (and dispatchers) run when triton is missing."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, quiver.kernels as K\n"
        "assert not K.HAS_TRITON\n"
        "a = torch.randn(2, 4, 8); r = torch.tensor([2, 4], dtype=torch.int32)\n"
        "h = K.lora_shrink(torch.randn(3, 8), a, torch.tensor([0, -1, 1], dtype=torch.int32), r)\n"
        "assert h.shape == (3, 4) and h[1].abs().sum() == 0\n"
        "y = torch.ones(3, 8); K.scale_by_slot(y, torch.full((2, 8), 2.0), torch.tensor([0, -1, 1], dtype=torch.int32))\n"
        "assert y[:, 0].tolist() == [2.0, 1.0, 2.0]\n"
        "try:\n"
        "    K.triton_lora_shrink(torch.randn(3, 8), a, torch.tensor([0, -1, 1], dtype=torch.int32), r)\n"
        "    raise SystemExit('expected RuntimeError')\n"
        "except RuntimeError:\n"
        "    pass\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "QUIVER_FORCE_TRITON"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ---- GPU: real shapes ----------------------------------------------------------------------------


def _gpu_pool(R, H_in, H_out, S=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ranks = torch.randint(1, R + 1, (S,), generator=g).tolist()
    ranks[0], ranks[1] = R, 1
    return ranks, make_pool(ranks, H_in, H_out, torch.bfloat16, "cuda", R=R, seed=seed)


@pytest.mark.parametrize("T", [1, 32, 128, 1024])
@pytest.mark.parametrize("R", [16, 64])
@pytest.mark.parametrize("H_in,H_out", [(4096, 4096), (2049, 4096), (4096, 2049)])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_bgmv_real_shapes(T, R, H_in, H_out):
    dtype = torch.bfloat16
    ranks, (a, b, rk, sc) = _gpu_pool(R, H_in, H_out)
    g = torch.Generator().manual_seed(T)
    slots = torch.randint(-1, 32, (T,), generator=g).to(torch.int32).cuda()
    x = make_x(T, H_in, dtype, "cuda")
    h_ref = L.reference_lora_shrink(x, a, slots, rk)
    h = L.lora_shrink(x, a, slots, rk)
    assert_close(h, h_ref, dtype, f"gpu bgmv shrink T={T} R={R}")
    y0 = make_x(T, H_out, dtype, "cuda", seed=3)
    y_ref = L.reference_lora_expand(h_ref, b, slots, rk, sc, y0.clone())
    y = L.lora_expand(h_ref, b, slots, rk, sc, y0.clone())
    assert_close(y, y_ref, dtype, f"gpu bgmv expand T={T} R={R}")
    none = slots == -1
    assert torch.equal(y[none], y0[none])


@pytest.mark.parametrize("T", [1, 32, 128, 1024])
@pytest.mark.parametrize("R", [16, 64])
@pytest.mark.parametrize("H_in,H_out", [(4096, 4096), (2049, 4096)])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_sgmv_real_shapes(T, R, H_in, H_out):
    dtype = torch.bfloat16
    ranks, (a, b, rk, sc) = _gpu_pool(R, H_in, H_out)
    g = torch.Generator().manual_seed(T)
    # random segment lengths (some empty), random slots (some -1), covering all T tokens
    n_seg = max(1, min(40, T // 3))
    cuts = torch.sort(torch.randint(0, T + 1, (n_seg - 1,), generator=g)).values.tolist()
    ip = torch.tensor([0] + cuts + [T], dtype=torch.int32).cuda()
    ss = torch.randint(-1, 32, (n_seg,), generator=g).to(torch.int32).cuda()
    x = make_x(T, H_in, dtype, "cuda")
    h_ref = L.reference_sgmv_shrink(x, a, ip, ss, rk)
    h = L.sgmv_shrink(x, a, ip, ss, rk)
    assert_close(h, h_ref, dtype, f"gpu sgmv shrink T={T} R={R}")
    y0 = make_x(T, H_out, dtype, "cuda", seed=3)
    y_ref = L.reference_sgmv_expand(h_ref, b, ip, ss, rk, sc, y0.clone())
    y = L.sgmv_expand(h_ref, b, ip, ss, rk, sc, y0.clone())
    assert_close(y, y_ref, dtype, f"gpu sgmv expand T={T} R={R}")


@pytest.mark.parametrize("T", [1, 128, 1024])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_scale_add_real_shapes(T):
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(T)
    y0 = torch.randn(T, 4096, generator=g).to(dtype).cuda()
    vec = (torch.rand(32, 4096, generator=g) + 0.5).to(dtype).cuda()
    slots = torch.randint(-1, 32, (T,), generator=g).to(torch.int32).cuda()
    assert_close(K.scale_by_slot(y0.clone(), vec, slots), SC.reference_scale_by_slot(y0.clone(), vec, slots), dtype, "gpu scale")
    assert_close(K.add_by_slot(y0.clone(), vec, slots), SC.reference_add_by_slot(y0.clone(), vec, slots), dtype, "gpu add")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_other_dtypes(dtype):
    ranks = [16, 1, 8, 5]
    a, b, rk, sc = make_pool(ranks, 2049, 4096, dtype, "cuda")
    slots = slots_t([0, 1, 1, -1, 2, 3, 3, 3, -1] * 7, "cuda")
    x = make_x(slots.numel(), 2049, dtype, "cuda")
    h = L.lora_shrink(x, a, slots, rk)
    assert_close(h, L.reference_lora_shrink(x, a, slots, rk), dtype, "gpu shrink")
    ip, ss = L.segments_from_slots(slots)
    assert_close(L.sgmv_shrink(x, a, ip, ss, rk), h, dtype, "gpu sgmv shrink")
    y0 = make_x(slots.numel(), 4096, dtype, "cuda", seed=3)
    y_ref = L.reference_lora_expand(h, b, slots, rk, sc, y0.clone())
    assert_close(L.lora_expand(h, b, slots, rk, sc, y0.clone()), y_ref, dtype, "gpu expand")
    assert_close(L.sgmv_expand(h, b, ip, ss, rk, sc, y0.clone()), y_ref, dtype, "gpu sgmv expand")
