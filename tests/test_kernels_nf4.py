"""Tests for quiver.kernels.nf4 (NF4 W4A16 base linear).

CPU: the PyTorch reference against bitsandbytes' dequantize path, and the Triton kernels under
TRITON_INTERPRET=1 at small shapes. GPU (`-m gpu`): real Llama-7B shapes against bitsandbytes.
"""

import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():  # run the Triton kernels in the interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

from quiver.kernels import nf4  # noqa: E402

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except Exception:  # pragma: no cover
    HAVE_TRITON = False

try:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF

    HAVE_BNB = True
except Exception:  # pragma: no cover
    bnb = bnbF = None
    HAVE_BNB = False

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed")
needs_bnb = pytest.mark.skipif(not HAVE_BNB, reason="bitsandbytes not installed")
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")

# max|got - ref| <= TOL[dtype] * max(1, max|ref|). bf16 is loose because the Triton interpreter
# rounds float32 -> bfloat16 by truncation (one extra ulp on weights and outputs on CPU).
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
GPU_TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 1.5e-2}


def assert_close(got, ref, dtype, what, tol=None):
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    tol = (tol or TOL)[dtype]
    scale = max(1.0, ref.float().abs().max().item())
    diff = (got.float() - ref.float()).abs().max().item()
    assert diff <= tol * scale, f"{what}: max|diff|={diff:.3e} > {tol:.1e}*{scale:.3e} (dtype {dtype})"


def quantize(N, K, *, compress_statistics=True, dtype=torch.float32, blocksize=64, seed=0, device="cpu",
             quant_storage=torch.uint8):
    """(packed, quant_state) from bitsandbytes for a random [N, K] weight."""
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(N, K, generator=g) * 0.05).to(dtype).to(device)
    return bnbF.quantize_4bit(W, blocksize=blocksize, compress_statistics=compress_statistics, quant_type="nf4",
                              quant_storage=quant_storage)


def synthetic_weight(N, K, seed=0, device="cpu"):
    """NF4Weight with random codes / scales, no bitsandbytes needed."""
    g = torch.Generator().manual_seed(seed)
    C = K // 64
    qweight = torch.randint(0, 256, (C, N, 32), generator=g, dtype=torch.uint8)
    absmax = torch.rand(C, N, generator=g) * 0.1 + 0.01
    w = nf4.NF4Weight(qweight=qweight, absmax=absmax, code=torch.tensor(nf4.NF4_CODE), shape=(N, K))
    return w.to(device)


# ---------------------------------------------------------------------------------------------
# (1) reference == bitsandbytes dequantize path


@needs_bnb
@pytest.mark.parametrize("cs", [False, True], ids=["plain", "double_quant"])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,K", [(97, 128), (96, 192), (33, 576)])
def test_reference_matches_bnb(cs, wdtype, N, K):
    packed, qs = quantize(N, K, compress_statistics=cs, dtype=wdtype, seed=N + K)
    w = nf4.nf4_weight_from_bnb(packed, qs)
    assert w.shape == (N, K) and w.blocksize == 64 and w.dtype == wdtype
    deq_bnb = bnbF.dequantize_4bit(packed, qs)  # [N, K] wdtype
    # the re-layout is lossless and the dequantized values are bit-identical
    assert torch.equal(w.bnb_packed(), packed), "re-layout is not a permutation of bnb's nibbles"
    assert torch.equal(w.dequantize(), deq_bnb)
    assert torch.equal(w.dequantize(torch.float32).to(wdtype), deq_bnb)
    if cs:
        ref_absmax = bnbF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
        assert torch.equal(nf4._dequantize_absmax(qs), ref_absmax.float())
    g = torch.Generator().manual_seed(1)
    bias = torch.randn(N, generator=g).to(wdtype)
    for M in (1, 3, 17):
        x = torch.randn(M, K, generator=g).to(wdtype)
        y = nf4.reference_nf4_linear(x, w)
        assert y.dtype == wdtype and y.shape == (M, N)
        assert torch.equal(y, x @ deq_bnb.T), f"M={M}: reference != x @ dequantize_4bit(...).T"
        yb = nf4.reference_nf4_linear(x, w, bias)
        assert torch.equal(yb, x @ deq_bnb.T + bias)


