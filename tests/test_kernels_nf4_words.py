"""Tests for quiver.kernels.nf4_words (NF4 decode GEMM over the 32-bit word layout).

CPU: the word layout holds exactly the NF4Weight's codes (dequantize_words == NF4Weight
dequantize), and the kernel (interpreter path: table gather, fp32 dot) matches the reference
with and without split-K, bias, M not a multiple of the block, N not a multiple of the block.
GPU (`-m gpu`): the PTX table lookup at Llama-7B shapes against bitsandbytes' dequantized
weights, bf16 and fp16, and CUDA-graph capture.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from conftest import triton_runnable

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from quiver.kernels import nf4  # noqa: E402
from quiver.kernels import nf4_words as W  # noqa: E402
from group_members import lora_members  # noqa: E402

_OK, _WHY = triton_runnable(W.HAS_TRITON, W._nf4_words_kernel) if W.HAS_TRITON else (False, "no triton")
needs_triton = pytest.mark.skipif(not _OK, reason=_WHY)
DEV = "cuda" if CUDA else "cpu"


def synthetic(N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = K // 64
    q = torch.randint(0, 256, (C, N, 32), generator=g, dtype=torch.uint8)
    absmax = torch.rand(C, N, generator=g) * 0.1 + 0.01
    return nf4.NF4Weight(qweight=q, absmax=absmax, code=torch.tensor(nf4.NF4_CODE), shape=(N, K)).to(DEV)


def test_word_layout_holds_the_same_codes():
    w = synthetic(40, 256)
    words = W.words_from_nf4(w)
    assert words.shape == (256 // 128 * 16, 40) and words.dtype == torch.int32
    torch.testing.assert_close(W.dequantize_words(words, w.absmax), w.dequantize(torch.float32), rtol=0, atol=0)
    # hand check: W[n, 128g + 16s + r] sits in nibble s of word (16g + r, n)
    codes = w.codes()
    n, g, s, r = 7, 1, 5, 3
    assert (int(words[16 * g + r, n]) >> (4 * s)) & 15 == int(codes[n, 128 * g + 16 * s + r])
    with pytest.raises(AssertionError):
        W.words_from_nf4(synthetic(8, 192))  # K not a multiple of 128


def test_prmt_table_encodes_the_codes():
    for dtype in (torch.bfloat16, torch.float16):
        t = W._prmt_table(dtype)
        for i, code in enumerate(nf4.NF4_CODE):
            hi = (t[i // 4] >> (8 * (i % 4))) & 0xFF
            lo = (t[4 + i // 4] >> (8 * (i % 4))) & 0xFF
            bits = torch.tensor([(hi << 8) | lo], dtype=torch.int32).to(torch.int16).view(dtype)
            assert float(bits) == float(torch.tensor(code).to(dtype)), (dtype, i)


@pytest.mark.gpu  # also runs on CPU under the interpreter
@needs_triton
@pytest.mark.parametrize("M,N,K,kw", [
    (3, 40, 256, dict(split_k=1)),
    (17, 48, 384, dict(split_k=2, block_m=16, block_n=16)),
    (1, 32, 512, dict()),
    (1, 40, 256, dict(gemv=True)),  # the CUDA-core path, one program per batch row
    (3, 48, 384, dict(gemv=True, split_k=2, block_n=16)),
    (2, 32, 512, dict(gemv=True, split_k=1)),
])
def test_kernel_matches_reference(M, N, K, kw):
    w = synthetic(N, K, seed=M)
    words = W.words_from_nf4(w)
    dtype = torch.float32 if not CUDA else torch.bfloat16
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEV)
    bias = torch.randn(N).to(dtype).to(DEV)
    ref = x.float() @ w.dequantize(torch.float32).T
    y = W.triton_nf4_words_linear(x, words, w.absmax, **kw)
    tol = 2e-5 if dtype == torch.float32 else 1.5e-2
    scale = max(1.0, ref.abs().max().item())
    assert (y.float() - ref).abs().max().item() <= tol * scale
    yb = W.triton_nf4_words_linear(x, words, w.absmax, bias, **kw)
    assert (yb.float() - (ref + bias.float())).abs().max().item() <= tol * scale


@pytest.mark.gpu  # also runs on CPU under the interpreter
@needs_triton
def test_narrow_outputs_take_the_prefill_path_above_narrow_max_m(monkeypatch):
    """Between NARROW_MAX_M and WORDS_MAX_M rows, outputs narrower than WIDE_N are dequantized
    (then one matmul); wider ones, and any output at NARROW_MAX_M rows, run the word kernel.
    Both give the layout's spec."""
    w = synthetic(96, 256, seed=5)
    words = W.words_from_nf4(w)
    full = w.dequantize(torch.float32)
    monkeypatch.setenv("QUIVER_FORCE_TRITON", "1")
    calls = []
    kernel, dequant = W.triton_nf4_words_linear, W.triton_words_dequantize
    monkeypatch.setattr(W, "triton_nf4_words_linear", lambda *a, **k: calls.append("words") or kernel(*a, **k))
    monkeypatch.setattr(W, "triton_words_dequantize", lambda *a, **k: calls.append("dequant") or dequant(*a, **k))
    dtype = torch.bfloat16 if CUDA else torch.float32
    tol = 3e-2 if CUDA else 2e-5
    for M, wide_n, path in [(W.NARROW_MAX_M, W.WIDE_N, "words"), (W.NARROW_MAX_M + 1, W.WIDE_N, "dequant"),
                            (W.WORDS_MAX_M, W.WIDE_N, "dequant"), (W.NARROW_MAX_M + 1, 96, "words")]:
        monkeypatch.setattr(W, "WIDE_N", wide_n)  # 96 outputs count as wide
        calls.clear()
        x = torch.randn(M, 256, generator=torch.Generator().manual_seed(M)).to(DEV, dtype)
        y = W.nf4_words_linear(x, words, w.absmax)
        assert calls == [path], (M, wide_n, calls)
        torch.testing.assert_close(y.float(), x.float() @ full.T, rtol=tol, atol=tol)


