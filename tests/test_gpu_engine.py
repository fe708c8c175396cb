"""The engine on CUDA (device machine): Quiver vs transformers on the same random weights."""

from __future__ import annotations

import pytest
import torch

from conftest import hf_greedy, tiny_model_dir
from test_engine_hf import staggered_run
from quiver.server.config import ModelConfig
from quiver.server.loader import load_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SHAPE = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=1024)


def prompts(n: int) -> list[list[int]]:
    """Random token-id prompts of 3..89 tokens (no tokenizer needed)."""
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 32000, (int(L),), generator=g).tolist() for L in torch.randint(3, 90, (n,), generator=g)]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_cuda_fp32_matches_transformers(tmp_path, kind):
    torch.backends.cuda.matmul.allow_tf32 = False
    path = tiny_model_dir(tmp_path, kind, **SHAPE)
    loaded = load_model(ModelConfig(model=path, quantize="none", dtype="float32", device="cuda"), keep_hf=True)
    _, results = staggered_run(loaded, prompts(10), 16, max_num_batched_tokens=64, max_num_seqs=8, max_model_len=256)
    for ids, res in results:
        assert res.token_ids == hf_greedy(loaded, ids, 16)


@pytest.mark.parametrize("quantize,dtype", [("nf4", "bfloat16"), ("int8", "float16"), ("none", "bfloat16")])
def test_cuda_low_precision_logits_match_transformers(tmp_path, quantize, dtype):
    """Teacher-forced: every logits row Quiver sampled from (prefill and graph-replayed decode)
    against transformers' logits at the same position, on the same quantized weights."""
    from conftest import capture_logits, run_to_completion
    from quiver.server.config import EngineConfig, SamplingParams
    from quiver.server.engine.engine import Engine

    path = tiny_model_dir(tmp_path, "llama", **SHAPE)
    loaded = load_model(ModelConfig(model=path, quantize=quantize, dtype=dtype, device="cuda"), keep_hf=True)
    engine = Engine(loaded, EngineConfig(max_model_len=256, max_num_seqs=8))
    rows = capture_logits(engine)
    handles = [(ids, engine.submit(ids, SamplingParams(max_new_tokens=8))) for ids in prompts(8)]
    run_to_completion(engine)
    worst = 0.0
    for ids, h in handles:
        out = h.result().token_ids
        full = torch.tensor([ids + out[:-1]], device="cuda")
        with torch.inference_mode():
            ref = loaded.hf_model(input_ids=full).logits[0, len(ids) - 1:].float().cpu()
        got = torch.stack(rows[h.seq.request_id])
        assert got.shape == ref.shape
        worst = max(worst, ((got - ref).abs().max() / ref.abs().max()).item())
    # LLM.int8() picks outlier columns from the whole batch's activations, so sequences that
    # share a batch change each other's int8 numerics: a looser bound there.
    bound = 1e-1 if quantize == "int8" else 3e-2
    assert worst < bound, f"max relative logit difference {worst:.3e}"


