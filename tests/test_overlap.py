"""Overlapped steps (engine.py): a step is launched before the last step's tokens reach the
host. On the CPU the overlap is forced on; every request must get exactly what it gets
without overlap: tokens, text, finish reason and token counts, with stop strings, EOS,
length limits, seeded sampling, cancels and preemption in one run."""

from __future__ import annotations

import pytest
import torch

from conftest import run_to_completion
from quiver.server.config import EngineConfig, SamplingParams
from quiver.server.engine.engine import Engine

PROMPTS = ["The capital of France is", "def fibonacci(n):", "List three primary colors:", "Water boils at",
           "Once upon a time, in a land far away, there lived a dragon who", "1, 2, 3, 4,"]


def _params(stop: str) -> list[SamplingParams]:
    return [
        SamplingParams(max_new_tokens=10),
        SamplingParams(max_new_tokens=12, stop=[stop]),  # stops partway
        SamplingParams(max_new_tokens=1),
        SamplingParams(max_new_tokens=9, temperature=0.8, top_p=0.9, seed=7),
        SamplingParams(max_new_tokens=11, temperature=1.2, top_k=20, seed=3),
        SamplingParams(max_new_tokens=8, ignore_eos=True),
    ]


def _run(loaded, overlap: bool, params, cancel_after: int | None = None, **kw):
    """Submits the prompts two per step into an engine that is stepped by hand; request 4 is
    cancelled after `cancel_after` steps. Returns the engine and each request's result."""
    engine = Engine(loaded, EngineConfig(overlap=overlap, **kw))
    preempt, engine.preempted = engine.scheduler.preempt, 0

    def counted(seq):
        engine.preempted += 1
        preempt(seq)

    engine.scheduler.preempt = counted
    tok = loaded.tokenizer
    todo = [(tok(p)["input_ids"], sp) for p, sp in zip(PROMPTS, params)]
    handles, steps, deferred = [], 0, 0
    while todo or engine.scheduler.has_work() or engine._inbox:
        for ids, sp in todo[:2]:
            handles.append(engine.submit(ids, sp))
        todo = todo[2:]
        if cancel_after is not None and steps == cancel_after:
            handles[4].cancel()
        inbox, engine._inbox = engine._inbox, []
        engine._take(inbox)
        if engine.scheduler.has_work():
            engine.step()
            steps += 1
            deferred += engine._launched is not None
    run_to_completion(engine)
    assert engine._launched is None
    assert engine.blocks.num_free == engine.blocks.num_blocks, "KV blocks leaked"
    return engine, deferred, [h.result() for h in handles]


