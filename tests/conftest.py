"""Shared fixtures: the embedded model is loaded once per test session (CI has 2 cores)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():  # Triton kernels run in the interpreter on CPU; set before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")
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


def run_staggered(engine, prompts, refs, params) -> list:
    """Submits prompts two a step into an engine that was not started (prefill chunks beside
    running decodes), prompt i with adapter refs[i] (or None), and runs it until idle; returns
    the handles (a handle's result is taken once)."""
    handles = []
    for j, (ids, ref) in enumerate(zip(prompts, refs)):
        handles.append(engine.submit(ids, params, adapter=ref))
        if j % 2:
            inbox, engine._inbox = engine._inbox, []
            engine._take(inbox)
            engine.step()
    run_to_completion(engine)
    return handles


TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)


def tiny_model_dir(tmp_path, kind: str, tokenizer=None, **overrides) -> str:
    """Writes a small random Llama/Qwen2/Mistral with safetensors (and a tokenizer) to tmp_path/kind."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, \
        Qwen2ForCausalLM

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
               "mistral": (MistralConfig, MistralForCausalLM)}
    from quiver.loadtest.bench_engine import word_tokenizer

    cfg_cls, model_cls = classes[kind]
    torch.manual_seed(0)
    cfg = {**TINY, **overrides}
    model = model_cls(cfg_cls(**cfg, eos_token_id=2, bos_token_id=1))
    with torch.no_grad():  # larger weights than the default init so the output is not flat
        for p in model.parameters():
            p.normal_(0, 0.2)
    out = tmp_path / kind
    model.save_pretrained(out, safe_serialization=True)
    (tokenizer or word_tokenizer(cfg["vocab_size"])).save_pretrained(out)
    return str(out)


def capture_logits(engine) -> dict[int, list[torch.Tensor]]:
    """Records every logits row the engine samples from, per request id (wraps runner.run)."""
    rows: dict[int, list[torch.Tensor]] = {}
    run = engine.runner.run

    def wrapped(scheduled, feed=None):
        logits = run(scheduled, feed)
        i = 0
        for item in scheduled:
            seq = item.seq
            if seq.num_computed + item.num_tokens == seq.num_tokens:
                rows.setdefault(seq.request_id, []).append(logits[i].float().cpu())
                i += 1
        return logits

    engine.runner.run = wrapped
    return rows


def triton_runnable(has_triton: bool, kernel) -> tuple[bool, str]:
    """Whether a Triton kernel can run here: on CUDA, or on CPU under TRITON_INTERPRET=1.

    Triton decorates kernels when imported; if it was imported before TRITON_INTERPRET=1 was
    set, kernels cannot run on the CPU (this conftest sets it first for that reason)."""
    if not has_triton:
        return False, "triton is not importable"
    if torch.cuda.is_available():
        return True, ""
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(kernel, InterpretedFunction):
        return False, "triton was imported before TRITON_INTERPRET=1 was set; set it in the environment"
    return True, ""