@pytest.mark.parametrize("shrink_in_base", [True, False])
def test_cuda_nf4_lora_logits_match_peft(tmp_path, monkeypatch, shrink_in_base):
    """NF4 base with LoRA adapters (q, k, v, o, down) in one mixed batch, teacher-forced: every
    logits row Quiver sampled from against PEFT's on transformers' NF4 model. Decode steps run
    the LoRA shrinks inside the NF4 word kernel's launch (adapters/batch.py shrink_in_base),
    prefill in their own; False: always their own. A spy on the word kernel proves which ran."""
    from peft import LoraConfig, PeftModel, get_peft_model

    import quiver.kernels.nf4_words as words_mod
    from adapter_factory import perturb
    from conftest import capture_logits, run_to_completion
    from quiver.adapters.base import BaseSpec
    from quiver.adapters.manager import AdapterConfig, AdapterManager
    from quiver.server.config import EngineConfig, SamplingParams
    from quiver.server.engine.engine import Engine

    monkeypatch.setenv("QUIVER_SHRINK_IN_BASE", "1" if shrink_in_base else "0")
    fused = []
    real = words_mod.triton_nf4_words_linear

    def spy(*args, shrink=None, **kw):
        fused.append(shrink is not None)
        return real(*args, shrink=shrink, **kw)

    monkeypatch.setattr(words_mod, "triton_nf4_words_linear", spy)
    path = tiny_model_dir(tmp_path, "llama", **SHAPE)
    loaded = load_model(ModelConfig(model=path, quantize="nf4", dtype="bfloat16", device="cuda"), keep_hf=True)
    hf = loaded.hf_model
    root = tmp_path / "adapters"
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
    for i, r in enumerate((8, 16)):
        pm = get_peft_model(hf, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False))
        perturb(pm, i + 1, 0.05)
        pm.save_pretrained(root / f"lora{r}")
        hf = pm.unload()
    manager = AdapterManager(AdapterConfig(str(root)), BaseSpec.from_model(loaded.model), loaded.name, loaded.dtype,
                             loaded.device)
    engine = Engine(loaded, EngineConfig(max_model_len=256, max_num_seqs=8), adapters=manager)
    rows = capture_logits(engine)
    names = ["lora8", "lora16", None]
    handles = [(names[j % 3], ids, engine.submit(ids, SamplingParams(max_new_tokens=8),
                                                 adapter=manager.resolve(names[j % 3]) if names[j % 3] else None))
               for j, ids in enumerate(prompts(8))]
    run_to_completion(engine)
    worst = {}
    for name in names:
        model = PeftModel.from_pretrained(hf, str(root / name)) if name else hf
        for n, ids, h in handles:
            if n != name:
                continue
            out = h.result().token_ids
            full = torch.tensor([ids + out[:-1]], device="cuda")
            with torch.inference_mode():
                ref = model(input_ids=full).logits[0, len(ids) - 1:].float().cpu()
            got = torch.stack(rows[h.seq.request_id])
            assert got.shape == ref.shape
            worst[name] = max(worst.get(name, 0.0), ((got - ref).abs().max() / ref.abs().max()).item())
        if name:
            hf = model.unload()
    assert all(w < 3e-2 for w in worst.values()), f"max relative logit differences {worst}"
    assert fused and any(fused) == shrink_in_base, "the word kernel ran the shrinks" if any(fused) else "it did not"


def peft_greedy(pm, ids: list[int], n: int) -> list[int]:
    """n greedy tokens of a PEFT model after the prompt ids (on CUDA)."""
    t = torch.tensor([ids], device="cuda")
    with torch.inference_mode():
        out = pm.generate(input_ids=t, attention_mask=torch.ones_like(t), max_new_tokens=n, do_sample=False,
                          pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_cuda_adapters_mixed_batch_graphs_vs_eager_vs_peft(tmp_path):
    """LoRA, DoRA, (IA)3 and prefix adapters on CUDA: graph replay == eager == PEFT."""
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, TaskType, get_peft_model

    from adapter_factory import perturb
    from quiver.adapters.base import BaseSpec
    from quiver.adapters.manager import AdapterConfig, AdapterManager
    from quiver.server.config import EngineConfig, SamplingParams
    from quiver.server.engine.engine import Engine
    from conftest import run_to_completion

    torch.backends.cuda.matmul.allow_tf32 = False
    path = tiny_model_dir(tmp_path, "llama", **SHAPE)
    loaded = load_model(ModelConfig(model=path, quantize="none", dtype="float32", device="cuda"), keep_hf=True)
    hf = loaded.hf_model
    root = tmp_path / "adapters"
    cfgs = {"lora": LoraConfig(r=8, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False),
            "dora": LoraConfig(r=4, target_modules=["q_proj", "up_proj"], use_dora=True, init_lora_weights=False),
            "ia3": IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                             init_ia3_weights=False),
            "prefix16": PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=16),
            "prefix5": PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5)}
    ids = prompts(3)
    expected = {}
    for name, cfg in cfgs.items():
        pm = get_peft_model(hf, cfg)
        if not name.startswith("prefix"):
            perturb(pm, 1, 0.05)
        pm.eval()
        pm.save_pretrained(root / name)
        for i in ids:
            expected[(name, tuple(i))] = peft_greedy(pm, i, 12)
        if not name.startswith("prefix"):
            pm.unload()
    results = {}
    for graphs in (True, False):
        manager = AdapterManager(AdapterConfig(str(root)), BaseSpec.from_model(loaded.model), loaded.name,
                                 loaded.dtype, loaded.device)
        engine = Engine(loaded, EngineConfig(max_model_len=256, cuda_graphs=graphs), adapters=manager)
        handles = [(n, i, engine.submit(i, SamplingParams(max_new_tokens=12), adapter=manager.resolve(n)))
                   for n in cfgs for i in ids]
        handles += [(None, i, engine.submit(i, SamplingParams(max_new_tokens=12))) for i in ids]
        run_to_completion(engine)
        if graphs:
            assert engine.runner.graphs.graphs, "no CUDA graph was captured"
        results[graphs] = {(n, tuple(i)): h.result().token_ids for n, i, h in handles}
    assert results[True] == results[False]
    for (name, i), toks in results[True].items():
        if name is not None:
            assert toks == expected[(name, i)], name


