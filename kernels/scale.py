"""Gathered per-slot vector ops for vector-shaped adapters: (IA)^3 rescaling, DoRA magnitude
scaling (multiply) and BitFit biases (add), batched over any mix of adapters.

Contract
--------
    vec_stack  [S, N]  one vector per adapter slot (float32 | float16 | bfloat16)
    token_slot [T]     int32 slot of each token, -1 = no adapter
    y          [T, N]  activations (float32 | float16 | bfloat16), updated IN PLACE

    scale_by_slot(y, vec_stack, token_slot): y[t] *= vec_stack[token_slot[t]]  (s == -1 untouched)
    add_by_slot(y, vec_stack, token_slot):   y[t] += vec_stack[token_slot[t]]  (s == -1 untouched)

Both compute in float32 and round once to y's dtype. Each op has a ``reference_*`` (pure
PyTorch) and a ``triton_*`` implementation with the same positional signature (Triton adds
keyword-only tuning knobs); the public function picks Triton for CUDA tensors or when
QUIVER_FORCE_TRITON=1 (see quiver.kernels.lora.use_triton). Slot ids are not range-checked on
device; the references check them.
"""

from __future__ import annotations

import torch

from .lora import FLOAT_DTYPES, HAS_TRITON, _check_index, _check_same_device, _device_ctx, _require_triton, use_triton
from .pdl import pdl_kwargs, pdl_start

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = [
    "reference_scale_by_slot",
    "reference_add_by_slot",
    "triton_scale_by_slot",
    "triton_add_by_slot",
    "scale_by_slot",
    "add_by_slot",
]

# One program per (token, BLOCK_N columns); elementwise and memory bound. Defaults for H100.
SLOT_VEC_BLOCK_N = 1024
SLOT_VEC_NUM_WARPS = 4

_OP_MUL = 0
_OP_ADD = 1


def _check_args(y: torch.Tensor, vec_stack: torch.Tensor, token_slot: torch.Tensor) -> tuple[int, int, int]:
    assert y.dim() == 2, f"y must be [T, N], got {tuple(y.shape)}"
    assert vec_stack.dim() == 2, f"vec_stack must be [S, N], got {tuple(vec_stack.shape)}"
    T, N = y.shape
    S, N_v = vec_stack.shape
    assert N_v == N, f"vec_stack N {N_v} != y N {N}"
    assert S >= 1, "vec_stack has no slots"
    assert y.dtype in FLOAT_DTYPES and vec_stack.dtype in FLOAT_DTYPES, f"dtypes {y.dtype}, {vec_stack.dtype}"
    assert y.stride(-1) == 1 and vec_stack.is_contiguous(), "y rows and vec_stack must be contiguous"
    _check_index(token_slot, "token_slot", T)
    _check_same_device(y=y, vec_stack=vec_stack, token_slot=token_slot)
    return T, N, S


def _reference(y: torch.Tensor, vec_stack: torch.Tensor, token_slot: torch.Tensor, op: int) -> torch.Tensor:
    T, N, S = _check_args(y, vec_stack, token_slot)
    if T == 0:
        return y
    assert int(token_slot.min()) >= -1 and int(token_slot.max()) < S, f"slot ids must be in [-1, {S})"
    idx = (token_slot >= 0).nonzero().squeeze(1)
    vec = vec_stack[token_slot[idx].long()].float()
    rows = y[idx].float()
    y[idx] = (rows * vec if op == _OP_MUL else rows + vec).to(y.dtype)
    return y


def reference_scale_by_slot(
    y: torch.Tensor,  # [T, N]  updated in place
    vec_stack: torch.Tensor,  # [S, N]
    token_slot: torch.Tensor,  # [T] int32, -1 = no adapter
) -> torch.Tensor:  # y
    """In place: for t: if (s := token_slot[t]) >= 0: y[t] = y.dtype(float32(y[t]) * float32(vec_stack[s]))."""
    return _reference(y, vec_stack, token_slot, _OP_MUL)


def reference_add_by_slot(
    y: torch.Tensor,  # [T, N]  updated in place
    vec_stack: torch.Tensor,  # [S, N]
    token_slot: torch.Tensor,  # [T] int32, -1 = no adapter
) -> torch.Tensor:  # y
    """In place: for t: if (s := token_slot[t]) >= 0: y[t] = y.dtype(float32(y[t]) + float32(vec_stack[s]))."""
    return _reference(y, vec_stack, token_slot, _OP_ADD)


