"""Tests of quiver.kernels.lora_group (multi-LoRA over a fused q|k|v or gate|up projection).

The reference (lora_shrink + lora_expand per member, each tested in test_kernels_lora.py) is
checked against a naive per-token loop, and the two-launch Triton path against the reference:
1, 2 and 3 members of different widths and ranks, slot maps where some pool slots have no
stack on a member (-1), tokens without adapter, split-K shrink; columns of y outside every
member's range are untouched.
"""

from __future__ import annotations

import os

import pytest
import torch

from conftest import triton_runnable

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from quiver.kernels import lora_group as LG  # noqa: E402
from group_members import lora_members  # noqa: E402

_OK, _WHY = triton_runnable(LG.HAS_TRITON, LG._group_shrink_kernel) if LG.HAS_TRITON else (False, "no triton")
DEV = "cuda" if CUDA else "cpu"


def members(widths, T, H_in=40, R=8, S=3, seed=0, pool=0):
    return lora_members(widths, T, H_in, R=R, S=S, seed=seed, device=DEV, gap=3, pool=pool)  # the gaps must stay untouched


def naive(x, token_slot, ms, y):
    y = y.clone()
    for m in ms:
        for t in range(x.shape[0]):
            s = int(m.slot_map[int(token_slot[t]) + 1])
            if s < 0:
                continue
            r = int(m.ranks[s])
            h = m.a[s, :r].double() @ x[t].double()
            y[t, m.col:m.col + m.b.shape[1]] += (float(m.scaling[s]) * (m.b[s, :, :r].double() @ h)).to(y.dtype)
    return y


@pytest.mark.gpu  # also runs on CPU under the interpreter
@pytest.mark.parametrize("widths,R,early,pool", [
    ((24, 16, 16), 8, "1", 0), ((33, 17), 8, "1", 0), ((8,), 8, "1", 0), ((24, 16, 16), 40, "1", 0),
    ((24, 16, 16), 40, "0", 0), ((33, 17), 64, "1", 0), ((24, 16), 16, "1", 64), ((33, 17), 32, "0", 64),
    ((24, 16), 16, "1", 16)])
@pytest.mark.parametrize("impl,rows", [("reference", "1"), ("triton", "1"), ("triton", "4")])
def test_lora_group(widths, R, early, pool, impl, rows, monkeypatch):
    """R 8: the loads that wait only for the slot (R_FLAT); R 40 and 64: several rank blocks,
    the expand's first one loaded early (EARLY_FIRST) and the rest rank-bound, or (early "0")
    every loop rank-bound. Slot ranks span one to three blocks. pool 64: the stacks are rank-R
    views of a rank-64 pool (the adapter pool's rank bound), NaN past R; pool 16: the whole
    rank of a rank-16 pool. With a pool, B is stored rank-major as the adapter pool stores it.
    rows 4: the expand over 4 tokens per program, the pool rank at once (1 token at R 40, 64)."""
    if impl == "triton" and not _OK:
        pytest.skip(_WHY)
    monkeypatch.setenv("QUIVER_LORA_EARLY", early)
    monkeypatch.setenv("QUIVER_EXPAND_ROWS", rows)
    launched = []
    real = LG._group_expand_rows_kernel
    monkeypatch.setattr(LG, "_group_expand_rows_kernel", _Spy(real, launched))
    T = 6
    token_slot = torch.tensor([0, -1, 3, 2, 1, 3], dtype=torch.int32, device=DEV)
    ms, width = members(widths, T, R=R, pool=pool)
    assert pool == R or not pool or not ms[0].a.is_contiguous()
    assert not pool or ms[0].b.stride(1) == 1, "the pool's B is rank-major"
    x = torch.randn(T, 40, generator=torch.Generator().manual_seed(1)).to(DEV)
    y0 = torch.randn(T, width, generator=torch.Generator().manual_seed(2)).to(DEV)
    fn = LG.reference_lora_group if impl == "reference" else LG.triton_lora_group
    y = fn(x, token_slot, ms, y0.clone())
    torch.testing.assert_close(y, naive(x, token_slot, ms, y0), rtol=1e-4, atol=1e-4)
    assert torch.equal(y[1], y0[1]), "a token without adapter changed"
    for m in ms:
        gap = slice(m.col + m.b.shape[1], m.col + m.b.shape[1] + 3)
        assert torch.equal(y[:, gap], y0[:, gap]), "columns outside the members changed"
    assert not torch.equal(y, y0)
    assert len(launched) == (impl == "triton" and rows != "1"), "the rows kernel ran" if launched else "it did not"


class _Spy:
    """kernel[grid](...) that records the launch and runs the kernel."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.log.append((grid, kw.get("BLOCK_T")))
            return self.kernel[grid](*args, **kw)
        return launch


@pytest.mark.gpu  # also runs on CPU under the interpreter
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_group_shrink_then_expand_only(impl, monkeypatch):
    """group_shrink, then lora_group(..., shrunk=True) (the NF4 base ran the shrinks) == lora_group."""
    if impl == "triton":
        if not _OK:
            pytest.skip(_WHY)
        monkeypatch.setenv("QUIVER_FORCE_TRITON", "1")
    T = 6
    token_slot = torch.tensor([0, -1, 3, 2, 1, 3], dtype=torch.int32, device=DEV)
    x = torch.randn(T, 40, generator=torch.Generator().manual_seed(1)).to(DEV)
    y0 = torch.randn(T, 24 + 16 + 6, generator=torch.Generator().manual_seed(2)).to(DEV)
    ms, _ = members((24, 16), T)
    LG.group_shrink(x.t().contiguous().t(), token_slot, ms)  # a strided x: rows made unit-stride
    y = LG.lora_group(x, token_slot, ms, y0.clone(), shrunk=True)
    torch.testing.assert_close(y, naive(x, token_slot, ms, y0), rtol=1e-4, atol=1e-4)