def test_cuda_rank_bound_grows_after_capture(tmp_path):
    """A rank-8 LoRA's decode graph is captured under the pool's rank bound 16; then a rank-24
    LoRA grows the bound to 32 (a new pool version): the graphs are recaptured, the stale ones
    dropped, and both adapters' tokens still match PEFT."""
    from peft import LoraConfig, get_peft_model

    from adapter_factory import perturb
    from conftest import run_to_completion
    from quiver.adapters.base import BaseSpec
    from quiver.adapters.manager import AdapterConfig, AdapterManager
    from quiver.server.config import EngineConfig, SamplingParams
    from quiver.server.engine.engine import Engine

    torch.backends.cuda.matmul.allow_tf32 = False
    path = tiny_model_dir(tmp_path, "llama", **SHAPE)
    loaded = load_model(ModelConfig(model=path, quantize="none", dtype="float32", device="cuda"), keep_hf=True)
    root = tmp_path / "adapters"
    ids = prompts(3)
    expected = {}
    for name, r in (("r8", 8), ("r24", 24)):
        cfg = LoraConfig(r=r, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        pm = get_peft_model(loaded.hf_model, cfg)
        perturb(pm, r, 0.05)
        pm.eval()
        pm.save_pretrained(root / name)
        for i in ids:
            expected[(name, tuple(i))] = peft_greedy(pm, i, 10)
        pm.unload()
    manager = AdapterManager(AdapterConfig(str(root), max_rank=64), BaseSpec.from_model(loaded.model), loaded.name,
                             loaded.dtype, loaded.device)
    engine = Engine(loaded, EngineConfig(max_model_len=256), adapters=manager)
    graphs = engine.runner.graphs

    def serve(names):
        hs = [(n, i, engine.submit(i, SamplingParams(max_new_tokens=10), adapter=manager.resolve(n)))
              for n in names for i in ids]
        run_to_completion(engine)
        for n, i, h in hs:
            assert h.result().token_ids == expected[(n, tuple(i))], n

    serve(["r8"])
    assert manager.pool.lora_rank == 16
    first = {k for k in graphs.graphs if k[1]}
    assert first, "no adapter graph was captured"
    serve(["r8", "r24"])
    assert manager.pool.lora_rank == 32
    now = {k for k in graphs.graphs if k[1]}
    assert now and not now & first, "the graphs of the old pool version should be dropped"
    assert {k[2] for k in now} == {manager.pool.version}


def test_cuda_overlap_gives_the_same_outputs(tmp_path):
    """Overlapped steps on CUDA (graph replays whose input ids come from the last step's tokens
    on the device): the same tokens as serial steps, greedy and seeded sampling."""
    from conftest import run_to_completion
    from quiver.server.config import EngineConfig, SamplingParams
    from quiver.server.engine.engine import Engine

    path = tiny_model_dir(tmp_path, "llama", **SHAPE)
    loaded = load_model(ModelConfig(model=path, quantize="nf4", dtype="bfloat16", device="cuda"))
    params = [SamplingParams(max_new_tokens=12, ignore_eos=True), SamplingParams(max_new_tokens=1),
              SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.9, seed=5, ignore_eos=True),
              SamplingParams(max_new_tokens=14, temperature=1.1, top_k=40, seed=2, ignore_eos=True)]
    out = {}
    for overlap in (False, True):
        engine = Engine(loaded, EngineConfig(max_model_len=256, max_num_seqs=8, overlap=overlap))
        deferred = []
        step = engine.step

        def counted():
            step()
            deferred.append(engine._launched is not None)

        engine.step = counted
        handles = [engine.submit(ids, params[j % 4]) for j, ids in enumerate(prompts(8))]
        run_to_completion(engine)
        assert engine.runner.graphs.graphs, "no CUDA graph was captured"
        assert engine.blocks.num_free == engine.blocks.num_blocks
        assert any(deferred) == overlap
        out[overlap] = [h.result().token_ids for h in handles]
    assert [len(t) for t in out[False]] == [p.max_new_tokens for p in params] * 2
    assert out[True] == out[False]


