"""Local Hugging Face model directories (safetensors): Llama, Qwen2 (qkv bias), Mistral.

Small randomly initialised models are written with save_pretrained, loaded by Quiver from the
directory, and compared token for token with transformers on the same weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import hf_greedy, tiny_model_dir
from test_engine_hf import staggered_run
from quiver.server.config import ModelConfig
from quiver.server.loader import ModelLoadError, load_model

@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_local_directory_matches_transformers(tmp_path, fp32_model, kind):
    path = tiny_model_dir(tmp_path, kind, fp32_model.tokenizer)
    loaded = load_model(ModelConfig(model=path, quantize="none", dtype="float32", device="cpu"), keep_hf=True)
    assert loaded.name == path
    if kind == "qwen2":
        assert loaded.model.layers[0].proj["q_proj"].bias is not None
    prompts = ["Hello there", "A somewhat longer prompt that needs several prefill chunks to fit", "x"]
    _, results = staggered_run(loaded, prompts, 10, max_num_batched_tokens=8, max_num_seqs=3, max_model_len=128,
                               block_size=4)
    for ids, res in results:
        assert res.token_ids == hf_greedy(loaded, ids, 10)


def test_bad_model_paths_fail_clearly(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(ModelConfig(model=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(ModelConfig(model=str(tmp_path / "empty")))
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text("{}")
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(ModelConfig(model=str(tmp_path / "pickled")))


def test_pickled_checkpoint_beside_a_stray_safetensors_is_not_loaded(tmp_path):
    """A directory whose weights are only a pickle (pytorch_model.bin) is refused even when some
    other .safetensors file sits beside it: transformers is told safetensors only."""
    from safetensors.torch import load_file, save_file

    path = Path(tiny_model_dir(tmp_path, "llama"))
    state = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    torch.save(state, path / "pytorch_model.bin")  # a loadable pickle: it must not be opened
    save_file({"x": torch.zeros(1)}, str(path / "stray.safetensors"))
    with pytest.raises(ModelLoadError, match="no loadable safetensors checkpoint"):
        load_model(ModelConfig(model=str(path), device="cpu"))
