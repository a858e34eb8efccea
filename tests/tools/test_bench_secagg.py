"""`fl-dplora bench secagg`: one round plain vs SecAgg+ on a tiny fake adapter (N = 3, one rep).

No timing is asserted; what is: the ratios are computed from the measured numbers, the secure upload
is larger than the plain one (masked values travel as 64-bit integers, plain ones as float32), the
per-stage bytes add up, and the sum check passes (and fails loudly on a wrong unmasked sum)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fl_dplora.tools.bench import secagg as bench_secagg

LORA = {"layers.0.q_proj.lora_A.weight": (4, 32), "layers.0.q_proj.lora_B.weight": (32, 4),
        "layers.0.v_proj.lora_A.weight": (4, 32), "layers.0.v_proj.lora_B.weight": (16, 4)}
FFA = {k: s for k, s in LORA.items() if "lora_B" in k}


@pytest.fixture(autouse=True)
def _restore_threads():
    """--quick sets torch's thread count for the process; later tests must not inherit it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _finite_positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_section_on_a_tiny_adapter():
    res = bench_secagg.run_section({"lora-r4": LORA, "ffa-r4": FFA}, num_clients=3, reps=1, warmup=0, verbose=False)
    assert set(res["median_seconds"]) == {"lora-r4-plain", "lora-r4-secure", "ffa-r4-plain", "ffa-r4-secure"}
    assert all(_finite_positive(v) for v in res["median_seconds"].values())
    pc = res["bytes_per_client"]
    for name, shapes in (("lora-r4", LORA), ("ffa-r4", FFA)):
        plain, secure, key = f"{name}-plain", f"{name}-secure", f"{name}-secure/{name}-plain"
        dim = sum(math.prod(s) for s in shapes.values())
        assert res["adapters"][name]["values"] == dim
        assert pc[plain]["up"] >= 4 * dim  # float32 payload at least
        assert pc[secure]["up"] > pc[plain]["up"] and pc[secure]["down"] > pc[plain]["down"]
        # the ratios are the measured numbers divided, nothing else
        assert res["ratio_bytes_up"][key] == pytest.approx(pc[secure]["up"] / pc[plain]["up"])
        assert res["ratio_bytes_down"][key] == pytest.approx(pc[secure]["down"] / pc[plain]["down"])
        assert res["ratio"][key] == pytest.approx(res["median_seconds"][secure] / res["median_seconds"][plain])
        assert res["ratio_cpu"][key] == pytest.approx(res["median_cpu_seconds"][secure] / res["median_cpu_seconds"][plain])
        # the four SecAgg+ stages account for every secure byte; the masked vectors dominate the upload
        stages = res["stages"][name]
        assert len(stages) == 4 and all(r["messages"] == 3 for r in stages.values())
        assert sum(r["up_per_client"] for r in stages.values()) == pytest.approx(pc[secure]["up"])
        assert sum(r["down_per_client"] for r in stages.values()) == pytest.approx(pc[secure]["down"])
        assert max(stages, key=lambda st: stages[st]["up_per_client"]) == "collect_masked_vectors"
        check = res["check"][name]
        assert check["passed"] and check["survivors"] == 3
        assert check["max_abs_diff_vs_plain"] <= check["bound"] + check["float32_tolerance"]
        assert check["max_abs_diff_vs_rounded"] <= check["float32_tolerance"]
    assert pc["lora-r4-plain"]["up"] > pc["ffa-r4-plain"]["up"]  # FFA ships B only


def test_a_wrong_unmasked_sum_stops_the_bench(monkeypatch):
    from fl_dplora.strategies import secagg

    real = secagg.secure_sum

    def off_by_ten_steps(grid, server_round, contents, shapes, grid_plan, *args):
        outcome = real(grid, server_round, contents, shapes, grid_plan, *args)
        key = min(outcome.total)
        outcome.total[key].view(-1)[0] += 10 * grid_plan.step
        return outcome

    monkeypatch.setattr(secagg, "secure_sum", off_by_ten_steps)
    with pytest.raises(RuntimeError, match="unmasked sum is wrong"):
        bench_secagg.run_section({"ffa-r4": FFA}, num_clients=3, reps=1, warmup=0, verbose=False)


def test_cli_quick_writes_json(tmp_path, capsys):
    from fl_dplora.cli import main

    out = tmp_path / "secagg.json"
    assert main(["bench", "secagg", "--quick", "--reps", "1", "--warmup", "0", "--num-clients", "3",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "NO TRAINING" in printed and "secure/plain" in printed
    res = json.loads(out.read_text())
    assert res["benchmark"] == "secagg" and res["setup"]["num_clients"] == 3
    assert set(res["ratio_bytes_up"]) == {"lora-r8-secure/lora-r8-plain", "ffa-r8-secure/ffa-r8-plain"}
    assert all(v > 1 for v in res["ratio_bytes_up"].values())
    # tiny-random-llama: hidden 64, 2 layers, 4 heads / 2 kv heads of 16 -> q 64x64, v 64->32
    assert res["adapters"]["lora-r8"]["values"] == 2 * (8 * 64 + 64 * 8 + 8 * 64 + 32 * 8)
    assert res["adapters"]["ffa-r8"]["values"] == 2 * (64 * 8 + 32 * 8)