if HAS_TRITON:

    @triton.jit
    def _slot_vec_kernel(
        y_ptr,  # [T, N], in place
        v_ptr,  # [S, N]
        slot_ptr,  # [T] int32
        N,
        stride_yt,
        stride_vs,
        BLOCK_N: tl.constexpr,
        OP: tl.constexpr,  # 0 = multiply, 1 = add
        PDL: tl.constexpr = False,
    ):
        pdl_start(PDL)
        t = tl.program_id(0)
        pid_n = tl.program_id(1)
        slot = tl.load(slot_ptr + t)
        n_offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = n_offs < tl.where(slot >= 0, N, 0)  # slot -1: row untouched
        y_row = y_ptr + t.to(tl.int64) * stride_yt + n_offs
        v_row = v_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_vs + n_offs
        yv = tl.load(y_row, mask=mask, other=0.0).to(tl.float32)
        vv = tl.load(v_row, mask=mask, other=0.0).to(tl.float32)
        if OP == 0:
            out = yv * vv
        else:
            out = yv + vv
        tl.store(y_row, out.to(y_ptr.dtype.element_ty), mask=mask)


def _triton(y, vec_stack, token_slot, op, block_n, num_warps):
    _require_triton()
    T, N, S = _check_args(y, vec_stack, token_slot)
    if T == 0:
        return y
    n_nb = -(-N // block_n)
    assert n_nb <= 65535
    with _device_ctx(y):
        _slot_vec_kernel[(T, n_nb)](
            y, vec_stack, token_slot, N, y.stride(0), vec_stack.stride(0),
            BLOCK_N=block_n, OP=op, num_warps=num_warps, **pdl_kwargs(y),
        )  # fmt: skip
    return y


def triton_scale_by_slot(
    y: torch.Tensor,  # [T, N]  contiguous, updated in place
    vec_stack: torch.Tensor,  # [S, N] contiguous
    token_slot: torch.Tensor,  # [T] int32, -1 = no adapter
    *,
    block_n: int = SLOT_VEC_BLOCK_N,
    num_warps: int = SLOT_VEC_NUM_WARPS,
) -> torch.Tensor:  # y
    """Triton, grid (T, cdiv(N, BLOCK_N)):
    for t, nb: if (s := token_slot[t]) >= 0: y[t, cols] = y.dtype(float32(y[t, cols]) * float32(vec_stack[s, cols]))."""
    return _triton(y, vec_stack, token_slot, _OP_MUL, block_n, num_warps)


def triton_add_by_slot(
    y: torch.Tensor,  # [T, N]  contiguous, updated in place
    vec_stack: torch.Tensor,  # [S, N] contiguous
    token_slot: torch.Tensor,  # [T] int32, -1 = no adapter
    *,
    block_n: int = SLOT_VEC_BLOCK_N,
    num_warps: int = SLOT_VEC_NUM_WARPS,
) -> torch.Tensor:  # y
    """Triton, grid (T, cdiv(N, BLOCK_N)):
    for t, nb: if (s := token_slot[t]) >= 0: y[t, cols] = y.dtype(float32(y[t, cols]) + float32(vec_stack[s, cols]))."""
    return _triton(y, vec_stack, token_slot, _OP_ADD, block_n, num_warps)


def scale_by_slot(
    y: torch.Tensor,  # [T, N]  updated in place
    vec_stack: torch.Tensor,  # [S, N]
    token_slot: torch.Tensor,  # [T] int32, -1 = no adapter
) -> torch.Tensor:  # y
    """In place y[t] *= vec_stack[token_slot[t]]; rows with slot -1 untouched."""
    if use_triton(y, vec_stack, token_slot):
        return triton_scale_by_slot(y, vec_stack, token_slot)
    return reference_scale_by_slot(y, vec_stack, token_slot)


def add_by_slot(
    y: torch.Tensor,  # [T, N]  updated in place
    vec_stack: torch.Tensor,  # [S, N]
    token_slot: torch.Tensor,  # [T] int32, -1 = no adapter
) -> torch.Tensor:  # y
    """In place y[t] += vec_stack[token_slot[t]]; rows with slot -1 untouched."""
    if use_triton(y, vec_stack, token_slot):
        return triton_add_by_slot(y, vec_stack, token_slot)
    return reference_add_by_slot(y, vec_stack, token_slot)
