"""A node's privacy ledger is its own and durable; the server keys ledgers by node id and never takes a
shorter one (issue 27, defects 2 and 6).

- the node's ledger is a file next to its ε log (append-only, fsynced, owner-only, one per run id),
  charged before the node trains: a node restarted between rounds (a fresh Context on the same node
  config and run id, as a restarted SuperNode's fresh ClientApp process) continues it, and its
  `max-epsilon` floor stops it at the right round;
- the server rejects a reported ledger that does not extend the one it stored (operator log only),
  and two nodes reporting the same partition-id keep two ledgers;
- a resume after a lost attempt: the node counts every attempt it began, so a floor equal to
  ε(σ, q, R) refuses at round R.
"""

from __future__ import annotations

import json
import os

import pytest
from flwr.app import Context, Message, MetricRecord, RecordDict
from harness import InProcessGrid, read_metrics, run_in_process, tiny_config

from fl_dplora import protocol
from fl_dplora.clients.node_ledger import NodeLedger, ledger_path
from fl_dplora.clients.node_policy import NodePolicy
from fl_dplora.privacy.accounting import PrivacyLedger, extends
from fl_dplora.privacy.modes import for_config
from fl_dplora.write_ahead import OPERATOR_LOG, WAL

# q = 1: the batch is larger than any node's shard (16 examples over 2 nodes), so the floor is known up front
SMALL = {"max-train-samples": 16, "batch-size": 32, "micro-batch-size": 4, "max-seq-len": 32, "local-steps": 1,
         "max-eval-samples": 2, "eval-every": 0, "accountant": "rdp", "noise-multiplier": 2.0, "target-epsilon": 50.0,
         "fraction-train": 1.0, "secure-rng": False}


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _eps(events, cfg) -> float:
    ledger = PrivacyLedger()
    for e in events:
        ledger.step(*e)
    return ledger.epsilon(cfg.privacy.delta, cfg.privacy.accountant)


def _restart(grid: InProcessGrid, nid: int) -> None:
    """What a SuperNode restart leaves: a fresh ClientApp process with an empty context.state."""
    old = grid.contexts[nid]
    grid.contexts[nid] = Context(run_id=old.run_id, node_id=nid, node_config=dict(old.node_config),
                                 state=RecordDict(), run_config={})


def _round(msg: Message) -> int:
    return int(msg.content["config"][protocol.ROUND])


# ---------------------------------------------------------------- pure pieces
def test_extends_accepts_continuations_and_rejects_shorter_or_other_histories():
    rec = lambda *ev: PrivacyLedger(ev).to_record()  # noqa: E731
    base = rec((1.0, 0.5, 4))
    assert extends({"sigmas": [], "rates": [], "steps": []}, base)
    assert extends(base, base) and extends(base, rec((1.0, 0.5, 6))) and extends(base, rec((1.0, 0.5, 4), (2.0, 1.0, 1)))
    assert not extends(base, rec((1.0, 0.5, 3)))  # shorter
    assert not extends(base, rec((1.0, 0.25, 8)))  # another q
    assert not extends(rec((1.0, 0.5, 4), (2.0, 1.0, 1)), rec((1.0, 0.5, 5)))


def test_node_ledger_file_is_append_only_owner_only_and_read_back_after_a_crash(tmp_path):
    path = ledger_path(tmp_path / "node.jsonl", 77)
    assert path == tmp_path / "node.run-77.ledger.jsonl"
    a = NodeLedger.open(path)
    a.charge(1, "example", 1.5, 0.25, 2)
    a.charge(1, "example", 1.5, 0.25, 2)  # a rerun of round 1 is a second attempt
    assert (path.stat().st_mode & 0o777) == 0o600
    with path.open("a") as f:
        f.write('{"event": "charge", "round": 2, "unit": "exa')  # cut by a crash before its fsync returned
    b = NodeLedger.open(path)  # a fresh process
    assert b.example_ledger().history == [(1.5, 0.25, 4)]
    assert not b.adopt(PrivacyLedger([(1.5, 0.25, 2)]).to_record())  # the server's shorter copy is not taken
    assert b.adopt(PrivacyLedger([(1.5, 0.25, 6)]).to_record())  # a longer one is (it can only charge more)
    assert NodeLedger.open(path).example_ledger().history == [(1.5, 0.25, 6)]
    # client level: one event per round of the run, plus one per attempt that did not advance the round
    assert [NodeLedger.rounds_charged(r) for r in ([1, 2, 3], [1, 2, 2, 3], [2, 3], [1, 1, 1], [5, 3])] == [3, 4, 3, 3, 6]


