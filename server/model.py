"""Quiver's own forward pass for Llama-family decoders (Llama, Mistral, Qwen2, SmolLM2).

Contract: `LlamaForward.forward(batch, kv)` takes one StepBatch (flat tokens of every
scheduled sequence: prefill chunks and decodes together) and the paged KV cache, writes the
new keys/values into their cache slots, and returns logits only at `batch.sample_index`
([num_samples, vocab], float32). No HF `generate`, no HF cache: attention reads the paged
cache through per-step gather indices built once in the StepBatch.

Each projection is `base(x)` (nn.Linear, or a bitsandbytes NF4/int8 module) followed by an
optional adapter hook `batch.adapters.linear(layer, name, x, base)`: base(x) plus the batched
adapter deltas of the step (see quiver.adapters). With no adapters the hook is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from quiver.kernels.fused import add_rms_norm, rms_norm, rope_kv, silu_mul
from quiver.server.fuse import GROUPS

# The eager path's attention backends, best first. Not cuDNN: it builds a plan on the host for
# every new shape, and eager steps (prefill chunks beside decodes) change shape every step; on
# the H200 it took 2.6 ms of host time per layer of one mixed step (83 of 139 ms).
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class AdapterHook(Protocol):
    """What the model asks of the step's adapter batch (implemented in quiver.adapters)."""

    def pre_linear(self, layer: int, name: str, x: torch.Tensor) -> torch.Tensor: ...

    def linear(self, layer: int, name: str, x: torch.Tensor, base: nn.Module) -> torch.Tensor: ...

    def begin(self) -> None: ...

    def scales_input(self, layer: int, names: tuple[str, ...]) -> bool: ...

    def group_linear(self, layer: int, names: tuple[str, ...], x: torch.Tensor, base: nn.Module,
                     widths: list[int]) -> list[torch.Tensor]: ...

    def input_embeds(self, embeds: torch.Tensor) -> torch.Tensor: ...


@dataclass
class StepBatch:
    """Per-step metadata, built once per step by the runner and read by every layer.

    Running example: two sequences, A decoding its 6th token, B prefilling 3 prompt tokens.
    T = 4 flat tokens [A5, B0, B1, B2]; B = 2 rows; Qmax = 3; Lmax = 6.
    """

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, position of each token in its sequence
    slot_mapping: torch.Tensor  # [T] int64, flat KV-cache slot written by each token
    sample_index: torch.Tensor  # [N] int64, flat tokens whose logits are returned
    adapters: AdapterHook | None = None
    # The SDPA rows (every row, unless decode rows are split off below), padded to Qmax x Lmax:
    q_gather: torch.Tensor | None = None  # [B, Qmax] int64, flat token index of row b, query i (padding: 0, dropped)
    out_scatter: torch.Tensor | None = None  # [T'] int64, index of each SDPA row token in the flattened [B*Qmax]
    kv_gather: torch.Tensor | None = None  # [B, Lmax] int64, cache slot of row b, key j (0 = padding)
    attn_mask: torch.Tensor | None = None  # [B, 1, Qmax, Lmax] bool, True = may attend
    sdpa_tokens: torch.Tensor | None = None  # [T'] int64, their flat tokens when decode rows are split off
    # Decode rows (one query each), attention straight from the paged cache, no gather of whole
    # sequences: every row of a decode graph's step; in an eager step, the rows of dec_tokens.
    block_tables: torch.Tensor | None = None  # [B, max_blocks] int32
    context_lens: torch.Tensor | None = None  # [B] int32, keys per row incl. the new token (0 = padding row)
    block_size: int = 0
    dec_tokens: torch.Tensor | None = None  # [Bd] int64, flat token of each decode row of an eager step
    dec_gather: torch.Tensor | None = None  # [B] int64, dec_tokens padded with 0 to block_tables' rows (set with it)
    dec_prefix: torch.Tensor | None = None  # [B, P] int64, their shared prefix slots (-1 = none)


