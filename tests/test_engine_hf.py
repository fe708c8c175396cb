"""Quiver's engine against transformers' greedy generate on the embedded model.

Prompts of different lengths join one running batch at different steps; the token budget is
small so long prompts are prefilled in chunks beside other sequences' decodes.
"""

from __future__ import annotations

import collections

import pytest

from conftest import hf_greedy, run_staggered
from quiver.server.config import EngineConfig, SamplingParams
from quiver.server.engine.engine import Engine

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a land far away, there lived a dragon who",
    "def fibonacci(n):",
    "List three primary colors:",
    "Water boils at",
    "Translate to French: Good morning, how are you today? I hope the weather is nice where you are.",
    "1, 2, 3, 4,",
    "The quick brown fox",
    "Write a haiku about the sea.",
    "In machine learning, a transformer is a neural network architecture that relies on self-attention "
    "to weigh the importance of different tokens in a sequence. Its key advantage is",
]
NEW_TOKENS = 20


def staggered_run(loaded, prompts, new_tokens, split_decodes=None, **engine_kw):
    """Submits prompts two at a time, one step apart, into a running engine; returns results.
    split_decodes: set the runner's (decode rows through the paged decode attention; on the
    CPU its reference); engine.kinds counts the eager steps' row kinds."""
    tok = loaded.tokenizer
    engine = Engine(loaded, EngineConfig(**engine_kw))
    if split_decodes is not None:
        engine.runner.split_decodes = split_decodes
    build, engine.kinds = engine.runner.build, collections.Counter()

    def counted(*a, **k):
        batch = build(*a, **k)
        engine.kinds[(batch.dec_tokens is not None, batch.q_gather is not None)] += 1
        return batch

    engine.runner.build = counted
    pending = [p if isinstance(p, list) else tok(p)["input_ids"] for p in prompts]
    handles = run_staggered(engine, pending, [None] * len(pending), SamplingParams(max_new_tokens=new_tokens))
    assert engine.blocks.num_free == engine.blocks.num_blocks, "KV blocks leaked"
    return engine, [(ids, h.result()) for ids, h in zip(pending, handles)]


@pytest.mark.parametrize("split", [False, True], ids=["sdpa_rows", "split_decodes"])
def test_engine_matches_transformers_fp32(fp32_model, split):
    engine, results = staggered_run(fp32_model, PROMPTS, NEW_TOKENS, split, max_num_batched_tokens=24, max_num_seqs=8,
                                    max_model_len=256)
    if split:  # steps of decodes alone, and of decodes beside prefill chunks
        assert engine.kinds[(True, False)] > 0 and engine.kinds[(True, True)] > 0
    else:
        assert set(engine.kinds) == {(False, True)}
    assert len(results) == len(PROMPTS)
    max_running = engine.steps  # sanity: chunked prefill over many steps
    assert max_running > NEW_TOKENS
    for ids, res in results:
        expected = hf_greedy(fp32_model, ids, NEW_TOKENS)
        assert res.error is None
        assert res.token_ids == expected, f"prompt of {len(ids)} tokens diverged"
        assert res.completion_tokens == len(expected) and res.prompt_tokens == len(ids)
        assert res.finish_reason in ("length", "stop")


def test_engine_matches_transformers_nf4(nf4_model):
    # transformers runs the very same bitsandbytes NF4 modules (shared at load)
    engine, results = staggered_run(nf4_model, PROMPTS[:6], 12, max_num_batched_tokens=32, max_num_seqs=4,
                                    max_model_len=256)
    for ids, res in results:
        assert res.token_ids == hf_greedy(nf4_model, ids, 12)


def test_preemption_recomputes_and_matches(fp32_model):
    # A KV cache too small for all sequences at once forces preemption and recompute.
    engine, results = staggered_run(fp32_model, PROMPTS[:6], NEW_TOKENS, max_num_batched_tokens=64, max_num_seqs=6,
                                    max_model_len=64, block_size=4, num_blocks=40)
    for ids, res in results:
        assert res.token_ids == hf_greedy(fp32_model, ids, NEW_TOKENS)


@pytest.mark.parametrize("max_new", [1, 3])
def test_max_new_tokens_and_length_reason(fp32_model, max_new):
    _, [(ids, res)] = staggered_run(fp32_model, ["Count: one, two, three,"], max_new, max_model_len=128)
    assert len(res.token_ids) == max_new
    assert res.finish_reason == "length"
