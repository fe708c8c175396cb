"""Protobuf requests -> engine inputs, with validation. Protobuf types stop here.

`GenerateInput.from_proto(req, defaults)` raises `InvalidRequest` (-> INVALID_ARGUMENT) for
bad input; the service maps it to a gRPC status.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from quiver.server.config import SamplingParams

MAX_STOP_STRINGS = 16


class InvalidRequest(ValueError):
    """The request is malformed; the message says what to fix."""


@dataclass
class GenerateInput:
    prompt: str | None
    messages: list[dict[str, str]] | None
    params: SamplingParams
    adapter_id: str = ""
    adapter_mix: list[tuple[str, float]] = field(default_factory=list)

    @classmethod
    def from_proto(cls, req, default_max_new_tokens: int) -> "GenerateInput":
        messages = [{"role": m.role, "content": m.content} for m in req.messages]
        if req.prompt and messages:
            raise InvalidRequest("give either prompt or messages, not both")
        if not req.prompt and not messages:
            raise InvalidRequest("the prompt is empty: set prompt or messages")
        for m in messages:
            if m["role"] not in ("system", "user", "assistant"):
                raise InvalidRequest(f"message role must be system, user or assistant, got {m['role']!r}")
        if req.max_new_tokens < 0:
            raise InvalidRequest(f"max_new_tokens must be >= 0 (0 = server default), got {req.max_new_tokens}")
        if req.temperature < 0:
            raise InvalidRequest(f"temperature must be >= 0, got {req.temperature}")
        if not (0.0 <= req.top_p <= 1.0):
            raise InvalidRequest(f"top_p must be in [0, 1] (0 = off), got {req.top_p}")
        if req.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0 (0 = off), got {req.top_k}")
        if len(req.stop) > MAX_STOP_STRINGS or any(not s for s in req.stop):
            raise InvalidRequest(f"stop: at most {MAX_STOP_STRINGS} non-empty strings")
        if req.adapter_id and len(req.adapter_mix):
            raise InvalidRequest("give either adapter_id or adapter_mix, not both")
        mix = [(w.adapter_id, w.weight) for w in req.adapter_mix]
        if any(not a for a, _ in mix):
            raise InvalidRequest("adapter_mix entries need an adapter_id")
        params = SamplingParams(
            max_new_tokens=req.max_new_tokens or default_max_new_tokens,
            temperature=req.temperature,
            top_p=req.top_p if req.top_p > 0 else 1.0,
            top_k=req.top_k,
            seed=req.seed if req.HasField("seed") else None,
            stop=list(req.stop),
        )
        return cls(prompt=req.prompt or None, messages=messages or None, params=params,
                   adapter_id=req.adapter_id, adapter_mix=mix)


def encode_prompt(tokenizer, inp: GenerateInput) -> list[int]:
    """Token ids of the prompt; messages are rendered with the model's chat template."""
    if inp.messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidRequest("this model has no chat template: send a raw prompt instead of messages")
        text = tokenizer.apply_chat_template(inp.messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(inp.prompt)["input_ids"]
