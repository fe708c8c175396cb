"""Tests of quiver.kernels.fused (RMSNorm with residual add, rotary + KV-cache write, silu*mul).

Contract checked here:
  * the references equal Hugging Face's own modules (LlamaRMSNorm, apply_rotary_pos_emb with
    LlamaRotaryEmbedding's tables) bit for bit, and silu*mul equals torch's expression;
  * the Triton kernels equal the references: exactly for rotary, the cache writes and
    silu*mul (same roundings), within 1 ulp for the norm (fp32 reduction order), for fp32,
    fp16 and bf16, odd hidden sizes, GQA, strided q/k/v views (slices of a fused projection);
  * rope_kv writes exactly the cache rows named by slot_mapping and no other.
On CPU the Triton kernels run under TRITON_INTERPRET=1 at tiny shapes.
"""

from __future__ import annotations

import os

import pytest
import torch

from conftest import triton_runnable

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from quiver.kernels import fused as F  # noqa: E402

_OK, _WHY = triton_runnable(F.HAS_TRITON, F._rms_norm_kernel) if F.HAS_TRITON else (False, "no triton")
needs_triton = pytest.mark.skipif(not _OK, reason=_WHY)
DEV = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The CPU interpreter converts float32 -> bfloat16 by truncation, CUDA rounds to nearest: exact
# comparisons of bf16 results hold on CUDA only; under the interpreter bf16 gets 2 ulps.
INTERP_BF16 = (2e-2, 3.2e-2) if not CUDA else (0, 0)
ULP = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # 2 ulps: two roundings may each flip


def exact(dtype):
    return INTERP_BF16 if dtype == torch.bfloat16 else (0, 0)


def _rand(*shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEV)


def test_reference_norm_matches_hf():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    for dtype in DTYPES:
        x = _rand(5, 96, dtype=dtype)
        hf = LlamaRMSNorm(96, eps=1e-5).to(DEV)
        with torch.no_grad():
            hf.weight.copy_(_rand(96, dtype=torch.float32, seed=1))
        hf = hf.to(dtype)
        torch.testing.assert_close(F.reference_rms_norm(x, hf.weight, 1e-5), hf(x), rtol=0, atol=0)
        r = _rand(5, 96, dtype=dtype, seed=2)
        out, total = F.reference_add_rms_norm(x, r, hf.weight, 1e-5)
        torch.testing.assert_close(total, x + r, rtol=0, atol=0)
        torch.testing.assert_close(out, hf(x + r), rtol=0, atol=0)


def test_reference_rope_matches_hf():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    T, H, KVH, D = 6, 4, 2, 16
    rot = LlamaRotaryEmbedding(LlamaConfig(hidden_size=H * D, num_attention_heads=H, num_key_value_heads=KVH))
    for dtype in DTYPES:
        q, k, v = (_rand(T, n * D, dtype=dtype, seed=i) for i, n in enumerate((H, KVH, KVH)))
        pos = torch.tensor([[0, 3, 7, 8, 30, 31]])
        cos, sin = rot(q, pos)
        cos, sin = cos[0].to(DEV), sin[0].to(DEV)
        kc = torch.zeros(40, KVH, D, dtype=dtype, device=DEV)
        vc = torch.zeros_like(kc)
        slots = torch.tensor([5, 9, 10, 11, 33, 2], device=DEV)
        q_out = F.reference_rope_kv(q, k, v, cos, sin, kc, vc, slots)
        q_hf, k_hf = apply_rotary_pos_emb(q.view(T, H, D).transpose(0, 1)[None], k.view(T, KVH, D).transpose(0, 1)[None],
                                          cos[None], sin[None])
        torch.testing.assert_close(q_out.view(T, H, D), q_hf[0].transpose(0, 1), rtol=0, atol=0)
        torch.testing.assert_close(kc[slots], k_hf[0].transpose(0, 1), rtol=0, atol=0)
        torch.testing.assert_close(vc[slots], v.view(T, KVH, D), rtol=0, atol=0)
        untouched = torch.ones(40, dtype=torch.bool)
        untouched[slots.cpu()] = False
        assert kc[untouched.to(DEV)].abs().sum() == 0 and vc[untouched.to(DEV)].abs().sum() == 0


@pytest.mark.gpu  # also runs on CPU under the interpreter
@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [64, 100])
def test_triton_norm(dtype, n):
    x = _rand(7, n, dtype=dtype) * 3
    w = _rand(n, dtype=dtype, seed=1)
    r = _rand(7, n, dtype=dtype, seed=2)
    torch.testing.assert_close(F.triton_rms_norm(x, w, 1e-6), F.reference_rms_norm(x, w, 1e-6),
                               rtol=ULP[dtype], atol=ULP[dtype])
    out, total = F.triton_add_rms_norm(x, r, w, 1e-6)
    ref_out, ref_total = F.reference_add_rms_norm(x, r, w, 1e-6)
    torch.testing.assert_close(total, ref_total, rtol=exact(dtype)[0], atol=exact(dtype)[1])
    torch.testing.assert_close(out, ref_out, rtol=ULP[dtype], atol=ULP[dtype])
    # the norm is not the identity: a wrong weight or a missing rstd fails here
    assert not torch.allclose(out.float(), total.float(), atol=1e-2)


@pytest.mark.gpu  # also runs on CPU under the interpreter
@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,KVH,D", [(4, 2, 16), (3, 3, 8)])
def test_triton_rope_kv(dtype, H, KVH, D):
    T = 5
    qkv = _rand(T, (H + 2 * KVH) * D, dtype=dtype)  # one fused projection output; q, k, v are strided views
    q, k, v = qkv.split([H * D, KVH * D, KVH * D], dim=1)
    ang = torch.rand(T, D // 2, generator=torch.Generator().manual_seed(3)) * 6
    cos = torch.cat([ang.cos(), ang.cos()], 1).to(dtype).to(DEV)
    sin = torch.cat([ang.sin(), ang.sin()], 1).to(dtype).to(DEV)
    slots = torch.tensor([4, 0, 7, 2, 9], device=DEV)
    caches = [torch.full((12, KVH, D), float("nan"), dtype=dtype, device=DEV) for _ in range(4)]
    ref_q = F.reference_rope_kv(q, k, v, cos, sin, caches[0], caches[1], slots)
    out_q = F.triton_rope_kv(q, k, v, cos, sin, caches[2], caches[3], slots)
    rtol, atol = exact(dtype)
    torch.testing.assert_close(out_q, ref_q, rtol=rtol, atol=atol)
    for ref, got in ((caches[0], caches[2]), (caches[1], caches[3])):
        torch.testing.assert_close(got, ref, rtol=rtol, atol=atol, equal_nan=True)
    assert torch.isnan(caches[2][1]).all()  # slot 1 was named by no token: untouched
    assert not torch.equal(out_q, q)  # rotated


@pytest.mark.gpu  # also runs on CPU under the interpreter
@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_silu_mul(dtype):
    gu = _rand(6, 2 * 1500, dtype=dtype) * 4  # N not a multiple of the block, strided views
    gate, up = gu[:, :1500], gu[:, 1500:]
    torch.testing.assert_close(F.triton_silu_mul(gate, up), F.reference_silu_mul(gate, up),
                               rtol=ULP[dtype], atol=ULP[dtype])
