"""Tests of quiver.kernels.lora_rope (group LoRA expand of q|k|v + rotary + KV-cache write).

Contract: group_expand_rope_kv equals lora_expand of every member into y followed by rope_kv
on y's q, k, v columns: the same rotated q, the same cache rows (and no others), the same y,
for members on a subset of q, k, v, GQA widths, ranks below the pool rank, rows without an
adapter; repeated launches agree (the row counters re-arm). CPU: Triton under
TRITON_INTERPRET=1 in float32; CUDA: bf16 against the two unfused kernels, bit for bit.
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
from quiver.kernels.lora import reference_lora_expand  # noqa: E402
from quiver.kernels import lora_group as LG  # noqa: E402
from quiver.kernels import lora_rope as LR  # noqa: E402

_OK, _WHY = triton_runnable(LR.HAS_TRITON, LR._group_expand_rope_kernel) if LR.HAS_TRITON else (False, "no triton")
needs_triton = pytest.mark.skipif(not _OK, reason=_WHY)
DEV = "cuda" if CUDA else "cpu"


def case(T=6, H=6, KVH=2, D=16, S=3, R=8, on=(0, 2), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    widths = [H * D, KVH * D, KVH * D]
    cols = [0, widths[0], widths[0] + widths[1]]
    members = []
    for i in on:  # members: LoRA on these of q, k, v (0, 1, 2)
        ranks = torch.tensor([R, 3, 5][:S], dtype=torch.int32)
        members.append(LG.GroupMember(
            a=rnd(S, R, 32).to(dtype).to(DEV), b=(rnd(S, widths[i], R) * 0.3).to(dtype).to(DEV),
            ranks=ranks.to(DEV), scaling=torch.tensor([0.5, 2.0, 1.0][:S]).to(DEV),
            slot_map=torch.tensor([-1, 0, -1, 2], dtype=torch.int32).to(DEV), h=rnd(T, R).to(DEV), col=cols[i]))
    y = rnd(T, sum(widths)).to(dtype).to(DEV)
    ang = rnd(T, D // 2)
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(dtype).to(DEV)
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(dtype).to(DEV)
    token_slot = torch.tensor([-1, 0, 1, 2, 0, 2] * T, dtype=torch.int32)[:T].to(DEV)
    n_slots = 2 * T
    slots = torch.randperm(n_slots, generator=g)[:T].to(DEV)
    x = rnd(T, 32).to(dtype).to(DEV)
    caches = [torch.full((n_slots, KVH, D), 7.0, dtype=dtype, device=DEV) for _ in range(4)]
    return x, token_slot, members, y, widths, cos, sin, slots, caches


def _run(fn, x, ts, members, y, widths, cos, sin, slots, kc, vc):
    y = y.clone()
    q = fn(ts, members, y, widths, cos, sin, kc, vc, slots)
    return q, y


@needs_triton
@pytest.mark.parametrize("on", [(0, 1, 2), (0, 2), (1,)])
def test_triton_matches_reference(on):
    x, ts, members, y, widths, cos, sin, slots, caches = case(on=on)
    q_ref, y_ref = _run(LR.reference_group_expand_rope_kv, x, ts, members, y, widths, cos, sin, slots, *caches[:2])
    for _ in range(2):  # a second launch: the row counters were re-armed
        q, y_out = _run(LR.triton_group_expand_rope_kv, x, ts, members, y, widths, cos, sin, slots, *caches[2:])
        torch.testing.assert_close(y_out, y_ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(q, q_ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(caches[2], caches[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(caches[3], caches[1], rtol=1e-6, atol=1e-6)
    untouched = [s for s in range(caches[0].shape[0]) if s not in slots.tolist()]
    assert torch.all(caches[2][untouched] == 7.0) and torch.all(caches[3][untouched] == 7.0)


def test_reference_is_group_expand_then_rope_kv():
    x, ts, members, y, widths, cos, sin, slots, caches = case()
    y1 = y.clone()
    for m in members:  # the expand half of lora_group, with the shrink output given
        reference_lora_expand(m.h, m.b, ts, m.ranks, m.scaling, y1[:, m.col:m.col + m.b.shape[1]], slot_map=m.slot_map)
    q_ref = F.reference_rope_kv(*y1.split(widths, -1), cos, sin, caches[0], caches[1], slots)
    q, y2 = _run(LR.reference_group_expand_rope_kv, x, ts, members, y, widths, cos, sin, slots, *caches[2:])
    assert torch.equal(q, q_ref) and torch.equal(y2, y1) and torch.equal(caches[2], caches[0])
    assert not torch.equal(y2, y)  # the adapters changed some rows


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_bit_identical_to_unfused_kernels():
    from quiver.kernels.lora import triton_lora_expand

    x, ts, members, y, widths, cos, sin, slots, caches = case(T=32, H=32, KVH=8, D=128, R=16, S=3,
                                                              on=(0, 1, 2), dtype=torch.bfloat16)
    y_ref = y.clone()
    for m in members:  # the BGMV expand computes each element as the group expand does
        triton_lora_expand(m.h, m.b, ts, m.ranks, m.scaling, y_ref[:, m.col:m.col + m.b.shape[1]], slot_map=m.slot_map)
    q_ref = F.triton_rope_kv(*y_ref.split(widths, -1), cos, sin, caches[0], caches[1], slots)
    y_out = y.clone()
    q = LR.triton_group_expand_rope_kv(ts, members, y_out, widths, cos, sin, caches[2], caches[3], slots)
    assert torch.equal(y_out, y_ref) and torch.equal(q, q_ref)
    assert torch.equal(caches[2], caches[0]) and torch.equal(caches[3], caches[1])


@needs_triton
def test_more_rows_than_counters_takes_the_two_launches(monkeypatch):
    from quiver.kernels import nf4

    x, ts, members, y, widths, cos, sin, slots, caches = case()
    q_ref, y_ref = _run(LR.reference_group_expand_rope_kv, x, ts, members, y, widths, cos, sin, slots, *caches[:2])
    monkeypatch.setattr(nf4, "LOCKS_SIZE", 2)
    q, y_out = _run(LR.triton_group_expand_rope_kv, x, ts, members, y, widths, cos, sin, slots, *caches[2:])
    torch.testing.assert_close(y_out, y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(q, q_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(caches[2], caches[0], rtol=1e-6, atol=1e-6)
