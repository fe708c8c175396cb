"""Mixed-step graphs (server/engine/mixed_graphs.py) against the eager engine.

On the CPU the pieces run uncaptured (MixedGraphs(capture=False)): the same static buffers,
token buckets, padding rows and order as the captured graphs, and the same eager attention
between them. Steps with a prefill chunk then take that path, with adapters of several methods
in the batch (LoRA, (IA)3 on a fused group's input, prefix tuning, bottleneck, BitFit, a soft
prompt, whose prefill steps stay eager), and every token and logits row equals the eager
engine's. The captured graphs are checked on the GPU (tests/test_gpu_engine.py).
"""

from __future__ import annotations

import pytest
import torch

from adapter_factory import bitfit_deltas, bottleneck_blocks
from conftest import capture_logits, run_staggered, run_to_completion
from quiver.adapters import bitfit, bottleneck, ia3, prefix, prompt
from quiver.adapters.base import BaseSpec
from quiver.adapters.lora import save_lora
from quiver.adapters.manager import AdapterConfig, AdapterManager
from quiver.adapters.weights import AdapterInfo, AdapterWeights, LoraDelta
from quiver.server.config import EngineConfig, SamplingParams
from quiver.server.engine import engine as engine_module
from quiver.server.engine.engine import Engine
from quiver.server.engine.mixed_graphs import MixedGraphs
from quiver.server.engine.runner import ModelRunner

NAMES = [None, "lora", "ia3", "prefix", "bottleneck", "bitfit", "prompt"]


@pytest.fixture(scope="module")
def adapter_root(fp32_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    base = BaseSpec.from_model(fp32_model.model)
    g = torch.Generator().manual_seed(7)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    L, H = base.n_layers, base.hidden
    save_lora(root / "lora", {(l, p): LoraDelta(rnd(8, base.shapes[p][1]) * 0.05, rnd(base.shapes[p][0], 8) * 0.05, 2.0)
                              for l in range(L) for p in ("q_proj", "v_proj", "down_proj")})
    ia3.save(root / "ia3", AdapterWeights(AdapterInfo("ia3", "ia3"),
                                          in_scale={(l, "up_proj"): 1 + rnd(H) * 0.2 for l in range(L)},
                                          out_scale={(l, "k_proj"): 1 + rnd(base.shapes["k_proj"][0]) * 0.2
                                                     for l in range(L)}))
    kv = rnd(L, 2, 6, base.n_kv_heads, base.head_dim) * 0.1
    prefix.save(root / "prefix", AdapterWeights(AdapterInfo("prefix", "prefix_tuning"), prefix_kv=kv))
    bottleneck.save(root / "bottleneck", bottleneck_blocks(H), act="relu")
    bitfit.save(root / "bitfit", bitfit_deltas(H))
    embeds = fp32_model.model.embed[torch.randint(100, 1000, (5,), generator=g)].clone()
    prompt.save(root / "prompt", AdapterWeights(AdapterInfo("prompt", "prompt_tuning"), prompt_embeds=embeds), L)
    return root


def run(fp32_model, root, mixed: bool, split: bool, overlap: bool = False):
    manager = AdapterManager(AdapterConfig(str(root)), BaseSpec.from_model(fp32_model.model), fp32_model.name,
                             torch.float32, torch.device("cpu"))
    engine = Engine(fp32_model, EngineConfig(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=128,
                                             overlap=overlap),
                    adapters=manager)
    engine.runner.split_decodes = split
    calls = []
    if mixed:
        graphs = MixedGraphs(fp32_model.model, engine.kv, engine.cfg.max_num_batched_tokens,
                             engine.cfg.num_blocks * engine.cfg.block_size, torch.device("cpu"), capture=False)
        inner = graphs.run
        graphs.run = lambda batch, *a: calls.append((batch.input_ids.shape[0], a[0] is not None)) or inner(batch, *a)
        engine.runner.mixed = graphs
    rows = capture_logits(engine)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 40000, (int(n),), generator=g).tolist() for n in torch.randint(4, 60, (14,), generator=g)]
    refs = [manager.resolve(NAMES[i % len(NAMES)]) if NAMES[i % len(NAMES)] else None for i in range(len(prompts))]
    handles = run_staggered(engine, prompts, refs, SamplingParams(max_new_tokens=6))
    results = [h.result() for h in handles]
    assert all(r.error is None for r in results)
    return [r.token_ids for r in results], [rows[h.seq.request_id] for h in handles], calls


