"""Where a cold adapter load's time goes, on a CUDA machine without a model: rank 16 LoRA on
q, k, v, o of a 32-layer 7B-shaped base (a 64 MiB float32 file), a 4-slot pool.

Prints, each the median of 7 after a warm-up:
  * pieces: pinning 32 MiB (new block / cached), the file read (safetensors' load_file, and
    Quiver's mapped read_safetensors, each also with one conversion to bf16), the NaN/Inf check
    per file tensor (torch and numpy) and over one staged buffer;
  * the rows of one projection three ways: layer by layer (2 copies per layer), stack + one
    conversion, one multi-tensor copy (staging.lora_rows);
  * whole loads as AdapterManager does them on CUDA (the file mapped and read without the
    per-tensor check, staged into its pinned arena with the check on the staged buffer, row
    copies run by 8 threads, then rebased onto the staged rows; engine thread), alternated with
    the same from safetensors' load_file (the path before), on 1 thread, and with the oldest
    order (per-tensor check on read, stage unchecked into a block pinned per adapter, 1 thread),
    then a profile of one stage call.

    python loadtest/bench_cold_load.py
"""
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from quiver.adapters.base import BaseSpec
from quiver.adapters.files import is_finite
from quiver.adapters.lora import save_lora
from quiver.adapters.mapped import read_safetensors
from quiver.adapters.methods import load_adapter
from quiver.adapters.pinned import PinnedArena
from quiver.adapters.pool import SlotPool
from quiver.adapters.staging import lora_rows, rebase, stage
from quiver.loadtest.bench_engine import LLAMA2_7B, random_lora


def median_ms(fn, n=7):
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t))
    return f"{statistics.median(times):.2f} ms (min {min(times):.2f}, max {max(times):.2f})"


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench_cold_load needs a CUDA device")
    H, I, L = LLAMA2_7B["hidden_size"], LLAMA2_7B["intermediate_size"], LLAMA2_7B["num_hidden_layers"]
    heads, kv_heads = LLAMA2_7B["num_attention_heads"], LLAMA2_7B["num_key_value_heads"]
    D = H // heads
    shapes = {"q_proj": (H, H), "k_proj": (kv_heads * D, H), "v_proj": (kv_heads * D, H), "o_proj": (H, H),
              "gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
    base = BaseSpec(L, H, kv_heads, D, shapes)
    dev = torch.device("cuda")
    w = random_lora(0, base, 16, ["q_proj", "k_proj", "v_proj", "o_proj"], dev)
    root = Path(tempfile.mkdtemp())
    save_lora(root / "cold", w.lora, base_model="x")
    print("threads", torch.get_num_threads())

    t = time.perf_counter()
    pinned = torch.empty(16 << 20, dtype=torch.bfloat16, pin_memory=True)
    print("pin 32 MiB, first", f"{1e3 * (time.perf_counter() - t):.1f} ms")
    print("pin 32 MiB, cached block", median_ms(lambda: torch.empty(16 << 20, dtype=torch.bfloat16, pin_memory=True)))
    held = []  # kept alive, so that every allocation is a new block
    print("pin 32 MiB, new block", median_ms(lambda: held.append(torch.empty(16 << 20, dtype=torch.bfloat16,
                                                                             pin_memory=True)), n=3))
    del held
    from safetensors.torch import load_file
    path = str(root / "cold" / "adapter_model.safetensors")
    tensors = list(load_file(path).values())
    print("load_file (page cache)", median_ms(lambda: load_file(path)))
    print("read_safetensors (views of a mapping; page cache)", median_ms(lambda: read_safetensors(path)))
    flat = torch.empty(sum(x.numel() for x in tensors), dtype=torch.bfloat16)
    dst = list(flat.split([x.numel() for x in tensors]))
    for name, read in (("load_file", load_file), ("read_safetensors", read_safetensors)):
        print(f"{name} + one conversion to bf16", median_ms(
            lambda: torch._foreach_copy_(dst, [x.view(-1) for x in read(path).values()])))
    print("NaN/Inf check, 256 torch sums", median_ms(lambda: [is_finite(x) for x in tensors]))
    print("NaN/Inf check, 256 numpy sums", median_ms(lambda: [bool(abs(x.numpy().sum()) < float("inf")) for x in tensors]))
    print("NaN/Inf check, one staged 32 MiB bf16 buffer", median_ms(lambda: is_finite(pinned)))

    f = load_adapter(root / "cold", base, 16)
    deltas = [f.lora[(layer, "q_proj")] for layer in range(L)]
    a = pinned[: L * 16 * H].view(L, 16, H)

    def by_layer():
        for layer, d in enumerate(deltas):
            a[layer, :16] = d.a

    print("q_proj A rows, layer by layer", median_ms(by_layer))
    print("q_proj A rows, stack + one conversion", median_ms(lambda: a.copy_(torch.stack([d.a for d in deltas]))))
    print("q_proj A rows, one multi-tensor copy", median_ms(lambda: torch._foreach_copy_(list(a.unbind(0)), [d.a for d in deltas])))
    print("lora_rows q_proj (A, B, ranks, scaling)", median_ms(lambda: lora_rows(f, "q_proj", L, 16, torch.bfloat16)))

    pool = SlotPool(base, 4, 16, torch.bfloat16, dev)
    pool.load(w)
    t = time.perf_counter()
    arena = PinnedArena(1 << 30)
    print("pin the 1 GiB arena (server start)", f"{1e3 * (time.perf_counter() - t):.0f} ms")
    import quiver.adapters.staging as staging
    ways = {"mapped, arena, check on the staged buffer, 8 fill threads, rebased (served)": (True, 8, True),
            "the same, file read by safetensors' load_file": (True, 8, False),
            "mapped, arena, check on the staged buffer, 1 fill thread": (True, 1, True),
            "load_file, pin per adapter, check per file tensor, 1 fill thread": (False, 1, False)}
    rows = {name: [] for name in ways}
    for i in range(8 * len(ways)):
        name = list(ways)[i % len(ways)]
        deferred, staging.FILL_THREADS, mapped = ways[name]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fresh = load_adapter(root / "cold", base, 16, check_finite=not deferred, mapped=mapped)
        t1 = time.perf_counter()
        stage(fresh, torch.bfloat16, 16, L, shapes, check=deferred, arena=arena if deferred else None)
        if mapped:
            rebase(fresh)
        t2 = time.perf_counter()
        fresh.info.adapter_id = f"c{i}"
        pool.arena = arena if deferred else None
        pool.load(fresh)
        t3 = time.perf_counter()
        torch.cuda.synchronize()
        t4 = time.perf_counter()
        rows[name].append((t1 - t0, t2 - t1, t3 - t2, t4 - t2, t4 - t0))
    staging.FILL_THREADS = 8
    for name in ways:
        cols = list(zip(*rows[name][1:]))  # the first of each is a warm-up
        med = [1e3 * statistics.median(c) for c in cols]
        print(f"load, {name}: read {med[0]:.1f} stage {med[1]:.1f} engine thread {med[2]:.2f} "
              f"cpu->slot {med[3]:.1f} | disk->slot median {med[4]:.1f} ms, min {1e3 * min(cols[4]):.1f}, "
              f"max {1e3 * max(cols[4]):.1f}")
    import cProfile
    import pstats
    fresh = load_adapter(root / "cold", base, 16, check_finite=False, mapped=True)
    prof = cProfile.Profile()
    prof.runcall(stage, fresh, torch.bfloat16, 16, L, shapes, check=True, arena=arena)
    pstats.Stats(prof).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
