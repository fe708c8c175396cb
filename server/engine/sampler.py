"""Turns the step's logits into one next token per sampling sequence.

Greedy (temperature 0 or top_k 1) is argmax. Otherwise: logits / temperature, keep the top_k
largest, keep the smallest set whose probability reaches top_p, then draw. `filter_logits` is
the one-row specification; `filtered_probs` does the same for all sampling rows at once on the
logits' device (one sort per step, not one sort and one device->host copy per row).

The draw is by inverse CDF: u ~ U[0, 1) comes from the sequence's own torch.Generator (seeded
from `seed` when given) and picks the first token whose cumulative probability exceeds u, so a
seeded request gives the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import random

import torch

from quiver.adapters.pinned import to_device
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


CANDIDATES = 1024  # on the CPU, rows whose kept tokens provably lie among the top CANDIDATES skip the full sort


def filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, V] -> (probs [N, C] float32 in descending-logit order, order [N, C]): row i is
    softmax(filter_logits(logits[i], params[i])) sorted, C = V, or C = CANDIDATES on the CPU when
    every row's kept tokens are among its top CANDIDATES; all rows in one pass."""
    dev = logits.device
    N, V = logits.shape
    knobs = to_device([[p.temperature, p.top_k if 0 < p.top_k < V else V, p.top_p if p.top_p < 1.0 else 2.0]
                       for p in params], dev, torch.float32)  # 2.0: top_p off
    x = logits.float() / knobs[:, 0:1]
    if dev.type == "cpu" and V > CANDIDATES:
        out = _candidate_probs(x, knobs)
        if out is not None:
            return out
    x, order = torch.sort(x, dim=-1, descending=True)
    kth = x.gather(1, knobs[:, 1:2].long() - 1)  # the k-th largest; ties with it stay, as in filter_logits
    x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    drop = (probs.cumsum(-1) - probs) >= knobs[:, 2:3]  # the mass before a token already reaches top_p
    probs = torch.softmax(x.masked_fill(drop, float("-inf")), dim=-1)
    return probs, order


def _candidate_probs(x: torch.Tensor, knobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """filtered_probs over the top CANDIDATES of every row (a partial sort), or None when some
    row may keep a token outside them: a row is exact here when its top_k <= CANDIDATES and no
    tie with the k-th value is cut off, or when top_k is off and the candidates already hold
    top_p of the whole distribution (every later token is then dropped)."""
    V, C = x.shape[1], CANDIDATES
    top, order = torch.topk(x, C, dim=-1)  # descending
    k, p = knobs[:, 1:2].long(), knobs[:, 2:3]
    k_on = k <= C
    kth = torch.where(k_on, top.gather(1, (k.clamp(max=C) - 1)), torch.full_like(p, float("-inf")))
    lse_all = torch.logsumexp(x, dim=-1, keepdim=True)
    mass = torch.exp(top - lse_all).sum(-1, keepdim=True)
    exact = (k_on & (top[:, C - 1:C] < kth)) | ((k == V) & (mass >= p))
    if not bool(exact.all()):
        return None
    xk = top.masked_fill(top < kth, float("-inf"))
    lse = torch.where(k_on, torch.logsumexp(xk, dim=-1, keepdim=True), lse_all)  # top_p sees the kept set
    probs = torch.exp(xk - lse)
    drop = (probs.cumsum(-1) - probs) >= p
    return torch.softmax(xk.masked_fill(drop, float("-inf")), dim=-1), order


def sample_tokens(logits: torch.Tensor, params: list[SamplingParams],
                  generators: list[torch.Generator]) -> torch.Tensor:
    """logits [N, V]; one params and generator per row -> N token ids on the logits' device,
    without waiting for the device (the uniforms are drawn on the host, in row order)."""
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        u = to_device([float(torch.rand(1, generator=generators[i])) for i in rows], logits.device, torch.float32)
        idx = to_device(rows, logits.device, torch.long)
        probs, order = filtered_probs(logits[idx], [params[i] for i in rows])
        cdf = probs.cumsum(-1)
        pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_(max=cdf.shape[1] - 1)
        tokens = tokens.clone()
        tokens[idx] = order.gather(1, pick)[:, 0]
    return tokens


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """sample_tokens on the host (one sync)."""
    return sample_tokens(logits, params, generators).tolist()
