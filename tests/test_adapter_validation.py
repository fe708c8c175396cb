"""Adapter files that cannot be served are refused with a message saying why; nothing is unpickled."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from quiver.adapters.base import BaseSpec
from quiver.adapters.files import AdapterError
from quiver.adapters.lora import save_lora
from quiver.adapters.methods import load_adapter
from quiver.adapters.weights import LoraDelta

PRE = "base_model.model.model.layers.0.self_attn"


@pytest.fixture(scope="module")
def base(fp32_model):
    return BaseSpec.from_model(fp32_model.model)


def write(path, config, tensors):
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def lora_cfg(**kw):
    return {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], **kw}


def good_tensors(r=4, proj="q_proj", out=576):
    return {f"{PRE}.{proj}.lora_A.weight": torch.randn(r, 576), f"{PRE}.{proj}.lora_B.weight": torch.randn(out, r)}


@pytest.mark.parametrize("case,match", [
    ("unknown_module", "targets 'c_attn'"),
    ("bad_shape", "shape"),
    ("nan", "NaN or Inf"),
    ("inf", "NaN or Inf"),
    ("opposite_infs", "NaN or Inf"),
    ("rank_too_big", "above this server's maximum"),
    ("layer_out_of_range", "layers"),
    ("pickle_file", "non-safetensors"),
    ("bad_json", "not valid JSON"),
    ("unknown_type", "is not served"),
    ("int_tensor", "floating point"),
    ("dora_without_magnitude", "lora_magnitude_vector"),
])
def test_refusals(tmp_path, base, case, match):
    d = tmp_path / case
    t = good_tensors()
    cfg = lora_cfg()
    if case == "unknown_module":
        t = {k.replace("q_proj", "c_attn"): v for k, v in t.items()}
    elif case == "bad_shape":
        t[f"{PRE}.q_proj.lora_B.weight"] = torch.randn(100, 4)
    elif case == "nan":
        t[f"{PRE}.q_proj.lora_A.weight"][0, 0] = float("nan")
    elif case == "inf":
        t[f"{PRE}.q_proj.lora_B.weight"][3, 1] = float("-inf")
    elif case == "opposite_infs":  # +inf and -inf: their sum is NaN, still caught
        t[f"{PRE}.q_proj.lora_A.weight"][0, :2] = torch.tensor([float("inf"), float("-inf")])
    elif case == "rank_too_big":
        t = good_tensors(r=80)
    elif case == "layer_out_of_range":
        t = {k.replace("layers.0", "layers.99"): v for k, v in t.items()}
    elif case == "unknown_type":
        cfg["peft_type"] = "LOHA"
    elif case == "int_tensor":
        t[f"{PRE}.q_proj.lora_A.weight"] = torch.ones(4, 576, dtype=torch.int32)
    elif case == "dora_without_magnitude":
        cfg["use_dora"] = True
    write(d, cfg, t)
    if case == "pickle_file":
        (d / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle: must never be opened
    if case == "bad_json":
        (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match=match):
        load_adapter(d, base, max_rank=64)


def test_foreign_base_name_is_a_warning_not_an_error(tmp_path, base):
    d = write(tmp_path / "a", lora_cfg(base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct"), good_tensors())
    w = load_adapter(d, base, max_rank=64, base_name="embedded")
    assert w.info.method == "lora" and w.info.rank == 4 and w.info.target_modules == ["q_proj"]
    assert any("HuggingFaceTB/SmolLM2-135M-Instruct" in m for m in w.info.warnings)


def test_save_lora_roundtrip(tmp_path, base):
    deltas = {(2, "v_proj"): LoraDelta(torch.randn(3, 576), torch.randn(192, 3), 2.0),
              (5, "down_proj"): LoraDelta(torch.randn(7, 1536), torch.randn(576, 7), 0.25)}
    save_lora(tmp_path / "x", deltas, base_model="m")
    w = load_adapter(tmp_path / "x", base, max_rank=8)
    x = torch.randn(4, 576)
    for key, d in deltas.items():
        got = w.lora[key]
        assert got.rank == d.rank
        assert torch.equal(got.a, d.a)
        xin = x if key[1] != "down_proj" else torch.randn(4, 1536)
        torch.testing.assert_close(got.scale * (xin @ got.a.T @ got.b.T), d.scale * (xin @ d.a.T @ d.b.T))
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize("case,dtype,match", [
    ("nan", torch.bfloat16, "layer 0 q_proj LoRA holds NaN or Inf"),
    ("fp16_overflow", torch.float16, "beyond the range of float16"),
    ("bottleneck_nan", torch.bfloat16, "layer 1 o_proj bottleneck holds NaN or Inf"),
])
def test_staging_refuses_what_cannot_be_served(tmp_path, base, case, dtype, match):
    """The accelerator path reads without the per-tensor NaN/Inf check and checks the staged rows
    once instead (adapters/staging.py): NaN/Inf are still refused, with the place named, and so is
    a float32 value that overflows the serving dtype; nothing stays staged."""
    from quiver.adapters.staging import stage
    from quiver.adapters.weights import Bottleneck

    t = good_tensors()
    if case == "nan":
        t[f"{PRE}.q_proj.lora_A.weight"][1, 7] = float("nan")
    elif case == "fp16_overflow":
        t[f"{PRE}.q_proj.lora_B.weight"][5, 2] = 1e6  # finite in float32, inf in float16
    d = write(tmp_path / case, lora_cfg(), t)
    w = load_adapter(d, base, max_rank=8, check_finite=False)
    if case == "bottleneck_nan":
        down = torch.randn(4, 576)
        down[0, 0] = float("nan")
        w.bottleneck[(1, "o_proj")] = Bottleneck(down, torch.zeros(4), torch.randn(576, 4), torch.zeros(576), "relu")
    with pytest.raises(AdapterError, match=match):
        stage(w, dtype, 8, base.n_layers, base.shapes, check=True)
    assert w.staged == {}
    if case == "nan":  # the default read refuses it before staging, naming the file tensor
        with pytest.raises(AdapterError, match="q_proj.lora_A.weight holds NaN or Inf"):
            load_adapter(d, base, max_rank=8)


def test_staging_check_passes_a_good_adapter(tmp_path, base):
    from quiver.adapters.staging import stage

    t = good_tensors()
    t[f"{PRE}.q_proj.lora_B.weight"][5, 2] = 1e6  # beyond float16, fine in bfloat16
    w = load_adapter(write(tmp_path / "ok", lora_cfg(), t), base, max_rank=8, check_finite=False)
    stage(w, torch.bfloat16, 8, base.n_layers, base.shapes, check=True)
    a = w.staged[("lora", "q_proj")][0]
    assert torch.equal(a[0, :4], t[f"{PRE}.q_proj.lora_A.weight"].bfloat16()) and not a[0, 4:].any()



# ---- the mapped reader (adapters/mapped.py: views of a mapping of the file, for staging) ----

def _raw(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return len(h).to_bytes(8, "little") + h + data


def test_read_safetensors_matches_the_safetensors_library(tmp_path):
    from safetensors.torch import load_file

    from quiver.adapters.mapped import read_safetensors

    t = {"a": torch.randn(3, 5), "b": torch.randn(7).half(), "c": torch.randn(2, 3).bfloat16(),
         "d": torch.arange(5, dtype=torch.int64), "e": torch.zeros(0, 4), "f": torch.tensor([True, False])}
    save_file(t, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    got, want = read_safetensors(tmp_path / "x.safetensors"), load_file(str(tmp_path / "x.safetensors"))
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    got["a"].mul_(0)  # a private mapping: the file keeps its values
    assert torch.equal(read_safetensors(tmp_path / "x.safetensors")["a"], t["a"])
    # an f16 tensor of odd length ahead of an f32 one leaves it unaligned: read by a copy
    raw = _raw({"h": {"dtype": "F16", "shape": [3], "data_offsets": [0, 6]},
                "w": {"dtype": "F32", "shape": [2], "data_offsets": [6, 14]}},
               torch.ones(3).half().numpy().tobytes() + torch.tensor([1.5, -2.0]).numpy().tobytes())
    (tmp_path / "u.safetensors").write_bytes(raw)
    assert read_safetensors(tmp_path / "u.safetensors")["w"].tolist() == [1.5, -2.0]


@pytest.mark.parametrize("case,match", [
    ("short", "shorter than a header"),
    ("header_too_long", "header of"),
    ("not_json", "not JSON"),
    ("not_object", "not a JSON object"),
    ("unknown_dtype", "unknown dtype"),
    ("outside", "outside"),
    ("size_mismatch", "bytes for shape"),
    ("overlap", "overlap"),
    ("negative", "non-negative"),
    ("extra_key", "is not"),
])
def test_read_safetensors_refuses_a_header_that_does_not_describe_the_file(tmp_path, base, case, match):
    f32 = lambda lo, hi, shape: {"dtype": "F32", "shape": shape, "data_offsets": [lo, hi]}  # noqa: E731
    data = bytes(16)
    raw = {"short": b"\x01\x00",
           "header_too_long": (1 << 40).to_bytes(8, "little") + b"{}",
           "not_json": (4).to_bytes(8, "little") + b"{{{{",
           "not_object": _raw([1, 2], b""),
           "unknown_dtype": _raw({"t": {"dtype": "F12", "shape": [1], "data_offsets": [0, 4]}}, data),
           "outside": _raw({"t": f32(0, 32, [8])}, data),
           "size_mismatch": _raw({"t": f32(0, 8, [3])}, data),
           "overlap": _raw({"t": f32(0, 8, [2]), "u": f32(4, 12, [2])}, data),
           "negative": _raw({"t": f32(0, 4, [-1])}, data),
           "extra_key": _raw({"t": {**f32(0, 4, [1]), "more": 1}}, data)}[case]
    d = write(tmp_path / case, lora_cfg(), good_tensors())
    (d / "adapter_model.safetensors").write_bytes(raw)
    with pytest.raises(AdapterError, match=f"not a readable safetensors file: .*{match}"):
        load_adapter(d, base, 16, mapped=True)


@pytest.mark.parametrize("mapped", [False, True])
@pytest.mark.parametrize("raw", [b"\x01\x00", (1 << 40).to_bytes(8, "little") + b"{}", (4).to_bytes(8, "little") + b"{{{{",
                                 (2).to_bytes(8, "little") + b'{"t": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}'],
                         ids=["short", "header_too_long", "not_json", "outside"])
def test_a_corrupt_weights_file_is_refused(tmp_path, base, raw, mapped):
    d = write(tmp_path / "x", lora_cfg(), good_tensors())
    (d / "adapter_model.safetensors").write_bytes(raw)
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        load_adapter(d, base, 16, mapped=mapped)
