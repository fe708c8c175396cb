"""Where a cold adapter load's time goes, on a CUDA machine without a model: rank 16 LoRA on
q, k, v, o of a 32-layer 7B-shaped base (a 64 MiB float32 file), a 4-slot pool.

Prints: pinning 32 MiB (first, new block, cached), one bulk fp32 -> bf16 conversion, the file
read and finite checks, then 10 loads (read + validate, stage, engine thread) alternating
staging.BULK_ROWS off and on, and a profile of one stage call.

    python loadtest/bench_cold_load.py
"""
import time, tempfile, torch, sys
from pathlib import Path
from quiver.adapters.base import BaseSpec
from quiver.adapters.lora import save_lora
from quiver.adapters.methods import load_adapter
from quiver.adapters.staging import stage
from quiver.adapters.pool import SlotPool
from quiver.loadtest.bench_engine import LLAMA2_7B, random_lora
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
root = Path(tempfile.mkdtemp()); save_lora(root / "cold", w.lora, base_model="x")
pool = SlotPool(base, 4, 16, torch.bfloat16, dev)
ms = lambda t: f"{1e3*(time.perf_counter()-t):.1f}"
for i in range(3):
    t = time.perf_counter(); p = torch.empty(16 << 20, dtype=torch.bfloat16, pin_memory=True); print("pin 32MB", ms(t))
    t = time.perf_counter(); q = torch.empty(16 << 20, dtype=torch.bfloat16); q.fill_(0); print("pageable 32MB touch", ms(t))
x = torch.randn(16 << 20)
for i in range(3):
    t = time.perf_counter(); p.copy_(x); print("convert 16M fp32->bf16 into pinned (one op)", ms(t))
from safetensors.torch import load_file
for i in range(3):
    t = time.perf_counter(); d = load_file(str(root / "cold" / "adapter_model.safetensors")); t1 = time.perf_counter()
    s = [v.sum() for v in d.values()]; print("load_file", f"{1e3*(t1-t):.1f}", "sums", ms(t1))
print("threads", torch.get_num_threads())
import quiver.adapters.staging as S
for i in range(10):
    S.BULK_ROWS = i % 2 == 1
    t0 = time.perf_counter(); f = load_adapter(root / "cold", base, 16); t1 = time.perf_counter()
    stage(f, torch.bfloat16, 16, L, shapes); t2 = time.perf_counter()
    f.info.adapter_id = f"c{i}"; pool.load(f); t3 = time.perf_counter(); torch.cuda.synchronize()
    print(f"bulk={S.BULK_ROWS} read {1e3*(t1-t0):.1f} stage {1e3*(t2-t1):.1f} engine {1e3*(t3-t2):.1f} total {ms(t0)}")
import cProfile, pstats
f = load_adapter(root / "cold", base, 16)
prof = cProfile.Profile()
prof.runcall(stage, f, torch.bfloat16, 16, L, shapes)
pstats.Stats(prof).sort_stats("tottime").print_stats(8)
