"""A crash costs no round: after a resume σ is recalibrated from what has been charged (issue 27, defect 8).

The write-ahead log charges the interrupted attempt; with σ calibrated for exactly R rounds that extra
charge used to exhaust the budget (client-level: the server stopped one round short; sample: every
node refused round R). Now the server (client-level) and each node (its own DP-SGD σ, and the σ its
ledger charges) pick σ for the rounds left from their own ledgers: all R rounds run, the final ε is
<= target and >= the uninterrupted run's, and σ after the resume is larger than before.
"""

from __future__ import annotations

import json
import math

import pytest
from harness import InProcessGrid, read_metrics, run_in_process, tiny_config

from fl_dplora import protocol
from fl_dplora.privacy.accounting import PrivacyLedger, calibrate_noise_multiplier, calibrate_remaining, epsilon_for
from fl_dplora.privacy.modes import for_config
from fl_dplora.transport import from_array_record

ROUNDS, TARGET = 3, 8.0
# calibrated σ (noise-multiplier 0), OS-entropy noise, every node in every round; q = 4/8 in sample mode
RUN = {"num-server-rounds": ROUNDS, "max-train-samples": 16, "batch-size": 4, "micro-batch-size": 4, "max-seq-len": 32,
       "local-steps": 1, "max-eval-samples": 2, "eval-every": 0, "accountant": "rdp", "noise-multiplier": 0.0,
       "target-epsilon": TARGET, "fraction-train": 1.0, "secure-rng": True, "checkpoint-every": 1}


class Crash(RuntimeError):
    """The server dies in the middle of round 2, after node 0 trained (and charged) it."""


def _round(msg) -> int:
    return int(msg.content["config"][protocol.ROUND])


def _crash_in_round_2_then_resume(tmp_path, nodes: int, configs: list[dict], run: dict):
    """Run until node 0 has trained round 2, kill the server there (Crash), then resume on restarted
    nodes (same ids, empty context.state): (the resumed summary, the crashed grid, the restarted grid,
    the run dir, the round of the checkpoint the crash left)."""
    grid = None

    def crash(nid, msg, reply):  # a SecAgg+ stage without a config record carries no round
        config = msg.content.config_records.get("config")
        if nid == grid.node_id_of(0) and config is not None and int(config[protocol.ROUND]) == 2:
            raise Crash("server killed after node 0 trained round 2")
        return reply

    grid = InProcessGrid(nodes, node_configs=configs, after=crash, seed=5)
    out = tmp_path / "run"
    with pytest.raises(Crash):
        run_in_process(nodes, output_dir=out, grid=grid, **run)
    checkpoint_round = json.loads((out / "checkpoint.json").read_text())["round"]
    fresh = InProcessGrid(nodes, node_configs=configs, seed=5)
    resumed, _ = run_in_process(nodes, output_dir=out, grid=fresh, resume=True, **run)
    return resumed, grid, fresh, out, checkpoint_round


def test_calibrate_remaining_fits_what_is_charged_and_reaches_the_plan():
    s0 = calibrate_noise_multiplier(TARGET, 1e-5, 0.5, ROUNDS, "rdp")
    plan = epsilon_for(s0, 0.5, ROUNDS, 1e-5, "rdp")
    charged = ((s0, 0.5, 2),)  # round 1, and round 2's lost attempt
    s1 = calibrate_remaining(TARGET, 1e-5, charged, ((0.5, 2),), "rdp", plan)
    eps = PrivacyLedger([*charged, (s1, 0.5, 2)]).epsilon(1e-5, "rdp")
    assert s1 > s0 and plan <= eps <= TARGET
    # the order of what is charged does not matter (a node and the server compose the same events)
    assert calibrate_remaining(TARGET, 1e-5, ((s0, 0.5, 1), (2.0, 0.5, 1)), ((0.5, 1),), "rdp") == calibrate_remaining(
        TARGET, 1e-5, ((2.0, 0.5, 1), (s0, 0.5, 1)), ((0.5, 1),), "rdp")


def test_sample_schedule_from_a_round_counts_the_stages_left():
    from fl_dplora.clients.node_privacy import sample_schedule

    cfg = tiny_config(**{"label-head": True, "loss": "label-words", "head-rounds": 2, "num-server-rounds": 3,
                         "head-batch-size": 0, "head-local-steps": 7, "local-steps": 3, "batch-size": 16})
    assert [sample_schedule(cfg, 50, r) for r in (1, 2, 3)] == [((1.0, 14), (16 / 50, 3)), ((1.0, 7), (16 / 50, 3)),
                                                                ((16 / 50, 3),)]


