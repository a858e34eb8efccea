"""The epsilon a run reports is the epsilon of what it did, checked end to end (in-process runs).

For each dp-mode the reported epsilon (metrics.jsonl per round, summary.json) is recomputed here
from the events the run actually performed (which client was sampled in which round, its shard
size, local steps, sigma) with Google's `dp_accounting` (RDP with Opacus' orders for
accountant=rdp, PLD for prv), independently of Opacus. Calibration (noise-multiplier <= 0) must
end within target-epsilon, and a fixed sigma that would overrun the target must stop the run.
"""

from __future__ import annotations

import logging
import math
import sys
from collections import defaultdict
from pathlib import Path

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from opacus.accountants import RDPAccountant

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: harness
from harness import InProcessGrid, read_metrics, run_in_process  # noqa: E402

from fl_dplora.data import partition_indices  # noqa: E402

NUM_CLIENTS = 4
DELTA = 1e-5
# Small and fast: 80 examples -> 20 per client; q = batch-size / 20 = 0.2 in dp-mode sample.
FAST = dict(max_train_samples=80, batch_size=4, micro_batch_size=4, max_seq_len=48, local_steps=2,
            max_eval_samples=4, eval_every=0, delta=DELTA, secure_rng=False)


def independent_epsilon(events: list[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """(sigma, q, steps) events, each a Poisson-subsampled Gaussian self-composed `steps` times, all composed."""
    event = dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), n)
        for s, q, n in events if n > 0
    ])
    if accountant == "rdp":
        acc = RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)
    else:
        acc = PLDAccountant(value_discretization_interval=1e-3)
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def sampled_rounds(grid: InProcessGrid) -> dict[int, list[int]]:
    """partition-id -> the rounds in which the server sent that client a train instruction."""
    out: dict[int, list[int]] = defaultdict(list)
    for ex in grid.exchanges:
        pid = int(grid.contexts[ex.node_id].node_config["partition-id"])
        out[pid].append(int(ex.instruction.content["config"]["server-round"]))
    return dict(out)


def shard_sizes(summary: dict, num_clients: int = NUM_CLIENTS) -> dict[int, int]:
    cfg = summary["config"]
    parts = partition_indices(cfg["task"], num_clients, cfg["partitioner"], float(cfg["dirichlet-alpha"]),
                              int(cfg["seed"]), int(cfg["max-train-samples"]))
    return {pid: len(idx) for pid, idx in enumerate(parts)}


