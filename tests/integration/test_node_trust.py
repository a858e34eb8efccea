"""A node's floor holds across runs, at its own δ, and its evaluation answers follow its own config
(issue 27: what a node is promised holds against a lying server).

- a server that starts a new `flwr run` on the same data file gets a new run id, not a new budget:
  `max-epsilon` bounds every run's charges on that file composed (old code: a fresh ledger per run);
- the node states ε at min(run's δ, its `max-delta`): a server that sends δ = 0.05 sees the round
  refused (old code: the ε at δ = 0.05 passed the floor);
- an evaluate message that names dp-mode none does not make a node with its own files answer
  (old code: the message's dp-mode decided).
"""

from __future__ import annotations

import csv
import json

import pytest
from flwr.app import MessageType
from harness import REPO, InProcessGrid, run_in_process

from fl_dplora import protocol
from fl_dplora.clients.node_ledger import NodeLedger, other_runs
from fl_dplora.clients.node_policy import NodePolicy
from fl_dplora.config import ConfigError
from fl_dplora.privacy.accounting import PrivacyLedger

# q = 1 (batch > the file), σ fixed: every round's ε is known up front
RUN = {"dp-mode": "sample", "num-server-rounds": 2, "local-steps": 1, "batch-size": 64, "micro-batch-size": 8,
       "max-seq-len": 32, "max-eval-samples": 2, "eval-every": 0, "accountant": "rdp", "noise-multiplier": 2.0,
       "target-epsilon": 50.0, "secure-rng": False}


def _node_file(path, rows: int = 10):
    src = REPO / "fl_dplora" / "data_files" / "tfns" / "sent_train.csv"
    with src.open() as f:
        lines = list(csv.DictReader(f))[:rows]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows({"text": r["text"], "label": r["label"]} for r in lines)
    return path


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _eps(events, delta=1e-5, adjacency="replace-one"):
    return PrivacyLedger(events, adjacency).epsilon(delta, "rdp")


# ---------------------------------------------------------------- pure pieces
def test_node_config_delta_is_validated_and_defaults_with_a_floor():
    assert NodePolicy.from_node_config({"max-epsilon": 4}).delta(0.5) == 1e-5  # a floor states its own δ
    assert NodePolicy.from_node_config({"max-epsilon": 4, "max-delta": 1e-7}).delta(1e-5) == 1e-7
    assert NodePolicy.from_node_config({"max-delta": 1e-3}).delta(1e-6) == 1e-6  # a smaller run δ stands
    assert NodePolicy.from_node_config({}).delta(0.5) == 0.5  # no floor, no cap
    for bad in (0, 1, "x"):
        with pytest.raises(ConfigError, match="^node-config max-delta: "):
            NodePolicy.from_node_config({"max-delta": bad})


def test_a_finished_runs_spent_events_and_the_other_runs_on_the_same_file(tmp_path):
    log = tmp_path / "n.jsonl"
    key = "abc"
    a = NodeLedger.open(log.with_name("n.run-1.data-abc.ledger.jsonl"))
    a.charge(1, "example", 2.0, 1.0, 1, "replace-one")
    a.charge(2, "example", 2.0, 1.0, 1, "replace-one")
    b = NodeLedger.open(log.with_name("n.run-2.data-abc.ledger.jsonl"))
    b.charge(1, "client", 1.5, 0.5, 1)
    b.charge(3, "client", 1.2, 0.5, 1)  # round 2 skipped: counted at the smallest σ
    NodeLedger.open(log.with_name("n.run-3.data-xyz.ledger.jsonl")).charge(1, "example", 2.0, 1.0, 1)  # another file
    assert [p.name for p in other_runs(log, 3, key)] == ["n.run-1.data-abc.ledger.jsonl", "n.run-2.data-abc.ledger.jsonl"]
    assert other_runs(log, 1, key)[0].name == "n.run-2.data-abc.ledger.jsonl"
    odd = tmp_path / "n[1].jsonl"  # a stem that reads as a glob pattern
    NodeLedger.open(odd.with_name("n[1].run-1.data-abc.ledger.jsonl")).charge(1, "example", 2.0, 1.0, 1)
    assert [p.name for p in other_runs(odd, 2, key)] == ["n[1].run-1.data-abc.ledger.jsonl"]
    spent_a = NodeLedger.open(log.with_name("n.run-1.data-abc.ledger.jsonl")).spent()
    assert spent_a.history == [(2.0, 1.0, 2)] and spent_a.adjacency == "replace-one"
    spent_b = NodeLedger.open(log.with_name("n.run-2.data-abc.ledger.jsonl")).spent()
    assert spent_b.history == [(1.5, 0.5, 1), (1.2, 0.5, 2)]  # two attempts and the skipped round 2


