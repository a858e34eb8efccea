"""A node adds noise of its own σ, calibrated from the run's public config, never the σ the server's
instruction carries (issue 27, defect 1): a server that sends `_sigma = 0` to a local-noise run
must not receive clipped updates without noise, and the node's ε log is charged with the σ it used."""

from __future__ import annotations

import json
import math

import pytest
from flwr.app import ConfigRecord, RecordDict
from harness import InProcessGrid, tiny_config

from fl_dplora import protocol
from fl_dplora.models import adapter_parameters, get_peft_model, round_keys
from fl_dplora.privacy.accounting import PrivacyLedger
from fl_dplora.privacy.modes import for_config
from fl_dplora.transport import from_array_record, to_array_record

LOCAL_NOISE = [("paper", {}), ("client", {"client-noise": "local"})]


def _train_once(cfg, instruction_sigma, node_config):
    """One train instruction to one in-process node (the real ClientApp, over the simulated wire),
    whose `_sigma` the server sets to `instruction_sigma`: (the node's update, d, the reply)."""
    model = get_peft_model(cfg)
    params = adapter_parameters(model, cfg)
    glob = {k: params[k].detach().clone() for k in round_keys(cfg, 1, params)}
    grid = InProcessGrid(1, node_configs=[node_config], seed=int(cfg["seed"]))
    config = ConfigRecord({**cfg, protocol.SIGMA: float(instruction_sigma)})
    config[protocol.ROUND] = 1
    content = RecordDict({"arrays": to_array_record(glob, cfg["transfer-dtype"]), "config": config})
    (reply,) = grid.send_and_receive([grid.create_message(content, "train", next(iter(grid.get_node_ids())), "1")])
    assert not reply.has_error(), reply.error.reason
    update = from_array_record(reply.content["arrays"], cfg["transfer-dtype"])
    return update, sum(t.numel() for t in glob.values()), reply


def _norm(update) -> float:
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in update.values()))


@pytest.mark.parametrize("mode,extra", LOCAL_NOISE)
def test_a_zero_sigma_instruction_still_gets_the_nodes_own_noise(mode, extra, tmp_path):
    cfg = tiny_config(**{"dp-mode": mode, "population": 2, "num-server-rounds": 2, **extra})
    node_sigma, node_accountant_sigma = for_config(cfg).noise_multipliers()
    assert node_sigma > 0.5  # the run's config calls for real noise
    log = tmp_path / "node.jsonl"
    update, d, _ = _train_once(cfg, 0.0, {"partition-id": 0, "num-partitions": 2, "epsilon-log": str(log)})
    # the update is the clipped delta (norm <= sqrt(2) C in paper mode) plus noise of std σC per value,
    # whose norm is σC·sqrt(d) to within ~1% at this d; without the node's own noise it would be <= sqrt(2) C
    c = float(cfg["max-grad-norm"])
    expected = node_sigma * c * math.sqrt(d)
    assert abs(_norm(update) - expected) <= 0.05 * expected + math.sqrt(2) * c, (_norm(update), expected)
    # the node's ε log: the σ it used, the server's lower σ flagged, ε charged with the node's σ
    (row,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert row["sigma"] == pytest.approx(node_sigma) and row["instruction-sigma"] == 0.0
    assert "below this node's own" in row["warning"]
    ledger = PrivacyLedger()
    ledger.step(*for_config(cfg).round_event(node_accountant_sigma))
    assert row["epsilon"] == pytest.approx(ledger.epsilon(cfg["delta"], cfg["accountant"]), rel=1e-9)
    assert row["epsilon"] < cfg["target-epsilon"]


def test_an_honest_instruction_gives_the_same_update_and_no_warning(tmp_path):
    cfg = tiny_config(**{"dp-mode": "paper", "population": 2, "num-server-rounds": 2})
    node_sigma = for_config(cfg).noise_multipliers()[0]
    node = {"partition-id": 0, "num-partitions": 2}
    honest, _, _ = _train_once(cfg, node_sigma, {**node, "epsilon-log": str(tmp_path / "honest.jsonl")})
    lying, _, _ = _train_once(cfg, 0.0, node)
    # same seed, same noise draw of the node's σ: the two updates differ at most by their clipped
    # deltas (training is not bit-reproducible), not by noise (which would differ by ~σC·sqrt(2d))
    c = float(cfg["max-grad-norm"])
    assert _norm({k: honest[k] - lying[k] for k in honest}) <= 2 * math.sqrt(2) * c
    assert _norm(honest) == pytest.approx(_norm(lying), abs=2 * math.sqrt(2) * c)
    (row,) = [json.loads(line) for line in (tmp_path / "honest.jsonl").read_text().splitlines()]
    assert row["sigma"] == pytest.approx(node_sigma) and "warning" not in row and "instruction-sigma" not in row


def test_a_node_that_requires_dp_draws_its_noise_from_os_entropy_whatever_the_server_says(tmp_path):
    # secure-rng=false would seed the noise from the run's seed, the partition id and the round, all
    # known to the server, which could then regenerate the noise and subtract it. A node that requires
    # DP ignores that: two identical instructions get two different noise draws (~σC·sqrt(2d) apart).
    cfg = tiny_config(**{"dp-mode": "paper", "population": 2, "num-server-rounds": 2, "secure-rng": False})
    node_sigma = for_config(cfg).noise_multipliers()[0]
    c = float(cfg["max-grad-norm"])
    seeded = {"partition-id": 0, "num-partitions": 2}
    a, d, _ = _train_once(cfg, node_sigma, seeded)
    b, _, _ = _train_once(cfg, node_sigma, seeded)
    assert _norm({k: a[k] - b[k] for k in a}) <= 2 * math.sqrt(2) * c  # no policy: the seeded draw repeats
    guarded = {**seeded, "require-dp-mode": "paper"}
    a, _, _ = _train_once(cfg, node_sigma, guarded)
    b, _, _ = _train_once(cfg, node_sigma, guarded)
    gap = _norm({k: a[k] - b[k] for k in a})
    assert gap >= 0.5 * node_sigma * c * math.sqrt(2 * d), (gap, node_sigma * c * math.sqrt(2 * d))
