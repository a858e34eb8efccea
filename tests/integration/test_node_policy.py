"""A node's own privacy floor (max-epsilon, require-dp-mode), its ε log, and federated evaluation."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from harness import InProcessGrid, read_metrics, run_in_process

from fl_dplora.clients.node_policy import NodePolicy, NodeRefusal
from fl_dplora.config import ConfigError, resolve
from fl_dplora.data import DATA_DIR
from fl_dplora.write_ahead import OPERATOR_LOG, read_operator


def _operator_events(out, event):
    rows = [json.loads(line) for line in (out / OPERATOR_LOG).read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("event") == event]


def test_node_config_is_validated_in_one_line():
    with pytest.raises(ConfigError, match="^node-config max-epsilon: expected a number"):
        NodePolicy.from_node_config({"max-epsilon": "four"})
    with pytest.raises(ConfigError, match="^node-config max-epsilon: must be > 0"):
        NodePolicy.from_node_config({"max-epsilon": 0})
    with pytest.raises(ConfigError, match="^node-config require-dp-mode: local not one of"):
        NodePolicy.from_node_config({"require-dp-mode": "sample,local"})


def test_policy_refuses_what_exceeds_the_floor_and_accepts_the_rest(tmp_path):
    policy = NodePolicy.from_node_config({"max-epsilon": 4.0, "require-dp-mode": "sample,client"})
    with pytest.raises(NodeRefusal, match="targets epsilon 8; this node allows at most max-epsilon 4"):
        policy.check_run(resolve({"dp-mode": "sample", "target-epsilon": 8.0}), "example")
    with pytest.raises(NodeRefusal, match="dp-mode paper is not one this node trains under"):
        policy.check_run(resolve({"dp-mode": "paper", "target-epsilon": 2.0, "population": 5, "label-head": False}), "client")
    with pytest.raises(NodeRefusal, match="dp-mode none gives no epsilon"):
        NodePolicy.from_node_config({"max-epsilon": 4.0}).check_run(resolve({"dp-mode": "none"}), None)
    policy.check_run(resolve({"dp-mode": "sample", "target-epsilon": 4.0}), "example")  # at the floor: accepted
    policy.check_round(3.99)
    with pytest.raises(NodeRefusal, match="raise this node's epsilon to 4.01 > max-epsilon 4"):
        policy.check_round(4.01)
    # a virtual node keeps no log; a node with its own data does (default path), or where it says
    assert NodePolicy.from_node_config({"partition-id": 0}).log_path is None
    assert NodePolicy.from_node_config({"data-path": "/x.csv"}).log_path.name == "node-epsilon.jsonl"
    assert NodePolicy.from_node_config({"epsilon-log": str(tmp_path / "e.jsonl")}).log_path == tmp_path / "e.jsonl"


@pytest.mark.slow
def test_a_node_below_the_runs_target_refuses_and_the_round_goes_on(tmp_path):
    logs = [tmp_path / f"node{i}.jsonl" for i in range(3)]
    configs = [{"partition-id": i, "num-partitions": 3, "epsilon-log": str(logs[i])} for i in range(3)]
    configs[0]["max-epsilon"] = 4.0  # this organisation allows less than the run's 8
    configs[2]["require-dp-mode"] = "sample"
    grid = InProcessGrid(3, node_configs=configs, seed=3)
    summary, out = run_in_process(3, output_dir=tmp_path / "run", grid=grid, **{"dp-mode": "sample",
                                                                               "target-epsilon": 8.0})
    rounds = int(summary["config"]["num-server-rounds"])
    rows = read_operator(out)[0]
    assert [r["accepted"] for r in rows] == [2] * rounds
    assert all(any("node policy: the run targets epsilon 8" in d for d in r["dropped"]) for r in rows)
    refused = [json.loads(line) for line in logs[0].read_text().splitlines()]
    assert len(refused) == rounds and all("max-epsilon 4" in r["refused"] for r in refused)
    assert not any("epsilon" in r for r in refused)  # it trained nothing, so it spent nothing
    for i in (1, 2):
        kept = [json.loads(line) for line in logs[i].read_text().splitlines()]
        assert [r["round"] for r in kept] == list(range(1, rounds + 1))
        eps = [r["epsilon"] for r in kept]
        assert eps == sorted(eps) and 0 < eps[-1] <= 8.0
        # the node's own last entry is what the server accounted for it
        per_client = json.loads((out / "summary.json").read_text())["privacy"]["per_client"]
        assert eps[-1] == pytest.approx(per_client[str(grid.node_id_of(i))]["epsilon"], rel=1e-9)
        assert all(r["dp-mode"] == "sample" and r["unit"] == "example" and r["delta"] == 1e-5 for r in kept)
    assert (logs[1].stat().st_mode & 0o777) == 0o600


@pytest.mark.slow
def test_client_level_node_log_is_the_runs_ledger(tmp_path):
    log = tmp_path / "node.jsonl"
    configs = [{"partition-id": i, "num-partitions": 2, "epsilon-log": str(log) if i == 0 else ""} for i in range(2)]
    summary, out = run_in_process(2, output_dir=tmp_path / "run", grid=InProcessGrid(2, node_configs=configs),
                                  **{"dp-mode": "client", "target-epsilon": 8.0})
    kept = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["round"] for r in kept] == list(range(1, summary["rounds"] + 1))
    eps = [r["epsilon"] for r in kept]
    assert eps == sorted(eps) and eps[0] < eps[-1]  # the run's ledger after each round, as the server accounts it
    assert eps[-1] == pytest.approx(summary["privacy"]["epsilon"], rel=1e-9)
    assert all(r["unit"] == "client" for r in kept)


@pytest.mark.slow
def test_federated_evaluation_scores_each_nodes_file_and_stays_out_of_the_released_outputs(tmp_path, capsys):
    from fl_dplora.cli import main

    valid = pd.read_csv(DATA_DIR / "tfns" / "sent_valid.csv")
    files = []
    for i, rows in enumerate((valid.iloc[:12], valid.iloc[12:30])):
        path = tmp_path / f"eval{i}.csv"
        rows[["text", "label"]].to_csv(path, index=False)
        files.append(path)
    configs = [{"partition-id": i, "num-partitions": 2, "eval-path": str(files[i]), "exact-eval": True} for i in range(2)]
    summary, out = run_in_process(2, output_dir=tmp_path / "fed", grid=InProcessGrid(2, node_configs=configs),
                                  **{"fraction-evaluate": 1.0})
    events = _operator_events(out, "federated-eval")
    assert [e["round"] for e in events] == list(range(1, summary["rounds"] + 1))
    last = events[-1]
    assert last["asked"] == last["replied"] == 2 and last["num-examples"] == 30
    by_part = {int(n["partition-id"]): n for n in last["nodes"]}
    assert by_part[0]["num-examples"] == 12 and by_part[1]["num-examples"] == 18
    want = (by_part[0]["accuracy"] * 12 + by_part[1]["accuracy"] * 18) / 30
    assert last["weighted"]["accuracy"] == pytest.approx(want)
    # the node scored with the server's scorer: the final adapter on that file gives the same numbers
    for i, path in enumerate(files):
        assert main(["evaluate", "--run", str(out), "--eval-file", str(path), "--output", str(tmp_path / f"e{i}.json")]) == 0
        local = json.loads((tmp_path / f"e{i}.json").read_text())["final_eval"]
        assert local["accuracy"] == pytest.approx(by_part[i]["accuracy"])
        assert local["loss"] == pytest.approx(by_part[i]["loss"], rel=1e-5)
    capsys.readouterr()
    # released outputs: the same keys as a run without federated evaluation, no node's numbers
    plain, plain_out = run_in_process(2, output_dir=tmp_path / "plain")
    assert read_metrics(out) == read_metrics(plain_out)  # same training: evaluation sampled its own stream
    assert set(summary) == set(plain)
    released = json.loads((out / "summary.json").read_text())
    assert "federated" not in json.dumps({k: v for k, v in released.items() if k != "config"})
    # a node that has its own data but no eval file declines; the round and the run go on
    configs = [{"partition-id": 0, "num-partitions": 2, "eval-path": str(files[0]), "exact-eval": True},
               {"partition-id": 1, "num-partitions": 2, "data-path": str(files[1]), "exact-eval": True}]
    _, out2 = run_in_process(2, output_dir=tmp_path / "decline", grid=InProcessGrid(2, node_configs=configs),
                             **{"fraction-evaluate": 1.0, "num-server-rounds": 1})
    event = _operator_events(out2, "federated-eval")[0]
    assert event["replied"] == 1 and "has no eval-path" in event["failed"][0]


def test_evaluation_goes_through_the_node_policy():
    """Federated evaluation has no DP mechanism: a node that requires DP declines it; a node with its
    own files answers only with exact-eval = true; virtual nodes (public eval split) answer. The node
    decides from its own config alone: the evaluate message's dp-mode is the server's word."""
    own = {"eval-path": "/e.csv"}
    for node in ({"require-dp-mode": "sample"}, {"max-epsilon": 8.0}, {"require-dp-mode": "client,sample", "exact-eval": True}):
        assert "this node requires DP" in NodePolicy.from_node_config(node).evaluation_refusal({**own, **node})
    plain = NodePolicy.from_node_config(own)
    assert "outside any epsilon; set exact-eval = true" in plain.evaluation_refusal(own)
    assert plain.evaluation_refusal({**own, "exact-eval": True}) is None
    assert NodePolicy.from_node_config({"partition-id": 0}).evaluation_refusal({"partition-id": 0}) is None
    # a node that also trains without DP does not require it
    both = {**own, "require-dp-mode": "none,sample", "exact-eval": True}
    assert NodePolicy.from_node_config(both).evaluation_refusal(both) is None


@pytest.mark.slow
def test_a_node_that_requires_dp_sends_no_metric_of_its_file_in_a_run_without_dp(tmp_path):
    from flwr.app import MessageType

    from fl_dplora import protocol

    valid = pd.read_csv(DATA_DIR / "tfns" / "sent_valid.csv")
    files = []
    for i in range(3):
        path = tmp_path / f"eval{i}.csv"
        valid.iloc[10 * i:10 * i + 10][["text", "label"]].to_csv(path, index=False)
        files.append(path)
    configs = [{"partition-id": i, "num-partitions": 3, "eval-path": str(files[i]), "exact-eval": True} for i in range(3)]
    configs[0]["require-dp-mode"] = "sample"
    configs[1]["max-epsilon"] = 4.0
    grid = InProcessGrid(3, node_configs=configs)
    summary, out = run_in_process(3, output_dir=tmp_path / "run", grid=grid,
                                  **{"dp-mode": "none", "fraction-evaluate": 1.0, "num-server-rounds": 1})
    evals = [x for x in grid.exchanges if x.instruction.metadata.message_type == MessageType.EVALUATE]
    by_node = {grid.node_id_of(i): i for i in range(3)}
    replies = {by_node[x.node_id]: x.reply for x in evals}
    assert set(replies) == {0, 1, 2}
    for i in (0, 1):  # the reply holds the flag and why, nothing computed from the file
        content = replies[i].content
        assert dict(content["metrics"]) == {protocol.EVAL_DECLINED: 1}
        assert not content.array_records
        assert set(content.config_records) == {protocol.EVAL_DECLINED_REASON}
        assert set(content[protocol.EVAL_DECLINED_REASON]) == {"reason"}
        assert "this node requires DP" in content[protocol.EVAL_DECLINED_REASON]["reason"]
    answered = dict(replies[2].content["metrics"])
    assert answered["num-examples"] == 10 and "accuracy" in answered
    assert "majority-rate" not in answered  # a node's class prior never leaves it
    event = _operator_events(out, "federated-eval")[0]
    assert (event["asked"], event["replied"], len(event["declined"]), event["failed"]) == (3, 1, 2, [])
    assert all("this node requires DP" in d for d in event["declined"])
    assert event["num-examples"] == 10 and "majority-rate" not in event["weighted"]
    assert all("majority-rate" not in n for n in event["nodes"])
