"""Builds one adapter of every served method on the embedded base, with its oracle.

PEFT methods are created and saved by PEFT itself (random, non-zero init); BitFit and
bottleneck adapters are written in Quiver's format and their oracle is the method applied
to the transformers model directly (forward hooks).
"""

from __future__ import annotations

import contextlib
import zlib

import torch

from quiver.adapters import bitfit, bottleneck
from quiver.adapters.weights import Bottleneck

LAYERS = 30


def perturb(model, seed: int, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.device) * std)


def peft_configs():
    from peft import AdaLoraConfig, IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType

    all7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return {
        "lora": LoraConfig(r=8, lora_alpha=16, target_modules=all7, init_lora_weights=False,
                           rank_pattern={"down_proj": 4}, alpha_pattern={"o_proj": 4}),
        "rslora": LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"],
                             init_lora_weights=False),
        "dora": LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "up_proj"],
                           init_lora_weights=False),
        "adalora": AdaLoraConfig(init_r=6, target_r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"],
                                 total_step=100),
        # up_proj's input vector makes a fused gate|up matmul fall back to member-by-member
        # vectors start at 1 as in training (init_ia3_weights=False draws them from N(0, 1): sign
        # flips in every layer that amplify float32 rounding ~50x, in PEFT as much as in Quiver)
        "ia3": IA3Config(target_modules=["k_proj", "v_proj", "up_proj", "down_proj"],
                         feedforward_modules=["up_proj", "down_proj"], init_ia3_weights=True),
        "prefix": PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=6),
        "prompt": PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5),
    }


STDS = {"lora": 0.02, "rslora": 0.05, "dora": 0.02, "adalora": 0.3, "ia3": 0.3, "prefix": 0.0, "prompt": 0.0}


def make_peft_adapter(hf, name, cfg, path):
    """Creates, perturbs and saves a PEFT adapter; returns the PeftModel (caller unloads)."""
    from peft import get_peft_model

    seed = zlib.crc32(name.encode()) % 1000  # the same adapter whatever ran before
    torch.manual_seed(seed)  # PEFT's random init draws from the global generator
    pm = get_peft_model(hf, cfg)
    if STDS[name]:
        perturb(pm, seed=seed, std=STDS[name])
    pm.eval()
    pm.save_pretrained(path)
    return pm


def release_peft(pm) -> None:
    from peft import PeftModel

    if isinstance(pm, PeftModel) and not pm.peft_config["default"].is_prompt_learning:
        pm.unload()


def bitfit_deltas(hidden: int, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return {(l, p): torch.randn(hidden if p in ("q_proj", "o_proj") else 1536, generator=g) * 0.05
            for l in range(0, LAYERS, 3) for p in ("q_proj", "o_proj", "up_proj")}


def bottleneck_blocks(hidden: int, r: int = 8, seed: int = 4):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.05  # noqa: E731
    return {(l, p): Bottleneck(rnd(r, hidden), rnd(r), rnd(hidden, r), rnd(hidden), "relu")
            for l in range(LAYERS) for p in ("o_proj", "down_proj")}


@contextlib.contextmanager
def hooked(hf, name: str, payload):
    """The transformers model with a BitFit or bottleneck adapter applied by forward hooks."""
    handles = []
    for (layer, proj), item in payload.items():
        block = hf.model.layers[layer]
        mod = getattr(block.self_attn if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else block.mlp, proj)
        if name == "bitfit":
            fn = lambda m, i, y, d=item: y + d.to(y.dtype)  # noqa: E731
        else:
            fn = lambda m, i, y, bn=item: bottleneck.reference_apply(y.reshape(-1, y.shape[-1]), bn).view_as(y)  # noqa: E731
        handles.append(mod.register_forward_hook(fn))
    try:
        yield hf
    finally:
        for h in handles:
            h.remove()


def save_quiver_adapters(root, hidden: int):
    bitfit.save(root / "bitfit", bitfit_deltas(hidden))
    bottleneck.save(root / "bottleneck", bottleneck_blocks(hidden), act="relu")