def test_arena_range_is_not_reused_while_its_copies_run():
    """A dropped adapter's staged range (adapters/pinned.py) is not handed to the next cold load
    while the slot copies that read it are still queued: the slot gets the first adapter's rows,
    the second adapter stages elsewhere, and the range is reused once the copies are done."""
    import gc

    from quiver.adapters.base import BaseSpec
    from quiver.adapters.pinned import PinnedArena
    from quiver.adapters.pool import SlotPool
    from quiver.adapters.staging import stage
    from quiver.adapters.weights import AdapterInfo, AdapterWeights, LoraDelta

    L, H = 4, 1024
    shapes = {"q_proj": (H, H)}
    base = BaseSpec(n_layers=L, hidden=H, n_kv_heads=1, head_dim=H, shapes=shapes)

    def adapter(i):
        g = torch.Generator().manual_seed(i)
        return AdapterWeights(AdapterInfo(f"a{i}", "lora", rank=16), lora={
            (layer, "q_proj"): LoraDelta(torch.randn(16, H, generator=g), torch.randn(H, 16, generator=g), 1.0)
            for layer in range(L)})

    sizing = PinnedArena(64 << 20)
    w0 = adapter(0)
    stage(w0, torch.bfloat16, 16, L, shapes, arena=sizing)
    arena = PinnedArena(sizing.nbytes - sizing.free_bytes())  # room for exactly one adapter
    lo, hi = arena.slab.data_ptr(), arena.slab.data_ptr() + arena.nbytes
    in_arena = lambda w: lo <= w.staged[("lora", "q_proj")][0].data_ptr() < hi  # noqa: E731

    pool = SlotPool(base, 2, 16, torch.bfloat16, torch.device("cuda"))
    pool.load(w0)  # the banks exist, as in a warm server (allocating them may synchronize)
    torch.cuda.synchronize()
    pool.arena = arena
    w1 = adapter(1)
    want = torch.stack([w1.lora[(layer, "q_proj")].a for layer in range(L)]).bfloat16().cuda()
    stage(w1, torch.bfloat16, 16, L, shapes, arena=arena)
    assert in_arena(w1), "the first adapter should fit the arena"
    w2 = adapter(2)  # host work before the window: gc after a long test session can take 0.1 s and more
    torch.cuda._sleep(3_000_000_000)  # the slot copies queue behind ~1.5 s of GPU work
    slot = pool.load(w1)
    del pool.resident[slot], pool.slot_of["a1"], w1  # the adapter is dropped while its copies wait
    gc.collect()
    assert len(arena.pending) == 1 and arena.pending[0][2][0] is not None, "w1's range should wait for its fence"
    assert not arena.pending[0][2][0].query(), "the GPU sleep ended before the check: the window is too short"
    stage(w2, torch.bfloat16, 16, L, shapes, arena=arena)
    assert not in_arena(w2), "the range is still read by queued copies"
    torch.cuda.synchronize()
    assert torch.equal(pool.lora_banks["q_proj"].a[:, slot], want), "the slot should hold the first adapter"
    assert arena.free_bytes() == arena.nbytes, "the range should be free once the copies are done"
    w3 = adapter(3)
    stage(w3, torch.bfloat16, 16, L, shapes, arena=arena)
    assert in_arena(w3)