def test_a_runs_spending_is_stated_per_protected_unit(tmp_path):
    """Per-unit budgets: a client-level run bounds one example only as a replacement of the node's
    whole clipped update (σ/2, no credit for the server's sampling); an example-level run bounds no
    whole-node participation at all."""
    client_run = NodeLedger.open(tmp_path / "a.ledger.jsonl")
    client_run.charge(1, "client", 1.5, 0.5, 1)
    client_run.charge(3, "client", 1.2, 0.5, 1)  # round 2 skipped: counted at the smallest σ
    assert client_run.spent_for("client").history == client_run.spent().history == [(1.5, 0.5, 1), (1.2, 0.5, 2)]
    assert client_run.spent_for("example").history == [(0.75, 1.0, 1), (0.6, 1.0, 2)]
    example_run = NodeLedger.open(tmp_path / "b.ledger.jsonl")
    example_run.charge(1, "example", 2.0, 0.1, 4, "replace-one")
    assert example_run.spent_for("example").history == [(2.0, 0.1, 4)]
    assert example_run.spent_for("client") is None


def test_a_client_level_run_after_an_example_level_one_on_the_same_file_is_refused(tmp_path):
    """A node with a floor trained its file under example-level DP-SGD; a client-level run on the same
    file is refused before any data is touched, in one line (old code: composed the two as one)."""
    data = _node_file(tmp_path / "node.csv")
    log = tmp_path / "node.jsonl"
    node = {"data-path": str(data), "epsilon-log": str(log), "max-epsilon": 40.0}
    run_in_process(1, output_dir=tmp_path / "run1", grid=InProcessGrid(1, node_configs=[node], seed=5, run_id=1),
                   **{**RUN, "num-server-rounds": 1})
    client = {**RUN, "num-server-rounds": 1, "dp-mode": "client", "fraction-train": 1.0}
    with pytest.raises(RuntimeError, match="protected single examples only"):
        run_in_process(1, output_dir=tmp_path / "run2", grid=InProcessGrid(1, node_configs=[node], seed=5, run_id=2),
                       **client)
    rows = _rows(log)
    assert [(r["run-id"], "refused" in r) for r in rows] == [(1, False), (2, True)]
    assert rows[1]["epsilon-data-file"] is None and "max-epsilon 40 cannot hold over its 2 runs" in rows[1]["refused"]


# ---------------------------------------------------------------- a second run on the same file
def test_a_new_run_on_the_same_file_does_not_reset_the_nodes_budget(tmp_path):
    """Run 1 trains 2 rounds; the floor is what 3 rounds cost. Run 2 (a new run id, the same file and
    ε log) trains its round 1 and is refused at its round 2, where the composed ε would pass it."""
    data = _node_file(tmp_path / "node.csv")
    log = tmp_path / "node.jsonl"
    node = {"data-path": str(data), "epsilon-log": str(log)}
    policy = NodePolicy.from_node_config(node)
    floor = _eps([(2.0, 1.0, 3)])  # q = 1, its own file without a declared size: replace-one
    node["max-epsilon"] = floor
    run_in_process(1, output_dir=tmp_path / "run1", grid=InProcessGrid(1, node_configs=[node], seed=5, run_id=1), **RUN)
    with pytest.raises(RuntimeError, match=r"round 2: every sampled client failed.*data file over its 2 runs"):
        run_in_process(1, output_dir=tmp_path / "run2", grid=InProcessGrid(1, node_configs=[node], seed=5, run_id=2), **RUN)
    rows = _rows(log)
    trained = [(r["run-id"], r["round"]) for r in rows if "refused" not in r]
    assert trained == [(1, 1), (1, 2), (2, 1)]
    (refused,) = [r for r in rows if "refused" in r]
    assert (refused["run-id"], refused["round"]) == (2, 2)
    assert "over its 2 runs" in refused["refused"] and "max-epsilon" in refused["refused"]
    assert refused["epsilon-data-file"] == pytest.approx(_eps([(2.0, 1.0, 4)]))
    assert rows[2]["epsilon-data-file"] == pytest.approx(floor) and rows[2]["runs-on-data-file"] == 2
    assert _eps([(2.0, 1.0, 2)]) < floor  # each run's own ε: the old per-run check let run 2 train on
    assert policy.ledger_path(1) != policy.ledger_path(2)


