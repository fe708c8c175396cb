"""Fused elementwise ops of the decoder layer: RMSNorm (optionally after a residual add),
rotary embedding with the KV-cache write, and SwiGLU's silu(gate) * up.

Why: a decode step of a 32-layer model launched ~40 small PyTorch kernels per layer for these
(norm: 7, rotary: 10, cache writes: 2, ...). Inside a CUDA graph each still costs a few
microseconds, ~3 ms per step on an H100; fused, it is 4 launches per layer.

Contract (every op has a ``reference_*`` in PyTorch, the spec and the CPU path, and a
``triton_*`` with the same positional signature; the public name picks Triton for CUDA
tensors or QUIVER_FORCE_TRITON=1). Shapes: x, residual [T, hidden]; weight [hidden];
q [T, H*D], k and v [T, KVH*D] (row stride free, last dim contiguous); cos, sin [T, D];
k_cache, v_cache [slots, KVH, D]; slot_mapping [T] int64.

    rms_norm(x, weight, eps)               -> weight * dtype(x * rsqrt(mean(x^2) + eps))
    add_rms_norm(x, residual, weight, eps) -> (rms_norm(x + residual), x + residual)
    rope_kv(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
        -> q * cos + rotate_half(q) * sin  ([T, H*D], a new tensor), and writes
        k_cache[slot_mapping] <- k * cos + rotate_half(k) * sin ; v_cache[slot_mapping] <- v
    silu_mul(gate, up)                     -> silu(gate) * up

Numerics follow the PyTorch (and Hugging Face) expressions rounding for rounding: the norm
reduces in float32 and rounds to x.dtype before the weight multiply; every product and sum
of rotary and SwiGLU is rounded to the activation dtype where PyTorch rounds it. The Triton
kernels run with fp-contraction off so a*b + c is not fused into one FMA. Reduction order
in the norm differs (fp32, ~1 ulp).
"""

from __future__ import annotations

import torch

from .lora import HAS_TRITON, _device_ctx, _require_triton, use_triton
from .pdl import pdl_kwargs, pdl_start

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = [
    "reference_rms_norm",
    "reference_add_rms_norm",
    "reference_rope_kv",
    "reference_silu_mul",
    "triton_rms_norm",
    "triton_add_rms_norm",
    "triton_rope_kv",
    "triton_silu_mul",
    "rms_norm",
    "add_rms_norm",
    "rope_kv",
    "silu_mul",
]

NORM_NUM_WARPS = 4
ELEMENTWISE_BLOCK = 1024


# ---- references (the spec; the CPU path) ----

def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def reference_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    h = x + residual
    return reference_rms_norm(h, weight, eps), h


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def reference_rope_kv(q, k, v, cos, sin, k_cache, v_cache, slot_mapping) -> torch.Tensor:
    T, D = cos.shape
    qh = q.reshape(T, -1, D)
    kh = k.reshape(T, -1, D)
    c, s = cos[:, None], sin[:, None]
    k_cache[slot_mapping] = kh * c + _rotate_half(kh) * s
    v_cache[slot_mapping] = v.reshape(T, -1, D)
    return (qh * c + _rotate_half(qh) * s).reshape(T, -1)


def reference_silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


# ---- Triton ----

