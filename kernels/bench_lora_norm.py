"""Timing: o_proj LoRA expand + residual add + RMSNorm, fused (kernels/lora_norm.py) against the
BGMV expand then add_rms_norm, per decoder layer at the 7B shape (hidden 4096, rank 16), with a
distinct adapter per row (up to 32) and one B bank per layer (the layers' banks exceed L2).

    python -m quiver.kernels.bench_lora_norm [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from .bench_nf4 import time_graph
from .fused import triton_add_rms_norm
from .lora import triton_lora_expand
from .lora_norm import triton_lora_add_rms_norm


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_lora_norm needs CUDA", file=sys.stderr)
        return 2
    dev, dt, N, R, S, L = torch.device("cuda"), torch.bfloat16, 4096, 16, 32, args.layers
    g = torch.Generator(device=dev).manual_seed(0)
    banks = [torch.randn(S, N, R, device=dev, dtype=dt, generator=g) * 0.01 for _ in range(L)]
    ranks = torch.full((S,), R, dtype=torch.int32, device=dev)
    scaling = torch.full((S,), 2.0, device=dev)
    weight = torch.ones(N, device=dev, dtype=dt)
    rows = []
    for T in (1, 32, 128):
        ts = (torch.arange(T, device=dev) % S).to(torch.int32)
        h = torch.randn(T, R, device=dev)
        y = torch.randn(T, N, device=dev, dtype=dt)
        r = torch.randn(T, N, device=dev, dtype=dt)

        def unfused():
            for b in banks:
                triton_add_rms_norm(triton_lora_expand(h, b, ts, ranks, scaling, y), r, weight, 1e-5)

        res = {"unfused": time_graph(unfused) * 1e3 / L}
        for split, bc, nw in [(True, 512, 4), (True, 256, 2), (True, 256, 4), (True, 1024, 4), (True, 128, 2),
                              (False, 4096, 16), (False, 1024, 8)]:
            def fused(split=split, bc=bc, nw=nw):
                for b in banks:
                    triton_lora_add_rms_norm(h, b, ts, ranks, scaling, y, r, weight, 1e-5, block_c=bc, num_warps=nw,
                                             split=split)
            res[f"{'split' if split else 'row'}_c{bc}_w{nw}"] = time_graph(fused) * 1e3 / L
        print(f"T={T}: " + ", ".join(f"{k} {v:.2f} us" for k, v in res.items()), flush=True)
        rows.append(dict(T=T, us_per_layer=res))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(rows=rows, device=torch.cuda.get_device_name()), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