class KVCache:
    """Paged KV cache: per layer, keys and values of every block, flat by slot.

    k[layer] and v[layer] are [num_blocks * block_size, n_kv_heads, head_dim]; token slot
    s = block_id * block_size + offset. The block manager hands out block ids.
    """

    def __init__(self, n_layers: int, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_blocks * block_size, n_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.num_blocks = num_blocks
        self.block_size = block_size

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class DecoderLayer(nn.Module):
    """One pre-norm block: attention with GQA and rotary, then SwiGLU MLP."""

    def __init__(self, index: int, projections: dict[str, nn.Module], input_norm: torch.Tensor,
                 post_norm: torch.Tensor, n_heads: int, n_kv_heads: int, head_dim: int, eps: float,
                 fused: dict[str, nn.Module] | None = None):
        super().__init__()
        self.index = index
        self.proj = nn.ModuleDict(projections)  # members of a fused group are views of its weight
        self.fused = nn.ModuleDict(fused or {})  # "qkv", "gate_up" (server/fuse.py)
        self.input_norm = nn.Parameter(input_norm, requires_grad=False)
        self.post_norm = nn.Parameter(post_norm, requires_grad=False)
        self.n_heads, self.n_kv_heads, self.head_dim, self.eps = n_heads, n_kv_heads, head_dim, eps

    def linear(self, name: str, x: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        if batch.adapters is None:
            return self.proj[name](x)
        x = batch.adapters.pre_linear(self.index, name, x)
        return batch.adapters.linear(self.index, name, x, self.proj[name])

    def group(self, group: str, x: torch.Tensor, batch: StepBatch) -> list[torch.Tensor]:
        """The projections of a group (GROUPS in server/fuse.py): one fused matmul whose output
        columns are split (views), each then given its adapters; member by member when not fused
        or when an adapter of the step scales a member's input."""
        names = GROUPS[group]
        ad = batch.adapters
        if group not in self.fused or (ad is not None and ad.scales_input(self.index, names)):
            return [self.linear(n, x, batch) for n in names]
        widths = [self.proj[n].out_features for n in names]
        if ad is None:
            return list(self.fused[group](x).split(widths, dim=-1))
        return ad.group_linear(self.index, names, x, self.fused[group], widths)

    def forward(self, h: torch.Tensor, batch: StepBatch, kv: KVCache, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        q = self.attention_in(h, batch, kv, cos, sin)
        return self.attention_out(self.attend(q, batch, kv), h, batch)

    # The three parts of a layer: captured mixed-step graphs (server/engine/mixed_graphs.py)
    # replay the first and the last and run attend() between them.
    # Norms, rotary + cache write and silu*mul are fused kernels on CUDA (quiver.kernels.fused).
    def attention_in(self, h: torch.Tensor, batch: StepBatch, kv: KVCache, cos: torch.Tensor,
                     sin: torch.Tensor) -> torch.Tensor:
        """Norm, q|k|v with their adapters, rotary; writes k, v to the cache; returns q [T, H*D]."""
        x = rms_norm(h, self.input_norm, self.eps)
        q, k, v = self.group("qkv", x, batch)
        return rope_kv(q, k, v, cos, sin, kv.k[self.index], kv.v[self.index], batch.slot_mapping)

    def attend(self, q: torch.Tensor, batch: StepBatch, kv: KVCache) -> torch.Tensor:
        T = q.shape[0]
        return paged_attention(q.view(T, self.n_heads, self.head_dim), kv.k[self.index], kv.v[self.index], batch)

    def attention_out(self, attn: torch.Tensor, h: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """o_proj, the residual and post norm, the SwiGLU MLP: the layer's output [T, hidden]."""
        x, h = add_rms_norm(self.linear("o_proj", attn, batch), h, self.post_norm, self.eps)
        act = silu_mul(*self.group("gate_up", x, batch))
        return h + self.linear("down_proj", act, batch)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: StepBatch) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its cached keys/values.

    q [T, H, D]; k_cache/v_cache [slots, KVH, D] -> [T, H*D]. Decode rows (block_tables) run
    the paged decode kernel; the other rows run one padded SDPA call (_sdpa_rows).
    """
    T, H, D = q.shape
    if batch.block_tables is None:
        return _sdpa_rows(q, k_cache, v_cache, batch)
    from quiver.kernels.attention import paged_decode_attention

    if batch.dec_tokens is None:  # a decode graph's step: every row, in token order
        return paged_decode_attention(q, k_cache, v_cache, batch.block_tables, batch.context_lens,
                                      batch.block_size, D ** -0.5).reshape(T, H * D)
    n = batch.dec_tokens.shape[0]
    q_dec = q[batch.dec_gather]  # padded to the graphs' batch bucket (padding rows read token 0)
    dec = paged_decode_attention(q_dec, k_cache, v_cache, batch.block_tables, batch.context_lens,
                                 batch.block_size, D ** -0.5, batch.dec_prefix)
    out = q.new_empty(T, H * D)
    out[batch.dec_tokens] = dec[:n].reshape(n, H * D)
    if batch.q_gather is not None:
        out[batch.sdpa_tokens] = _sdpa_rows(q, k_cache, v_cache, batch)
    return out


def _sdpa_rows(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: StepBatch) -> torch.Tensor:
    """Pseudo-code: for each SDPA row b: keys = cache[kv_gather[b]]; out = softmax(q k^T /
    sqrt(D) masked by attn_mask[b]) v. Rows are padded to Qmax x Lmax and run as one SDPA call;
    returns the rows' tokens in out_scatter's order, [T', H*D]."""
    T, H, D = q.shape
    B, Qmax = batch.q_gather.shape
    q_pad = q[batch.q_gather]  # [B, Qmax, H, D]; padding queries (token 0) attend to key 0 and are dropped
    k = _query_heads(k_cache[batch.kv_gather], H)  # [B, Lmax, H, D]
    v = _query_heads(v_cache[batch.kv_gather], H)
    with sdpa_kernel(SDPA_BACKENDS):
        out = F.scaled_dot_product_attention(
            q_pad.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=batch.attn_mask,
        )  # [B, H, Qmax, D]
    out = out.transpose(1, 2).reshape(B * Qmax, H * D)
    return out[batch.out_scatter]


def _query_heads(kv: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[B, L, KVH, D] -> [B, L, H, D], each key/value head repeated for its H // KVH query heads
    (GQA). With a mask, SDPA's memory-efficient kernel takes no enable_gqa and torch falls back
    to the math path: 6.3x slower on the H200 (docs/results/h200/sdpa_gqa_probe.log)."""
    B, L, KVH, D = kv.shape
    if KVH == n_heads:
        return kv
    return kv[:, :, :, None].expand(B, L, KVH, n_heads // KVH, D).reshape(B, L, n_heads, D)


class LlamaForward(nn.Module):
    """The decoder stack: embeddings, layers, final norm, LM head, rotary tables."""

    def __init__(self, embed: torch.Tensor, layers: list[DecoderLayer], norm: torch.Tensor, lm_head: torch.Tensor,
                 rotary: nn.Module, eps: float):
        super().__init__()
        self.embed = nn.Parameter(embed, requires_grad=False)
        self.layers = nn.ModuleList(layers)
        self.norm = nn.Parameter(norm, requires_grad=False)
        self.lm_head = nn.Parameter(lm_head, requires_grad=False)  # may share storage with embed
        self.rotary = rotary
        self.eps = eps
        first = layers[0]
        self.n_heads, self.n_kv_heads, self.head_dim = first.n_heads, first.n_kv_heads, first.head_dim

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def rotary_tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # The model's own rotary module (HF) computes cos/sin for any rope_type it supports.
        probe = torch.empty(0, dtype=dtype, device=positions.device)
        cos, sin = self.rotary(probe, positions[None])
        return cos[0], sin[0]  # [T, D]

    @torch.inference_mode()
    def forward(self, batch: StepBatch, kv: KVCache) -> torch.Tensor:
        h, cos, sin = self.embed_step(batch)
        for layer in self.layers:
            h = layer(h, batch, kv, cos, sin)
        return self.logits(h, batch.sample_index)

    def embed_step(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The step's hidden states [T, hidden] and rotary tables [T, D]."""
        h = F.embedding(batch.input_ids, self.embed)
        if batch.adapters is not None:
            batch.adapters.begin()  # per-step index math runs here, inside a captured CUDA graph
            h = batch.adapters.input_embeds(h)
        cos, sin = self.rotary_tables(batch.positions, h.dtype)
        return h, cos, sin

    def logits(self, h: torch.Tensor, sample_index: torch.Tensor) -> torch.Tensor:
        h = rms_norm(h[sample_index], self.norm, self.eps)
        return F.linear(h, self.lm_head).float()
