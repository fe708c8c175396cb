"""Which kernel an eager step's SDPA call runs, with and without GQA: the call of
server/model._sdpa_rows (boolean mask, enable_gqa=True) under server/model.SDPA_BACKENDS, for
32 query heads over 32 (Llama-2-7B) and over 8 key/value heads (GQA), against the same call with
the key/value heads repeated (no GQA); prints the kernels' names and the time of each.

    python3 docs/results/h200/sdpa_gqa_probe.py
"""
import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from quiver.server.model import SDPA_BACKENDS

B, Q, L, H, D = 2, 128, 384, 32, 128
dev = torch.device("cuda")
mask = torch.ones(B, 1, Q, L, dtype=torch.bool, device=dev).tril(L - Q)
for kvh, repeat in ((32, False), (8, False), (8, True)):
    q = torch.randn(B, H, Q, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(B, kvh, L, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    if repeat:
        k, v = k.repeat_interleave(H // kvh, 1), v.repeat_interleave(H // kvh, 1)

    def call():
        with sdpa_kernel(SDPA_BACKENDS):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    ref = None
    for _ in range(3):
        out = call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            call()
        torch.cuda.synchronize()
    kernels = sorted({e.key[:60] for e in prof.key_averages() if e.device_type.name == "CUDA"})
    total = sum(e.self_device_time_total for e in prof.key_averages()) / 10
    print(f"kv_heads {kvh} repeat {repeat}: {total:.1f} us per call; kernels: {kernels}", flush=True)
