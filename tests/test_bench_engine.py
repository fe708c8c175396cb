"""The engine-level benchmark runs (tiny settings) and reports sane numbers."""

import pytest

from quiver.loadtest import bench_engine


def test_time_decode_with_mixed_methods(fp32_model):
    cache: dict = {}
    base = bench_engine.time_decode(fp32_model, 4, 0, [8], ["q_proj", "v_proj"], 8, 2, cache)
    mixed = bench_engine.time_decode(fp32_model, 4, 4, [4, 8], ["q_proj", "v_proj"], 8, 2, cache,
                                     ["lora", "lora", "ia3", "prefix"])
    for r in (base, mixed):
        assert r["ms_per_step"] > 0 and r["tok_s"] > 0 and r["batch"] == 4
    manager = next(iter(cache.values()))
    kinds = sorted(w.info.method for w in manager.cpu.values())
    assert kinds == ["ia3", "lora", "lora", "prefix_tuning"]
    assert {d.rank for w in manager.cpu.values() for d in w.lora.values()} == {4, 8}


def test_cold_load_reports_both_stages(fp32_model):
    r = bench_engine.cold_load(fp32_model, 4, ["q_proj"], repeats=2)
    assert r["disk_to_cpu_ms"] > 0 and r["cpu_to_slot_ms"] > 0 and r["file_mib"] > 0
    assert 0 < r["engine_thread_ms"] <= r["cpu_to_slot_ms"] and r["disk_to_slot_ms"] >= r["disk_to_cpu_ms"]


def test_profile_step_lists_the_ops(fp32_model):
    r = bench_engine.time_decode(fp32_model, 2, 0, [8], ["q_proj"], 8, 1, {}, profile=True)
    assert "aten::linear" in r["profile"] or "aten::addmm" in r["profile"] or "aten::mm" in r["profile"]


def test_host_benchmark_runs_real_engine_steps():
    from quiver.loadtest import bench_host

    r = bench_host.host_step(batch=4, n_adapters=2, steps=5, tokenizer="real")
    assert r["host_ms_per_step"] > 0 and r["tokens"] == 4 * 5  # every sequence decoded every step


def test_host_profile_lists_the_engine_calls(fp32_model):
    r = bench_engine.time_decode(fp32_model, 2, 0, [8], ["q_proj"], 8, 1, {}, host_profile=2)
    assert "function calls" in r["host_profile"] and "(forward)" in r["host_profile"]


def test_serial_rows_time_the_engine_without_overlap(tmp_path):
    import json

    out = tmp_path / "bench.json"
    assert bench_engine.main(["--batch", "2", "--adapters", "0,2", "--steps", "2", "--prompt-len", "8",
                              "--serial", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["system"], r["adapters"]) for r in rows] == [("quiver", 0), ("quiver-serial", 0),
                                                            ("quiver", 2), ("quiver-serial", 2)]
    for quiver, serial in zip(rows[::2], rows[1::2]):
        assert serial["ms_per_step"] > 0 and serial["vs_overlap"] == serial["ms_per_step"] / quiver["ms_per_step"]


def test_env_rows_run_once_per_setting_in_order(tmp_path, monkeypatch):
    """--env: the batch's rows run once per setting, in order, each with its variables set while
    it runs (a spy on time_decode reads them) and its own no-adapter baseline."""
    import json
    import os

    monkeypatch.setenv("QUIVER_EXPAND_IN_BASE", "1")  # restored after the test
    seen = []
    real = bench_engine.time_decode
    monkeypatch.setattr(bench_engine, "time_decode", lambda *a, **k: (
        seen.append((os.environ["QUIVER_EXPAND_IN_BASE"], a[2])), real(*a, **k))[1])
    out = tmp_path / "bench.json"
    assert bench_engine.main(["--batch", "2", "--adapters", "0,2", "--steps", "1", "--prompt-len", "8", "--out",
                              str(out), "--env", "QUIVER_EXPAND_IN_BASE=0", "--env", "QUIVER_EXPAND_IN_BASE=1"]) == 0
    assert seen == [("0", 0), ("0", 2), ("1", 0), ("1", 2)]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["env"], r["adapters"]) for r in rows] == [
        ("QUIVER_EXPAND_IN_BASE=0", 0), ("QUIVER_EXPAND_IN_BASE=0", 2),
        ("QUIVER_EXPAND_IN_BASE=1", 0), ("QUIVER_EXPAND_IN_BASE=1", 2)]
    assert rows[3]["vs_no_adapters"] == rows[3]["ms_per_step"] / rows[2]["ms_per_step"]
    with pytest.raises(SystemExit, match="NAME=VALUE"):
        bench_engine.main(["--batch", "2", "--adapters", "0", "--steps", "1", "--env", "NOVALUE"])


def test_serving_benchmark_runs_the_load_generator_per_setting(tmp_path):
    """bench_serve: one server per overlap setting over the same model, the load generator in
    its own process against each; every request completes and the table has both rows."""
    import json

    from quiver.loadtest import bench_serve

    out = tmp_path / "serve.json"
    assert bench_serve.main(["--quantize", "none", "--duration", "2", "--concurrency", "2", "--input-len", "fixed:8",
                             "--output-len", "fixed:4", "--warmup", "1", "--out", str(out)]) == 0
    reports = json.loads(out.read_text())["reports"]
    assert [r["overlap"] for r in reports] == ["on", "off"]
    for r in reports:
        assert r["requests"]["completed"] == r["requests"]["sent"] > 0 and r["requests"]["failed"] == 0
        assert r["output_tok_per_s"] > 0 and r["engine_steps"] > 0
        assert 0 < r["tokens"]["completion_mean"] <= 4


def test_serving_benchmark_spreads_requests_over_written_adapters(tmp_path):
    """bench_serve --adapters 3: three random LoRA adapters written in PEFT format are served,
    and the load generator's requests name each of them (uniform popularity), all completed."""
    import json

    from quiver.loadtest import bench_serve

    out = tmp_path / "serve.json"
    assert bench_serve.main(["--quantize", "none", "--duration", "3", "--concurrency", "3", "--input-len", "fixed:8",
                             "--output-len", "fixed:4", "--warmup", "0", "--overlap", "on", "--adapters", "3",
                             "--out", str(out)]) == 0
    (report,) = json.loads(out.read_text())["reports"]
    assert report["adapters"] == 3 and report["requests"]["failed"] == 0
    per = report["per_adapter"]
    assert set(per) == {"bench-0", "bench-1", "bench-2"}
    assert all(v["completed"] == v["sent"] > 0 for v in per.values())