def test_local_noise_top_up_keeps_the_sum_at_the_servers_sigma():
    """Local noise: nodes add the config's σ0; after a resume raised the server's σ, it tops each reply up."""
    import torch

    cfg = tiny_config(**{**RUN, "dp-mode": "client", "client-noise": "local"}, population=4)
    mode = for_config(cfg)
    s0 = mode.noise_multipliers()[0]
    sigma = 1.5 * s0
    zeros = {"w": torch.zeros(200_000, dtype=torch.float64)}
    # the replies' own generator: drawn from torch's global one they equalled the server's noise draw
    # whenever an earlier test had left it at manual_seed(0) (test_dp_step), and the std doubled up
    g = torch.Generator().manual_seed(1)
    replies = [{"w": torch.randn(200_000, generator=g, dtype=torch.float64) * s0 * mode.max_grad_norm} for _ in range(3)]
    out = mode.aggregate(replies, [1.0] * 3, zeros, 1, sigma, torch.Generator().manual_seed(0))
    std = float((out["w"] * mode.divisor).std())
    assert std == pytest.approx(sigma * mode.max_grad_norm * 2.0, rel=0.01)  # σ·C·√population


@pytest.mark.parametrize("mode,extra", [("sample", {}), ("client", {}), ("client", {"client-noise": "local"}),
                                        ("paper", {})])
def test_resume_after_a_crash_mid_round_runs_every_round_within_the_target(mode, extra, tmp_path):
    run = {**RUN, "dp-mode": mode, **extra}
    # node 0 keeps a durable ledger and a floor equal to the target; node 1 keeps its ledger in memory.
    # Local noise: the floor binds on the node's ε against the server (its own noise at rate 1, σ/2), above
    # the target from round 1, so it is the uninterrupted run's (R attempts at the config's σ)
    node_mode = for_config(tiny_config(**run, population=2))
    local, (s0, s0_accounted) = node_mode.placement.server_sees_noised_updates, node_mode.noise_multipliers()
    floor = node_mode.epsilon_against_server([s0_accounted] * ROUNDS) if local else TARGET
    configs = [{"partition-id": 0, "num-partitions": 2, "epsilon-log": str(tmp_path / "node0.jsonl"),
                "max-epsilon": floor}, {"partition-id": 1, "num-partitions": 2}]
    baseline, _ = run_in_process(2, output_dir=tmp_path / "base", grid=InProcessGrid(2, seed=5), **run)

    resumed, grid, fresh, out, checkpoint_round = _crash_in_round_2_then_resume(tmp_path, 2, configs, run)
    assert checkpoint_round == 1

    # every round ran, and every node trained in every round after the resume (no refusal)
    assert resumed["rounds"] == ROUNDS and [r["round"] for r in read_metrics(out)] == list(range(1, ROUNDS + 1))
    trained = {}
    for ex in (e for e in fresh.exchanges if e.instruction.metadata.message_type == "train"):
        assert ex.reply is not None and not ex.reply.has_error(), ex.reply
        assert not dict(ex.reply.content["metrics"]).get(protocol.BUDGET_EXHAUSTED)
        trained.setdefault(_round(ex.instruction), set()).add(ex.node_id)
    assert trained == {r: set(fresh.contexts) for r in range(2, ROUNDS + 1)}

    p, b = resumed["privacy"], baseline["privacy"]
    assert b["epsilon"] <= p["epsilon"] <= TARGET * (1 + 1e-6)
    if mode == "sample":
        base = {c["partition_id"]: c for c in b["per_client"].values()}
        for c in p["per_client"].values():
            assert c["steps"] == ROUNDS + 1  # round 2's lost attempt charged (the node's own, or the server's worst case)
            assert base[c["partition_id"]]["epsilon"] <= c["epsilon"] <= TARGET * (1 + 1e-6)
            assert c["sigma"] > base[c["partition_id"]]["sigma"]  # σ after the resume > σ before
        sigmas = [s for s, _, _ in p["history"]]
        assert len(sigmas) == 2 and sigmas[-1] > sigmas[0] in {c["sigma"] for c in base.values()}
    else:
        assert p["steps"] == ROUNDS + 1 and b["steps"] == ROUNDS
        assert p["noise_multiplier"] > b["noise_multiplier"]
        train = lambda g: [e for e in g.exchanges if e.instruction.metadata.message_type == "train"]  # noqa: E731
        sent = {_round(ex.instruction): float(ex.instruction.content["config"][protocol.SIGMA]) for ex in train(fresh)}
        first = {float(ex.instruction.content["config"][protocol.SIGMA]) for ex in train(grid)}
        assert first == {b["noise_multiplier"]} and all(s == p["noise_multiplier"] > b["noise_multiplier"]
                                                        for s in sent.values())
        assert p["history"][-1][0] == p["accountant_noise_multiplier"] and p["history"][-1][2] == ROUNDS - 1
    # node 0's floor (= target) holds against its own ledger: the σ it charged after the resume is larger
    rows = [json.loads(x) for x in (tmp_path / "node0.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows if "refused" not in r] == [1, 2, 2, 3] and not any("refused" in r for r in rows)
    assert max(r["epsilon"] for r in rows) <= TARGET * (1 + 1e-9)
    if local:  # the noise node 0 adds after the resume is the σ it charges, recalibrated and larger
        assert max(r["epsilon-against-server"] for r in rows) <= floor * (1 + 1e-9)
        assert [r.get("sigma-recalibrated", 0.0) > s0_accounted for r in rows] == [False, False, True, True]
        c, added = float(node_mode.max_grad_norm), s0 / s0_accounted * rows[-1]["sigma-recalibrated"]  # σ applied
        for ex in (e for e in fresh.exchanges if e.node_id == fresh.node_id_of(0)
                   and e.instruction.metadata.message_type == "train"):
            update = from_array_record(ex.reply.content["arrays"], node_mode.cfg.federation.transfer_dtype)
            d = sum(t.numel() for t in update.values())
            norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in update.values()))
            assert abs(norm - added * c * math.sqrt(d)) <= 0.05 * added * c * math.sqrt(d) + math.sqrt(2) * c