def test_local_noise_runs_on_the_same_file_compose_against_the_server(tmp_path):
    """Local noise: the server sees each update with the node's own noise alone (σ/2 at rate 1 per
    attempt). Run 1 trains 2 rounds, run 2 its round 1; at its round 2 the composed ε against the
    server passes the floor and the node refuses, although the runs' composed (sampled) ε does not."""
    data = _node_file(tmp_path / "node.csv")
    log = tmp_path / "node.jsonl"
    floor = PrivacyLedger([(1.0, 1.0, 3)]).epsilon(1e-5, "rdp")  # three attempts at σ = 2 against the server
    assert PrivacyLedger([(2.0, 1.0, 4)]).epsilon(1e-5, "rdp") < floor  # the runs' own composition passes
    configs = [{"data-path": str(data), "epsilon-log": str(log), "max-epsilon": floor},
               {"partition-id": 1, "num-partitions": 2}]
    run = {**RUN, "dp-mode": "client", "client-noise": "local", "fraction-train": 1.0, "max-train-samples": 16}
    for run_id in (1, 2):
        grid = InProcessGrid(2, node_configs=configs, seed=5, run_id=run_id)
        run_in_process(2, output_dir=tmp_path / f"run{run_id}", grid=grid, **run)
    rows = _rows(log)
    assert [(r["run-id"], r["round"]) for r in rows if "refused" not in r] == [(1, 1), (1, 2), (2, 1)]
    (refused,) = [r for r in rows if "refused" in r]
    assert (refused["run-id"], refused["round"]) == (2, 2) and "over its 2 runs" in refused["refused"]
    assert refused["epsilon-against-server-data-file"] == pytest.approx(PrivacyLedger([(1.0, 1.0, 4)]).epsilon(1e-5, "rdp"))
    assert refused["epsilon-data-file"] < floor < refused["epsilon-against-server-data-file"]


# ---------------------------------------------------------------- the server's δ
def test_a_large_delta_from_the_server_does_not_pass_the_floor(tmp_path):
    """A floor that one round meets at δ = 1e-5 only refuses; δ = 0.05 in the run config would have made
    the same round's ε small enough to pass."""
    data = _node_file(tmp_path / "node.csv")
    log = tmp_path / "node.jsonl"
    floor = 0.5 * _eps([(2.0, 1.0, 1)])  # below one round at δ = 1e-5
    assert _eps([(2.0, 1.0, 1)], delta=0.05) < floor  # what the lying server's δ would have shown
    node = {"data-path": str(data), "epsilon-log": str(log), "max-epsilon": floor}

    def lie(nid, msg):  # what the server's own config check would refuse, sent anyway
        msg.content["config"]["delta"] = 0.05
        return msg

    grid = InProcessGrid(1, node_configs=[node], seed=5, before=lie)
    with pytest.raises(RuntimeError, match="every sampled client failed"):
        run_in_process(1, output_dir=tmp_path / "run", grid=grid, **{**RUN, "num-server-rounds": 1})
    (row,) = _rows(log)
    assert "refused" in row and "max-epsilon" in row["refused"]
    # with its own max-delta the node states and checks ε there
    node2 = {**node, "max-delta": 0.04, "max-epsilon": _eps([(2.0, 1.0, 1)], delta=0.04) * 1.001,
             "epsilon-log": str(tmp_path / "node2.jsonl")}
    grid = InProcessGrid(1, node_configs=[node2], seed=5, run_id=7, before=lie)
    run_in_process(1, output_dir=tmp_path / "run2", grid=grid, **{**RUN, "num-server-rounds": 1})
    (row,) = _rows(tmp_path / "node2.jsonl")
    assert "refused" not in row and row["delta"] == 0.04


