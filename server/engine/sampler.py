"""Turns the step's logits into one next token per sampling sequence.

Greedy (temperature 0 or top_k 1) is argmax. Otherwise: logits / temperature, keep the top_k
largest, keep the smallest set whose probability reaches top_p, then draw with the
sequence's own torch.Generator, seeded from `seed` when given, so a seeded request gives
the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import random

import torch

from quiver.server.config import SamplingParams


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed if seed is not None else random.getrandbits(63))
    return g


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [V] float32 -> logits [V] with filtered entries at -inf (temperature applied)."""
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (always keep the first)
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        logits = logits.index_put((order[drop],), torch.tensor(float("-inf")))
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """logits [N, V] float32; one params and generator per row -> N token ids."""
    greedy_ids = logits.argmax(dim=-1).tolist()
    out = []
    for row, (p, g) in enumerate(zip(params, generators)):
        if p.greedy:
            out.append(greedy_ids[row])
            continue
        filtered = filter_logits(logits[row].float().cpu(), p)
        probs = torch.softmax(filtered, dim=-1)
        out.append(int(torch.multinomial(probs, 1, generator=g)))
    return out