def test_nodes_sharing_one_log_keep_one_ledger_per_data_file(tmp_path, monkeypatch):
    """Two SuperNodes of one user on one machine share the default ε log; each data file has its own
    ledger (one node's charges never exhaust the other's budget), the same file shares one."""
    monkeypatch.setenv("FL_DPLORA_HOME", str(tmp_path / "home"))
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    pa, pb = (NodePolicy.from_node_config({"data-path": str(p)}) for p in (a, b))
    assert pa.log_path == pb.log_path == tmp_path / "home" / "node-epsilon.jsonl"
    assert pa.ledger_path(7) != pb.ledger_path(7) and pa.ledger_path(7).parent == tmp_path / "home"
    same = NodePolicy.from_node_config({"data-path": str(tmp_path / "x" / ".." / "a.csv")})
    assert same.ledger_path(7) == pa.ledger_path(7)  # the same file by another spelling
    NodeLedger.open(pa.ledger_path(7)).charge(1, "example", 1.0, 0.5, 4)
    assert NodeLedger.open(pb.ledger_path(7)).example_ledger().total_steps == 0
    assert NodeLedger.open(same.ledger_path(7)).example_ledger().total_steps == 4
    assert ledger_path(tmp_path / "n.jsonl", 7).name == "n.run-7.ledger.jsonl"  # no data key: the run's alone


def test_a_floor_without_an_epsilon_log_still_keeps_a_durable_ledger(tmp_path, monkeypatch):
    """max-epsilon alone (no epsilon-log, no data-path): the ledger goes to the default log's folder,
    so a restarted node does not start its floor from zero; without a floor nothing is written."""
    monkeypatch.setenv("FL_DPLORA_HOME", str(tmp_path / "home"))
    floor = NodePolicy.from_node_config({"partition-id": 3, "max-epsilon": 4.0})
    assert floor.log_path == tmp_path / "home" / "node-epsilon.jsonl"
    NodeLedger.open(floor.ledger_path(9)).charge(1, "example", 1.0, 0.5, 4)
    restarted = NodePolicy.from_node_config({"partition-id": 3, "max-epsilon": 4.0})
    assert NodeLedger.open(restarted.ledger_path(9)).example_ledger().total_steps == 4
    assert NodePolicy.from_node_config({"partition-id": 3}).ledger_path(9) is None


# ---------------------------------------------------------------- (a) a node restarted between rounds
def test_a_restarted_node_continues_its_ledger_and_its_floor_stops_it(tmp_path):
    cfg = tiny_config(**SMALL, **{"dp-mode": "sample", "num-server-rounds": 3})
    floor = _eps([(2.0, 1.0, 2)], cfg)  # two rounds of one step at q = 1
    log = tmp_path / "node0.jsonl"
    configs = [{"partition-id": 0, "num-partitions": 2, "epsilon-log": str(log), "max-epsilon": floor},
               {"partition-id": 1, "num-partitions": 2}]
    grid = None

    def before(nid, msg):
        if nid == grid.node_id_of(0) and _round(msg) > 1:
            _restart(grid, nid)

    grid = InProcessGrid(2, node_configs=configs, before=before, seed=5)
    summary, out = run_in_process(2, output_dir=tmp_path / "run", grid=grid, **{**SMALL, "dp-mode": "sample",
                                                                               "num-server-rounds": 3})
    rows = _rows(log)
    trained = [r for r in rows if "refused" not in r]
    assert [r["round"] for r in trained] == [1, 2] and [r["steps"] for r in trained] == [1, 2]
    assert trained[0]["epsilon"] == pytest.approx(_eps([(2.0, 1.0, 1)], cfg)) and trained[1]["epsilon"] == pytest.approx(floor)
    (refused,) = [r for r in rows if "refused" in r]
    assert refused["round"] == 3 and "max-epsilon" in refused["refused"]
    # the ledger itself: next to the ε log, keyed by the run id, owner-only, one charge per round trained
    path = NodePolicy.from_node_config(configs[0]).ledger_path(grid.run_id)
    assert path.parent == log.parent and (path.stat().st_mode & 0o777) == 0o600
    assert [(r["event"], r["round"]) for r in _rows(path)] == [("charge", 1), ("charge", 2)]
    node0 = summary["privacy"]["per_client"][str(grid.node_id_of(0))]
    assert node0["steps"] == 2 and node0["epsilon"] == pytest.approx(floor)
    assert summary["rounds"] == 3 and len(read_metrics(out)) == 3


# ---------------------------------------------------------------- (b) the server's copies
def test_a_shorter_reported_ledger_is_rejected_and_logged_for_the_operator_only(tmp_path):
    grid = None

    def after(nid, msg, reply):
        if nid != grid.node_id_of(0) or _round(msg) != 2 or reply.has_error():
            return reply
        metrics = dict(reply.content["metrics"])
        metrics.update({"ledger-sigmas": [2.0], "ledger-rates": [1.0], "ledger-steps": [1], "steps-total": 1})
        return Message(RecordDict({"arrays": reply.content["arrays"], "metrics": MetricRecord(metrics)}), reply_to=msg)

    grid = InProcessGrid(2, after=after, seed=5)
    summary, out = run_in_process(2, output_dir=tmp_path / "run", grid=grid, **{**SMALL, "dp-mode": "sample",
                                                                               "num-server-rounds": 2, "local-steps": 2})
    node0 = str(grid.node_id_of(0))
    (event,) = [r for r in _rows(out / OPERATOR_LOG) if r.get("event") == "ledger-rejected"]
    assert event["round"] == 2 and event["node"] == node0 and "does not extend" in event["why"]
    # the stored ledger (2 steps from round 1) stays and is charged with round 2's 2 steps: never 1 step
    assert summary["privacy"]["per_client"][node0]["steps"] == 4
    assert summary["privacy"]["per_client"][str(grid.node_id_of(1))]["steps"] == 4
    released = (out / "summary.json").read_text() + (out / "metrics.jsonl").read_text()
    assert "ledger-rejected" not in released and "does not extend" not in released


