"""quiver.kernels: batched adapter kernels (multi-LoRA BGMV/SGMV, per-slot vector ops),
paged decode attention, and the NF4 W4A16 base linear (kernels/nf4.py).

Contract: every op has a pure-PyTorch ``reference_*`` (the spec, used on CPU) and a
``triton_*`` implementation with the same positional signature; the un-prefixed public
function dispatches (Triton for CUDA tensors or QUIVER_FORCE_TRITON=1, else the reference).
Triton is optional: without it the package imports and only the references run
(``HAS_TRITON`` says which). This package imports nothing else from quiver.

Shapes: adapter pool of S slots padded to max rank R; a_stack [S, R, H_in],
b_stack [S, H_out, R], ranks [S] int32, scaling [S] float32; token_slot [T] int32 (-1 = none);
segments: seg_indptr [G+1] int32, seg_slot [G] int32. See kernels/lora.py and kernels/scale.py.
"""

from .lora import (
    HAS_TRITON,
    apply_lora,
    lora_expand,
    lora_shrink,
    reference_lora_expand,
    reference_lora_shrink,
    reference_sgmv_expand,
    reference_sgmv_shrink,
    segments_from_slots,
    sgmv_expand,
    sgmv_shrink,
    triton_lora_expand,
    triton_lora_shrink,
    triton_sgmv_expand,
    triton_sgmv_shrink,
    use_triton,
)
from .attention import (
    decode_split_plan,
    paged_decode_attention,
    reference_paged_decode_attention,
    triton_paged_decode_attention,
)
from .scale import (
    add_by_slot,
    reference_add_by_slot,
    reference_scale_by_slot,
    scale_by_slot,
    triton_add_by_slot,
    triton_scale_by_slot,
)

__all__ = [
    "decode_split_plan",
    "paged_decode_attention",
    "reference_paged_decode_attention",
    "triton_paged_decode_attention",
    "HAS_TRITON",
    "use_triton",
    "segments_from_slots",
    "lora_shrink",
    "lora_expand",
    "sgmv_shrink",
    "sgmv_expand",
    "apply_lora",
    "scale_by_slot",
    "add_by_slot",
    "reference_lora_shrink",
    "reference_lora_expand",
    "reference_sgmv_shrink",
    "reference_sgmv_expand",
    "reference_scale_by_slot",
    "reference_add_by_slot",
    "triton_lora_shrink",
    "triton_lora_expand",
    "triton_sgmv_shrink",
    "triton_sgmv_expand",
    "triton_scale_by_slot",
    "triton_add_by_slot",
]
