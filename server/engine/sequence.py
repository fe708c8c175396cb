"""One request's state inside the engine: its tokens, KV blocks and progress.

`num_computed` counts tokens whose keys/values are in the KV cache. A step schedules the
next `n` uncomputed tokens (a prefill chunk, or 1 for a decode); when all known tokens are
computed, the step samples the next token from the last one's logits.

With overlapped steps (engine.py) a sampled token reaches the host one step late: until
then its output id is a placeholder, `placeholder(r)` < 0, naming row r of the last step's
sampled tokens on the device; `resolve_placeholders` swaps those rows in on the device.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from quiver.server.config import SamplingParams

_ids = itertools.count()


def placeholder(row: int) -> int:
    """The output id of a token still on the device: row `row` of the last step's tokens."""
    return -1 - row


def resolve_placeholders(ids: torch.Tensor, feed: torch.Tensor) -> torch.Tensor:
    """ids [T] with every placeholder replaced by its row of feed (both on one device; no sync)."""
    return torch.where(ids < 0, feed[(-1 - ids).clamp(min=0)], ids)


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: Any = None  # resolved adapter handle (quiver.adapters), None = base model
    tenant: str = ""
    request_id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    arrival: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    # Extra leading positions the adapter occupies (prefix tuning's virtual tokens).
    prefix_len: int = 0
    # Placeholder tokens at the head of prompt_ids (prompt tuning's soft prompt).
    virtual_tokens: int = 0
    slot: int | None = None  # adapter slot while resident and pinned

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_at(self, p: int) -> int:
        """tokens[p] without building the list."""
        n = len(self.prompt_ids)
        return self.prompt_ids[p] if p < n else self.output_ids[p - n]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def output_full(self) -> bool:
        """Every token it may generate is sampled (the last may still be on its way)."""
        return len(self.output_ids) >= self.params.max_new_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