class LogLines(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def __enter__(self):
        logging.getLogger("fl_dplora").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("fl_dplora").removeHandler(self)


# ---------------------------------------------------------------- dp-mode sample
@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_sample_mode_epsilon_matches_independent_accountant(accountant, tmp_path):
    sigma, rounds, local_steps, batch = 1.0, 3, FAST["local_steps"], FAST["batch_size"]
    grid = InProcessGrid(NUM_CLIENTS, seed=42)
    summary, out = run_in_process(NUM_CLIENTS, grid=grid, output_dir=tmp_path, **FAST, dp_mode="sample",
                                  fraction_train=0.5, num_server_rounds=rounds, noise_multiplier=sigma,
                                  accountant=accountant, target_epsilon=50.0)
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    sampled = sampled_rounds(grid)
    # the case this test is about: a client that took part in some rounds but not in others
    assert any(0 < len(rs) < rounds for rs in sampled.values()), sampled
    sizes = shard_sizes(summary)
    # keyed by node id (the server's identity of each node); partition_id is the label the node reported
    assert set(summary["privacy"]["per_client"]) == {str(grid.node_id_of(p)) for p in sampled}
    per_client = {str(pc["partition_id"]): pc for pc in summary["privacy"]["per_client"].values()}

    def reference(pid: int, upto: int) -> float:
        q = batch / sizes[pid]
        return independent_epsilon([(sigma, q, local_steps) for r in sampled[pid] if r <= upto], DELTA, accountant)

    for pid, rs in sampled.items():
        pc = per_client[str(pid)]
        assert pc["steps"] == len(rs) * local_steps  # rounds without this client added nothing
        assert pc["sigma"] == sigma
        assert pc["sample_rate"] == pytest.approx(batch / sizes[pid], rel=1e-12)
        ref = reference(pid, rounds)
        print(f"{accountant} client {pid}: rounds {rs}, eps {pc['epsilon']:.4f} vs dp_accounting {ref:.4f}")
        assert pc["epsilon"] == pytest.approx(ref, rel=0.01)
    for row in rows:  # the per-round epsilon is the worst client's so far
        ref = max(reference(pid, row["round"]) for pid, rs in sampled.items() if min(rs) <= row["round"])
        assert row["epsilon"] == pytest.approx(ref, rel=0.01)
        assert row["delta"] == DELTA
    assert summary["privacy"]["epsilon"] == rows[-1]["epsilon"]
    assert summary["privacy"]["steps"] == max(len(rs) for rs in sampled.values()) * local_steps


# ---------------------------------------------------------------- dp-mode client / paper
@pytest.mark.parametrize("mode,accountant", [("client", "rdp"), ("client", "prv"), ("paper", "rdp")])
def test_client_level_epsilon_matches_independent_accountant(mode, accountant, tmp_path):
    sigma, q, rounds = 1.0, 0.5, 3
    grid = InProcessGrid(NUM_CLIENTS, seed=42)
    summary, out = run_in_process(NUM_CLIENTS, grid=grid, output_dir=tmp_path, **{**FAST, "local_steps": 1},
                                  dp_mode=mode, fraction_train=q, num_server_rounds=rounds, noise_multiplier=sigma,
                                  accountant=accountant, target_epsilon=50.0)
    rows = read_metrics(out)
    assert len(rows) == rounds
    # paper: dA and dB each clipped to C and noised with sigma*C -> one Gaussian of sensitivity sqrt(2)C
    sigma_acc = sigma / math.sqrt(2) if mode == "paper" else sigma
    for row in rows:  # every round counts, whoever was sampled (Poisson sampling with rate q)
        ref = independent_epsilon([(sigma_acc, q, 1)] * row["round"], DELTA, accountant)
        print(f"{mode}/{accountant} round {row['round']}: eps {row['epsilon']:.4f} vs dp_accounting {ref:.4f}")
        assert row["epsilon"] == pytest.approx(ref, rel=0.01)
    p = summary["privacy"]
    assert (p["noise_multiplier"], p["sample_rate"], p["steps"]) == (sigma, q, rounds)
    assert p["epsilon"] == rows[-1]["epsilon"]
    if mode == "client":  # the (sigma/sqrt2) reading would be wrong for client mode: make sure it differs
        assert p["epsilon"] < independent_epsilon([(sigma / math.sqrt(2), q, 1)] * rounds, DELTA, accountant) * 0.9


# ---------------------------------------------------------------- calibration and the budget
def test_calibrated_sample_mode_ends_within_target(tmp_path):
    target, rounds, clients = 3.0, 2, 2
    summary, out = run_in_process(clients, output_dir=tmp_path, **FAST, dp_mode="sample",
                                  fraction_train=1.0, num_server_rounds=rounds, noise_multiplier=0.0,
                                  target_epsilon=target, accountant="prv")
    assert summary["rounds"] == rounds
    assert len(summary["privacy"]["per_client"]) == clients
    sizes = shard_sizes(summary, clients)
    for pc in summary["privacy"]["per_client"].values():
        pid = pc["partition_id"]
        assert pc["steps"] == rounds * FAST["local_steps"]  # every round: the worst case it was calibrated for
        ref = independent_epsilon([(pc["sigma"], FAST["batch_size"] / sizes[int(pid)], pc["steps"])], DELTA, "prv")
        print(f"calibrated sample: client {pid} sigma {pc['sigma']:.4f} eps {pc['epsilon']:.4f} (PLD {ref:.4f})")
        assert pc["epsilon"] <= target and ref <= target * 1.01
        assert pc["epsilon"] >= 0.95 * target  # calibrated, not grossly over-noised
    assert max(r["epsilon"] for r in read_metrics(out)) <= target


@pytest.mark.parametrize("mode", ["client", "paper"])
def test_calibrated_client_mode_ends_within_target(mode, tmp_path):
    target, q, rounds = 4.0, 0.5, 3
    summary, out = run_in_process(NUM_CLIENTS, output_dir=tmp_path, **{**FAST, "local_steps": 1}, dp_mode=mode,
                                  fraction_train=q, num_server_rounds=rounds, noise_multiplier=0.0,
                                  target_epsilon=target, accountant="rdp")
    p = summary["privacy"]
    assert summary["rounds"] == rounds
    sigma_acc = p["noise_multiplier"] / (math.sqrt(2) if mode == "paper" else 1.0)
    ref = independent_epsilon([(sigma_acc, q, 1)] * rounds, DELTA, "rdp")
    print(f"calibrated {mode}: sigma {p['noise_multiplier']:.4f} eps {p['epsilon']:.4f} (dp_accounting {ref:.4f})")
    assert p["epsilon"] <= target and ref <= target * 1.01
    assert p["epsilon"] >= 0.95 * target
    assert max(r["epsilon"] for r in read_metrics(out)) <= target


@pytest.mark.parametrize("mode", ["sample", "client"])
def test_fixed_sigma_over_budget_stops_early(mode, tmp_path):
    """A fixed sigma whose second round would overrun target-epsilon: one round, then a clear stop."""
    rounds, clients = 4, 2
    if mode == "sample":  # 80 examples over 2 clients
        sigma, q, fraction, steps = 0.8, FAST["batch_size"] / 40, 1.0, FAST["local_steps"]
    else:
        sigma, q, fraction, steps = 1.0, 0.5, 0.5, 1
    one = independent_epsilon([(sigma, q, steps)], DELTA, "rdp")
    two = independent_epsilon([(sigma, q, 2 * steps)], DELTA, "rdp")
    target = (one + two) / 2
    with LogLines() as log:
        summary, out = run_in_process(clients, output_dir=tmp_path, **{**FAST, "local_steps": steps}, dp_mode=mode,
                                      fraction_train=fraction, num_server_rounds=rounds, noise_multiplier=sigma,
                                      target_epsilon=target, accountant="rdp")
    rows = read_metrics(out)
    if mode == "sample":
        assert set(shard_sizes(summary, clients).values()) == {40}  # so q above is every client's rate
    stops = [line for line in log.lines if "stopping early" in line]
    print(f"{mode}: target {target:.3f}, rounds {summary['rounds']}, eps {summary['privacy']['epsilon']:.4f}; {stops}")
    assert stops and "target-epsilon" in stops[0]
    assert summary["rounds"] < rounds
    assert summary["privacy"]["epsilon"] <= target
    assert summary["privacy"]["epsilon"] == pytest.approx(one, rel=0.01)  # the one round that did run
    assert all(r["epsilon"] <= target for r in rows)
    assert rows and rows[0]["epsilon"] > 0  # the first round did run before the stop
    if mode == "sample":  # the refusing clients still report their (unchanged) ledgers
        per_client = summary["privacy"]["per_client"]
        assert len(per_client) == clients
        for pc in per_client.values():
            assert (pc["steps"], pc["sigma"], pc["epsilon"]) == (steps, sigma, pytest.approx(one, rel=0.01))
        assert summary["privacy"]["steps"] == steps and summary["privacy"]["noise_multiplier"] == sigma


def test_paper_mode_with_ffa_has_sensitivity_c_not_root2_c():
    """paper + FFA sends only ΔB, clipped to C: the accountant's multiplier is the noise's (issue 15)."""
    from fl_dplora.config import resolve
    from fl_dplora.privacy.accounting import calibrate_noise_multiplier
    from fl_dplora.privacy.modes import for_config

    base = {"dp-mode": "paper", "target-epsilon": 8.0, "num-server-rounds": 3, "fraction-train": 1.0,
            "label-head": False, "population": 4}
    z = calibrate_noise_multiplier(8.0, 1e-5, 1.0, 3, "prv")
    applied, accounted = for_config(resolve({**base, "lora-variant": "ffa"})).noise_multipliers()
    assert applied == pytest.approx(z) and accounted == pytest.approx(z)
    applied, accounted = for_config(resolve({**base, "lora-variant": "lora"})).noise_multipliers()
    assert applied == pytest.approx(z * 2 ** 0.5) and accounted == pytest.approx(z)
