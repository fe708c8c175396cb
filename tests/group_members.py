"""LoRA group members (quiver.kernels.lora_group.GroupMember) for the kernel tests."""

from __future__ import annotations

import torch

from quiver.kernels.lora_group import GroupMember


def lora_members(widths, T, K, *, R=8, S=3, seed=0, dtype=torch.float32, device="cpu", gap=0, pool=0):
    """One member per width over an input of width K: S slots of ranks 1..R (NaN past a slot's
    rank in A and B: never read), pool slot 3 without a stack on member 1, zeroed h [T, R];
    members' columns `gap` apart. pool >= R: A and B are views [:, :R] of stacks of rank `pool`
    (NaN past R), B stored rank-major, as the adapter pool hands them to the kernels under its
    rank bound (adapters/pool.py LoraBank).
    Returns (members, total width of y)."""
    g = torch.Generator().manual_seed(seed)
    out, col = [], 0
    for i, n in enumerate(widths):
        ranks = torch.tensor([(7 * i + 17 * s) % R + 1 for s in range(S)], dtype=torch.int32)  # R 40: up to 35
        P = max(pool, R)
        a = torch.full((S, P, K), float("nan"))
        b = torch.full((S, P, n), float("nan")).transpose(1, 2) if pool else torch.full((S, n, P), float("nan"))
        a[:, :R] = torch.randn(S, R, K, generator=g)
        b[:, :, :R] = torch.randn(S, n, R, generator=g)
        a, b = a.to(dtype).to(device)[:, :R], b.to(dtype).to(device)[:, :, :R]  # .to keeps the strides
        for s in range(S):
            a[s, ranks[s]:] = float("nan")
            b[s, :, ranks[s]:] = float("nan")
        slot_map = torch.tensor([-1, 0, 1, 2, -1 if i == 1 else 0], dtype=torch.int32)
        scaling = torch.rand(S, generator=g) + 0.5
        out.append(GroupMember(a, b, ranks.to(device), scaling.to(device),
                               slot_map.to(device), torch.zeros(T, R, device=device), col))
        col += n + gap
    return out, col
