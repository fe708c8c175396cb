"""Paged KV-cache block manager: hands out fixed-size blocks of KV slots to sequences.

Check and action come in pairs: `can_allocate(seq, n_tokens)` / `allocate(seq, n_tokens)`
grow the sequence's block table to hold its first n_tokens; `free(seq)` returns its blocks.
Blocks are ref-counted so that shared blocks (an adapter's prefix KV) outlive any one
sequence: `share(blocks)` adds a reference, `release(blocks)` drops one.
Plain Python over integers; the tensors live in quiver.server.model.KVCache.
"""

from __future__ import annotations

from collections import deque

from quiver.server.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.ref_count = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def blocks_needed(self, seq: Sequence, n_tokens: int) -> int:
        """Blocks to add so that seq's table covers n_tokens positions."""
        want = -(-n_tokens // self.block_size)
        return max(0, want - len(seq.block_table))

    def can_allocate(self, seq: Sequence, n_tokens: int) -> bool:
        return self.blocks_needed(seq, n_tokens) <= self.num_free

    def allocate(self, seq: Sequence, n_tokens: int) -> None:
        need = self.blocks_needed(seq, n_tokens)
        if need > self.num_free:
            raise RuntimeError(f"out of KV blocks: need {need}, free {self.num_free}")
        for _ in range(need):
            block = self.free_blocks.popleft()
            self.ref_count[block] = 1
            seq.block_table.append(block)

    def can_take(self, n_blocks: int) -> bool:
        return n_blocks <= self.num_free

    def take(self, n_blocks: int) -> list[int]:
        """Blocks owned by someone other than a sequence (an adapter's shared prefix)."""
        if n_blocks > self.num_free:
            raise RuntimeError(f"out of KV blocks: need {n_blocks}, free {self.num_free}")
        blocks = [self.free_blocks.popleft() for _ in range(n_blocks)]
        for b in blocks:
            self.ref_count[b] = 1
        return blocks

    def share(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self.ref_count[b] > 0, f"sharing free block {b}"
            self.ref_count[b] += 1

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self.ref_count[b] > 0, f"double free of block {b}"
            self.ref_count[b] -= 1
            if self.ref_count[b] == 0:
                self.free_blocks.append(b)

    def free(self, seq: Sequence) -> None:
        self.release(seq.block_table)
        seq.block_table = []

    def slot(self, seq: Sequence, position: int) -> int:
        """Flat KV-cache slot of seq's token at `position`."""
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size
