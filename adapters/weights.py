"""The canonical in-memory form every adaptation method loads into.

Contract: a method module turns its files into one `AdapterWeights`; the slot pool and the
step's AdapterBatch only ever see this form. Keys are (layer index, projection name) with
projection names as in quiver.server.model.PROJECTIONS. Tensors are float32 on the CPU until
a slot takes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

Key = tuple[int, str]  # (layer, "q_proj" ...)


@dataclass
class LoraDelta:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float  # y += scale * b @ (a @ x)

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class Bottleneck:
    down: torch.Tensor  # [r, out]   applied to the projection's output y
    down_bias: torch.Tensor  # [r]
    up: torch.Tensor  # [out, r]
    up_bias: torch.Tensor  # [out]
    act: str  # "relu" | "gelu" | "silu"

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass
class AdapterInfo:
    adapter_id: str
    method: str
    rank: int = 0
    target_modules: list[str] = field(default_factory=list)
    base_model: str | None = None
    warnings: list[str] = field(default_factory=list)
    size_bytes: int = 0


@dataclass
class AdapterWeights:
    """Everything one adapter contributes, per layer and projection.

    Order of application on a projection y = W x_in (x_in = x * in_scale where set):
    y += lora; y = y * out_scale; y += out_add; y += up(act(down(y) + down_bias)) + up_bias.
    """

    info: AdapterInfo
    lora: dict[Key, LoraDelta] = field(default_factory=dict)
    in_scale: dict[Key, torch.Tensor] = field(default_factory=dict)  # [in]  (IA3 feed-forward)
    out_scale: dict[Key, torch.Tensor] = field(default_factory=dict)  # [out] (IA3, DoRA)
    out_add: dict[Key, torch.Tensor] = field(default_factory=dict)  # [out] (BitFit, DoRA bias term)
    bottleneck: dict[Key, Bottleneck] = field(default_factory=dict)
    prefix_kv: torch.Tensor | None = None  # [layers, 2, n_virtual, kv_heads, head_dim] (prefix tuning)
    prompt_embeds: torch.Tensor | None = None  # [n_virtual, hidden] (prompt tuning)
    # id(tensor) -> the same tensor in the serving dtype in pinned memory, made by stage() off
    # the engine thread so a slot load is a few asynchronous copies (no conversion, no sync)
    staged: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def stage(self, dtype: torch.dtype, rank: int | None = None) -> None:
        """Pre-converts every tensor to dtype in page-locked memory (call before the engine loads
        it); with rank, LoRA A and B are zero-padded to that rank (a slot row in one copy). All
        staged tensors are views of one pinned buffer (pinning is a costly allocation)."""
        pads: dict[int, tuple[int, ...]] = {}
        if rank is not None:
            for d in self.lora.values():
                pads[id(d.a)] = (0, 0, 0, rank - d.rank)  # A [r, in] -> [rank, in]
                pads[id(d.b)] = (0, rank - d.rank)  # B [out, r] -> [out, rank]
        host = [t for t in self.tensors() if not t.is_cuda]
        shapes = {id(t): _padded_shape(t.shape, pads.get(id(t), ())) for t in host}
        total = sum(int(torch.Size(shape).numel()) for shape in shapes.values())
        buf = torch.empty(total, dtype=dtype, pin_memory=torch.cuda.is_available())
        staged, off = {}, 0
        for t in host:
            shape = shapes[id(t)]
            n = int(torch.Size(shape).numel())
            view = buf[off:off + n].view(shape)
            off += n
            pad = pads.get(id(t), ())
            if pad and any(pad):
                view.zero_()
                view[tuple(slice(0, k) for k in t.shape)] = t
            else:
                view.copy_(t)
            staged[id(t)] = view
        for t in self.tensors():
            if t.is_cuda:  # already on the accelerator (built there): only the dtype
                staged[id(t)] = t.to(dtype)
        self.staged = staged

    def source(self, t: torch.Tensor) -> torch.Tensor:
        """The staged copy of one of this adapter's tensors (t itself when not staged)."""
        return self.staged.get(id(t), t)

    def tensors(self) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for d in self.lora.values():
            out += [d.a, d.b]
        for bn in self.bottleneck.values():
            out += [bn.down, bn.down_bias, bn.up, bn.up_bias]
        for table in (self.in_scale, self.out_scale, self.out_add):
            out += list(table.values())
        out += [t for t in (self.prefix_kv, self.prompt_embeds) if t is not None]
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def _padded_shape(shape: torch.Size, pad: tuple[int, ...]) -> tuple[int, ...]:
    """shape after torch.nn.functional.pad(t, pad) with non-negative pads (last dim first)."""
    out = list(shape)
    for i in range(len(pad) // 2):
        out[-1 - i] += pad[2 * i] + pad[2 * i + 1]
    return tuple(out)
