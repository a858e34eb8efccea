"""`fl-dplora bench prefix-cache --quick` runs and writes the documented JSON (a smoke run: the tiny
random model, one repetition; no timing is asserted, only that every number is there and sane)."""

from __future__ import annotations

import json
import math

import pytest


@pytest.fixture(autouse=True)
def _restore_threads():
    """--quick sets torch's thread count for the process: later in-process runs must not inherit it
    (float sums then differ in the last bits from a subprocess's, and bitwise-resume tests fail)."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _run(tmp_path, *extra: str) -> dict:
    from fl_dplora.cli import main

    out = tmp_path / "prefix-cache.json"
    assert main(["bench", "prefix-cache", "--quick", "--reps", "1", "--warmup", "0", "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


def _positive(values: dict) -> bool:
    return bool(values) and all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in values.values())


def test_bench_prefix_cache_quick(tmp_path):
    """In-process, without the client subprocesses: seconds."""
    res = _run(tmp_path, "--no-rss")
    assert res["benchmark"] == "prefix-cache"
    assert set(res["median_seconds"]) == {"full-n1", "cached-n1", "build-n1", "build-n1-int8", "build-n1-unshared",
                                          "forward", "decoder"}
    assert set(res["ratio"]) == {"full-n1/cached-n1", "forward/build-n1", "decoder/build-n1", "build-n1-unshared/build-n1",
                                 "build-n1/build-n1-int8"}
    for key in ("median_seconds", "ratio", "median_cpu_seconds", "examples_per_second", "speedup"):
        assert _positive(res[key]), key
    step = res["steps"]["n1"]
    assert step["prefix_start"] == 1 and step["examples_per_step"] > 0
    assert step["max_abs_loss_diff"] < 1e-4  # the cached forward scores the same loss as the full one
    assert res["peak_rss_mib"] == {} and res["cache_payload_mib"] is None


def test_bench_prefix_cache_build_only_reports_float32_vs_int8(tmp_path, capsys):
    """fp32 vs int8 build side by side: rates, the GEMM peaks of the same run, feature differences."""
    res = _run(tmp_path, "--build-only", "--build-examples", "8")
    assert set(res["median_seconds"]) == {"build-n1", "build-n1-int8"} and res["setup"]["build_only"]
    r = res["int8"]
    assert r["build_rate_ratio"] == pytest.approx(res["median_seconds"]["build-n1"] / res["median_seconds"]["build-n1-int8"])
    for key in ("tokens_per_second", "model_gflops", "peak_gflops", "fraction_of_peak"):
        assert _positive(r[key]), key
    assert r["tokens"] >= r["tokens_run"] > 0 and r["examples"] == 8
    # final_features_all_int8: the bench's model has LoRA at init (B = 0), so its top block runs int8 too
    for part in ("final_features", "prefix_states", "final_features_all_int8"):  # the tiny random model: close, not equal
        assert 0.99 <= r[part]["cosine_min"] <= r[part]["cosine_mean"] < 1.0 + 1e-9, r[part]
        assert 0 < r[part]["max_abs_diff"] < r[part]["max_abs_float32"]
    out = capsys.readouterr().out
    assert "int8 / float32 build rate" in out and "of its GEMM peak" in out and "with every block int8" in out


@pytest.mark.slow
def test_bench_prefix_cache_quick_rss(tmp_path):
    """Also the two ClientApp processes (prefix-cache memory / off): tens of seconds, mostly imports."""
    res = _run(tmp_path, "--cache-examples", "16")
    assert set(res["peak_rss_mib"]) == set(res["held_rss_mib"]) == {"memory", "off"}
    assert _positive(res["peak_rss_mib"]) and res["peak_rss_mib"]["off"] > 100  # torch + a model loaded
    assert res["cache_payload_mib"] > 0
