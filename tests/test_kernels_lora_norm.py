"""Tests of quiver.kernels.lora_norm (LoRA expand + residual add + RMSNorm in one kernel).

Contract: lora_add_rms_norm(h, B, token_slot, ranks, scaling, y, residual, weight, eps) equals
lora_expand followed by add_rms_norm (the two kernels it replaces), for rows with and without
an adapter, ranks below the pool rank, a slot map, and a hidden size that is not a multiple of
the column chunk, in both launch forms (chunks of a row in parallel, the last one normalizing;
one program per row); y is left unmodified. The residual stream (`total`) matches exactly, the
normalized row within the norm's float32 reduction order (1 ulp). On CPU the kernel runs under
TRITON_INTERPRET=1 in float32 at small shapes; on CUDA in bf16 against the unfused kernels.
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
from quiver.kernels import lora as L  # noqa: E402
from quiver.kernels import lora_norm as LN  # noqa: E402

_OK, _WHY = (triton_runnable(LN.HAS_TRITON, LN._lora_add_rms_norm_kernel) if LN.HAS_TRITON
             else (False, "no triton"))
needs_triton = pytest.mark.skipif(not _OK, reason=_WHY)
DEV = "cuda" if CUDA else "cpu"


def case(T=7, N=1100, S=3, R=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    ranks = torch.tensor([R, 5, 9][:S], dtype=torch.int32)
    b = rnd(S, N, R) * 0.1  # not zero beyond each rank: the kernel must stop at the rank
    h = rnd(T, R)
    d = dict(h=h, b_stack=b.to(dtype), ranks=ranks, scaling=torch.tensor([0.5, 2.0, 1.0][:S]),
             y=rnd(T, N).to(dtype), residual=rnd(T, N).to(dtype), weight=(1 + 0.1 * rnd(N)).to(dtype))
    # slot map of a stack that holds slots 0 and 2 only (as the pool's present map): token slots
    # -1 (base), 0, 1 (no adapter in this stack), 2
    token_slot = torch.tensor([-1, 0, 1, 2, 0, 2, -1][:T], dtype=torch.int32)
    slot_map = torch.tensor([-1, 0, -1, 2], dtype=torch.int32)
    return {k: v.to(DEV) for k, v in d.items()}, token_slot.to(DEV), slot_map.to(DEV)


def unfused(d, token_slot, slot_map, fn_expand, fn_norm, eps=1e-5):
    y = fn_expand(d["h"], d["b_stack"], token_slot, d["ranks"], d["scaling"], d["y"].clone(), slot_map=slot_map)
    return fn_norm(y, d["residual"], d["weight"], eps)


def test_reference_is_expand_then_add_rms_norm():
    d, ts, sm = case()
    y0 = d["y"].clone()
    out, total = LN.reference_lora_add_rms_norm(**d, token_slot=ts, eps=1e-5, slot_map=sm)
    ref_out, ref_total = unfused(d, ts, sm, L.reference_lora_expand, F.reference_add_rms_norm)
    assert torch.equal(out, ref_out) and torch.equal(total, ref_total)
    assert torch.equal(d["y"], y0)
    # rows whose slot has no adapter in this stack are the plain residual add
    plain = (d["y"] + d["residual"])[[0, 2, 6]]
    assert torch.equal(total[[0, 2, 6]], plain)
    assert not torch.equal(total[[1, 3]], (d["y"] + d["residual"])[[1, 3]])


@needs_triton
@pytest.mark.parametrize("N,block_c,split", [(1100, 512, True), (1100, 256, True), (1100, 512, False),
                                            (512, 512, True), (96, 64, True), (96, 128, False)])
def test_triton_matches_unfused_reference(N, block_c, split):
    d, ts, sm = case(N=N)
    y0 = d["y"].clone()
    out, total = LN.triton_lora_add_rms_norm(**d, token_slot=ts, eps=1e-5, slot_map=sm, block_c=block_c, split=split)
    ref_out, ref_total = unfused(d, ts, sm, L.reference_lora_expand, F.reference_add_rms_norm)
    torch.testing.assert_close(total, ref_total, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, ref_out, rtol=2e-6, atol=2e-6)
    assert torch.equal(d["y"], y0)


@needs_triton
def test_triton_without_slot_map_and_empty_batch():
    d, ts, _ = case(S=3)
    ts = torch.tensor([-1, 0, 1, 2, 0, 2, 1], dtype=torch.int32, device=DEV)
    out, total = LN.triton_lora_add_rms_norm(**d, token_slot=ts, eps=1e-6, block_c=256)
    ref_out, ref_total = unfused(d, ts, None, L.reference_lora_expand, F.reference_add_rms_norm, eps=1e-6)
    torch.testing.assert_close(total, ref_total, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, ref_out, rtol=2e-6, atol=2e-6)
    e = {k: (v[:0] if k in ("h", "y", "residual") else v) for k, v in d.items()}
    out, total = LN.triton_lora_add_rms_norm(**e, token_slot=ts[:0], eps=1e-6)
    assert out.shape == (0, d["y"].shape[1]) and total.shape == out.shape


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_matches_the_unfused_kernels(dtype):
    d, ts, sm = case(T=7, N=4096, R=16, dtype=dtype)
    out, total = LN.triton_lora_add_rms_norm(**d, token_slot=ts, eps=1e-5, slot_map=sm)
    for _ in range(3):  # the row counters re-arm: repeated launches agree
        again = LN.triton_lora_add_rms_norm(**d, token_slot=ts, eps=1e-5, slot_map=sm)
        assert torch.equal(again[0], out) and torch.equal(again[1], total)
    ref_out, ref_total = unfused(d, ts, sm, L.triton_lora_expand, F.triton_add_rms_norm)
    ulp = 8e-3 if dtype == torch.bfloat16 else 1e-3
    torch.testing.assert_close(total.float(), ref_total.float(), rtol=ulp, atol=ulp)
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=2 * ulp, atol=2 * ulp)
    # nearly every element is bit-identical: only the norm's sum order differs
    assert (total == ref_total).float().mean() > 0.99


@needs_triton
def test_more_rows_than_counters_runs_a_program_per_row(monkeypatch):
    from quiver.kernels import nf4

    d, ts, sm = case(N=1100)
    ref_out, ref_total = unfused(d, ts, sm, L.reference_lora_expand, F.reference_add_rms_norm)
    monkeypatch.setattr(nf4, "LOCKS_SIZE", 2)
    out, total = LN.triton_lora_add_rms_norm(**d, token_slot=ts, eps=1e-5, slot_map=sm)
    torch.testing.assert_close(total, ref_total, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, ref_out, rtol=2e-6, atol=2e-6)