@needs_bnb
@pytest.mark.parametrize("blocksize,K", [(128, 256), (256, 512)])
def test_reference_larger_blocksize(blocksize, K):
    packed, qs = quantize(40, K, blocksize=blocksize, compress_statistics=True)
    w = nf4.nf4_weight_from_bnb(packed, qs)
    assert w.blocksize == blocksize
    assert torch.equal(w.dequantize(), bnbF.dequantize_4bit(packed, qs))


@needs_bnb
def test_from_params4bit_module_and_storage_dtype():
    N, K = 50, 128
    W = torch.randn(N, K) * 0.05
    p = bnb.nn.Params4bit(W, requires_grad=False, compress_statistics=True, quant_type="nf4").to("cpu")
    deq = bnbF.dequantize_4bit(p.data, p.quant_state)
    w = nf4.nf4_weight_from_bnb(p)
    assert torch.equal(w.dequantize(), deq)
    lin = bnb.nn.Linear4bit(K, N, bias=False, compress_statistics=True, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(W, requires_grad=False, compress_statistics=True, quant_type="nf4")
    lin = lin.to("cpu")
    deq = bnbF.dequantize_4bit(lin.weight.data, lin.weight.quant_state)
    assert torch.equal(nf4.nf4_weight_from_bnb(lin).dequantize(), deq)
    # quant_storage other than uint8 (FSDP-style): bytes are the same
    packed, qs = quantize(N, K, quant_storage=torch.bfloat16)
    assert packed.dtype == torch.bfloat16
    assert torch.equal(nf4.nf4_weight_from_bnb(packed, qs).dequantize(), bnbF.dequantize_4bit(packed, qs))


@needs_bnb
def test_from_bnb_rejects_unsupported():
    W = torch.randn(16, 128)
    q, qs = bnbF.quantize_4bit(W, quant_type="fp4")
    with pytest.raises(ValueError, match="NF4"):
        nf4.nf4_weight_from_bnb(q, qs)
    q, qs = bnbF.quantize_4bit(torch.randn(16, 96), quant_type="nf4")
    with pytest.raises(ValueError, match="multiple of 64"):
        nf4.nf4_weight_from_bnb(q, qs)
    q, qs = bnbF.quantize_4bit(W, quant_type="nf4", blocksize=32)
    with pytest.raises(ValueError, match="blocksize"):
        nf4.nf4_weight_from_bnb(q, qs)
    p = bnb.nn.Params4bit(W, requires_grad=False, quant_type="nf4")  # never moved: not quantized
    with pytest.raises(ValueError, match="quantized"):
        nf4.nf4_weight_from_bnb(p)


def test_reference_synthetic_and_shapes():
    w = synthetic_weight(24, 128)
    x = torch.randn(2, 3, 128)
    y = nf4.reference_nf4_linear(x, w)
    assert y.shape == (2, 3, 24)
    assert torch.allclose(y, x @ w.dequantize(torch.float32).T)
    with pytest.raises(AssertionError):
        nf4.reference_nf4_linear(torch.randn(2, 64), w)


def test_module_imports_without_triton_and_bnb():
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['bitsandbytes'] = None\n"
        "import torch\n"
        "import quiver.kernels.nf4 as m\n"
        "assert not m.HAS_TRITON and 'bitsandbytes' not in {k for k, v in sys.modules.items() if v}\n"
        "w = m.NF4Weight(torch.zeros(2, 8, 32, dtype=torch.uint8), torch.ones(2, 8),\n"
        "                torch.tensor(m.NF4_CODE), (8, 128))\n"
        "assert m.nf4_linear(torch.ones(1, 128), w).shape == (1, 8)\n"
        "print('ok')\n"
    )
    path = nf4.__file__
    env = {k: v for k, v in os.environ.items() if k != "QUIVER_FORCE_TRITON"}
    r = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# (2) Triton kernels vs reference at small shapes (interpreter on CPU)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N,K", [(96, 128), (97, 192)])
@pytest.mark.parametrize("M", [1, 5, 33])
def test_triton_matches_reference(dtype, N, K, M):
    w = synthetic_weight(N, K, seed=N * K + M, device=DEV)
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, K, generator=g).to(dtype).to(DEV)
    ref = nf4.reference_nf4_linear(x, w)
    y = nf4.triton_nf4_linear(x, w)  # default config (gemv for M=1, mm otherwise)
    assert y.dtype == dtype
    assert_close(y, ref, dtype, f"auto M={M} N={N} K={K}")
    y = nf4.triton_nf4_linear(x, w, kernel="mm", split_k=1)
    assert_close(y, ref, dtype, f"mm M={M} N={N} K={K}")
    if M <= 5:  # the GEMV kernel is slow in the interpreter at larger M
        y = nf4.triton_nf4_linear(x, w, kernel="gemv", split_k=1)
        assert_close(y, ref, dtype, f"gemv M={M} N={N} K={K}")


