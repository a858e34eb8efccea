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
    grid = InProcessGrid(1, node_configs=[node_config], seed=cfg.train.seed)
    config = ConfigRecord({**cfg.to_record(), protocol.SIGMA: float(instruction_sigma)})
    config[protocol.ROUND] = 1
    content = RecordDict({"arrays": to_array_record(glob, cfg.federation.transfer_dtype), "config": config})
    (reply,) = grid.send_and_receive([grid.create_message(content, "train", next(iter(grid.get_node_ids())), "1")])
    assert not reply.has_error(), reply.error.reason
    update = from_array_record(reply.content["arrays"], cfg.federation.transfer_dtype)
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
    c = cfg.privacy.max_grad_norm
    expected = node_sigma * c * math.sqrt(d)
    assert abs(_norm(update) - expected) <= 0.05 * expected + math.sqrt(2) * c, (_norm(update), expected)
    # the node's ε log: the σ it used, the server's lower σ flagged, ε charged with the node's σ
    (row,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert row["sigma"] == pytest.approx(node_sigma) and row["instruction-sigma"] == 0.0
    assert "below this node's own" in row["warning"]
    ledger = PrivacyLedger()
    ledger.step(*for_config(cfg).round_event(node_accountant_sigma))
    assert row["epsilon"] == pytest.approx(ledger.epsilon(cfg.privacy.delta, cfg.privacy.accountant), rel=1e-9)
    assert row["epsilon"] < cfg.privacy.target_epsilon


def test_an_honest_instruction_gives_the_same_update_and_no_warning(tmp_path):
    cfg = tiny_config(**{"dp-mode": "paper", "population": 2, "num-server-rounds": 2})
    node_sigma = for_config(cfg).noise_multipliers()[0]
    node = {"partition-id": 0, "num-partitions": 2}
    honest, _, _ = _train_once(cfg, node_sigma, {**node, "epsilon-log": str(tmp_path / "honest.jsonl")})
    lying, _, _ = _train_once(cfg, 0.0, node)
    # same seed, same noise draw of the node's σ: the two updates differ at most by their clipped
    # deltas (training is not bit-reproducible), not by noise (which would differ by ~σC·sqrt(2d))
    c = cfg.privacy.max_grad_norm
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
    c = cfg.privacy.max_grad_norm
    seeded = {"partition-id": 0, "num-partitions": 2}
    a, d, _ = _train_once(cfg, node_sigma, seeded)
    b, _, _ = _train_once(cfg, node_sigma, seeded)
    assert _norm({k: a[k] - b[k] for k in a}) <= 2 * math.sqrt(2) * c  # no policy: the seeded draw repeats
    guarded = {**seeded, "require-dp-mode": "paper"}
    a, _, _ = _train_once(cfg, node_sigma, guarded)
    b, _, _ = _train_once(cfg, node_sigma, guarded)
    gap = _norm({k: a[k] - b[k] for k in a})
    assert gap >= 0.5 * node_sigma * c * math.sqrt(2 * d), (gap, node_sigma * c * math.sqrt(2 * d))


# ------------------------------------------------------- client level: what the node composes (issue 27 review)
def _eps(events, cfg) -> float:
    ledger = PrivacyLedger()
    for event in events:
        ledger.step(*event)
    return ledger.epsilon(cfg.privacy.delta, cfg.privacy.accountant)


def test_the_node_composes_each_attempt_at_the_sigma_it_charged(tmp_path):
    """A client-level node bounds the run's ledger from its own charges: a round it took part in at a
    low σ stays at that σ, a round it skipped counts at the smallest σ charged (never today's σ x rounds)."""
    from fl_dplora.clients.node_ledger import NodeLedger

    ledger = NodeLedger.open(tmp_path / "l.jsonl")
    ledger.charge(1, "client", 0.4, 0.5, 1)
    events = ledger.client_events("client", 3, 2.0, 0.5)  # round 2 skipped
    assert events == [(0.4, 0.5, 1), (2.0, 0.5, 1), (0.4, 0.5, 1)]
    cfg = tiny_config()
    assert _eps(events, cfg) > 2 * _eps([(2.0, 0.5, 3)], cfg)  # what "σ now x rounds" would have said
    assert ledger.attempt_sigmas("client", 2.0) == [0.4, 2.0]


def test_a_server_that_lowers_sigma_in_one_round_meets_the_nodes_floor_later(tmp_path):
    """The server sends round 1 num-server-rounds = 1 (so the node's own calibration spends the whole
    target in one round: a smaller σ; a larger target-epsilon would meet the node's run check), then
    the run's honest config: the node's check composes round 1's σ, so a node whose floor the
    honest run fits refuses round 2 (counting round 2's σ twice would have let it train)."""
    from harness import run_in_process

    honest = tiny_config(**{"dp-mode": "client", "population": 2, "num-server-rounds": 2})
    lie = tiny_config(**{"dp-mode": "client", "population": 2, "num-server-rounds": 1})
    s_honest, s_lie = (for_config(c).noise_multipliers()[1] for c in (honest, lie))
    q = honest.federation.fraction_train
    once, composed, naive = _eps([(s_lie, q, 1)], honest), _eps([(s_lie, q, 1), (s_honest, q, 1)], honest), _eps([(s_honest, q, 2)], honest)
    assert s_lie < s_honest and max(once, naive) < composed  # the scenario separates the two ways of counting
    floor = (max(once, naive) + composed) / 2
    log = tmp_path / "node0.jsonl"

    def lying(node_id, msg):
        if node_id == grid.node_id_of(0) and int(msg.content["config"][protocol.ROUND]) == 1:
            msg.content["config"]["num-server-rounds"] = 1
        return msg

    grid = InProcessGrid(2, node_configs=[{"partition-id": 0, "num-partitions": 2, "epsilon-log": str(log),
                                           "max-epsilon": floor}, {"partition-id": 1, "num-partitions": 2}],
                         before=lying, seed=5)
    run_in_process(2, output_dir=tmp_path / "run", grid=grid, **{"dp-mode": "client", "population": 2})
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert "refused" not in rows[0] and rows[0]["epsilon"] == pytest.approx(once, rel=1e-6)
    assert "refused" in rows[1] and "max-epsilon" in rows[1]["refused"]


def _reply(cfg, node_config):
    model = get_peft_model(cfg)
    params = adapter_parameters(model, cfg)
    glob = {k: params[k].detach().clone() for k in round_keys(cfg, 1, params)}
    grid = InProcessGrid(1, node_configs=[node_config], seed=cfg.train.seed)
    config = ConfigRecord({**cfg.to_record(), protocol.SIGMA: 1.0})
    config[protocol.ROUND] = 1
    content = RecordDict({"arrays": to_array_record(glob, cfg.federation.transfer_dtype), "config": config})
    (reply,) = grid.send_and_receive([grid.create_message(content, "train", next(iter(grid.get_node_ids())), "1")])
    return reply


def test_local_noise_is_checked_against_the_server_at_rate_one(tmp_path):
    """With local noise the node's own noise is all the server cannot remove, and the server chooses
    who takes part: a server that sends fraction-train 0.05 (so the calibration counts on amplification
    by sampling and gives a small σ) meets the node's floor on the ε against the server (σ/2, rate 1),
    which the honest config's σ fits."""
    base = {"dp-mode": "client", "client-noise": "local", "population": 2, "num-server-rounds": 2}
    honest, lie = tiny_config(**base), tiny_config(**base, **{"fraction-train": 0.05})
    mode = for_config(honest)
    s_honest, s_lie = for_config(honest).noise_multipliers()[1], for_config(lie).noise_multipliers()[1]
    e_honest, e_lie = mode.epsilon_against_server([s_honest]), mode.epsilon_against_server([s_lie])
    assert e_honest < e_lie
    floor = (e_honest + e_lie) / 2
    node = {"partition-id": 0, "num-partitions": 2, "max-epsilon": floor}
    ok = _reply(honest, {**node, "epsilon-log": str(tmp_path / "a.jsonl")})
    assert not ok.has_error(), ok.error.reason
    (row,) = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert row["epsilon-against-server"] == pytest.approx(e_honest, rel=1e-6)
    bad = _reply(lie, {**node, "epsilon-log": str(tmp_path / "b.jsonl")})
    assert bad.has_error() and "against the server" in bad.error.reason
    # the run-level epsilon of the lying config alone would have let it through
    assert _eps([for_config(lie).round_event(s_lie)], lie) < floor


def test_a_distributed_noise_share_never_goes_below_the_nodes_own_sigma(tmp_path):
    """SecAgg+ distributed noise: every share and the grid use the round's one σ, but a node never adds
    less than its own (config and ledger): a larger announced σ is used, a lower one is refused in one
    line and logged in the node's ε log (issue 27: the server cannot lower a node's noise)."""
    from types import SimpleNamespace

    from fl_dplora.clients.node_policy import NodePolicy, NodeRefusal
    from fl_dplora.clients.node_privacy import share_sigma

    log = tmp_path / "n.jsonl"
    policy = NodePolicy.from_node_config({"epsilon-log": str(log)})
    msg = lambda sigma: SimpleNamespace(content={"config": {protocol.SIGMA: sigma}})  # what share_sigma reads
    assert share_sigma(policy, msg(1.5), 1.2, {}) == 1.5  # announced above its own (after a resume): used
    assert share_sigma(policy, msg(1.2 * (1 - 1e-8)), 1.2, {}) == 1.2  # bisection rounding: its own
    for lowered in (0.0, 1.0):
        with pytest.raises(NodeRefusal, match="below this node's own"):
            share_sigma(policy, msg(lowered), 1.2, {"round": 1})
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(rows) == 2 and all("below this node's own" in r["refused"] for r in rows)
