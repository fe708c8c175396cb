"""Programmatic dependent launch (kernels/pdl.py).

CPU: PDL is never on off CUDA or under the interpreter; on CUDA only with QUIVER_PDL=1.
GPU (`-m gpu`, Hopper): a chain of dependent Quiver kernels (norm -> NF4 linear -> silu*up ->
NF4 linear -> LoRA -> attention-free residual norm), eager and replayed from a CUDA graph, gives
bit-identical results with PDL on and off: every kernel waits for its producer before reading.
"""

from __future__ import annotations

import pytest
import torch

from quiver.kernels import pdl

CUDA = torch.cuda.is_available()


def test_pdl_off_on_cpu_and_by_default(monkeypatch):
    monkeypatch.setenv("QUIVER_PDL", "1")
    assert pdl.pdl_kwargs(torch.zeros(2)) == {}
    if CUDA:
        monkeypatch.delenv("QUIVER_PDL")
        assert pdl.pdl_kwargs(torch.zeros(2, device="cuda")) == {}


def _chain(x, norm_w, w1, a1, w2, a2, lora):
    from quiver.kernels import fused, lora as L
    from quiver.kernels import nf4_words as W

    h = fused.triton_rms_norm(x, norm_w, 1e-5)
    gu = W.triton_nf4_words_linear(h, w1, a1)
    inter = gu.shape[1] // 2
    act = fused.triton_silu_mul(gu[:, :inter], gu[:, inter:])
    y = W.triton_nf4_words_linear(act, w2, a2)
    a_stack, b_stack, slots, ranks, scaling = lora
    hid = L.triton_lora_shrink(y, a_stack, slots, ranks)
    L.triton_lora_expand(hid, b_stack, slots, ranks, scaling, y)
    return fused.triton_add_rms_norm(y, x, norm_w, 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or torch.cuda.get_device_capability()[0] < 9, reason="needs a Hopper GPU")
def test_gpu_chain_same_with_and_without_pdl(monkeypatch):
    from quiver.kernels import nf4_words as W

    g = torch.Generator(device="cuda").manual_seed(0)
    T, H, I, S, R = 8, 1024, 2048, 4, 16
    dev = "cuda"
    words = lambda n, k: torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, device=dev, generator=g)  # noqa: E731
    w1, a1 = words(2 * I, H), torch.rand(H // 64, 2 * I, device=dev, generator=g) * 0.05
    w2, a2 = words(H, I), torch.rand(I // 64, H, device=dev, generator=g) * 0.05
    norm_w = torch.rand(H, device=dev, generator=g, dtype=torch.bfloat16) + 0.5
    lora = (torch.randn(S, R, H, device=dev, generator=g, dtype=torch.bfloat16) * 0.05,
            torch.randn(S, H, R, device=dev, generator=g, dtype=torch.bfloat16) * 0.05,
            torch.tensor([0, 1, -1, 2, 3, 3, 0, 1], dtype=torch.int32, device=dev),
            torch.tensor([16, 8, 4, 16], dtype=torch.int32, device=dev),
            torch.tensor([0.5, 1.0, 2.0, 0.25], device=dev))
    x = torch.randn(T, H, device=dev, generator=g, dtype=torch.bfloat16)
    monkeypatch.setenv("QUIVER_PDL", "1")
    assert pdl.pdl_kwargs(x), "QUIVER_PDL=1 should turn PDL on for a Hopper GPU"
    assert W.triton_nf4_words_linear(x, w1, a1).shape == (T, 2 * I)

    def run_both():
        eager = _chain(x, norm_w, w1, a1, w2, a2, lora)
        graph = torch.cuda.CUDAGraph()
        _chain(x, norm_w, w1, a1, w2, a2, lora)  # warm up (compiles) outside the capture
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            out = _chain(x, norm_w, w1, a1, w2, a2, lora)
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        return [t.clone() for t in eager], [t.clone() for t in out]

    on = run_both()
    monkeypatch.setenv("QUIVER_PDL", "0")
    off = run_both()
    for a, b in zip(on[0] + on[1], off[0] + off[1]):
        assert torch.isfinite(a.float()).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)