@needs_triton
@pytest.mark.parametrize(
    "kw",
    [
        dict(kernel="mm", split_k=2),
        dict(kernel="mm", split_k=3, block_m=32, block_n=16, split_k_mode="reduce"),
        dict(kernel="mm", chunks=2),  # C=3: masked tail chunk
        dict(kernel="mm", chunks=4, split_k=2, num_stages=3),
        dict(kernel="gemv", split_k=2, chunks=2),
        dict(kernel="gemv", split_k=3, chunks=1, split_k_mode="reduce"),
        dict(kernel="gemv", block_n=32, chunks=4),
    ],
    ids=["mm_s2", "mm_s3_32x16_reduce", "mm_ch2", "mm_ch4_s2", "gemv_s2", "gemv_s3_reduce", "gemv_n32"],
)
def test_triton_configs_bias_and_layouts(kw):
    N, K = 97, 192
    w = synthetic_weight(N, K, seed=7, device=DEV)
    g = torch.Generator().manual_seed(3)
    bias = torch.randn(N, generator=g).to(DEV)
    # 3-D input, M = 3
    x = torch.randn(1, 3, K, generator=g).to(DEV)
    assert_close(nf4.triton_nf4_linear(x, w, bias, **kw), nf4.reference_nf4_linear(x, w, bias), torch.float32,
                 f"{kw} bias 3-D")
    # non-contiguous x (stride_k != 1), bf16 bias/out
    xt = torch.randn(K, 2, generator=g).to(torch.bfloat16).to(DEV).t()
    assert not xt.is_contiguous()
    bb = bias.to(torch.bfloat16)
    assert_close(nf4.triton_nf4_linear(xt, w, bb, **kw), nf4.reference_nf4_linear(xt, w, bb), torch.bfloat16,
                 f"{kw} non-contiguous bf16")


@needs_triton
@pytest.mark.parametrize("kernel", ["gemv", "mm"])
def test_triton_split_k_fixup_deterministic_and_rearmed(kernel):
    """The single-launch fixup equals the two-pass reduction bit for bit and leaves its tile
    counters at zero (so the next launch, or a graph replay, starts clean)."""
    N, K = 40, 512  # C = 8 chunks
    w = synthetic_weight(N, K, seed=11, device=DEV)
    x = torch.randn(3, K).to(DEV)
    bias = torch.randn(N).to(DEV)
    kw = dict(kernel=kernel, split_k=4, gemv_max_m=4, chunks=1, block_n=16)
    ys = [nf4.triton_nf4_linear(x, w, bias, **kw) for _ in range(2)]  # second call reuses counters
    y_red = nf4.triton_nf4_linear(x, w, bias, split_k_mode="reduce", **kw)
    y_one = nf4.triton_nf4_linear(x, w, bias, **dict(kw, split_k=1))
    assert torch.equal(ys[0], ys[1]) and torch.equal(ys[0], y_red)
    assert_close(ys[0], y_one, torch.float32, "split vs no split")
    assert_close(ys[0], nf4.reference_nf4_linear(x, w, bias), torch.float32, "split vs reference")
    locks = nf4._tile_locks(x.device)
    assert int(locks.abs().sum()) == 0, "tile counters not re-armed"


@needs_triton
def test_triton_dequantize_and_prefill_path():
    w = synthetic_weight(97, 192, seed=5, device=DEV)
    for dtype in (torch.float32, torch.float16):  # bit-exact (the interpreter truncates bf16 casts)
        assert torch.equal(nf4.triton_nf4_dequantize(w, dtype), w.dequantize(dtype)), dtype
    assert_close(nf4.triton_nf4_dequantize(w, torch.bfloat16, block_n=16), w.dequantize(torch.bfloat16),
                 torch.bfloat16, "bf16 dequant")
    x = torch.randn(2, 9, 192).to(DEV)
    bias = torch.randn(97).to(DEV)
    ref = nf4.reference_nf4_linear(x, w, bias)
    assert_close(nf4.triton_nf4_linear(x, w, bias, kernel="dequant"), ref, torch.float32, "dequant path")
    assert nf4.pick_config(nf4.DEQUANT_MIN_M, 4096, 4096)["kernel"] == "dequant"
    assert nf4.pick_config(nf4.DEQUANT_MIN_M - 1, 4096, 4096)["kernel"] == "mm"


