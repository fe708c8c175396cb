"""Fused projections: q|k|v and gate|up as one matmul each.

Contract: `fuse_projections(projections) -> {group: module}` for every group in GROUPS whose
members can be concatenated along their outputs: all plain nn.Linear (same dtype, device and
bias presence) or all Quiver NF4Linear in the word layout. The members in `projections` are
replaced IN PLACE by views of the fused weight, so memory is not doubled and each member still
computes its own projection (adapters read their shapes; a step with an input-side (IA)³
vector on a member runs the members one by one). bitsandbytes modules (int8, NF4 on CPU) are
not fused.

Why: a decode step is a few hundred small launches; fusing saves three per layer and gives the
NF4 kernel wider N (better occupancy) at small batch.
"""

from __future__ import annotations

import torch
from torch import nn

GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}


def _fuse_linear(members: list[nn.Linear]) -> nn.Linear | None:
    if any(type(m) is not nn.Linear for m in members):
        return None
    first = members[0].weight
    if len({(m.weight.dtype, m.weight.device, m.in_features, m.bias is None) for m in members}) != 1:
        return None
    weight = torch.cat([m.weight.data for m in members])
    bias = None if members[0].bias is None else torch.cat([m.bias.data for m in members])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=first.dtype)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        fused.bias = nn.Parameter(bias, requires_grad=False)
    lo = 0
    for m in members:  # members become views of the fused storage
        hi = lo + m.out_features
        m.weight = nn.Parameter(weight[lo:hi], requires_grad=False)
        if bias is not None:
            m.bias = nn.Parameter(bias[lo:hi], requires_grad=False)
        lo = hi
    return fused


def _fuse_nf4(members, projections: dict, names: tuple[str, ...]):
    from quiver.server.quant import NF4Linear

    if any(not isinstance(m, NF4Linear) for m in members):
        return None
    fused = NF4Linear.fuse(members)
    if fused is None:
        return None
    lo = 0
    for name, m in zip(names, members):
        projections[name] = fused.column_view(lo, lo + m.out_features)
        lo += m.out_features
    return fused


def fuse_projections(projections: dict[str, nn.Module]) -> dict[str, nn.Module]:
    out = {}
    for group, names in GROUPS.items():
        members = [projections[n] for n in names]
        fused = _fuse_linear(members) or _fuse_nf4(members, projections, names)
        if fused is not None:
            out[group] = fused
    return out