# ---------------------------------------------------------------- the evaluate message's dp-mode
def test_an_evaluate_message_naming_no_dp_gets_no_exact_metrics_from_a_nodes_file(tmp_path):
    """Training under DP-SGD; the server's evaluate messages say dp-mode none. The node with its own
    eval file (no exact-eval) declines: its answer follows its own config, not the message."""
    eval_file = _node_file(tmp_path / "eval.csv")

    def lie(nid, msg):
        if msg.metadata.message_type == MessageType.EVALUATE:
            msg.content["config"]["dp-mode"] = "none"
        return msg

    grid = InProcessGrid(1, node_configs=[{"partition-id": 0, "num-partitions": 1, "eval-path": str(eval_file)}],
                         before=lie, seed=5)
    run_in_process(1, output_dir=tmp_path / "run", grid=grid,
                   **{**RUN, "num-server-rounds": 1, "fraction-evaluate": 1.0, "max-train-samples": 16})
    evals = [x for x in grid.exchanges if x.instruction.metadata.message_type == MessageType.EVALUATE]
    assert evals and all(x.instruction.content["config"]["dp-mode"] == "none" for x in evals)
    for x in evals:
        assert dict(x.reply.content["metrics"]) == {protocol.EVAL_DECLINED: 1}
        assert "exact-eval" in x.reply.content[protocol.EVAL_DECLINED_REASON]["reason"]


# ---------------------------------------------------------------- the SecAgg+ threshold a share is for
SECURE = {"dp-mode": "client", "secure-aggregation": True, "client-noise": "distributed", "population": 4,
          "num-server-rounds": 1, "target-epsilon": 8.0, "accountant": "rdp", "secagg-threshold": 3, "secure-rng": False}


def test_a_share_goes_only_into_a_secagg_round_that_enforces_its_threshold_and_grid():
    from harness import tiny_config

    from fl_dplora.privacy.modes import for_config

    mode = for_config(tiny_config(**SECURE))
    sigma, dim = mode.noise_multipliers()[0], 1000
    grid = mode.secagg.plan(dim, sigma)
    good = {"threshold": 3, "clipping_range": grid.clipping_range, "target_range": grid.quantization_range,
            "mod_range": grid.modulus_range}
    assert mode.secagg.setup_refusal(good, dim, sigma) == ""
    assert mode.secagg.setup_refusal({**good, "threshold": 4}, dim, sigma) == ""  # more survivors: more noise
    assert "does not come through SecAgg+" in mode.secagg.setup_refusal(None, dim, sigma)
    assert "threshold 2 is below the run's secagg-threshold 3" in mode.secagg.setup_refusal({**good, "threshold": 2}, dim, sigma)
    assert "grid" in mode.secagg.setup_refusal({**good, "clipping_range": grid.clipping_range / 4}, dim, sigma)


def test_a_server_that_runs_secagg_with_a_lower_threshold_than_it_declares_gets_no_share(tmp_path):
    """The config says secagg-threshold 3 (each share σC'/√3); the SecAgg+ setup the server sends says 2:
    a sum of 2 shares would carry σC'·√(2/3). Every node refuses at the masked-vector stage (old code:
    each sent its share)."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

    def lower_threshold(nid, msg):
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if configs is not None and configs.get(Key.STAGE) == Stage.SETUP:
            configs[Key.THRESHOLD] = 2
        return msg

    grid = InProcessGrid(4, before=lower_threshold, seed=42)
    run_in_process(4, grid=grid, output_dir=tmp_path, **SECURE)
    refused = [x for x in grid.exchanges if x.reply is not None and x.reply.has_error()]
    assert len(refused) == 4 and len(grid.exchanges) == 12  # setup and keys went through; the masked vectors did not
    for x in refused:
        assert x.reply.has_error() and "reconstruction threshold 2 is below" in x.reply.error.reason