@needs_triton
def test_triton_fp16_and_empty():
    w = synthetic_weight(40, 128, seed=2, device=DEV)
    x = torch.randn(4, 128).half().to(DEV)
    assert_close(nf4.triton_nf4_linear(x, w), nf4.reference_nf4_linear(x, w), torch.float16, "fp16")
    y = nf4.triton_nf4_linear(torch.randn(0, 128).to(DEV), w)
    assert y.shape == (0, 40)


@needs_triton
@needs_bnb
def test_triton_on_bnb_weight():
    N, K = 97, 192
    packed, qs = quantize(N, K, compress_statistics=True, dtype=torch.bfloat16)
    w = nf4.nf4_weight_from_bnb(packed, qs).to(DEV)
    deq = bnbF.dequantize_4bit(packed, qs).to(DEV)
    for M in (1, 6):
        x = torch.randn(M, K).to(torch.bfloat16).to(DEV)
        assert_close(nf4.triton_nf4_linear(x, w), x @ deq.T, torch.bfloat16, f"bnb weight M={M}")


@needs_triton
def test_dispatch(monkeypatch):
    w = synthetic_weight(32, 128, seed=4)
    x = torch.randn(2, 128)
    monkeypatch.delenv("QUIVER_FORCE_TRITON", raising=False)
    assert not nf4.use_triton(x)
    assert torch.equal(nf4.nf4_linear(x, w), nf4.reference_nf4_linear(x, w))  # CPU -> reference
    if not CUDA:
        monkeypatch.setenv("QUIVER_FORCE_TRITON", "1")
        assert nf4.use_triton(x)
        assert_close(nf4.nf4_linear(x, w), nf4.reference_nf4_linear(x, w), torch.float32, "forced triton")


def test_pick_config():
    c = nf4.pick_config(1, 4096, 4096, torch.device("cpu"))
    assert c["kernel"] == "gemv" and c["split_k"] >= 1
    c = nf4.pick_config(8, 4096, 4096, torch.device("cpu"))
    assert c["kernel"] == "mm" and c["block_m"] == 16 and 1 <= c["split_k"] <= nf4.SPLITK_MAX
    assert c["chunks"] >= 1 and c["num_stages"] >= 1
    c = nf4.pick_config(512, 4096, 4096, torch.device("cpu"))
    assert c["kernel"] == "mm" and c["split_k"] == 1
    assert nf4.pick_config(4096, 4096, 4096, torch.device("cpu"))["kernel"] == "dequant"
    c = nf4.pick_config(8, 4096, 4096, torch.device("cpu"), kernel="gemv", block_n=64, split_k=3)
    assert c["kernel"] == "gemv" and c["block_n"] == 64 and c["split_k"] == 3
    c = nf4.pick_config(2, 4096, 4096, torch.device("cpu"), gemv_max_m=4)
    assert c["kernel"] == "gemv"


# ---------------------------------------------------------------------------------------------
# (3) GPU: Llama-2-7B shapes, bf16, against bitsandbytes


def _rms(t):
    return t.float().pow(2).mean().sqrt().item()


def _bnb_cuda_weight(N, K, seed):
    torch.manual_seed(seed)
    W = torch.randn(N, K, dtype=torch.bfloat16) * 0.02
    return bnb.nn.Params4bit(W, requires_grad=False, compress_statistics=True, quant_type="nf4").to("cuda")


@pytest.mark.gpu
@gpu
@needs_bnb
@pytest.mark.parametrize("N,K", [(4096, 4096), (11008, 4096)])
def test_gpu_dequant_bit_exact(N, K):
    p = _bnb_cuda_weight(N, K, seed=N)
    w = nf4.nf4_weight_from_bnb(p)
    qs = p.quant_state
    absmax = bnbF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    assert torch.equal(nf4._dequantize_absmax(qs), absmax.float()), "absmax != bnb dequantize_blockwise + offset"
    assert torch.equal(w.bnb_packed(), p.data)
    deq = bnbF.dequantize_4bit(p.data, qs)  # bnb's CUDA kernel
    ours = w.dequantize(torch.bfloat16)
    diff = (ours.float() - deq.float()).abs().max().item()
    assert torch.equal(ours, deq), f"torch dequant != bnb CUDA dequant: max diff {diff:.3e}"


