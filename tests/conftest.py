"""Shared fixtures: the embedded model is loaded once per test session (CI has 2 cores)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def fp32_model():
    """Embedded SmolLM2-135M-Instruct, unquantized float32, with the transformers model kept."""
    from quiver.server.config import ModelConfig
    from quiver.server.loader import load_model

    return load_model(ModelConfig(quantize="none", dtype="float32", device="cpu"), keep_hf=True)


@pytest.fixture(scope="session")
def nf4_model():
    """Embedded model with bitsandbytes NF4 projections shared by Quiver and transformers."""
    from quiver.server.config import ModelConfig
    from quiver.server.loader import load_model

    return load_model(ModelConfig(quantize="nf4", dtype="float32", device="cpu"), keep_hf=True)


_HF_CACHE: dict = {}


def hf_greedy(loaded, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy generate: the oracle for Quiver's engine (memoized)."""
    key = (id(loaded), tuple(prompt_ids), max_new_tokens)
    if key not in _HF_CACHE:
        _HF_CACHE[key] = _hf_greedy(loaded, prompt_ids, max_new_tokens)
    return _HF_CACHE[key]


def _hf_greedy(loaded, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    hf = loaded.hf_model
    ids = torch.tensor([prompt_ids], device=loaded.device)
    with torch.inference_mode():
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                          do_sample=False, pad_token_id=loaded.eos_token_ids[0])
    return out[0, len(prompt_ids):].tolist()


def run_to_completion(engine) -> None:
    """Drives an engine that was not started: take the inbox and step until idle."""
    while True:
        inbox, engine._inbox = engine._inbox, []
        engine._take(inbox)
        if not engine.scheduler.has_work():
            return
        engine.step()
