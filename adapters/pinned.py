"""One page-locked slab, pinned once at start, carved into the staged buffers of adapters.

Pinning host memory is a costly allocation (about 16 ms for 32 MiB on the H200 host,
docs/BENCHMARKS.md), and every adapter held in the CPU tier keeps its staged rows
(adapters/staging.py), so without this each cold load of a new adapter pays for a new block.
Here a buffer is a first-fit range of the slab:

    arena = PinnedArena(nbytes)          # pins nbytes now (0: no slab, take always returns None)
    buf = arena.take(n, owner)           # uint8 view of n bytes, or None when no range is free
    arena.fence(owner)                   # after queuing copies that read owner's buffer
    ...                                  # when owner is garbage-collected, its range is handed back,
                                         # and reused only once the copies fenced from it are done

The fence is a CUDA event recorded on the stream of the copies (the slot pool records it after
its writes), so a range is never overwritten while a transfer still reads it.

`to_device(x, device, dtype=None)` is the small-copy counterpart for per-step index tensors:
a list or CPU tensor goes to CUDA through page-locked memory with a non-blocking copy (a copy
from pageable memory first waits for the stream, which with the engine's overlapped steps is
still running the step before); torch's caching host allocator reuses that buffer only after
the copy has run.
"""

from __future__ import annotations

import threading
import weakref

import torch


def to_device(x, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=dtype)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


ALIGN = 256  # bytes: each range starts on a multiple (any dtype view is aligned)


class PinnedArena:
    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.slab = torch.empty(nbytes, dtype=torch.uint8, pin_memory=nbytes > 0 and torch.cuda.is_available())
        self.free: list[tuple[int, int]] = [(0, nbytes)] if nbytes else []  # (offset, size), sorted, merged
        self.pending: list[tuple[int, int, list]] = []  # handed back, waiting for their fence
        # re-entrant: a finalizer (_hand_back) may run inside a locked section when the garbage
        # collector drops an owner there
        self.lock = threading.RLock()
        self.fences: dict[int, list[list]] = {}  # id(owner) -> a [event or None] per range it holds

    def take(self, n: int, owner) -> torch.Tensor | None:
        """n bytes for owner's staged rows, or None (no room: the caller pins its own)."""
        n = -(-n // ALIGN) * ALIGN
        with self.lock:
            self._reclaim()
            for i, (off, size) in enumerate(self.free):
                if size >= n:
                    self.free[i:i + 1] = [(off + n, size - n)] if size > n else []
                    fence: list = [None]  # shared with the finalizer
                    self.fences.setdefault(id(owner), []).append(fence)
                    weakref.finalize(owner, self._hand_back, off, n, fence, id(owner))
                    return self.slab[off:off + n]
        return None

    def fence(self, owner) -> None:
        """Marks the copies queued so far on the current stream as readers of owner's ranges."""
        with self.lock:
            fences = list(self.fences.get(id(owner), ()))
        if fences and torch.cuda.is_available():
            event = torch.cuda.Event()
            event.record()
            for fence in fences:
                fence[0] = event

    def free_bytes(self) -> int:
        with self.lock:
            self._reclaim()
            return sum(size for _, size in self.free)

    def _hand_back(self, off: int, n: int, fence: list, key: int) -> None:
        with self.lock:
            self.fences.pop(key, None)  # the owner is gone: all its ranges are being handed back
            self.pending.append((off, n, fence))

    def _reclaim(self) -> None:
        """Moves handed-back ranges whose copies are done to the free list (lock held)."""
        done, waiting = [], []
        for p in self.pending:
            (done if p[2][0] is None or p[2][0].query() else waiting).append(p)
        if not done:
            return
        self.pending = waiting
        ranges = sorted(self.free + [(off, n) for off, n, _ in done])
        merged = [ranges[0]]
        for off, size in ranges[1:]:
            last_off, last_size = merged[-1]
            if last_off + last_size == off:
                merged[-1] = (last_off, last_size + size)
            else:
                merged.append((off, size))
        self.free = merged