def test_distributed_noise_resume_after_a_crash_runs_every_round_within_the_target(tmp_path):
    """client-noise=distributed under SecAgg+: after the resume the server announces one recalibrated σ for
    every share and the SecAgg+ grid; each node's own recalibration (node 0's from its durable ledger) is no
    larger, so no node refuses, all R rounds run, and ε lies between the uninterrupted run's and the target."""
    run = {**RUN, "dp-mode": "client", "secure-aggregation": True, "client-noise": "distributed", "population": 3,
           "secagg-threshold": 2}
    node_mode = for_config(tiny_config(**run))
    s0 = node_mode.noise_multipliers()[1]
    floor = node_mode.epsilon_against_server([s0] * ROUNDS)  # node 0's floor: the uninterrupted run's
    configs = [{"partition-id": 0, "num-partitions": 3, "epsilon-log": str(tmp_path / "node0.jsonl"),
                "max-epsilon": floor}, {"partition-id": 1, "num-partitions": 3}, {"partition-id": 2, "num-partitions": 3}]
    baseline, _ = run_in_process(3, output_dir=tmp_path / "base", grid=InProcessGrid(3, seed=5), **run)
    resumed, _, fresh, out, _ = _crash_in_round_2_then_resume(tmp_path, 3, configs, run)

    assert resumed["rounds"] == ROUNDS and [r["round"] for r in read_metrics(out)] == list(range(1, ROUNDS + 1))
    assert all(ex.reply is not None and not ex.reply.has_error() for ex in fresh.exchanges)  # no node refused
    p, b = resumed["privacy"], baseline["privacy"]
    assert b["epsilon"] <= p["epsilon"] <= TARGET * (1 + 1e-6) and p["steps"] == ROUNDS + 1
    # one σ for every share and the grid, no lower than the σ the accountant charges after the resume
    sent = {float(c[protocol.SIGMA]) for ex in fresh.exchanges if (c := ex.instruction.content.config_records.get("config"))}
    assert sent == {p["noise_multiplier"]} and p["noise_multiplier"] >= p["accountant_noise_multiplier"]
    assert p["accountant_noise_multiplier"] > b["accountant_noise_multiplier"]
    rows = [json.loads(x) for x in (tmp_path / "node0.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows if "refused" not in r] == [1, 2, 2, 3] and not any("refused" in r for r in rows)
    assert max(r["epsilon"] for r in rows) <= TARGET * (1 + 1e-9)
    assert max(r["epsilon-against-server"] for r in rows) <= floor * (1 + 1e-9)
    # node 0 recalibrated from its own ledger after the rerun, to the σ the server announced
    assert [r.get("sigma-recalibrated", 0.0) > s0 for r in rows] == [False, False, True, True]
    assert rows[-1]["sigma-recalibrated"] == pytest.approx(p["noise_multiplier"], rel=1e-6)