def test_two_nodes_with_the_same_partition_id_keep_two_ledgers(tmp_path):
    grid = None

    def after(nid, msg, reply):  # node 1 also claims node 0's id in its metrics: the server ignores it
        if nid != grid.node_id_of(0) and not reply.has_error():
            metrics = {**dict(reply.content["metrics"]), "node_id": next(iter(grid.contexts))}
            return Message(RecordDict({"arrays": reply.content["arrays"], "metrics": MetricRecord(metrics)}), reply_to=msg)
        return reply

    configs = [{"partition-id": 0, "num-partitions": 2}, {"partition-id": 0, "num-partitions": 2}]
    grid = InProcessGrid(2, node_configs=configs, after=after, seed=5)
    summary, _ = run_in_process(2, output_dir=tmp_path / "run", grid=grid, **{**SMALL, "dp-mode": "sample",
                                                                             "num-server-rounds": 1})
    per_client = summary["privacy"]["per_client"]
    assert set(per_client) == {str(n) for n in grid.contexts}
    assert [pc["partition_id"] for pc in per_client.values()] == [0, 0]


# ---------------------------------------------------------------- (c) a resume after a lost attempt
class Crash(RuntimeError):
    """The server dies in the middle of a round (no checkpoint, no reply logged)."""


@pytest.mark.parametrize("mode", ["sample", "client"])
def test_after_a_lost_attempt_the_node_counts_it_and_a_floor_of_R_rounds_refuses_round_R(mode, tmp_path):
    rounds = 3
    run = {**SMALL, "dp-mode": mode, "num-server-rounds": rounds, "checkpoint-every": 1}
    cfg = tiny_config(**run, population=2)
    event = (2.0, 1.0, 1) if mode == "sample" else for_config(cfg).round_event(for_config(cfg).noise_multipliers()[1])
    floor = _eps([event] * rounds, cfg)  # ε(σ, q, R)
    log = tmp_path / "node0.jsonl"
    configs = [{"partition-id": 0, "num-partitions": 2, "epsilon-log": str(log), "max-epsilon": floor},
               {"partition-id": 1, "num-partitions": 2}]
    out = tmp_path / "run"
    grid = None

    def lossy(nid, msg, reply):
        if nid == grid.node_id_of(0) and _round(msg) == 1:
            return None  # round 1: node 0 trained, its reply never arrived (the server has no ledger of it)
        if nid == grid.node_id_of(0) and _round(msg) == 2:
            raise Crash("server killed after node 0 trained round 2")
        return reply

    grid = InProcessGrid(2, node_configs=configs, after=lossy, seed=5)
    with pytest.raises(Crash):
        run_in_process(2, output_dir=out, grid=grid, **run)
    assert json.loads((out / "checkpoint.json").read_text())["round"] == 1
    assert any(json.loads(x).get("round") == 2 for x in (out / WAL).read_text().splitlines())

    fresh = InProcessGrid(2, node_configs=configs, seed=5)  # restarted nodes: same ids, empty context.state
    assert fresh.node_id_of(0) == grid.node_id_of(0)
    summary, _ = run_in_process(2, output_dir=out, grid=fresh, resume=True, **run)
    rows = _rows(log)
    trained = [r for r in rows if "refused" not in r]
    assert [r["round"] for r in trained] == [1, 2, 2]  # the lost attempt and the rerun both counted
    assert trained[-1]["epsilon"] == pytest.approx(floor, rel=1e-9)
    (refused,) = [r for r in rows if "refused" in r]
    assert refused["round"] == rounds and "max-epsilon" in refused["refused"]
    if mode == "sample":  # the node's report after the resume carries every attempt it began
        assert summary["privacy"]["per_client"][str(grid.node_id_of(0))]["steps"] == 3
        assert [r["steps"] for r in trained] == [1, 2, 3]
    else:
        assert [r["rounds-charged"] for r in trained] == [1, 2, 3]
        assert summary["privacy"]["steps"] == rounds + 1  # the server charged the begun round 2 too
    assert summary["rounds"] == rounds
    assert os.path.exists(NodePolicy.from_node_config(configs[0]).ledger_path(grid.run_id))
