"""Engine-level decode benchmark (no gRPC): Quiver with and without adapters, side by side.

    python -m quiver.loadtest.bench_engine                         # CPU: embedded model, batch 32
    python -m quiver.loadtest.bench_engine --model llama2-7b --layers 8 --quantize nf4,none \
        --batch 1,8,32,128 --adapters 0,32,256 --peft-baseline --out bench.json

For each (quantize, batch, adapters): `batch` sequences with `--prompt-len` random prompt
tokens are prefilled, then `--steps` decode steps are timed (CUDA-synchronised). Sequence i
uses adapter i % adapters (0 = base model only). Adapters cycle over `--methods` (lora,
ia3, prefix with 16 virtual tokens); LoRAs take ranks cycling over `--ranks` on `--targets`.
Reported: ms per decode step, output tok/s, and the ratio against no adapters in the same
run; on CUDA also the weight-bandwidth limit measured in the run (a device-to-device copy).
`--peft-baseline` adds HF transformers + PEFT mixed-batch `generate(adapter_names=...)`.
`--model llama2-7b` builds a Llama-2-7B-shaped model with random weights on the device.
`--serial` also times every Quiver row with overlapped steps off (system `quiver-serial`:
each step waits for its tokens on the host before the next is launched).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from quiver.adapters.base import BaseSpec
from quiver.adapters.manager import AdapterConfig, AdapterManager
from quiver.adapters.weights import AdapterInfo, AdapterWeights, LoraDelta
from quiver.kernels.bench_nf4 import copy_bandwidth, replay_ms
from quiver.server.config import EngineConfig, ModelConfig, SamplingParams
from quiver.server.engine.engine import Engine
from quiver.server.loader import LoadedModel, load_model, pick_device, wrap_hf_model

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)


class NullTokenizer:
    """Benchmarks feed token ids; text is not needed."""

    eos_token_id = None
    chat_template = None

    def decode(self, ids, skip_special_tokens=True):
        return ""


def word_tokenizer(vocab_size: int):
    """A tokenizer needing no files: whitespace words w3 .. w{V-1}; <unk>=0, <s>=1, </s>=2."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def random_llama(layers: int, quantize: str, dtype: torch.dtype, device: torch.device,
                 keep_hf: bool = False, tokenizer=None) -> LoadedModel:
    """A Llama-2-7B-shaped model (`layers` deep) with random weights, built on the device;
    tokenizer None = NullTokenizer (token ids only)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**LLAMA2_7B, "num_hidden_layers": layers}, eos_token_id=2)
    with torch.device("meta"):
        hf = LlamaForCausalLM(cfg)
    hf = hf.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.02)
        for m in hf.modules():
            if hasattr(m, "inv_freq"):
                m.inv_freq.copy_(1.0 / (cfg.rope_parameters["rope_theta"] ** (
                    torch.arange(0, 128, 2, dtype=torch.float, device=device) / 128)))
    return wrap_hf_model(hf, tokenizer or NullTokenizer(), ModelConfig(quantize=quantize, dtype=str(dtype).removeprefix("torch."),
                                                          device=str(device)),
                         f"random-llama2-7b-{layers}L", device, dtype, keep_hf=keep_hf)


def random_lora(idx: int, base: BaseSpec, rank: int, targets: list[str], device: torch.device) -> AdapterWeights:
    g = torch.Generator().manual_seed(idx)
    w = AdapterWeights(AdapterInfo(f"bench-{idx}", "lora", rank=rank, target_modules=targets))
    for layer in range(base.n_layers):
        for proj in targets:
            out_f, in_f = base.shapes[proj]
            w.lora[(layer, proj)] = LoraDelta(torch.randn(rank, in_f, generator=g) * 0.01,
                                              torch.randn(out_f, rank, generator=g) * 0.01, 2.0)
    return w


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_ia3(idx: int, base: BaseSpec) -> AdapterWeights:
    """(IA)3 on keys, values and the FFN hidden (PEFT's default Llama targets)."""
    g = torch.Generator().manual_seed(idx)
    w = AdapterWeights(AdapterInfo(f"bench-{idx}", "ia3", target_modules=["k_proj", "v_proj", "down_proj"]))
    for layer in range(base.n_layers):
        for proj in ("k_proj", "v_proj"):
            w.out_scale[(layer, proj)] = 1 + 0.01 * torch.randn(base.shapes[proj][0], generator=g)
        w.in_scale[(layer, "down_proj")] = 1 + 0.01 * torch.randn(base.shapes["down_proj"][1], generator=g)
    return w


def random_prefix(idx: int, base: BaseSpec, n_virtual: int = 16) -> AdapterWeights:
    g = torch.Generator().manual_seed(idx)
    kv = torch.randn(base.n_layers, 2, n_virtual, base.n_kv_heads, base.head_dim, generator=g) * 0.1
    return AdapterWeights(AdapterInfo(f"bench-{idx}", "prefix_tuning", rank=n_virtual), prefix_kv=kv)


def bench_adapter(i: int, base: BaseSpec, ranks: list[int], targets: list[str], methods: list[str],
                  device: torch.device) -> AdapterWeights:
    """Adapter i of the benchmark: methods cycle over adapters (lora ranks cycle among LoRAs)."""
    kind = methods[i % len(methods)]
    if kind == "ia3":
        return random_ia3(i, base)
    if kind == "prefix":
        return random_prefix(i, base)
    pos = i % len(methods)
    k = (i // len(methods)) * methods.count("lora") + methods[:pos].count("lora")  # index among the LoRAs
    return random_lora(i, base, ranks[k % len(ranks)], targets, device)


def time_decode(loaded: LoadedModel, batch: int, n_adapters: int, ranks: list[int], targets: list[str],
                prompt_len: int, steps: int, manager_cache: dict, methods: list[str] = ("lora",),
                profile: bool = False, pool_rank: int = 0, host_profile: int = 0, overlap: bool | None = None) -> dict:
    device = loaded.device
    pool_rank = pool_rank or max(ranks)
    manager = None
    if n_adapters:
        key = (n_adapters, tuple(ranks), tuple(targets), tuple(methods), pool_rank)
        if key not in manager_cache:
            import tempfile

            base = BaseSpec.from_model(loaded.model)
            m = AdapterManager(AdapterConfig(tempfile.mkdtemp(), num_slots=min(n_adapters, batch),
                                             max_rank=pool_rank, cpu_cache=n_adapters + 1),
                               base, loaded.name, loaded.dtype, device)
            for i in range(n_adapters):
                m.add(bench_adapter(i, base, ranks, targets, list(methods), device))
            manager_cache[key] = m
        manager = manager_cache[key]
        manager.reset_pool(min(n_adapters, batch))
    # Room for every step of the run: no sequence may finish inside the timed window (a smaller
    # batch there would replay, or first capture, another graph and skew the time per step).
    new_tokens = steps + 16 + (1 if profile else 0) + host_profile
    max_len = prompt_len + new_tokens + 8 + (16 if "prefix" in methods else 0)
    cfg = EngineConfig(max_num_seqs=batch, max_num_batched_tokens=max(batch, min(batch * prompt_len, 8192)),
                       max_model_len=max_len, num_blocks=batch * (-(-max_len // 16) + 1) + 8,  # + shared prefix blocks
                       overlap=overlap)
    engine = Engine(loaded, cfg, adapters=manager)
    g = torch.Generator().manual_seed(0)
    vocab = loaded.model.embed.shape[0]
    for i in range(batch):
        ref = manager.resolve(f"bench-{i % n_adapters}") if n_adapters else None
        engine.submit(torch.randint(3, vocab, (prompt_len,), generator=g).tolist(),
                      SamplingParams(max_new_tokens=new_tokens, ignore_eos=True), adapter=ref)
    inbox, engine._inbox = engine._inbox, []
    engine._take(inbox)
    while any(s.num_computed < s.num_tokens - 1 for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()  # prefill (possibly chunked)
    for _ in range(2):
        engine.step()  # warm-up decodes (the first captures the decode graph of this batch size)
    sync(device)
    sizes = []
    schedule = engine.scheduler.schedule
    engine.scheduler.schedule = lambda: sizes.append(len(out := schedule())) or out  # noqa: E731
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync(device)
    engine.scheduler.schedule = schedule
    if sizes != [batch] * steps:
        raise RuntimeError(f"timed decode steps ran {sizes} sequences, not {batch} each")
    ms = (time.perf_counter() - t0) / steps * 1e3
    out = {"batch": batch, "adapters": n_adapters, "ms_per_step": ms, "tok_s": batch * 1e3 / ms}
    gpu_ms = graph_replay_ms(engine, batch, n_adapters > 0)
    if gpu_ms is not None:  # the rest of a step is host work the GPU waits for
        out.update(graph_ms=gpu_ms, host_ms=ms - gpu_ms)
    if host_profile:
        out["host_profile"] = profile_host(engine, host_profile)
        print(f"host profile, batch {batch}, {n_adapters} adapters ({host_profile} decode steps, cProfile):\n"
              f"{out['host_profile']}", flush=True)
    if profile:
        out["profile"] = profile_step(engine, device)
        print(f"profile, batch {batch}, {n_adapters} adapters (one decode step, GPU kernels):\n{out['profile']}",
              flush=True)
    return out


def graph_replay_ms(engine, batch: int, use_adapters: bool, reps: int = 10) -> float | None:
    """GPU time of the decode step alone: median of `reps` replays of the CUDA graph the timed
    steps used, each between CUDA events (a replay recomputes the last step: same inputs, same
    KV-cache writes). None without graphs."""
    graphs = engine.runner.graphs
    if graphs is None or not graphs.enabled:
        return None
    bucket = next(b for b in graphs.buckets if b >= batch)
    keys = [k for k in graphs.graphs if k[0] == bucket and k[1] == use_adapters]
    if not keys:
        return None
    return replay_ms(graphs.graphs[max(keys, key=lambda k: k[2])][0], reps)


def profile_host(engine, steps: int, rows: int = 25) -> str:
    """Where the engine thread's time goes over `steps` more decode steps (cProfile, by own
    time; the wait for the GPU shows in the call that syncs). cProfile slows Python code, so read
    the shares, not the absolute times."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        engine.step()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(rows)
    return buf.getvalue()


def profile_step(engine, device: torch.device, rows: int = 14) -> str:
    """Kernel time table of one more decode step (CUDA-graph replays included) by torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        engine.step()
        sync(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)


def cold_load(loaded: LoadedModel, rank: int, targets: list[str], repeats: int = 5) -> dict:
    """Disk -> CPU (read + validate, then stage: serving dtype, pinned) and CPU -> accelerator
    slot times of one LoRA adapter."""
    import tempfile
    from pathlib import Path

    from quiver.adapters.lora import save_lora
    from quiver.adapters.manager import read_staged
    from quiver.adapters.pinned import PinnedArena
    from quiver.adapters.pool import SlotPool

    base = BaseSpec.from_model(loaded.model)
    root = Path(tempfile.mkdtemp())
    w = random_lora(0, base, rank, targets, loaded.device)
    save_lora(root / "cold", w.lora, base_model=loaded.name)
    pool = SlotPool(base, 4, rank, loaded.dtype, loaded.device)
    pool.load(w)  # allocate the stacks once, as a warm server has
    pool.arena = arena = PinnedArena((1024 if loaded.device.type == "cuda" else 0) << 20)  # AdapterManager's default
    disk, engine, slot = [], [], []
    for i in range(repeats):
        sync(loaded.device)
        t0 = time.perf_counter()
        # as AdapterManager does on the request's thread (CUDA: mapped, staged with the check, rebased)
        fresh = read_staged(root / "cold", base, rank, loaded.name, loaded.device, loaded.dtype, pool.R, arena)
        t1 = time.perf_counter()
        fresh.info.adapter_id = f"cold-{i}"
        pool.load(fresh)  # the engine thread: queues the copies
        t2 = time.perf_counter()
        sync(loaded.device)
        disk.append(t1 - t0)
        engine.append(t2 - t1)
        slot.append(time.perf_counter() - t1)
    size = (root / "cold" / "adapter_model.safetensors").stat().st_size
    med = lambda v: sorted(v)[len(v) // 2] * 1e3  # noqa: E731
    return {"system": "cold-load", "rank": rank, "targets": targets, "file_mib": size / 2**20,
            "disk_to_cpu_ms": med(disk), "engine_thread_ms": med(engine),
            "cpu_to_slot_ms": med(slot), "disk_to_slot_ms": med([a + b for a, b in zip(disk, slot)])}


def peft_baseline(hf, batch: int, n_adapters: int, rank: int, targets: list[str], prompt_len: int,
                  steps: int) -> dict:
    """HF transformers + PEFT mixed-batch generate(adapter_names=...) on the same shape."""
    from peft import LoraConfig, get_peft_model

    n = max(1, n_adapters)
    pm = get_peft_model(hf, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False),
                        adapter_name="a0")
    for i in range(1, n):
        pm.add_adapter(f"a{i}", LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                                           init_lora_weights=False))
    pm.eval()
    try:
        return _time_generate(pm, hf, batch, n_adapters, n, prompt_len, steps)
    finally:
        pm.unload()


def _time_generate(pm, hf, batch, n_adapters, n, prompt_len, steps) -> dict:
    device = next(hf.parameters()).device
    ids = torch.randint(3, hf.config.vocab_size, (batch, prompt_len), device=device)
    names = [f"a{i % n}" for i in range(batch)] if n_adapters else None
    kw = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        pre = time.perf_counter()
        pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                    pad_token_id=0, **({"adapter_names": names} if names else {}))
        sync(device)
        t_prefill = time.perf_counter() - pre
        t0 = time.perf_counter()
        pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw,
                    **({"adapter_names": names} if names else {}))
        sync(device)
        dt = time.perf_counter() - t0 - t_prefill
    ms = dt / max(1, steps - 1) * 1e3
    return {"batch": batch, "adapters": n_adapters, "ms_per_step": ms, "tok_s": batch * 1e3 / ms, "system": "hf+peft"}


def parse_env(spec: str) -> dict:
    """NAME=VALUE[,NAME=VALUE] (an --env) as a dict."""
    env = {}
    for item in filter(None, spec.split(",")):
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"--env takes NAME=VALUE[,NAME=VALUE], not {spec!r}")
        env[name] = value
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="embedded", help="embedded | llama2-7b | a local model path")
    ap.add_argument("--layers", type=int, default=32, help="depth of the llama2-7b shape")
    ap.add_argument("--quantize", default="none", help="comma list of nf4,int8,none")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch", default="32")
    ap.add_argument("--adapters", default="0,32")
    ap.add_argument("--ranks", default="16", help="comma list, cycled over adapters (e.g. 8,16,32,64)")
    ap.add_argument("--pool-rank", type=int, default=0,
                    help="rank of the adapter pool's slots (default: the largest of --ranks; the server's is --max-rank 64)")
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--methods", default="lora",
                    help="comma list cycled over adapters: lora, ia3, prefix (e.g. lora,lora,ia3,prefix)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--serial", action="store_true", help="also time each Quiver row with overlapped steps off")
    ap.add_argument("--peft-baseline", action="store_true")
    ap.add_argument("--peft-batch", default="", help="comma list: batch sizes of the HF+PEFT baseline (default: all)")
    ap.add_argument("--cold-load", action="store_true", help="also time one adapter's disk -> slot load")
    ap.add_argument("--profile", default="", help="comma list of batch sizes whose decode step is profiled "
                                                  "(kernel time table, torch.profiler)")
    ap.add_argument("--host-profile", type=int, default=0,
                    help="after the timed steps, profile this many more decode steps on the host (cProfile)")
    ap.add_argument("--env", action="append", default=[],
                    help="NAME=VALUE[,NAME=VALUE]: the batch's rows run once per --env, in order, with these "
                         "environment variables set (e.g. --env QUIVER_EXPAND_IN_BASE=0 --env QUIVER_EXPAND_IN_BASE=1)")
    ap.add_argument("--out", default=None, help="JSON results file")
    args = ap.parse_args(argv)
    envs = {spec: parse_env(spec) for spec in args.env}  # refused before the model loads
    device = pick_device("auto")
    batches = [int(b) for b in args.batch.split(",")]
    adapter_counts = [int(a) for a in args.adapters.split(",")]
    ranks = [int(r) for r in args.ranks.split(",")]
    targets = args.targets.split(",")
    profile_batches = {int(b) for b in args.profile.split(",")} if args.profile else set()
    rows, extra_rows = [], []
    bw = copy_bandwidth(device)
    for quantize in args.quantize.split(","):
        if args.model == "llama2-7b":
            dtype = torch.bfloat16 if args.dtype == "auto" else getattr(torch, args.dtype)
            loaded = random_llama(args.layers, quantize, dtype, device, keep_hf=args.peft_baseline)
        else:
            loaded = load_model(ModelConfig(model=None if args.model == "embedded" else args.model,
                                            quantize=quantize, dtype=args.dtype), keep_hf=args.peft_baseline)
        limit_ms = loaded.weight_bytes / (bw * 1e9) * 1e3 if bw else None
        cache: dict = {}
        if args.cold_load:
            cold = cold_load(loaded, ranks[0], targets)
            print(json.dumps(cold), flush=True)
            extra_rows.append({**cold, "quantize": quantize})
        for batch, env in ((b, e) for b in batches for e in (args.env or [""])):
            base_ms = None
            os.environ.update(envs.get(env, {}))  # switches read at every launch or graph capture
            for n in adapter_counts:
                r = time_decode(loaded, batch, n, ranks, targets, args.prompt_len, args.steps, cache,
                                args.methods.split(","), profile=batch in profile_batches, pool_rank=args.pool_rank,
                                host_profile=args.host_profile)
                r.update(system="quiver", quantize=quantize, weight_mib=loaded.weight_bytes / 2**20,
                         methods=args.methods, ranks=args.ranks, pool_rank=args.pool_rank or max(ranks))
                if env:
                    r["env"] = env
                if n == 0:
                    base_ms = r["ms_per_step"]
                r["vs_no_adapters"] = r["ms_per_step"] / base_ms if base_ms else None
                r["limit_ms"] = limit_ms
                rows.append(r)
                print(json.dumps(r), flush=True)
                if args.serial:
                    s = time_decode(loaded, batch, n, ranks, targets, args.prompt_len, args.steps, cache,
                                    args.methods.split(","), pool_rank=args.pool_rank, overlap=False)
                    s.update({k: r[k] for k in ("quantize", "weight_mib", "methods", "ranks", "pool_rank", "limit_ms")},
                             system="quiver-serial", vs_no_adapters=None, vs_overlap=s["ms_per_step"] / r["ms_per_step"])
                    rows.append(s)
                    print(json.dumps(s), flush=True)
            if args.peft_baseline and (not args.peft_batch or str(batch) in args.peft_batch.split(",")):
                for n in [a for a in adapter_counts if a <= 32]:
                    r = peft_baseline(loaded.hf_model, batch, n, ranks[0], targets, args.prompt_len, args.steps)
                    r.update(quantize=quantize, vs_no_adapters=None, limit_ms=limit_ms)
                    r["vs_quiver"] = r["ms_per_step"] / next(
                        q["ms_per_step"] for q in rows if q["system"] == "quiver" and q["batch"] == batch
                        and q["adapters"] == n and q["quantize"] == quantize)
                    rows.append(r)
                    print(json.dumps(r), flush=True)
        del loaded, cache
        if device.type == "cuda":
            torch.cuda.empty_cache()
    table = ["| system | quantize | batch | adapters | ms/step | GPU ms (graph) | tok/s | vs no adapters | "
             "bandwidth limit ms |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs = f"{r['vs_no_adapters']:.3f}x" if r.get("vs_no_adapters") else "-"
        lim = f"{r['limit_ms']:.2f}" if r.get("limit_ms") else "-"
        gpu = f"{r['graph_ms']:.2f}" if r.get("graph_ms") else "-"
        system = f"{r['system']} ({r['env']})" if r.get("env") else r["system"]
        table.append(f"| {system} | {r.get('quantize', '-')} | {r['batch']} | {r['adapters']} | "
                     f"{r['ms_per_step']:.2f} | {gpu} | {r['tok_s']:.0f} | {vs} | {lim} |")
    print("\n".join(table))
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "copy_bandwidth_gb_s": bw, "args": vars(args), "rows": rows, "cold_load": extra_rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(info, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