@pytest.mark.gpu  # also runs on CPU under the interpreter
@needs_triton
def test_dequant_kernel_slices_and_dispatch(monkeypatch):
    """The prefill path (Triton dequantize) equals the layout's spec; column slices of a fused
    weight (strided words/absmax) give the slice's outputs; nf4_words_linear picks by M."""
    w = synthetic(96, 256, seed=3)
    words = W.words_from_nf4(w)
    full = w.dequantize(torch.float32)
    torch.testing.assert_close(W.triton_words_dequantize(words, w.absmax, torch.float32), full, rtol=0, atol=0)
    part_w, part_a = words[:, 40:72], w.absmax[:, 40:72]  # rows 40..71 of W, strided views
    torch.testing.assert_close(W.triton_words_dequantize(part_w, part_a, torch.float32), full[40:72], rtol=0, atol=0)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(0)).to(DEV)
    dtype = torch.bfloat16 if CUDA else torch.float32  # CUDA: the PTX path takes 16-bit activations
    tol = 3e-2 if CUDA else 2e-5
    y = W.triton_nf4_words_linear(x.to(dtype), part_w, part_a, split_k=2)
    torch.testing.assert_close(y.float(), x.to(dtype).float() @ full[40:72].T, rtol=tol, atol=tol)
    monkeypatch.setenv("QUIVER_FORCE_TRITON", "1")
    big = torch.randn(W.WORDS_MAX_M + 3, 256).to(DEV)  # prefill-sized: dequantize + matmul
    torch.testing.assert_close(W.nf4_words_linear(big, words, w.absmax), big @ full.T, rtol=2e-5, atol=2e-5)
    seen = []  # the matmul runs over rows padded to the bucket; the caller gets its own rows
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda a, *r: seen.append(a.shape) or linear(a, *r))
    bias = torch.randn(96).to(DEV)
    y = W.nf4_words_linear(big.view(1, -1, 256), words, w.absmax, bias)
    monkeypatch.undo()
    monkeypatch.setenv("QUIVER_FORCE_TRITON", "1")
    assert seen == [(192, 256)] and y.shape == (1, W.WORDS_MAX_M + 3, 96)
    torch.testing.assert_close(y[0], big @ full.T + bias, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(W.nf4_words_linear(x, words, w.absmax), x @ full.T, rtol=2e-5, atol=2e-5)
    monkeypatch.delenv("QUIVER_FORCE_TRITON")
    if not CUDA:  # the reference path
        torch.testing.assert_close(W.nf4_words_linear(x, words, w.absmax), x @ full.T, rtol=2e-5, atol=2e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("N,K", [(4096, 4096), (11008, 4096), (4096, 11008)])
@pytest.mark.parametrize("M", [1, 8, 32, 64])
def test_gpu_llama_shapes_vs_bnb(N, K, M):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(N + K + M)
    p = bnb.nn.Params4bit(torch.randn(N, K, dtype=torch.bfloat16) * 0.02, requires_grad=False,
                          compress_statistics=True, quant_type="nf4").to("cuda")
    w = nf4.nf4_weight_from_bnb(p)
    words = W.words_from_nf4(w)
    deq = bnb.functional.dequantize_4bit(p.data, p.quant_state)
    paths = [{}] + ([dict(gemv=True), dict(gemv=False)] if M <= 8 else [])  # CUDA cores and tensor cores
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        ref = x.float() @ deq.float().T
        exact = x.double() @ w.dequantize(torch.float32).double().T
        err_ref = (ref.to(dtype).double() - exact).pow(2).mean().sqrt().item()
        for kw in paths:
            y = W.triton_nf4_words_linear(x, words, w.absmax, **kw)
            err = (y.double() - exact).pow(2).mean().sqrt().item()
            assert err <= 1.5 * err_ref + 1e-4 * exact.pow(2).mean().sqrt().item(), (dtype, kw, err, err_ref)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_graph_capture():
    w = synthetic(4096, 4096)
    words = W.words_from_nf4(w)
    x = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
    y0 = W.triton_nf4_words_linear(x, words, w.absmax, split_k=4)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = W.triton_nf4_words_linear(x, words, w.absmax, split_k=4)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(y, W.triton_nf4_words_linear(x, words, w.absmax, split_k=4), rtol=0, atol=0)
    assert not torch.equal(y, y0)


def test_pick_words_config_buckets_and_split():
    """The measured defaults: the CUDA-core path up to GEMV_MAX_M rows; then BLOCK_N 128 for
    decode up to M=16 and for wide outputs; narrow outputs above M=16 take BLOCK_N 64 (8 warps
    above M=32); split-K fills ~SPLIT_TARGET_PER_SM programs per SM within the bucket's maximum
    and keeps split * M <= SPLIT_MAX_ROWS."""
    cpu = torch.device("cpu")  # W._num_sms falls back to a fixed count off CUDA
    sms = W._num_sms(cpu)
    for M, N, K in [(1, 4096, 4096), (2, 4096, 4096), (16, 12288, 4096), (32, 22016, 4096), (32, 4096, 11008),
                    (64, 4096, 4096), (64, 22016, 4096), (128, 4096, 11008)]:
        cfg = W.pick_words_config(M, N, K, cpu)
        s = cfg["split_k"]
        assert s >= 1 and s & (s - 1) == 0 and s * M <= W.SPLIT_MAX_ROWS, (M, N, cfg)
        if M <= W.GEMV_MAX_M:
            g = W.GEMV_CONFIG
            assert cfg["gemv"] and (cfg["block_n"], cfg["num_warps"], cfg["num_stages"]) == (
                g["block_n"], g["num_warps"], g["num_stages"]), (M, cfg)
            tiles = M * -(-N // cfg["block_n"])
        else:
            assert not cfg.get("gemv")
            narrow = M > 16 and N < W.WIDE_N
            assert cfg["block_n"] == (64 if narrow else 128), (M, N, cfg)
            assert cfg["num_warps"] == (8 if narrow and M > 32 else 4), (M, N, cfg)
            assert cfg["num_stages"] == 3
            tiles = -(-M // cfg["block_m"]) * -(-N // cfg["block_n"])
        if s > 1:  # split only while the grid is short of the target
            per_sm = W.GEMV_CONFIG["per_sm"] if cfg.get("gemv") else W.SPLIT_TARGET_PER_SM
            assert tiles * (s // 2) < per_sm * sms, (M, N, cfg)
    assert W.pick_words_config(1, 4096, 4096, cpu, gemv=False)["split_k"] == 8  # 32 tiles: the bucket's maximum
    assert W.pick_words_config(8, 4096, 4096, cpu, split_k=2, block_n=32) == dict(
        block_m=16, block_n=32, num_warps=4, num_stages=3, split_k=2)  # overrides win
    assert W.pick_words_config(8, 4096, 4096, cpu, gemv=True)["gemv"]


def _lora_members(widths, T, K, R=8, S=3, seed=0, pool=0):
    return lora_members(widths, T, K, R=R, S=S, seed=seed, dtype=torch.bfloat16 if CUDA else torch.float32,
                        device=DEV, pool=pool)[0]


@pytest.mark.gpu  # also runs on CPU under the interpreter
@needs_triton
@pytest.mark.parametrize("M,widths,R,kw", [
    (5, (24, 16, 16), 8, dict(split_k=2, block_n=16)),
    (1, (8,), 8, dict()),
    (3, (33, 17), 40, dict(split_k=1)),
    (2, (16, 8), 8, dict()),  # K 1024: the shrink splits K (atomic adds into h)
    (3, (16, 8), 8, dict(gemv=True, split_k=2)),  # beside the CUDA-core path's programs
    (4, (24, 16), 16, dict(pool=64)),  # rank-16 views of a rank-64 pool (the adapter pool's rank bound)
])
def test_kernel_runs_the_lora_shrinks_of_the_same_x(M, widths, R, kw):
    """The shrink programs in the word kernel's launch fill every member's h as the naive
    x A^T (zeros past a slot's rank and for tokens without adapter) and leave y bit-identical
    to the launch without them."""
    N, K = 40, 1024 if M == 2 else 256
    from quiver.kernels.lora_group import shrink_plan
    w = synthetic(N, K, seed=M)
    words = W.words_from_nf4(w)
    dtype = torch.bfloat16 if CUDA else torch.float32
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEV)
    token_slot = torch.tensor([0, -1, 3, 2, 1][:M], dtype=torch.int32, device=DEV)
    ms = _lora_members(widths, M, K, R=R, pool=kw.pop("pool", 0))
    if K == 1024:
        assert shrink_plan(x, token_slot, ms, target=W.BASE_SHRINK_TARGET, block_k=W.BASE_SHRINK_BLOCK_K).split_k > 1
    y = W.triton_nf4_words_linear(x, words, w.absmax, shrink=(token_slot, ms), **kw)
    assert torch.equal(y, W.triton_nf4_words_linear(x, words, w.absmax, **kw))
    for i, m in enumerate(ms):
        want = torch.zeros_like(m.h)
        for t in range(M):
            s = int(m.slot_map[int(token_slot[t]) + 1])
            if s >= 0:
                r = int(m.ranks[s])
                want[t, :r] = m.a[s, :r].float() @ x[t].float()
        torch.testing.assert_close(m.h, want, rtol=1e-3, atol=1e-3)
        assert m.h.abs().sum() > 0, f"member {i} got no shrink"


@pytest.mark.gpu  # also runs on CPU under the interpreter
@needs_triton
def test_nf4_linear_shrink_in_either_layout(monkeypatch):
    """NF4Linear.forward(x, shrink=...) gives the same h in the word layout (the shrink in the
    kernel's launch) and the byte layout (its own launch), and the same y as without it."""
    from quiver.server.quant import NF4Linear

    monkeypatch.setenv("QUIVER_FORCE_TRITON", "1")
    w = synthetic(40, 256, seed=4)
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(2)).to(DEV)
    token_slot = torch.tensor([2, -1, 0, 3], dtype=torch.int32, device=DEV)
    hs = []
    for mod in (NF4Linear.from_weight(w), NF4Linear(w, None)):
        ms = _lora_members((16, 24), 4, 256, seed=5)
        if CUDA:
            x = x.to(torch.bfloat16)
        y = mod(x, shrink=(token_slot, ms))
        torch.testing.assert_close(y, mod(x), rtol=0, atol=0)
        hs.append(torch.cat([m.h for m in ms], dim=1))
    assert hs[0].abs().sum() > 0
    torch.testing.assert_close(hs[0], hs[1], rtol=1e-3, atol=1e-3)


@needs_triton
def test_shrink_members_are_checked_before_the_launch():
    """A member whose layout the shrink programs cannot take (h of the wrong shape) is refused
    before the word kernel runs: y is not written, no h is touched."""
    w = synthetic(40, 256, seed=6)
    words = W.words_from_nf4(w)
    dtype = torch.bfloat16 if CUDA else torch.float32
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(3)).to(dtype).to(DEV)
    token_slot = torch.tensor([0, 1, 2], dtype=torch.int32, device=DEV)
    ms = _lora_members((16, 8), 3, 256)
    ms[1] = dataclasses.replace(ms[1], h=torch.zeros(2, ms[1].h.shape[1], device=DEV))
    with pytest.raises(AssertionError):
        W.triton_nf4_words_linear(x, words, w.absmax, shrink=(token_slot, ms))
    assert ms[0].h.abs().sum() == 0
    with pytest.raises(AssertionError):  # token_slot of another length
        W.triton_nf4_words_linear(x, words, w.absmax, shrink=(token_slot[:2], ms[:1]))