if HAS_TRITON:

    @triton.jit
    def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, sum_ptr, N, stride_x, stride_r, stride_o, stride_s, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        pdl_start(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
            tl.store(sum_ptr + row * stride_s + cols, x, mask=mask)
        h = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / N + eps)
        h = (h * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_o + cols, (w * h).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_heads(x_ptr, dst_ptr, c, s, offs_h, offs_d, partner, sign, n_heads, D, stride_dst_h):
        # x [n_heads, D] of one token -> dst (same layout): x * cos + rotate_half(x) * sin
        mask = (offs_h[:, None] < n_heads) & (offs_d[None, :] < D)
        x = tl.load(x_ptr + offs_h[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
        xp = tl.load(x_ptr + offs_h[:, None] * D + partner[None, :], mask=mask, other=0.0)
        ty = x_ptr.dtype.element_ty
        rot = (xp.to(tl.float32) * sign[None, :]).to(ty)
        a = (x.to(tl.float32) * c[None, :]).to(ty).to(tl.float32)
        b = (rot.to(tl.float32) * s[None, :]).to(ty).to(tl.float32)
        tl.store(dst_ptr + offs_h[:, None] * stride_dst_h + offs_d[None, :], (a + b).to(ty), mask=mask)

    @triton.jit
    def _rope_kv_kernel(q_ptr, qo_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slot_ptr,
                        H, KVH, D, stride_q, stride_k, stride_v, stride_cs,
                        BLOCK_H: tl.constexpr, BLOCK_KVH: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr = False):
        pdl_start(PDL)
        t = tl.program_id(0).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        half = D // 2
        partner = tl.where(offs_d < half, offs_d + half, offs_d - half)
        sign = tl.where(offs_d < half, -1.0, 1.0)
        c = tl.load(cos_ptr + t * stride_cs + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + t * stride_cs + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        _rope_heads(q_ptr + t * stride_q, qo_ptr + t * H * D, c, s, tl.arange(0, BLOCK_H), offs_d, partner, sign, H, D, D)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        offs_kh = tl.arange(0, BLOCK_KVH)
        _rope_heads(k_ptr + t * stride_k, kc_ptr + slot * KVH * D, c, s, offs_kh, offs_d, partner, sign, KVH, D, D)
        mask = (offs_kh[:, None] < KVH) & d_ok[None, :]
        tile = offs_kh[:, None] * D + offs_d[None, :]
        v = tl.load(v_ptr + t * stride_v + tile, mask=mask, other=0.0)
        tl.store(vc_ptr + slot * KVH * D + tile, v, mask=mask)

    @triton.jit
    def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, N, stride_g, stride_u, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        pdl_start(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < N
        g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        ty = out_ptr.dtype.element_ty
        act = (g / (1.0 + tl.exp(-g))).to(ty).to(tl.float32)
        tl.store(out_ptr + row * N + cols, (act * u).to(ty), mask=mask)


def _rows(x: torch.Tensor, name: str) -> None:
    assert x.dim() == 2 and x.stride(-1) == 1, f"{name} must be [T, N] with a contiguous last dim"


def _norm(x, residual, weight, eps):
    _require_triton()
    _rows(x, "x")
    T, N = x.shape
    out = torch.empty((T, N), dtype=x.dtype, device=x.device)
    total = torch.empty_like(out) if residual is not None else out
    if residual is not None:
        _rows(residual, "residual")
    r = residual if residual is not None else x
    if T:
        with _device_ctx(x):
            _rms_norm_kernel[(T,)](x, r, weight, out, total, N, x.stride(0), r.stride(0), out.stride(0),
                                   total.stride(0), float(eps), HAS_RESIDUAL=residual is not None,
                                   BLOCK=triton.next_power_of_2(N), num_warps=NORM_NUM_WARPS,
                                   enable_fp_fusion=False, **pdl_kwargs(x))
    return out, total


def triton_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _norm(x, None, weight, eps)[0]


def triton_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _norm(x, residual, weight, eps)


def triton_rope_kv(q, k, v, cos, sin, k_cache, v_cache, slot_mapping) -> torch.Tensor:
    _require_triton()
    for t, name in ((q, "q"), (k, "k"), (v, "v"), (cos, "cos"), (sin, "sin")):
        _rows(t, name)
    T, D = cos.shape
    assert D % 2 == 0 and sin.shape == cos.shape and sin.stride() == cos.stride()
    H, KVH = q.shape[1] // D, k.shape[1] // D
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and tuple(k_cache.shape[1:]) == (KVH, D)
    q_out = torch.empty((T, H * D), dtype=q.dtype, device=q.device)
    if T:
        with _device_ctx(q):
            _rope_kv_kernel[(T,)](q, q_out, k, v, cos, sin, k_cache, v_cache, slot_mapping, H, KVH, D,
                                  q.stride(0), k.stride(0), v.stride(0), cos.stride(0),
                                  BLOCK_H=triton.next_power_of_2(H), BLOCK_KVH=triton.next_power_of_2(KVH),
                                  BLOCK_D=triton.next_power_of_2(D), num_warps=4, enable_fp_fusion=False, **pdl_kwargs(q))
    return q_out


def triton_silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    _require_triton()
    _rows(gate, "gate"), _rows(up, "up")
    T, N = gate.shape
    out = torch.empty((T, N), dtype=gate.dtype, device=gate.device)
    if T:
        with _device_ctx(gate):
            _silu_mul_kernel[(T, triton.cdiv(N, ELEMENTWISE_BLOCK))](
                gate, up, out, N, gate.stride(0), up.stride(0), BLOCK=ELEMENTWISE_BLOCK, num_warps=4,
                enable_fp_fusion=False, **pdl_kwargs(gate))
    return out


# ---- dispatch ----

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if use_triton(x, weight):
        return triton_rms_norm(x, weight, eps)
    return reference_rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x, residual, weight):
        return triton_add_rms_norm(x, residual, weight, eps)
    return reference_add_rms_norm(x, residual, weight, eps)


def rope_kv(q, k, v, cos, sin, k_cache, v_cache, slot_mapping) -> torch.Tensor:
    if use_triton(q, k, v, cos, k_cache):
        return triton_rope_kv(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
    return reference_rope_kv(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if use_triton(gate, up):
        return triton_silu_mul(gate, up)
    return reference_silu_mul(gate, up)
