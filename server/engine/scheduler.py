"""Iteration-level scheduler: which sequences run this step, and how many tokens each.

Every step: running sequences first (decodes take 1 token, unfinished prefills their next
chunk), then waiting sequences in arrival order while the token budget, the running-seq cap
and the KV blocks allow. Long prompts are cut into chunks of at most the remaining budget
(chunked prefill), so prefills and decodes share a step. When a running sequence cannot grow,
the most recently admitted running sequence is preempted: `preempt(seq)` frees its blocks and
puts it back at the head of the waiting queue to be recomputed later. A sequence that cannot
grow with no other sequence left to preempt, and no idle adapter's prefix blocks to reclaim,
never will: it is moved to `refused` (blocks freed) for the engine to fail, instead of
preempting itself and being recomputed forever.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from quiver.server.config import EngineConfig
from quiver.server.engine.block_manager import BlockManager
from quiver.server.engine.sequence import Sequence, Status


@dataclass
class Scheduled:
    seq: Sequence
    num_tokens: int  # tokens of seq computed this step, starting at seq.num_computed


class Scheduler:
    def __init__(self, cfg: EngineConfig, blocks: BlockManager, admit=None, reclaim=None):
        self.cfg = cfg
        self.admit = admit  # admit(seq) -> bool: can seq's adapter be made resident now?
        self.reclaim = reclaim  # reclaim() -> bool: blocks freed that no sequence holds (idle prefixes)?
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.refused: list[Sequence] = []  # outgrew the whole cache; the engine fails them
        self.preemptions = 0  # sequences preempted so far (read by server/metrics.py)

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        """Removes seq from either queue and frees its blocks."""
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)

    def schedule(self) -> list[Scheduled]:
        budget = self.cfg.max_num_batched_tokens
        out: list[Scheduled] = []
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or seq.output_full:
                continue  # preempted earlier in this loop, or its last token is on its way
            n = min(seq.num_uncomputed, budget)
            if n == 0:
                continue
            if n == 1 and self.blocks.blocks_needed(seq, seq.num_computed + 1) == 0:
                out.append(Scheduled(seq, 1))  # a decode inside its last block: nothing to allocate
                budget -= 1
                continue
            while not self.blocks.can_allocate(seq, seq.num_computed + n):
                if len(self.running) == 1:  # alone and still too big: no preemption helps
                    if self.reclaim is not None and self.reclaim():
                        continue  # idle adapters' prefix blocks were freed: try again
                    self.running.remove(seq)
                    self.blocks.free(seq)
                    seq.status = Status.WAITING  # in neither queue: the engine fails it
                    self.refused.append(seq)
                    break
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            self.blocks.allocate(seq, seq.num_computed + n)
            out.append(Scheduled(seq, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_uncomputed, budget)
            if not self.blocks.can_allocate(seq, seq.num_computed + n):
                break
            if self.admit is not None and not self.admit(seq):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq, seq.num_computed + n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.append(Scheduled(seq, n))
            budget -= n
        return out
