"""Every adaptation method served in one mixed batch, checked against its oracle.

Oracle: Hugging Face PEFT running the same adapter files on the same base (LoRA, rsLoRA with
rank/alpha patterns, DoRA, AdaLoRA, (IA)3, prefix tuning, prompt tuning); the method applied
to transformers directly for BitFit and bottleneck adapters. Quiver serves all of them, plus
base-model requests, in the same engine steps (--quantize none --dtype float32): next-token
logits within tolerance and 16 greedy tokens equal.
"""

from __future__ import annotations

import grpc
import pytest
import torch

from adapter_factory import (bitfit_deltas, bottleneck_blocks, hooked, make_peft_adapter, peft_configs,
                             release_peft, save_quiver_adapters)
from conftest import capture_logits, hf_greedy, run_to_completion
from quiver.adapters.base import BaseSpec
from quiver.adapters.manager import AdapterConfig, AdapterManager
from quiver.server.config import EngineConfig, SamplingParams
from quiver.server.engine.engine import Engine

PROMPTS = ["The capital of France is", "Write a short poem about autumn leaves falling:"]
NEW = 16
ATOL = 2e-3


def oracle(model, ids, eos_ids):
    """Next-token logits and NEW greedy tokens, each from a full forward over the sequence so far
    (no KV cache: PEFT's prefix-tuning generate does not follow transformers' newer cache API,
    while its forward pass does). Stops after an EOS token, as generate and Quiver do."""
    seq = list(ids)
    first = None
    with torch.inference_mode():
        for _ in range(NEW):
            t = torch.tensor([seq])
            logits = model(input_ids=t, attention_mask=torch.ones_like(t)).logits[0, -1].float()
            first = logits if first is None else first
            seq.append(int(logits.argmax()))
            if seq[-1] in eos_ids:
                break
    return first, seq[len(ids):]