@pytest.mark.parametrize("split", [False, True])
def test_mixed_steps_through_the_pieces_equal_the_eager_engine(fp32_model, adapter_root, split):
    want_tokens, want_rows, _ = run(fp32_model, adapter_root, mixed=False, split=split)
    got_tokens, got_rows, calls = run(fp32_model, adapter_root, mixed=True, split=split)
    assert got_tokens == want_tokens
    for got, want in zip(got_rows, want_rows):
        torch.testing.assert_close(torch.stack(got), torch.stack(want), atol=1e-3, rtol=1e-3)  # padded rows change fp32 rounding
    mixed = [(t, adapters) for t, adapters in calls if t > 8]  # on the CPU decode steps take this path too
    assert len(mixed) >= 4 and any(adapters for _, adapters in mixed)
    assert len({-(-t // 64) for t, _ in mixed}) == 2, "steps in both token buckets (64, 128)"


def test_mixed_steps_launched_before_the_step_befores_tokens_equal_the_eager_engine(fp32_model, adapter_root,
                                                                                     monkeypatch):
    """OVERLAP_MIXED: a step with a prefill chunk that the pieces take is launched before the
    step before's tokens come to the host; its decode rows read those tokens on the device."""
    want_tokens, want_rows, _ = run(fp32_model, adapter_root, mixed=False, split=True)
    monkeypatch.setattr(engine_module, "OVERLAP_MIXED", True)
    fed = []  # steps with a prefill chunk launched while the step before's tokens were on the device
    inner = ModelRunner.run

    def spy(self, scheduled, feed=None):
        if any(item.num_tokens > 1 for item in scheduled):
            fed.append(feed is not None)
        return inner(self, scheduled, feed)

    monkeypatch.setattr(ModelRunner, "run", spy)
    got_tokens, got_rows, calls = run(fp32_model, adapter_root, mixed=True, split=True, overlap=True)
    assert got_tokens == want_tokens
    for got, want in zip(got_rows, want_rows):
        torch.testing.assert_close(torch.stack(got), torch.stack(want), atol=1e-3, rtol=1e-3)
    assert any(t > 8 for t, _ in calls) and sum(fed) >= 3, fed


def test_capture_all_then_a_failed_capture_runs_steps_eagerly(fp32_model, monkeypatch):
    """capture_all captures every token bucket without adapters, largest first, once; a step
    whose capture fails runs op by op, with the same tokens, and MAX_FAILURES failed captures
    switch mixed graphs off."""
    from quiver.server.engine.mixed_graphs import MAX_FAILURES

    engine = Engine(fp32_model, EngineConfig(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=160))
    scratch = engine.cfg.num_blocks * engine.cfg.block_size
    mg = MixedGraphs(fp32_model.model, engine.kv, 160, scratch, torch.device("cpu"), capture=False)
    order, real = [], mg._capture
    monkeypatch.setattr(mg, "_capture", lambda bucket, adapters: order.append(bucket) or real(bucket, adapters))
    assert mg.buckets == [64, 128, 192]
    big = MixedGraphs(fp32_model.model, engine.kv, 8192, scratch, torch.device("cpu"), capture=False)
    assert big.buckets[-1] == 1024 and len(big.buckets) == 16  # larger steps run eagerly
    assert mg.capture_all() == 3 and order == [192, 128, 64]
    assert mg.capture_all() == 3 and len(order) == 3

    ids = list(range(100, 140))
    want = engine.submit(ids, SamplingParams(max_new_tokens=4))
    run_to_completion(engine)
    failing = MixedGraphs(fp32_model.model, engine.kv, 160, scratch, torch.device("cpu"), capture=False)

    attempts = []

    def fail(bucket, adapters):
        attempts.append(bucket)
        raise RuntimeError("op not capturable")

    monkeypatch.setattr(failing, "_capture", fail)
    engine.runner.mixed = failing
    got = engine.submit(ids, SamplingParams(max_new_tokens=4))
    run_to_completion(engine)
    got, want = got.result(), want.result()  # a handle's result is taken once
    assert len(attempts) == MAX_FAILURES and not failing.enabled and not failing.sets  # then no more tries
    assert got.error is None and want.error is None
    assert got.token_ids == want.token_ids and len(got.token_ids) == 4


def test_adapter_graphs_are_captured_at_start_not_on_first_use(fp32_model, adapter_root, monkeypatch):
    """Engine.capture_adapter_graphs (run by start after the warm-up): one request through the
    first adapter on disk allocates the pool's stacks, then every token bucket's adapter graphs
    are captured at that pool version; a later request with that adapter captures nothing more."""
    manager = AdapterManager(AdapterConfig(str(adapter_root)), BaseSpec.from_model(fp32_model.model), fp32_model.name,
                             torch.float32, torch.device("cpu"))
    engine = Engine(fp32_model, EngineConfig(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=128),
                    adapters=manager)
    mg = MixedGraphs(fp32_model.model, engine.kv, 128, engine.cfg.num_blocks * engine.cfg.block_size,
                     torch.device("cpu"), capture=False)
    captured, real = [], mg._capture
    monkeypatch.setattr(mg, "_capture", lambda bucket, adapters: captured.append((bucket, adapters is not None))
                        or real(bucket, adapters))
    engine.runner.mixed = mg
    first = manager.ids()[0]
    assert engine.capture_adapter_graphs() == 2
    assert sorted(captured) == [(64, True), (128, True)]  # each once (on the CPU the warm-up request's steps take 64)
    assert {k for k in mg.sets if k[1]} == {(128, True, manager.pool.version), (64, True, manager.pool.version)}
    handle = engine.submit(list(range(100, 140)), SamplingParams(max_new_tokens=3), adapter=manager.resolve(first))
    run_to_completion(engine)
    assert handle.result().error is None
    assert sorted(captured) == [(64, True), (128, True)], "the request replayed the start-up captures"
    bare = Engine(fp32_model, EngineConfig(max_model_len=256, max_num_seqs=8))
    assert bare.capture_adapter_graphs() == 0  # no adapters: nothing to capture
