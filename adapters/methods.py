"""The explicit list of adaptation methods, by the `peft_type` of adapter_config.json.

`load_adapter(path, base, max_rank, base_name)` reads a directory and returns AdapterWeights,
or raises AdapterError with a message that says what to fix. check_finite=False leaves the
NaN/Inf check to `staging.stage(..., check=True)`, which runs it once over the staged rows;
mapped=True leaves the tensors as views of the mapped file, for a caller that stages them and
then calls `staging.rebase` (adapters/manager.py on CUDA).
"""

from __future__ import annotations

from pathlib import Path

from quiver.adapters import adalora, bitfit, bottleneck, ia3, lora, prefix, prompt
from quiver.adapters.base import BaseSpec
from quiver.adapters.files import AdapterError, read_adapter_dir
from quiver.adapters.weights import AdapterWeights

METHODS = {
    "LORA": lora.load,
    "ADALORA": adalora.load,
    "IA3": ia3.load,
    "PREFIX_TUNING": prefix.load,
    "PROMPT_TUNING": prompt.load,
    "P_TUNING": prompt.load,
    "BITFIT": bitfit.load,
    "BOTTLENECK": bottleneck.load,
}


def load_adapter(path: Path, base: BaseSpec, max_rank: int, base_name: str = "",
                 check_finite: bool = True, mapped: bool = False) -> AdapterWeights:
    path = Path(path)
    cfg, tensors = read_adapter_dir(path, check_finite, mapped)
    kind = str(cfg.get("peft_type", "")).upper()
    if kind not in METHODS:
        raise AdapterError(f"{path.name}: peft_type {cfg.get('peft_type')!r} is not served; "
                           f"served: {sorted(METHODS)}")
    try:
        weights = METHODS[kind](path.name, cfg, tensors, base, max_rank)
    except AdapterError as exc:
        raise AdapterError(f"{path.name}: {exc}") from None
    info = weights.info
    info.base_model = cfg.get("base_model_name_or_path")
    if info.base_model and base_name and info.base_model != base_name:
        info.warnings.append(f"trained on {info.base_model!r}, served on {base_name!r} (shapes fit)")
    info.size_bytes = (path / "adapter_model.safetensors").stat().st_size
    return weights
