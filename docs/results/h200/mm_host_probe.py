"""Host time of one bf16 F.linear launch on CUDA: shapes seen for the first time against
shapes repeated (an eager step's prefill linears have a new M nearly every step).

    python3 docs/results/h200/mm_host_probe.py
"""
import statistics
import time

import torch
import torch.nn.functional as F

W = {n: torch.randn(n, 4096, device="cuda", dtype=torch.bfloat16) for n in (4096, 12288, 22016)}
W[4096 + 1] = torch.randn(4096, 11008, device="cuda", dtype=torch.bfloat16)


def host_us(ms, w):
    out = []
    for m in ms:
        x = torch.randn(m, w.shape[1], device="cuda", dtype=torch.bfloat16)
        torch.cuda.synchronize()
        t = time.perf_counter()
        F.linear(x, w)
        out.append(1e6 * (time.perf_counter() - t))
    torch.cuda.synchronize()
    return statistics.median(out), max(out)


for key, w in W.items():
    F.linear(torch.randn(64, w.shape[1], device="cuda", dtype=torch.bfloat16), w)
    new = host_us(range(129, 329), w)  # every M new
    rep = host_us([159] * 200, w)
    bucket = host_us([192] * 200, w)
    again = host_us(range(129, 329), w)  # the same Ms a second time
    print(f"W {tuple(w.shape)}: new M median {new[0]:.1f} us (max {new[1]:.0f}); repeated M=159 {rep[0]:.1f}; "
          f"M=192 {bucket[0]:.1f}; the new Ms again {again[0]:.1f} us", flush=True)
