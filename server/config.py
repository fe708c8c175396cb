"""Configuration dataclasses: one per concern, each validated in __post_init__.

ModelConfig says which weights to load and how to hold them; EngineConfig sizes the KV
cache and the scheduler; ServerConfig is the gRPC edge. SamplingParams belong to one request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

QUANTIZE_CHOICES = ("nf4", "int8", "none")
DEFAULT_METRICS_PORT = 9095  # not Prometheus' own 9090, nor node_exporter's 9100 or DCGM's 9400
DTYPE_CHOICES = ("float32", "bfloat16", "float16", "auto")


@dataclass
class ModelConfig:
    # None = the embedded SmolLM2-135M-Instruct GGUF. Otherwise a local Hugging Face model
    # directory (config.json + safetensors) or a .gguf file.
    model: str | None = None
    quantize: str = "nf4"
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # auto: cuda if available
    nf4_kernel: str = "triton"  # on CUDA: "triton" (Quiver's fused W4A16) or "bnb" (bitsandbytes' matmul)
    # q|k|v and gate|up as one matmul each (server/fuse.py); None = on CUDA only (on CPU the
    # unfused matmuls keep results bit-identical to transformers for the oracle tests)
    fuse_projections: bool | None = None

    def __post_init__(self) -> None:
        if self.quantize not in QUANTIZE_CHOICES:
            raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, got {self.quantize!r}")
        if self.nf4_kernel not in ("triton", "bnb"):
            raise ValueError(f"nf4_kernel must be triton or bnb, got {self.nf4_kernel!r}")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {self.dtype!r}")


@dataclass
class EngineConfig:
    block_size: int = 16  # tokens per KV block
    num_blocks: int = 0  # 0 = derive from max_model_len * max_num_seqs
    max_num_seqs: int = 32  # running sequences per step
    max_num_batched_tokens: int = 512  # tokens per step (prefill chunks + decodes)
    max_model_len: int = 2048  # prompt + generated tokens of one sequence
    default_max_new_tokens: int = 256
    cuda_graphs: bool = True  # replay CUDA graphs for decode-only steps on CUDA
    # steps with a prefill chunk replay per-layer graphs around an eager attention
    # (server/engine/mixed_graphs.py; needs cuda_graphs); None = on CUDA
    mixed_graphs: bool | None = None
    # launch each step before the last step's tokens reach the host (engine.py); None = on CUDA
    overlap: bool | None = None
    # run short requests of several lengths through the engine at start (Engine.warm_up), so
    # the first requests do not wait for kernel compilation; None = on CUDA
    warmup: bool | None = None

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len", "default_max_new_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_blocks < 0:
            raise ValueError("num_blocks must be >= 0")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs (one decode token per sequence)")
        if self.num_blocks == 0:
            per_seq = -(-self.max_model_len // self.block_size)
            self.num_blocks = per_seq * min(self.max_num_seqs, 8) + per_seq
        slots = self.num_blocks * self.block_size
        if slots < self.max_model_len:  # a longer sequence could never be held: no promise of it
            log.warning("max_model_len %d lowered to %d, the KV cache's num_blocks * block_size",
                        self.max_model_len, slots)
            self.max_model_len = slots

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.max_model_len // self.block_size)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    max_workers: int = 128  # gRPC handler threads (one per in-flight call)
    adapter_dir: str | None = None
    adapter_slots: int = 16  # adapters resident on the accelerator at once
    max_rank: int = 64  # largest LoRA / bottleneck rank accepted
    pinned_mib: int = 1024  # page-locked memory pinned at start for staged adapters (CUDA)
    # Prometheus /metrics over HTTP on host: None = no metrics at all, 0 = any free port
    # (Server.metrics_port says which). `quiver serve` defaults to DEFAULT_METRICS_PORT.
    metrics_port: int | None = None

    def __post_init__(self) -> None:
        if self.metrics_port is not None and not (0 <= self.metrics_port < 65536):
            raise ValueError(f"metrics port out of range: {self.metrics_port}")
        if self.adapter_slots <= 0 or self.max_rank <= 0:
            raise ValueError("adapter_slots and max_rank must be positive")
        if self.pinned_mib < 0:
            raise ValueError("pinned_mib must be >= 0")
        if not (0 <= self.port < 65536):
            raise ValueError(f"port out of range: {self.port}")
        if self.max_workers <= 0:
            raise ValueError("max_workers must be positive")


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off, 1 = greedy
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1