@pytest.mark.gpu
@gpu
@needs_triton
@needs_bnb
@pytest.mark.parametrize("N,K", [(4096, 4096), (11008, 4096), (4096, 11008)])
@pytest.mark.parametrize("M", [1, 8, 32, 128])
def test_gpu_llama_shapes(N, K, M):
    p = _bnb_cuda_weight(N, K, seed=N + K + M)
    w = nf4.nf4_weight_from_bnb(p)
    deq = bnbF.dequantize_4bit(p.data, p.quant_state)  # [N, K] bf16
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    ref = x @ deq.T
    y = nf4.triton_nf4_linear(x, w)
    torch.cuda.synchronize()
    assert_close(y, ref, torch.bfloat16, f"M={M} N={N} K={K}", tol=GPU_TOL)
    assert_close(nf4.nf4_linear(x, w, bias), ref + bias, torch.bfloat16, f"bias M={M}", tol=GPU_TOL)
    # accuracy vs the exact product with the unrounded NF4 weights: no worse than the bnb
    # dequantize -> bf16 cuBLAS path (same error sources: bf16 weights, bf16 output)
    exact = x.double() @ w.dequantize(torch.float32).double().T
    y_bnb = bnb.matmul_4bit(x, p.t(), quant_state=p.quant_state)
    err_ours, err_ref, err_bnb = (_rms(t.double() - exact) for t in (y, ref, y_bnb))
    assert err_ours <= 1.25 * err_ref + 1e-4 * _rms(exact), (
        f"rms err ours {err_ours:.3e} vs dequant+cuBLAS {err_ref:.3e} (bnb.matmul_4bit {err_bnb:.3e})")


@pytest.mark.gpu
@gpu
@needs_triton
@pytest.mark.parametrize("kw", [dict(kernel="gemv"), dict(kernel="mm", split_k=4), dict(kernel="mm", split_k=1),
                                dict(kernel="gemv", split_k=3, split_k_mode="reduce"), dict(kernel="dequant")])
@pytest.mark.parametrize("M", [1, 8, 300])
def test_gpu_configs_and_fp32(kw, M):
    w = synthetic_weight(1000, 1024, seed=M, device="cuda")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = torch.randn(M, 1024, device="cuda").to(dtype)
        ref = x.double() @ w.dequantize(dtype).double().T
        assert_close(nf4.triton_nf4_linear(x, w, **kw), ref, dtype, f"{kw} M={M} {dtype}", tol=GPU_TOL)
        assert torch.equal(nf4.triton_nf4_dequantize(w, dtype), w.dequantize(dtype))


@pytest.mark.gpu
@gpu
@needs_triton
@pytest.mark.parametrize("M", [1, 8, 32, 128, 1024])
def test_gpu_small_n_and_odd_shapes(M):
    """GQA-like k/v projections (small N -> split-K on every path) and a K that is not a multiple
    of the per-iteration chunk count (SmolLM2-135M: K = 576 = 9 chunks)."""
    for N, K in ((256, 4096), (1024, 4096), (192, 576), (1536, 576), (576, 1536)):
        w = synthetic_weight(N, K, seed=N + K + M, device="cuda")
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        ref = x.double() @ w.dequantize(torch.bfloat16).double().T
        assert_close(nf4.triton_nf4_linear(x, w), ref, torch.bfloat16, f"M={M} N={N} K={K}", tol=GPU_TOL)


@pytest.mark.gpu
@gpu
@needs_triton
@pytest.mark.parametrize("prepare", [True, False], ids=["prepared", "counters_allocated_in_capture"])
def test_gpu_cuda_graph_capture(prepare):
    w = synthetic_weight(4096, 4096, device="cuda")
    for M, kw in ((1, {}), (8, {}), (1, dict(split_k=4)), (8, dict(split_k=4, split_k_mode="reduce"))):
        x = torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16)
        y_eager = nf4.triton_nf4_linear(x, w, **kw)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            if prepare:
                nf4.triton_nf4_linear(x, w, **kw)  # compile + allocate split-K counters of s
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            y = nf4.triton_nf4_linear(x, w, **kw)
        for _ in range(3):  # replays must re-arm the split-K counters
            y.zero_()
            g.replay()
            torch.cuda.synchronize()
            assert torch.equal(y, y_eager), f"M={M} {kw}: graph replay differs from eager"
