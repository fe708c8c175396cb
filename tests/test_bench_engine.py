"""The engine-level benchmark runs (tiny settings) and reports sane numbers."""

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
