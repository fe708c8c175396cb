"""Tests of quiver.kernels.attention (paged decode attention over Quiver's KV cache layout).

Contract checked here:
  * reference_paged_decode_attention matches a naive float64 softmax over contiguous
    per-sequence K/V tensors built independently of the cache (and a hand-made case), so the
    spec itself is verified: slot(b, j) = block_tables[b, j // bs] * bs + j % bs, GQA head
    mapping h -> h // (H // KVH), prefix_slots, rows with context 0 -> exact zeros;
  * triton_paged_decode_attention matches the reference on ragged contexts (1, bs, bs+1,
    several blocks, 0), shuffled non-contiguous block tables, MHA/GQA/MQA, single- and
    multi-split launches, tl.dot and tl.sum variants, with and without prefix_slots;
  * cache slots that belong to no key (tails of last blocks, unused blocks, blocks named by
    block-table entries past the context) hold NaN: the kernels never read them;
  * the split plan depends on static shapes only (CUDA-graph capturable).
On CPU the Triton kernels run under TRITON_INTERPRET=1 at tiny shapes; tests marked ``gpu``
run at real shapes (H 32, KVH 32/8, D 128, bs 16, contexts up to 4096, bf16) and replay a
captured torch.cuda.CUDAGraph with new contents.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from conftest import triton_runnable

CUDA = torch.cuda.is_available()
if not CUDA:  # must happen before triton is imported (kernels are decorated at import time)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from quiver.kernels import attention as A  # noqa: E402


_TRITON_OK, _TRITON_WHY = triton_runnable(A.HAS_TRITON, A._paged_decode_split_kernel)
needs_triton = pytest.mark.skipif(not _TRITON_OK, reason=_TRITON_WHY)
gpu = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]
DEV = "cuda" if CUDA else "cpu"

# (atol, rtol) per dtype, kernel vs reference; outputs are convex combinations of O(1) values
# (magnitude ~0.1 at 4k keys). Both round the output to dtype once (rtol covers 2 ulps);
# the kernel also rounds probabilities to fp16/bf16 before the P.V dot (atol).
TOL = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-3, 1e-2),
    torch.bfloat16: (5e-3, 2e-2),
}
# Looser bound for the reference vs the float64 oracle (the reference rounds once to dtype).
TOL_REF = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1e-2, 1e-2),
}


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: tuple[float, float], what: str) -> None:
    atol, rtol = tol
    out64, ref64 = out.double().cpu(), ref.double().cpu()
    assert out64.shape == ref64.shape, f"{what}: shape {tuple(out64.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out64).all(), f"{what}: non-finite values (a NaN cache slot was read?)"
    diff = (out64 - ref64).abs()
    bad = diff > atol + rtol * ref64.abs()
    assert not bad.any(), (
        f"{what} [{out.dtype}]: max abs diff {diff.max().item():.3e} (atol={atol}, rtol={rtol}), "
        f"{int(bad.sum())}/{bad.numel()} elements out of tolerance"
    )


class Case:
    """A paged cache built from independent contiguous per-sequence K/V.

    seq_k[b], seq_v[b]: [ctx_b, KVH, D] (dtype), the ground truth; pre_k[b], pre_v[b]:
    [n_pre_b, KVH, D] prefix keys. Every cache slot that holds none of them is NaN; block
    table entries past each context point at a NaN block.
    """

    def __init__(self, ctx_lens, H, KVH, D, block_size, dtype, max_blocks=None, prefix_lens=None, P=None,
                 seed=0, device=DEV, q_scale=2.0):
        g = torch.Generator().manual_seed(seed)
        bs = block_size
        B = len(ctx_lens)
        need = [math.ceil(n / bs) for n in ctx_lens]
        max_blocks = max_blocks or max(1, max(need))
        assert max(need) <= max_blocks
        n_pre = list(prefix_lens) if prefix_lens is not None else [0] * B
        pre_blocks = math.ceil(sum(n_pre) / bs) + 1  # prefix keys go to arbitrary (unaligned) slots
        num_blocks = sum(need) + pre_blocks + 2
        perm = torch.randperm(num_blocks, generator=g).tolist()
        nan_block = perm.pop()  # never written: table entries past a context point here

        def rnd(*shape):
            return torch.randn(*shape, generator=g).to(dtype)

        self.seq_k = [rnd(n, KVH, D) for n in ctx_lens]
        self.seq_v = [rnd(n, KVH, D) for n in ctx_lens]
        self.pre_k = [rnd(n, KVH, D) for n in n_pre]
        self.pre_v = [rnd(n, KVH, D) for n in n_pre]
        k_cache = torch.full((num_blocks * bs, KVH, D), float("nan"), dtype=dtype)
        v_cache = k_cache.clone()
        tables = torch.full((B, max_blocks), nan_block, dtype=torch.int32)
        for b, n in enumerate(ctx_lens):
            blocks = [perm.pop() for _ in range(need[b])]
            tables[b, : need[b]] = torch.tensor(blocks, dtype=torch.int32)
            for j in range(n):
                slot = blocks[j // bs] * bs + j % bs
                k_cache[slot] = self.seq_k[b][j]
                v_cache[slot] = self.seq_v[b][j]
        self.prefix_slots = None
        if prefix_lens is not None:
            free = [blk * bs + o for blk in perm for o in range(bs)]
            free = [free[i] for i in torch.randperm(len(free), generator=g).tolist()]
            P = P or max(1, max(n_pre))
            pre = torch.full((B, P), -1, dtype=torch.int32)
            for b, n in enumerate(n_pre):
                cols = torch.randperm(P, generator=g)[:n].sort().values  # -1 holes anywhere in the row
                for i, col in enumerate(cols.tolist()):
                    slot = free.pop()
                    pre[b, col] = slot
                    k_cache[slot] = self.pre_k[b][i]
                    v_cache[slot] = self.pre_v[b][i]
            self.prefix_slots = pre.to(device)
        self.q = (rnd(B, H, D).float() * q_scale).to(dtype).to(device)
        self.k_cache, self.v_cache = k_cache.to(device), v_cache.to(device)
        self.block_tables = tables.to(device)
        self.context_lens = torch.tensor(ctx_lens, dtype=torch.int32, device=device)
        self.block_size, self.scale = bs, D ** -0.5
        self.H, self.KVH = H, KVH

    def args(self):
        return (self.q, self.k_cache, self.v_cache, self.block_tables, self.context_lens, self.block_size,
                self.scale, self.prefix_slots)

    def naive(self) -> torch.Tensor:
        """float64 softmax over the contiguous keys (prefix first; order does not matter)."""
        B, H, D = self.q.shape
        group = self.H // self.KVH
        out = torch.zeros(B, H, D, dtype=torch.float64)
        for b in range(B):
            k = torch.cat([self.pre_k[b], self.seq_k[b]]).double()
            v = torch.cat([self.pre_v[b], self.seq_v[b]]).double()
            if k.shape[0] == 0:
                continue
            for h in range(H):
                kv = h // group
                s = (k[:, kv] @ self.q[b, h].double().cpu()) * self.scale
                w = torch.exp(s - s.max())
                out[b, h] = (w / w.sum()) @ v[:, kv]
        return out


def ctx_sets(bs: int) -> list[list[int]]:
    return [
        [1],  # B = 1, a single key
        [3 * bs + 1],  # B = 1, several blocks + one key
        [bs, 0, 5 * bs + 3],  # exactly one block, a padding row, several blocks
        [1, bs + 1, 2 * bs - 1],
    ]


# ---------------------------------------------------------------------------------------------
# The reference is the spec: check it against the naive oracle


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kvh", [4, 2, 1])
@pytest.mark.parametrize("block_size", [4, 8])
def test_reference_matches_naive(dtype, kvh, block_size):
    for i, ctx in enumerate(ctx_sets(block_size)):
        c = Case(ctx, H=4, KVH=kvh, D=16, block_size=block_size, dtype=dtype, max_blocks=6, seed=i)
        out = A.reference_paged_decode_attention(*c.args())
        assert out.dtype == dtype
        assert_close(out, c.naive(), TOL_REF[dtype], f"reference ctx={ctx}")
        for b, n in enumerate(ctx):
            if n == 0:
                assert (out[b] == 0).all(), "padding row must be exactly 0"


@pytest.mark.parametrize("kvh", [2, 1])
def test_reference_prefix_matches_naive(kvh):
    c = Case([5, 0, 9, 0], H=4, KVH=kvh, D=16, block_size=4, dtype=torch.float32, prefix_lens=[3, 2, 0, 0], P=5)
    out = A.reference_paged_decode_attention(*c.args())
    assert_close(out, c.naive(), TOL_REF[torch.float32], "reference with prefix")
    assert (out[3] == 0).all()  # no prefix, no context


def test_reference_hand_case():
    """One key -> out == v; two keys with equal scores -> their mean; GQA head mapping."""
    bs, D = 2, 4
    k = torch.zeros(4 * bs, 2, D)
    v = torch.zeros(4 * bs, 2, D)
    # row 0: 1 key in block 3 (slot 6); row 1: 2 keys in block 1 (slots 2, 3)
    v[6, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    v[6, 1] = torch.tensor([5.0, 6.0, 7.0, 8.0])
    v[2, 1] = torch.tensor([2.0, 0.0, 0.0, 0.0])
    v[3, 1] = torch.tensor([0.0, 4.0, 0.0, 0.0])
    q = torch.randn(2, 4, D)
    tables = torch.tensor([[3, 0], [1, 0]], dtype=torch.int32)
    ctx = torch.tensor([1, 2], dtype=torch.int32)
    out = A.reference_paged_decode_attention(q, k, v, tables, ctx, bs, 0.5)
    assert torch.equal(out[0, :2], v[6, 0].expand(2, D))  # heads 0, 1 -> kv head 0
    assert torch.equal(out[0, 2:], v[6, 1].expand(2, D))  # heads 2, 3 -> kv head 1
    assert torch.allclose(out[1, 2:], torch.tensor([1.0, 2.0, 0.0, 0.0]).expand(2, D))  # k == 0: equal scores


def test_reference_rejects_bad_values():
    c = Case([5], H=2, KVH=1, D=16, block_size=4, dtype=torch.float32, max_blocks=2, device="cpu")
    with pytest.raises(AssertionError):
        A.reference_paged_decode_attention(c.q, c.k_cache, c.v_cache, c.block_tables,
                                           torch.tensor([9], dtype=torch.int32), 4, 0.25)
    with pytest.raises(AssertionError):
        A.reference_paged_decode_attention(c.q, c.k_cache, c.v_cache, c.block_tables.to(torch.int64),
                                           c.context_lens, 4, 0.25)


def test_split_plan_static():
    for B, kvh, mb, bs in [(1, 8, 256, 16), (32, 8, 256, 16), (128, 8, 256, 16), (1, 32, 4, 16), (3, 1, 5, 8)]:
        for req in (None, 1, 3, 1000):
            n, tps = A.decode_split_plan(B, kvh, mb, bs, num_splits=req)
            assert n >= 1 and tps % A.DECODE_BLOCK_N_DOT == 0
            assert n * tps >= mb * bs and (n - 1) * tps < mb * bs, (B, kvh, mb, bs, req, n, tps)
            if req is not None:
                assert n <= req
    assert A.decode_split_plan(1, 8, 256, 16)[0] > 1  # small batch, long max context: split-K
    assert A.decode_split_plan(128, 8, 256, 16)[0] == 1  # big batch fills the GPU already


# ---------------------------------------------------------------------------------------------
# Triton (interpreter on CPU) vs the reference


def _check_triton(c: Case, dtype, what: str, **kw) -> torch.Tensor:
    out = A.triton_paged_decode_attention(*c.args(), **kw)
    ref = A.reference_paged_decode_attention(*c.args())
    assert out.dtype == dtype
    assert_close(out, ref, TOL[dtype], what)
    zero_rows = (c.context_lens == 0).cpu()
    if c.prefix_slots is not None:
        zero_rows &= (c.prefix_slots < 0).all(1).cpu()
    assert (out.cpu()[zero_rows] == 0).all(), f"{what}: rows without keys must be exactly 0"
    return out


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kvh", [4, 2, 1])
@pytest.mark.parametrize("block_size", [4, 8])
def test_triton_matches_reference(dtype, kvh, block_size):
    # max_blocks 6: 24 (bs 4) or 48 (bs 8) keys at most, tiles of block_n=16 keys. num_splits=1:
    # one program per (row, kv head) walks 2-3 tiles and writes out directly (no reduce kernel);
    # num_splits=3: 2 splits of 16 keys (bs 4) or 3 splits of 16 keys (bs 8) + the reduce kernel.
    for i, ctx in enumerate(ctx_sets(block_size)):
        c = Case(ctx, H=4, KVH=kvh, D=16 if i % 2 else 32, block_size=block_size, dtype=dtype, max_blocks=6, seed=i)
        for splits in (1, 3):
            _check_triton(c, dtype, f"ctx={ctx} splits<={splits}", block_n=16, num_splits=splits)


@needs_triton
@pytest.mark.parametrize("kvh,use_dot", [(2, False), (1, True)])
def test_triton_dot_and_sum_variants(kvh, use_dot):
    c = Case([7, 0, 13], H=4, KVH=kvh, D=16, block_size=4, dtype=torch.float32, max_blocks=4, seed=3)
    _check_triton(c, torch.float32, f"use_dot={use_dot}", block_n=16, num_splits=2, use_dot=use_dot)


@needs_triton
@pytest.mark.parametrize("D,kvh", [(24, 2), (8, 1)])
def test_triton_head_dim_not_pow2(D, kvh):
    c = Case([9, 0, 3], H=4, KVH=kvh, D=D, block_size=4, dtype=torch.float16, max_blocks=3, seed=11)
    _check_triton(c, torch.float16, f"D={D}", block_n=16, num_splits=2)


@needs_triton
@pytest.mark.parametrize("dtype,kvh", [(torch.float32, 2), (torch.float16, 1)])
def test_triton_prefix_slots(dtype, kvh):
    # rows: prefix + context, prefix only (padding row with a prefix), context only, nothing at all
    c = Case([6, 0, 9, 0], H=4, KVH=kvh, D=16, block_size=4, dtype=dtype, max_blocks=3, prefix_lens=[3, 2, 0, 0],
             P=20, seed=5)
    _check_triton(c, dtype, "prefix, 1 paged split", block_n=16, num_splits=1)
    _check_triton(c, dtype, "prefix, 2 paged splits", block_n=16, num_splits=2)


@needs_triton
@pytest.mark.parametrize("kvh", [4, 2])
def test_triton_pipelined_key_loop(kvh):
    """PIPELINE (the next tile's loads before this tile's arithmetic): contexts of one tile, of
    two, and of 2-4 tiles ending mid-tile; one split and splits that end or start mid-context
    (an empty split loads nothing); prefix keys beside it; MHA (tl.sum) and GQA (tl.dot)."""
    c = Case([1, 16, 33, 0, 61, 48], H=4, KVH=kvh, D=16, block_size=4, dtype=torch.float32, max_blocks=16, seed=13)
    for splits in (1, 2, 3):
        _check_triton(c, torch.float32, f"pipeline splits<={splits}", block_n=16, num_splits=splits, pipeline=True)
    p = Case([6, 0, 37], H=4, KVH=kvh, D=16, block_size=4, dtype=torch.float32, max_blocks=10, prefix_lens=[3, 2, 0],
             P=20, seed=14)
    _check_triton(p, torch.float32, "pipeline with prefix", block_n=16, num_splits=2, pipeline=True)


@needs_triton
def test_triton_default_knobs_and_bf16_mha():
    """Default tuning knobs (block_n 64, heuristic splits) and bf16 on the tl.sum path (the
    interpreter's bf16 tl.dot is wrong, so bf16 GQA is checked on GPU only)."""
    c = Case([9, 0, 17], H=4, KVH=4, D=16, block_size=8, dtype=torch.bfloat16, max_blocks=3, seed=7)
    _check_triton(c, torch.bfloat16, "bf16 MHA default knobs")


@needs_triton
def test_dispatch(monkeypatch):
    c = Case([5, 0], H=4, KVH=2, D=16, block_size=4, dtype=torch.float32, max_blocks=2, seed=9)
    calls = []
    real = A.triton_paged_decode_attention

    def spy(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(A, "triton_paged_decode_attention", spy)
    monkeypatch.setenv("QUIVER_FORCE_TRITON", "1")
    out = A.paged_decode_attention(*c.args()[:7])
    assert calls, "QUIVER_FORCE_TRITON=1 must use the Triton path"
    assert_close(out, c.naive(), TOL[torch.float32], "dispatch (triton)")
    monkeypatch.delenv("QUIVER_FORCE_TRITON", raising=False)
    calls.clear()
    out = A.paged_decode_attention(*c.args()[:7])
    assert bool(calls) == CUDA, "CPU tensors without QUIVER_FORCE_TRITON use the reference"
    assert_close(out, c.naive(), TOL[torch.float32], "dispatch (default)")


@pytest.mark.parametrize("force_triton", [False, pytest.param(True, marks=needs_triton)])
def test_model_paged_attention_decode_path(monkeypatch, force_triton):
    """quiver.server.model.paged_attention: the block_tables (decode) path that calls this
    kernel agrees with the gather + SDPA path on the same cache."""
    from quiver.server.model import StepBatch, paged_attention

    if force_triton:
        monkeypatch.setenv("QUIVER_FORCE_TRITON", "1")
    ctx = [3, 9, 1]
    c = Case(ctx, H=4, KVH=2, D=16, block_size=4, dtype=torch.float32, max_blocks=3, seed=13)
    B, H, D = c.q.shape
    lmax = max(ctx)
    pos = torch.arange(lmax)
    slots = c.block_tables.cpu()[:, pos // 4].long() * 4 + pos % 4  # [B, Lmax]
    live = pos[None, :] < torch.tensor(ctx)[:, None]
    kv_gather = torch.where(live, slots, slots[:, :1]).to(DEV)  # padding keys: a real slot (masked anyway)
    live = live.to(DEV)
    empty = torch.empty(0, dtype=torch.long, device=DEV)
    common = dict(input_ids=empty, positions=empty, slot_mapping=empty, sample_index=empty)
    sdpa = StepBatch(q_gather=torch.arange(B, device=DEV)[:, None], out_scatter=torch.arange(B, device=DEV),
                     kv_gather=kv_gather,
                     attn_mask=live[:, None, None, :], **common)
    paged = StepBatch(q_gather=empty, out_scatter=empty, kv_gather=empty, attn_mask=empty, block_tables=c.block_tables,
                      context_lens=c.context_lens, block_size=4, **common)
    want = paged_attention(c.q, c.k_cache, c.v_cache, sdpa)
    got = paged_attention(c.q, c.k_cache, c.v_cache, paged)
    assert_close(got, want, TOL[torch.float32], "model decode path vs SDPA path")


# ---------------------------------------------------------------------------------------------
# GPU: real shapes, bf16, CUDA graphs


def gpu_case(B, H, KVH, D, bs, max_blocks, dtype, seed, ctx=None, device="cuda"):
    """Built on device: random ragged contexts up to max_blocks * bs, shuffled blocks, NaN in
    every slot that holds no key."""
    g = torch.Generator().manual_seed(seed)
    max_ctx = max_blocks * bs
    if ctx is None:
        ctx = torch.randint(1, max_ctx + 1, (B,), generator=g)
        fixed = [max_ctx, 1, bs, bs + 1, 0]
        ctx[: min(B, len(fixed))] = torch.tensor(fixed[: min(B, len(fixed))])
    ctx = torch.as_tensor(ctx, dtype=torch.int32)
    need = (ctx + bs - 1) // bs
    num_blocks = int(need.sum()) + 1
    perm = torch.randperm(num_blocks, generator=g).to(torch.int32)
    tables = torch.full((B, max_blocks), int(perm[-1]), dtype=torch.int32)  # unused entries -> a NaN block
    off = 0
    for b in range(B):
        n = int(need[b])
        tables[b, :n] = perm[off: off + n]
        off += n
    tables, ctx_d = tables.to(device), ctx.to(device)
    pos = torch.arange(max_ctx, device=device)
    slots = tables[:, pos // bs].long() * bs + pos % bs  # [B, max_ctx]
    live = slots[pos[None, :] < ctx_d[:, None].long()]
    k = torch.full((num_blocks * bs, KVH, D), float("nan"), dtype=dtype, device=device)
    v = torch.full_like(k, float("nan"))
    gen = torch.Generator(device=device).manual_seed(seed)
    k[live] = torch.randn(live.numel(), KVH, D, generator=gen, device=device).to(dtype)
    v[live] = torch.randn(live.numel(), KVH, D, generator=gen, device=device).to(dtype)
    q = (torch.randn(B, H, D, generator=gen, device=device) * 2).to(dtype)
    return q, k, v, tables, ctx_d


@pytest.mark.parametrize("B", [1, 32, 128])
@pytest.mark.parametrize("kvh", [32, 8])
@pytest.mark.parametrize("pipeline", [None, False, True])  # None: the default of the path
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_matches_reference_bf16(B, kvh, pipeline):
    q, k, v, tables, ctx = gpu_case(B, 32, kvh, 128, 16, 256, torch.bfloat16, seed=B + kvh)
    if pipeline is None:
        out = A.paged_decode_attention(q, k, v, tables, ctx, 16, 128 ** -0.5)
    else:
        out = A.triton_paged_decode_attention(q, k, v, tables, ctx, 16, 128 ** -0.5, pipeline=pipeline)
    ref = A.reference_paged_decode_attention(q, k, v, tables, ctx, 16, 128 ** -0.5)
    assert_close(out, ref, TOL[torch.bfloat16], f"gpu B={B} kvh={kvh}")
    assert (out[ctx == 0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("kvh,D", [(8, 64), (4, 128), (1, 128), (8, 96)])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_other_dtypes_and_head_dims(dtype, kvh, D):
    q, k, v, tables, ctx = gpu_case(16, 32, kvh, D, 16, 64, dtype, seed=D + kvh)
    out = A.paged_decode_attention(q, k, v, tables, ctx, 16, D ** -0.5)
    ref = A.reference_paged_decode_attention(q, k, v, tables, ctx, 16, D ** -0.5)
    assert_close(out, ref, TOL[dtype], f"gpu {dtype} kvh={kvh} D={D}")


@pytest.mark.parametrize("bs", [8, 32])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_block_sizes_and_prefix(bs):
    c = Case([1, bs, bs + 1, 7 * bs + 5, 0, 0, 300], H=32, KVH=8, D=128, block_size=bs, dtype=torch.bfloat16,
             prefix_lens=[6, 0, 3, 10, 4, 0, 6], P=12, seed=bs, device="cuda")
    for splits in (1, 4, None):
        for pipeline in (False, True):
            _check_triton(c, torch.bfloat16, f"gpu prefix bs={bs} splits<={splits} pipeline={pipeline}",
                          num_splits=splits, pipeline=pipeline)
    c.prefix_slots = None
    c.pre_k = [x[:0] for x in c.pre_k]
    c.pre_v = [x[:0] for x in c.pre_v]
    _check_triton(c, torch.bfloat16, f"gpu bs={bs}")


@pytest.mark.parametrize("B", [24, 128])  # 3 splits + reduce kernel / a single split, no reduce
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_cuda_graph_replay(B):
    """Capture once (contexts all 1), replay with new q / block tables / context lens (up to the
    maximum, with padding rows) and compare every replay to the reference."""
    H, KVH, D, bs, max_blocks = 32, 8, 128, 16, 128
    assert (A.decode_split_plan(B, KVH, max_blocks, bs)[0] > 1) == (B == 24)
    dtype = torch.bfloat16
    num_blocks = B * max_blocks + 5
    k = torch.randn(num_blocks * bs, KVH, D, device="cuda").to(dtype)
    v = torch.randn(num_blocks * bs, KVH, D, device="cuda").to(dtype)
    q_s = torch.randn(B, H, D, device="cuda").to(dtype)
    tables_s = torch.zeros(B, max_blocks, dtype=torch.int32, device="cuda")
    ctx_s = torch.ones(B, dtype=torch.int32, device="cuda")
    scale = D ** -0.5
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up: compile outside the capture
            A.paged_decode_attention(q_s, k, v, tables_s, ctx_s, bs, scale)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync inside the launch path raises
    try:
        A.paged_decode_attention(q_s, k, v, tables_s, ctx_s, bs, scale)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_s = A.paged_decode_attention(q_s, k, v, tables_s, ctx_s, bs, scale)
    g = torch.Generator().manual_seed(3)
    for it in range(4):
        ctx = torch.randint(0, max_blocks * bs + 1, (B,), generator=g, dtype=torch.int32)
        ctx[0], ctx[1], ctx[2] = 0, max_blocks * bs, 1
        tables = torch.stack([torch.randperm(num_blocks, generator=g)[:max_blocks] for _ in range(B)]).to(torch.int32)
        q = (torch.randn(B, H, D, generator=g) * 2).to(dtype)
        q_s.copy_(q)
        tables_s.copy_(tables)
        ctx_s.copy_(ctx)
        graph.replay()
        torch.cuda.synchronize()
        ref = A.reference_paged_decode_attention(q_s, k, v, tables_s, ctx_s, bs, scale)
        assert_close(out_s, ref, TOL[dtype], f"graph replay {it}")
        assert (out_s[0] == 0).all()


@pytest.mark.parametrize("kvh", [32, 8])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_sdpa_rows_run_a_fused_kernel_with_gqa(kvh):
    """The eager step's SDPA call (server/model._sdpa_rows, boolean mask) on 32 query heads over
    32 and over 8 key/value heads: the same values as the paged decode kernel's reference, from
    a fused attention kernel. With enable_gqa and a mask, torch fell back to the math path
    (docs/results/h200/sdpa_gqa_probe.log), whose kernels (a float32 GEMM, a softmax) this finds."""
    from torch.profiler import ProfilerActivity, profile

    from quiver.server.model import StepBatch, paged_attention

    B, H, D, bs, max_blocks = 8, 32, 128, 16, 8
    q, k, v, tables, ctx = gpu_case(B, H, kvh, D, bs, max_blocks, torch.bfloat16, seed=5,
                                    ctx=[max_blocks * bs, 1, bs, bs + 1, 37, 64, 100, 2])
    lmax = max_blocks * bs
    pos = torch.arange(lmax, device="cuda")
    slots = tables[:, pos // bs].long() * bs + pos % bs
    live = pos[None, :] < ctx[:, None].long()
    kv_gather = torch.where(live, slots, slots[:, :1])
    empty = torch.empty(0, dtype=torch.long, device="cuda")
    batch = StepBatch(q_gather=torch.arange(B, device="cuda")[:, None], out_scatter=torch.arange(B, device="cuda"),
                      kv_gather=kv_gather, attn_mask=live[:, None, None, :], input_ids=empty, positions=empty,
                      slot_mapping=empty, sample_index=empty)
    paged_attention(q, k, v, batch)  # warm up
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = paged_attention(q, k, v, batch)
        torch.cuda.synchronize()
    ref = A.reference_paged_decode_attention(q, k, v, tables, ctx, bs, D ** -0.5).reshape(B, H * D)
    assert_close(out, ref, TOL[torch.bfloat16], f"SDPA rows, {kvh} kv heads")
    names = [e.key for e in prof.key_averages() if e.device_type.name == "CUDA"]
    assert any("fmha" in n or "flash" in n.lower() for n in names), names
    assert not any("softmax" in n for n in names), names