def _stop_string(loaded) -> str:
    """A piece of request 1's greedy text, so its stop string is hit partway."""
    _, _, results = _run(loaded, False, [SamplingParams(max_new_tokens=12)] * len(PROMPTS), max_model_len=128)
    text = results[1].text
    assert len(text) > 12, text
    return text[len(text) // 2: len(text) // 2 + 3]


@pytest.mark.parametrize("case", ["plain", "cancel", "preempt"])
def test_overlap_gives_the_same_outputs(fp32_model, case):
    params = _params(_stop_string(fp32_model))
    kw = dict(max_model_len=128)
    if case == "preempt":  # a KV cache too small for all sequences: preemption and recompute
        kw = dict(max_model_len=64, block_size=4, num_blocks=12, max_num_batched_tokens=64)
    cancel_after = 6 if case == "cancel" else None
    _, _, serial = _run(fp32_model, False, params, cancel_after, **kw)
    engine, deferred, overlapped = _run(fp32_model, True, params, cancel_after, **kw)
    assert deferred > 5, "the overlapped engine never left a step's tokens on the device"
    for i, (a, b) in enumerate(zip(serial, overlapped)):
        assert b.completion_tokens == len(b.token_ids) and b.prompt_tokens == a.prompt_tokens, i
        if a.finish_reason == "cancelled":  # a cancel lands while one more token is on its way
            assert b.finish_reason == "cancelled" and 0 <= len(a.token_ids) - len(b.token_ids) <= 1, i
            assert a.token_ids[:len(b.token_ids)] == b.token_ids and a.text.startswith(b.text), i
            continue
        assert (a.token_ids, a.text, a.finish_reason, a.error) == (b.token_ids, b.text, b.finish_reason, b.error), i
        assert a.completion_tokens == b.completion_tokens, i
    assert serial[1].finish_reason == "stop" and len(serial[1].token_ids) < 12
    assert len(serial[2].token_ids) == 1
    if case == "cancel":
        assert serial[4].finish_reason == "cancelled"
    if case == "preempt":
        assert engine.preempted > 0, "the small KV cache should have forced preemption"


def test_overlap_defers_the_tokens_one_step(fp32_model):
    """After a decode step the sampled tokens are placeholders; the next step's input ids are
    filled from them on the device, and the step after that makes them real on the host."""
    engine = Engine(fp32_model, EngineConfig(max_model_len=64, overlap=True))
    handle = engine.submit([5, 6, 7], SamplingParams(max_new_tokens=4))
    inbox, engine._inbox = engine._inbox, []
    engine._take(inbox)
    seq = handle.seq
    engine.step()  # prefill: the first token stays on the device
    assert seq.output_ids == [-1] and engine._launched is not None
    engine.step()  # decode over the placeholder; the first token reaches the host
    first = seq.output_ids[0]
    assert first >= 0 and seq.output_ids[1] == -1
    run_to_completion(engine)
    serial = Engine(fp32_model, EngineConfig(max_model_len=64, overlap=False))
    expected = serial.submit([5, 6, 7], SamplingParams(max_new_tokens=4))
    run_to_completion(serial)
    want = expected.result()
    assert handle.result().token_ids == want.token_ids and want.token_ids[0] == first


def test_a_prefill_step_takes_the_tokens_before_it_is_launched(fp32_model):
    """A step with a prefill chunk takes the last step's tokens first: a sequence that they
    stop leaves that step unscheduled (no token computed past its stop), and its output is the
    serial engine's."""
    tok = fp32_model.tokenizer
    prompt = tok("The capital of France is")["input_ids"]
    serial = Engine(fp32_model, EngineConfig(max_model_len=64, overlap=False))
    ref = serial.submit(prompt, SamplingParams(max_new_tokens=8))
    run_to_completion(serial)
    first = ref.result().token_ids
    stop = tok.decode(first[:4])
    assert stop.strip() and len(first) == 8

    def run(overlap: bool):
        engine = Engine(fp32_model, EngineConfig(max_model_len=64, overlap=overlap))
        a = engine.submit(prompt, SamplingParams(max_new_tokens=8, stop=[stop]))
        for _ in range(4):  # prefill + 3 decodes: the 4th token is sampled, and with overlap still on its way
            inbox, engine._inbox = engine._inbox, []
            engine._take(inbox)
            engine.step()
        b = engine.submit([5, 6, 7, 8], SamplingParams(max_new_tokens=2))  # the next step has a prefill chunk
        run_to_completion(engine)
        return a, b

    (a_serial, b_serial), (a_overlap, b_overlap) = run(False), run(True)
    got, want = a_overlap.result(), a_serial.result()
    assert got.token_ids == want.token_ids == first[:4] and got.finish_reason == want.finish_reason == "stop"
    assert a_overlap.seq.num_computed == a_serial.seq.num_computed, "a token was computed past the stop"
    assert b_overlap.result().token_ids == b_serial.result().token_ids


@pytest.mark.parametrize("overlap", [False, True])
def test_warm_up_runs_every_length_and_leaves_the_engine_as_new(fp32_model, overlap):
    """Engine.warm_up runs one eager step per WARMUP_PROMPTS length (and its decode), frees
    everything, and the engine then serves as a fresh one does."""
    from quiver.server.engine.engine import WARMUP_PROMPTS

    engine = Engine(fp32_model, EngineConfig(max_model_len=256, overlap=overlap))
    sizes = []
    schedule = engine.scheduler.schedule

    def spy():
        out = schedule()
        sizes.append(sum(item.num_tokens for item in out))
        return out

    engine.scheduler.schedule = spy
    steps = engine.warm_up()
    engine.scheduler.schedule = schedule
    assert set(WARMUP_PROMPTS) <= set(sizes) and steps >= 2 * len(WARMUP_PROMPTS)
    assert engine.blocks.num_free == engine.blocks.num_blocks and not engine._handles and engine._launched is None
    assert not engine.scheduler.has_work()
    got = engine.submit([5, 6, 7], SamplingParams(max_new_tokens=5))
    run_to_completion(engine)
    fresh = Engine(fp32_model, EngineConfig(max_model_len=256, overlap=overlap))
    want = fresh.submit([5, 6, 7], SamplingParams(max_new_tokens=5))
    run_to_completion(fresh)
    assert got.result().token_ids == want.result().token_ids


def test_warm_up_stops_quietly_when_the_cache_is_small(fp32_model):
    engine = Engine(fp32_model, EngineConfig(max_model_len=64, block_size=4, num_blocks=6))
    assert engine.warm_up() == 2  # only the 8-token prompt (+ 2 new tokens) fits 24 cached tokens
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_a_failed_step_keeps_the_tokens_of_the_step_before(fp32_model):
    """A step that raises fails its requests; the tokens the step before computed are still
    streamed first, as the serial engine streams them."""
    def run(overlap: bool):
        engine = Engine(fp32_model, EngineConfig(max_model_len=64, overlap=overlap))
        real, calls = engine.runner.run, [0]

        def flaky(scheduled, feed=None):
            calls[0] += 1
            if calls[0] == 4:
                raise RuntimeError("injected")
            return real(scheduled, feed)

        engine.runner.run = flaky
        handle = engine.submit([5, 6, 7], SamplingParams(max_new_tokens=8))
        run_to_completion(engine)
        return handle.result()

    serial, overlapped = run(False), run(True)
    assert "injected" in serial.error and "injected" in overlapped.error
    assert len(serial.token_ids) == 3 and overlapped.token_ids == serial.token_ids


def _bounded_run(engine, max_steps: int = 200) -> None:
    """run_to_completion that fails instead of looping forever."""
    for _ in range(max_steps):
        inbox, engine._inbox = engine._inbox, []
        engine._take(inbox)
        if not engine.scheduler.has_work():
            return
        engine.step()
    raise AssertionError(f"engine still busy after {max_steps} steps")


@pytest.mark.parametrize("overlap", [False, True])
def test_requests_longer_than_the_cache_end_cleanly(fp32_model, overlap):
    """A cache smaller than max_model_len lowers it (a longer request is refused at submit, a
    longer output stops at "length"); a sequence that still outgrows the cache, because
    shared blocks (an adapter's prefix) hold part of it, fails with resource_exhausted."""
    engine = Engine(fp32_model, EngineConfig(max_model_len=64, block_size=4, num_blocks=6, overlap=overlap))
    assert engine.cfg.max_model_len == 24
    with pytest.raises(ValueError, match="context holds 24"):
        engine.submit([5] * 24, SamplingParams(max_new_tokens=4))
    capped = engine.submit([5] * 20, SamplingParams(max_new_tokens=50, ignore_eos=True))
    _bounded_run(engine)
    res = capped.result()
    assert res.error is None and res.finish_reason == "length" and len(res.token_ids) == 4

    held = engine.blocks.take(2)  # 16 of the 24 slots left, as when a prefix adapter is resident
    grows = engine.submit([5] * 12, SamplingParams(max_new_tokens=10, ignore_eos=True))
    _bounded_run(engine)
    res = grows.result()
    assert res.error_kind == "resource_exhausted" and "outgrew the KV cache" in res.error
    assert res.completion_tokens == 5  # 16 slots hold 12 + 4 outputs; the 5th was sampled too
    engine.blocks.release(held)
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_a_failing_warm_up_does_not_stop_the_server(fp32_model, monkeypatch):
    import quiver.server.engine.engine as engine_mod

    engine = Engine(fp32_model, EngineConfig(max_model_len=64, warmup=True, overlap=False))

    def broken(*a, **k):
        raise RuntimeError("injected sampling failure")

    monkeypatch.setattr(engine_mod, "sample_tokens", broken)
    engine.start()  # logs the failure and serves
    try:
        assert not engine._handles and engine._launched is None
        monkeypatch.undo()
        res = engine.submit([5, 6, 7], SamplingParams(max_new_tokens=3, ignore_eos=True)).result()
        assert res.error is None and len(res.token_ids) == 3
    finally:
        engine.shutdown()


@pytest.mark.parametrize("overlap", [False, True])
def test_idle_prefix_blocks_are_reclaimed_before_a_request_is_refused(fp32_model, tmp_path, overlap):
    """A resident prefix-tuning adapter that no request uses holds KV blocks; a request that
    needs them gets them (the adapter is evicted, and loads again when asked for)."""
    from quiver.adapters.base import BaseSpec
    from quiver.adapters.manager import AdapterConfig, AdapterManager
    from quiver.adapters.prefix import save
    from quiver.adapters.weights import AdapterInfo, AdapterWeights

    base = BaseSpec.from_model(fp32_model.model)
    kv = torch.randn(base.n_layers, 2, 8, base.n_kv_heads, base.head_dim, generator=torch.Generator().manual_seed(0))
    save(tmp_path / "p", AdapterWeights(AdapterInfo("p", "prefix_tuning"), prefix_kv=kv * 0.1))
    mgr = AdapterManager(AdapterConfig(str(tmp_path)), base, "", torch.float32, torch.device("cpu"))
    engine = Engine(fp32_model, EngineConfig(max_model_len=64, block_size=4, num_blocks=8, overlap=overlap),
                    adapters=mgr)
    assert engine.cfg.max_model_len == 32
    first = engine.submit([5, 6, 7], SamplingParams(max_new_tokens=2), adapter=mgr.resolve("p"))
    _bounded_run(engine)
    first = first.result()
    assert first.error is None and engine.blocks.num_free == 6  # 2 blocks: the idle prefix
    big = engine.submit([5] * 20, SamplingParams(max_new_tokens=10, ignore_eos=True))  # 30 of 32 slots
    _bounded_run(engine)
    res = big.result()
    assert res.error is None and res.finish_reason == "length" and len(res.token_ids) == 10
    assert not mgr.prefix_blocks and engine.blocks.num_free == engine.blocks.num_blocks
    again = engine.submit([5, 6, 7], SamplingParams(max_new_tokens=2), adapter=mgr.resolve("p"))
    _bounded_run(engine)
    assert again.result().token_ids == first.token_ids