@pytest.fixture(scope="module")
def suite(fp32_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    hf, tok = fp32_model.hf_model, fp32_model.tokenizer
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    expected = {}
    for name, cfg in peft_configs().items():
        pm = make_peft_adapter(hf, name, cfg, root / name)
        try:
            for i in ids:
                logits, toks = oracle(pm, i, fp32_model.eos_token_ids)
                expected[(name, tuple(i))] = (logits, toks)
        finally:
            release_peft(pm)
    hidden = fp32_model.hf_config.hidden_size
    save_quiver_adapters(root, hidden)
    for name, payload in (("bitfit", bitfit_deltas(hidden)), ("bottleneck", bottleneck_blocks(hidden))):
        with hooked(hf, name, payload):
            for i in ids:
                expected[(name, tuple(i))] = oracle(hf, i, fp32_model.eos_token_ids)
    return root, ids, expected


def make_engine(fp32_model, root, overlap=None, **kw):
    manager = AdapterManager(AdapterConfig(str(root), **kw), BaseSpec.from_model(fp32_model.model), fp32_model.name,
                             fp32_model.dtype, fp32_model.device)
    engine = Engine(fp32_model, EngineConfig(max_model_len=256, max_num_batched_tokens=512, max_num_seqs=32,
                                             overlap=overlap), adapters=manager)
    return engine, manager


@pytest.fixture(scope="module")
def fused_fp32_model():
    """The embedded model with q|k|v and gate|up fused into one matmul each (server/fuse.py)."""
    from quiver.server.config import ModelConfig
    from quiver.server.loader import load_model

    loaded = load_model(ModelConfig(quantize="none", dtype="float32", device="cpu", fuse_projections=True))
    assert all(set(layer.fused) == {"qkv", "gate_up"} for layer in loaded.model.layers)
    q, k = loaded.model.layers[0].proj["q_proj"].weight, loaded.model.layers[0].proj["k_proj"].weight
    assert k.data_ptr() == q.data_ptr() + q.numel() * q.element_size(), "members must be views of the fused weight"
    return loaded


@pytest.mark.parametrize("fused,overlap,split", [(False, False, False), (True, False, False), (False, True, False),
                                                 (False, False, True)],
                         ids=["separate", "fused_projections", "overlapped_steps", "split_decodes"])
def test_all_methods_in_one_mixed_batch(fp32_model, fused_fp32_model, suite, fused, overlap, split):
    """split: decodes through the paged decode attention (CPU: its reference), prefix slots too."""
    root, ids, expected = suite
    model = fused_fp32_model if fused else fp32_model
    engine, manager = make_engine(model, root, overlap=overlap)
    engine.runner.split_decodes = split
    methods = sorted({m for m, _ in expected})
    assert set(manager.ids()) == set(methods)
    rows = capture_logits(engine)
    handles = []
    for i in ids:
        handles.append((None, i, engine.submit(i, SamplingParams(max_new_tokens=NEW))))
        for m in methods:
            handles.append((m, i, engine.submit(i, SamplingParams(max_new_tokens=NEW), adapter=manager.resolve(m))))
    inbox, engine._inbox = engine._inbox, []
    engine._take(inbox)
    run_to_completion(engine)
    assert engine.steps <= NEW + 1, "requests were not batched together"
    failures = []
    for method, i, h in handles:
        res = h.result()
        assert res.error is None, (method, res.error)
        if method is None:
            assert res.token_ids == hf_greedy(fp32_model, i, NEW)
            continue
        want_logits, want_tokens = expected[(method, tuple(i))]
        diff = (rows[h.seq.request_id][0] - want_logits).abs().max().item()
        if diff > ATOL or res.token_ids != want_tokens:
            failures.append(f"{method}: max logit diff {diff:.2e}, tokens {res.token_ids} vs {want_tokens}")
        assert res.prompt_tokens == len(i)
    assert not failures, "\n".join(failures)
    assert engine.blocks.num_free + sum(len(b) for b in manager.prefix_blocks.values()) == engine.blocks.num_blocks


def test_adapters_change_the_output(suite, fp32_model):
    root, ids, expected = suite
    base = hf_greedy(fp32_model, ids[1], NEW)
    changed = [m for (m, i), (_, toks) in expected.items() if i == tuple(ids[1]) and toks != base]
    assert len(changed) >= 6, f"too few adapters change greedy output: {changed}"


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlapped_steps"])
def test_few_slots_evict_and_reload(fp32_model, suite, overlap):
    """Two accelerator slots for nine adapters: requests wait for a slot, outputs still match
    (with overlapped steps a slot is released one step later)."""
    root, ids, expected = suite
    engine, manager = make_engine(fp32_model, root, overlap=overlap, num_slots=2)
    methods = sorted({m for m, _ in expected})
    handles = [(m, engine.submit(ids[0], SamplingParams(max_new_tokens=NEW), adapter=manager.resolve(m)))
               for m in methods]
    run_to_completion(engine)
    for m, h in handles:
        assert h.result().token_ids == expected[(m, tuple(ids[0]))][1], m
    assert len(manager.pool.slot_of) == 2 and all(r == 0 for r in manager.pool.refs)


def test_mix_of_loras_is_one_virtual_adapter(fp32_model, suite):
    root, ids, _ = suite
    engine, manager = make_engine(fp32_model, root)
    lora, rslora = manager.resolve("lora").weights, manager.resolve("rslora").weights
    mix = manager.resolve_mix([("lora", 0.5), ("rslora", 1.5)])
    key = (0, "q_proj")
    x = torch.randn(3, 576)
    want = 0.5 * lora.lora[key].scale * (x @ lora.lora[key].a.T @ lora.lora[key].b.T) \
        + 1.5 * rslora.lora[key].scale * (x @ rslora.lora[key].a.T @ rslora.lora[key].b.T)
    d = mix.weights.lora[key]
    torch.testing.assert_close(d.scale * (x @ d.a.T @ d.b.T), want, atol=1e-5, rtol=1e-4)
    h = engine.submit(ids[0], SamplingParams(max_new_tokens=4), adapter=mix)
    run_to_completion(engine)
    res = h.result()
    assert res.error is None and len(res.token_ids) == 4


def test_grpc_serves_every_method_by_folder_name(fp32_model, suite, tmp_path):
    """`quiver serve --adapter-dir DIR` path: adapters by folder name, through a real channel."""
    from concurrent.futures import ThreadPoolExecutor

    from quiver.server.app import Server
    from quiver.server.config import ModelConfig, ServerConfig
    from quiver.server.pb import quiver_pb2 as pb
    from quiver.server.pb import quiver_pb2_grpc as pb_grpc

    root, ids, expected = suite
    broken = root / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (broken / "adapter_model.bin").write_bytes(b"pickle")
    srv = Server(ServerConfig(port=0, adapter_dir=str(root)), ModelConfig(),
                 EngineConfig(max_model_len=256, max_num_batched_tokens=256), loaded=fp32_model)
    port = srv.start()
    try:
        stub = pb_grpc.QuiverStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        prompt = PROMPTS[0]
        methods = sorted({m for m, _ in expected})

        def call(m):
            return m, list(stub.Generate(pb.GenerateRequest(prompt=prompt, adapter_id=m, max_new_tokens=NEW),
                                         timeout=120).token_ids)

        with ThreadPoolExecutor(len(methods)) as pool:
            results = list(pool.map(call, methods))
        for m, toks in results:
            assert toks == expected[(m, tuple(ids[0]))][1], m

        listed = {a.adapter_id: a for a in stub.ListAdapters(pb.ListAdaptersRequest(), timeout=30).adapters}
        assert set(methods) | {"broken"} == set(listed)
        assert listed["dora"].method == "dora" and listed["lora"].rank == 8 and listed["broken"].method == "invalid"
        info = stub.GetAdapter(pb.GetAdapterRequest(adapter_id="ia3"), timeout=30)
        assert info.method == "ia3" and info.warnings and info.base_model_name_or_path

        mixed = stub.Generate(pb.GenerateRequest(prompt=prompt, max_new_tokens=4, adapter_mix=[
            pb.AdapterWeight(adapter_id="lora", weight=0.5), pb.AdapterWeight(adapter_id="rslora", weight=0.5)]),
            timeout=60)
        assert mixed.completion_tokens == 4
        for req, code in [
            (pb.GenerateRequest(prompt=prompt, adapter_id="nope"), grpc.StatusCode.NOT_FOUND),
            (pb.GenerateRequest(prompt=prompt, adapter_id="../etc"), grpc.StatusCode.NOT_FOUND),
            (pb.GenerateRequest(prompt=prompt, adapter_id="broken"), grpc.StatusCode.FAILED_PRECONDITION),
            (pb.GenerateRequest(prompt=prompt, adapter_mix=[pb.AdapterWeight(adapter_id="ia3", weight=1.0)]),
             grpc.StatusCode.FAILED_PRECONDITION),
        ]:
            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(req, timeout=30)
            assert err.value.code() == code, err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.GetAdapter(pb.GetAdapterRequest(adapter_id="nope"), timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        srv.stop()
        import shutil

        shutil.rmtree(broken)


@pytest.mark.parametrize("method", ["lora", "adalora", "ia3", "prefix", "prompt"])
def test_quiver_writes_what_peft_reads(fp32_model, suite, tmp_path, method):
    """Load a PEFT adapter, write it back with Quiver's writer, and let PEFT serve the copy:
    same next-token logits as the original (the trainer writes adapters this way)."""
    from peft import PeftModel

    from quiver.adapters import ia3, prefix, prompt
    from quiver.adapters.lora import save_lora
    from quiver.adapters.methods import load_adapter

    root, ids, expected = suite
    base = BaseSpec.from_model(fp32_model.model)
    w = load_adapter(root / method, base, max_rank=64)
    out = tmp_path / method
    if method in ("lora", "adalora"):
        save_lora(out, w.lora, base_model="m")
    elif method == "ia3":
        ia3.save(out, w)
    elif method == "prefix":
        prefix.save(out, w)
    else:
        prompt.save(out, w, n_layers=base.n_layers)
    again = load_adapter(out, base, max_rank=64)
    assert again.info.method == ("lora" if method == "adalora" else w.info.method)
    pm = PeftModel.from_pretrained(fp32_model.hf_model, str(out))
    try:
        t = torch.tensor([ids[0]])
        with torch.inference_mode():
            logits = pm(input_ids=t, attention_mask=torch.ones_like(t)).logits[0, -1].float()
    finally:
        if not pm.peft_config["default"].is_prompt_learning:
            pm.unload()
    diff = (logits - expected[(method, tuple(ids[0]))][0]).abs().max().item()
    assert diff < ATOL, f"{method}: max logit diff {diff:.2e}"


def test_listing_reads_configs_only(fp32_model, suite):
    root, _, expected = suite
    _, manager = make_engine(fp32_model, root)
    listed = {i.adapter_id: i for i in manager.list()}
    assert not manager.cpu, "listing must not load adapter weights"
    assert {m for m, _ in expected} == set(listed)
    assert listed["dora"].method == "dora" and listed["lora"].rank == 8 and listed["prefix"].rank == 6
    assert listed["ia3"].method == "ia3" and listed["bottleneck"].method == "bottleneck"
    assert all(i.size_bytes > 0 for i in listed.values())


def test_mapped_read_stages_the_same_rows_and_keeps_nothing_of_the_file(fp32_model, suite, monkeypatch):
    """The accelerator's load path (adapters/manager.py on CUDA): the weights file is mapped
    (adapters/mapped.py), staged, then rebased (staging.rebase). For every method the staged
    rows equal those staged from an owned read (safetensors' load_file); after the rebase the
    adapter holds the staged values and nothing refers to the mapping any more, so a file
    rewritten later can neither change what is served nor fault the process; a mix composed
    from rebased adapters is float32 and matches one composed from owned reads."""
    import gc
    import mmap
    import weakref

    from quiver.adapters.methods import load_adapter
    from quiver.adapters.mix import compose
    from quiver.adapters.staging import SERVED_UNSTAGED, rebase, stage

    maps = []

    class Tracked(mmap.mmap):
        def __init__(self, *args, **kwargs):  # mmap.__new__ maps; this only records it
            maps.append(weakref.ref(self))

    monkeypatch.setattr(mmap, "mmap", Tracked)
    root = suite[0]
    base = BaseSpec.from_model(fp32_model.model)
    names = sorted(p.name for p in root.iterdir())
    assert len(names) == 9
    rebased = {}
    for name in names:
        owned = load_adapter(root / name, base, 16, check_finite=False)
        stage(owned, torch.bfloat16, 16, base.n_layers, base.shapes, check=True)
        w = load_adapter(root / name, base, 16, check_finite=False, mapped=True)
        stage(w, torch.bfloat16, 16, base.n_layers, base.shapes, check=True)
        gc.collect()
        if name == "lora":  # its LoRA tensors are the file's own: views of the mapping until the rebase
            assert maps[-1]() is not None
        rebase(w)
        gc.collect()
        assert maps[-1]() is None, f"{name}: a tensor still refers to the mapped file"
        assert w.staged.keys() == owned.staged.keys(), name
        for key, rows in owned.staged.items():
            for want, got in zip(rows, w.staged[key]):
                assert torch.equal(want, got), (name, key)
        for (kind, key, got), (_, _, want) in zip(w.named_tensors(), owned.named_tensors(), strict=True):
            if kind in SERVED_UNSTAGED:
                assert got.dtype == torch.float32 and torch.equal(got, want), (name, kind, key)
            else:
                assert got.dtype == torch.bfloat16 and torch.equal(got, want.bfloat16()), (name, kind, key)
        rebased[name] = (w, owned)
    mix = compose([(rebased["lora"][0], 0.5), (rebased["rslora"][0], 1.5)], 64)
    ref = compose([(rebased["lora"][1], 0.5), (rebased["rslora"][1], 1.5)], 64)
    for key, d in ref.lora.items():
        got = mix.lora[key]
        assert got.a.dtype == torch.float32
        want = d.b @ d.a
        assert float((got.b @ got.a - want).norm() / want.norm()) < 1e-2, key  # bf16 rows: ~2^-8 each
