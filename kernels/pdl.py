"""Programmatic dependent launch (PDL, Hopper and newer) for Quiver's decode kernels.

A decode step is a chain of ~10 dependent kernels per layer. Launched normally, each kernel
starts only after the one before it has finished and its memory is flushed, so every kernel
pays launch latency, ramp-up and tail on the critical path. With PDL:

  * every Quiver kernel calls `gdc_launch_dependents()` as soon as it starts, which lets the
    next kernel on the stream be scheduled onto free SM slots while this one still runs;
  * every kernel calls `gdc_wait()` before it reads anything another kernel wrote (and before
    it writes anything): it blocks until the kernel before it has completed and its writes are
    visible. Correctness is therefore the same as with normal launches;
  * the NF4 linear first prefetches the first word tiles of its weights into L2 (the weights
    are read-only and depend on no kernel), then waits: the weight stream of one linear starts
    while the norm / attention / LoRA kernels before it run.

Kernels before a non-PDL kernel (torch, cuBLAS) just wait as usual. Under CUDA-graph capture
the programmatic edges are recorded into the graph.

Off by default: on the H100 it did not pay (docs/BENCHMARKS.md, "Programmatic dependent
launch"): the 7B-shaped decode step was within noise at batch 32 with adapters and slower
without, and the NF4 linear alone was slower at split-K 8. QUIVER_PDL=1 turns it on for CUDA
devices of compute capability >= 9.0 when Triton exposes it (QUIVER_PDL_PREFETCH=0 keeps PDL
but skips the NF4 weight prefetch); never under TRITON_INTERPRET.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401
    _HAS_GDC = True
except Exception:  # pragma: no cover - older Triton or no Triton
    gdc_launch_dependents = gdc_wait = None
    _HAS_GDC = False

__all__ = ["pdl_kwargs", "pdl_enabled", "prefetch_enabled", "pdl_start", "prefetch_l2"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


@functools.lru_cache(maxsize=16)
def _device_supports(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_enabled(t: torch.Tensor) -> bool:
    """True when kernels on t's device launch with PDL."""
    if not (_HAS_GDC and t.is_cuda) or _interpreting() or os.environ.get("QUIVER_PDL", "0") != "1":
        return False
    return _device_supports(t.device.index if t.device.index is not None else torch.cuda.current_device())


def prefetch_enabled() -> bool:
    return os.environ.get("QUIVER_PDL_PREFETCH", "1") != "0"


def pdl_kwargs(t: torch.Tensor) -> dict:
    """Launch keywords for a kernel with a `PDL: tl.constexpr = False` parameter: {} (normal
    launch) or the constexpr plus Triton's launch_pdl flag."""
    return {"PDL": True, "launch_pdl": True} if pdl_enabled(t) else {}


try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover
    triton = None
    pdl_start = prefetch_l2 = None

if triton is not None:

    @triton.jit
    def pdl_start(PDL: tl.constexpr):
        """Kernel prologue: wait for the kernel before (its writes become visible), then let the
        next kernel be scheduled. A no-op without PDL."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()

    @triton.jit
    def prefetch_l2(ptrs):
        """Ask L2 for the 128-byte lines holding ptrs (a hint: no data comes back, no fault)."""
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];\nmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                                  is_pure=False, pack=1)
