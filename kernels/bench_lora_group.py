"""Sweep of the grouped multi-LoRA kernels' launch configs at the engine's decode shapes (CUDA only).

    python -m quiver.kernels.bench_lora_group [--batch 1,8,32,128] [--ranks 16] [--pool-rank 16]
                                              [--layers 32] [--out FILE.json]

Workload: the LoRA deltas of one Llama-2-7B decode step as the engine runs them
(adapters/batch.py): per layer one `lora_group` over q|k|v (3 members, hidden 4096 -> 3 x 4096)
and one over o (1 member), every member with its own pool of `--adapters` slots padded to
`--pool-rank`; slot s has rank ranks[s % len(ranks)]; token t uses slot t % adapters. Each layer
has its own pools, so nothing stays in L2. One step = the zero-fill of the shrink outputs plus
the 64 group calls (128 launches), captured in a CUDA graph; time = median of replays.

It times the defaults (kernels/lora.py's BGMV constants) and the defaults before the last
sweep (PREVIOUS), then shrink configs with the default
expand, then expand configs with the default shrink, and prints per batch the best of each and
the floor: the bytes the step must move (each distinct adapter's A and B rows at its own rank,
x, y read and written) over the device-to-device copy bandwidth measured in the same run. The
winning configs are checked against reference_lora_group (float32) before they are reported.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch

from quiver.kernels.bench_nf4 import copy_bandwidth, time_graph, write_sweep
from quiver.kernels.lora_group import GroupMember, reference_lora_group, triton_lora_group

SHRINK_GRID = dict(shrink_block_k=(128, 256, 512, 1024), shrink_num_warps=(4, 8), shrink_target=(264, 528, 1056))
EXPAND_GRID = dict(expand_block_n=(32, 64, 128, 256, 512), expand_num_warps=(2, 4, 8))
# the defaults before this sweep (shrink: 4 warps, ~2 programs per SM; expand: 64 outputs, 4 warps)
PREVIOUS = dict(shrink_num_warps=4, shrink_target=264, expand_block_n=64, expand_num_warps=4)


def _grid(space: dict) -> list[dict]:
    return [dict(zip(space, vals)) for vals in itertools.product(*space.values())]


def build_layers(args, device, dtype):
    """Per layer: (qkv members, o members) with their own pools."""
    H, S, R = args.hidden, args.adapters, args.pool_rank
    ranks_list = [int(r) for r in args.ranks.split(",")]
    ranks = torch.tensor([ranks_list[s % len(ranks_list)] for s in range(S)], dtype=torch.int32, device=device)
    scaling = torch.full((S,), 2.0, dtype=torch.float32, device=device)
    slot_map = torch.arange(-1, S, dtype=torch.int32, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    layers = []
    for _ in range(args.layers):
        def member(col):
            a = (torch.randn(S, R, H, device=device, generator=g) / H**0.5).to(dtype)
            b = (torch.randn(S, H, R, device=device, generator=g) / R**0.5).to(dtype)
            return dict(a=a, b=b, col=col)
        layers.append(([member(i * H) for i in range(3)], [member(0)]))
    return layers, ranks, scaling, slot_map


def make_step(layers, ranks, scaling, slot_map, x, slots, y_qkv, y_o, h, cfg):
    groups = []
    i = 0
    for qkv, o in layers:
        for mems, y in ((qkv, y_qkv), (o, y_o)):
            gm = []
            for m in mems:
                gm.append(GroupMember(m["a"], m["b"], ranks, scaling, slot_map, h[i], m["col"]))
                i += 1
            groups.append((gm, y))

    def step():
        h.zero_()
        for gm, y in groups:
            triton_lora_group(x, slots, gm, y, **cfg)
    return step


def check(layers, ranks, scaling, slot_map, x, slots, cfg, H) -> float:
    """Max |triton - reference| / max |reference| over the first layer's q|k|v group (the
    reference in float32 on the CPU)."""
    T = x.shape[0]
    R = layers[0][0][0]["a"].shape[1]
    out = []
    for fn, dev in ((triton_lora_group, x.device), (reference_lora_group, torch.device("cpu"))):
        dt = x.dtype if dev.type == "cuda" else torch.float32
        mems = [GroupMember(m["a"].to(dev, dt), m["b"].to(dev, dt), ranks.to(dev), scaling.to(dev), slot_map.to(dev),
                            torch.zeros(T, R, dtype=torch.float32, device=dev), m["col"]) for m in layers[0][0]]
        y = torch.zeros(T, 3 * H, dtype=dt, device=dev)
        kw = cfg if fn is triton_lora_group else {}
        out.append(fn(x.to(dev, dt), slots.to(dev), mems, y, **kw).float().cpu())
    return float((out[0] - out[1]).abs().max() / out[1].abs().max().clamp_min(1e-12))


def floor_bytes(args, T, ranks, elt) -> int:
    H = args.hidden
    distinct = sorted({t % args.adapters for t in range(T)})
    r_sum = sum(int(ranks[s]) for s in distinct)
    per_layer = 4 * (2 * r_sum * H * elt) + T * H * elt * 2 + 4 * T * H * elt * 2  # A+B; x (qkv, o); y r+w
    return args.layers * per_layer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m quiver.kernels.bench_lora_group", description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--adapters", type=int, default=32)
    p.add_argument("--ranks", default="16", help="ranks of the slots, cycled (e.g. 8,16,32,64)")
    p.add_argument("--pool-rank", type=int, default=16)
    p.add_argument("--batch", default="1,8,32,128")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_lora_group needs a CUDA device", file=sys.stderr)
        return 2
    dev, dtype = torch.device("cuda"), torch.bfloat16
    bw = copy_bandwidth(dev) * 1e9  # bytes/s
    layers, ranks, scaling, slot_map = build_layers(args, dev, dtype)
    H = args.hidden
    rows = []
    for T in [int(b) for b in args.batch.split(",")]:
        gen = torch.Generator(device=dev).manual_seed(T)
        x = torch.randn(T, H, device=dev, generator=gen).to(dtype)
        slots = (torch.arange(T, device=dev) % args.adapters).to(torch.int32)
        y_qkv = torch.zeros(T, 3 * H, device=dev, dtype=dtype)
        y_o = torch.zeros(T, H, device=dev, dtype=dtype)
        h = torch.zeros(args.layers * 4, T, args.pool_rank, device=dev, dtype=torch.float32)

        def timed(cfg):
            return time_graph(make_step(layers, ranks, scaling, slot_map, x, slots, y_qkv, y_o, h, cfg), reps=args.reps)

        default_ms = timed({})
        previous_ms = timed(PREVIOUS)
        results = {"shrink": [], "expand": []}
        for kind, space in (("shrink", SHRINK_GRID), ("expand", EXPAND_GRID)):
            for cfg in _grid(space):
                try:
                    results[kind].append((timed(cfg), cfg))
                except Exception as e:  # a config may not compile
                    torch.cuda.synchronize()
                    print(f"  T={T} {cfg}: {type(e).__name__}: {str(e)[:160]}", file=sys.stderr)
            results[kind].sort(key=lambda t: t[0])
        best = {**results["shrink"][0][1], **results["expand"][0][1]}
        best_ms = timed(best)
        floor_ms = floor_bytes(args, T, ranks, 2) / bw * 1e3
        row = dict(batch=T, previous_ms=previous_ms, default_ms=default_ms, best_ms=best_ms, best=best, floor_ms=floor_ms,
                   err_default=check(layers, ranks, scaling, slot_map, x, slots, {}, H),
                   err_best=check(layers, ranks, scaling, slot_map, x, slots, best, H),
                   shrink=[dict(ms=ms, cfg=c) for ms, c in results["shrink"]],
                   expand=[dict(ms=ms, cfg=c) for ms, c in results["expand"]])
        rows.append(row)
        print(f"T={T}: previous {previous_ms:.3f} ms, default {default_ms:.3f} ms, best {best_ms:.3f} ms {best}, floor {floor_ms:.3f} ms; "
              f"top shrink {[(round(ms, 3), c) for ms, c in results['shrink'][:3]]}; "
              f"top expand {[(round(ms, 3), c) for ms, c in results['expand'][:3]]}", flush=True)
    print(f"\nLoRA of one decode step ({args.layers} layers, q|k|v group + o, ranks {args.ranks}, pool rank "
          f"{args.pool_rank}, {args.adapters} adapters) on {torch.cuda.get_device_name()}; copy {bw / 1e12:.2f} TB/s\n")
    print("| batch | previous defaults ms | defaults ms | previous / defaults | best ms | default / best | floor ms "
          "| best / floor | rel err default / best | best config |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['previous_ms']:.3f} | {r['default_ms']:.3f} | {r['previous_ms'] / r['default_ms']:.2f}x "
              f"| {r['best_ms']:.3f} | {r['default_ms'] / r['best_ms']:.2f}x "
              f"| {r['floor_ms']:.3f} | {r['best_ms'] / r['floor_ms']:.2f}x | {r['err_default']:.1e} / {r['err_best']:.1e} "
              f"| {r['best']} |")
    if args.out:
        write_sweep(args.out, bw, args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