@pytest.mark.parametrize("overlap_mixed", [False, True])
@pytest.mark.parametrize("quantize,dtype", [("nf4", "bfloat16"), ("none", "float32")])
def test_cuda_mixed_graphs_equal_eager_steps(tmp_path, monkeypatch, quantize, dtype, overlap_mixed):
    """Steps with a prefill chunk replay the captured per-layer graphs (server/engine/mixed_graphs.py):
    with LoRA adapters and base requests, prefills beside running decodes, every token and
    logits row equals the same engine's with mixed graphs off; the graphs were captured (with
    adapters: every step here holds an adapter request) and stayed on. overlap_mixed: those steps
    are launched before the step before's tokens come to the host (engine.OVERLAP_MIXED)."""
    from peft import LoraConfig, get_peft_model
    import quiver.server.engine.engine as engine_module

    from adapter_factory import perturb
    from conftest import capture_logits, run_staggered
    from quiver.adapters.base import BaseSpec
    from quiver.adapters.manager import AdapterConfig, AdapterManager
    from quiver.server.config import EngineConfig, SamplingParams
    from quiver.server.engine.engine import Engine

    torch.backends.cuda.matmul.allow_tf32 = False
    path = tiny_model_dir(tmp_path, "llama", **SHAPE)
    loaded = load_model(ModelConfig(model=path, quantize=quantize, dtype=dtype, device="cuda"), keep_hf=True)
    hf, root = loaded.hf_model, tmp_path / "adapters"
    for i, r in enumerate((8, 16)):
        pm = get_peft_model(hf, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj", "down_proj"],
                                           init_lora_weights=False))
        perturb(pm, i + 1, 0.05)
        pm.save_pretrained(root / f"lora{r}")
        hf = pm.unload()

    def run(mixed: bool):
        manager = AdapterManager(AdapterConfig(str(root)), BaseSpec.from_model(loaded.model), loaded.name,
                                 loaded.dtype, loaded.device)
        engine = Engine(loaded, EngineConfig(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=192,
                                             mixed_graphs=mixed, warmup=False), adapters=manager)
        rows = capture_logits(engine)
        names = ["lora8", None, "lora16"]
        refs = [manager.resolve(names[j % 3]) if names[j % 3] else None for j in range(12)]
        handles = run_staggered(engine, prompts(12), refs, SamplingParams(max_new_tokens=8))
        results = [h.result() for h in handles]
        assert all(r.error is None for r in results)
        return engine, [r.token_ids for r in results], [torch.stack(rows[h.seq.request_id]) for h in handles]

    eager, want_tokens, want_rows = run(False)
    assert eager.runner.mixed is None
    monkeypatch.setattr(engine_module, "OVERLAP_MIXED", overlap_mixed)
    engine, got_tokens, got_rows = run(True)
    mixed = engine.runner.mixed
    assert mixed.enabled and any(k[1] for k in mixed.sets), sorted(mixed.sets)  # captured, with adapters
    worst = max(((g - w).abs().max() / w.abs().max()).item() for g, w in zip(got_rows, want_rows))
    assert worst < (2e-2 if dtype == "bfloat16" else 1e-4), worst
    same = sum(g == w for g, w in zip(got_tokens, want_tokens))
    assert same >= (len(want_tokens) - 1 if dtype == "bfloat16" else len(want_tokens)), (got_tokens, want_tokens)
