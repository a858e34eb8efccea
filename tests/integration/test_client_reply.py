"""What leaves a client: only the LoRA update and a few numbers; no base weight, no raw data.

The replies are inspected as the server receives them (after Flower's wire format) from the real
ClientApp, driven in-process by tests/harness.py, so these run in seconds without Ray.
"""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from safetensors.torch import load_file

from fl_dplora.write_ahead import read_operator
from fl_dplora.data import client_examples, load_task
from fl_dplora.model_loading import load_base_model
from fl_dplora.models import adapter_parameters, get_peft_model
from fl_dplora.transport import wire_bytes
from harness import InProcessGrid, run_in_process, tiny_config, wire_copy

NUM_CLIENTS = 3


def _run(tmp_path_factory, name: str, num_clients: int = NUM_CLIENTS, grid: InProcessGrid | None = None, **overrides):
    grid = grid or InProcessGrid(num_clients)
    out = tmp_path_factory.mktemp(name)
    summary, out_dir = run_in_process(num_clients, grid=grid, output_dir=out, **overrides)
    return {"grid": grid, "summary": summary, "out": out_dir,
            "cfg": tiny_config(**{"population": num_clients, **overrides}, output_dir=str(out))}


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return _run(tmp_path_factory, "plain", num_server_rounds=2)


@pytest.fixture(scope="module")
def dp_sample(tmp_path_factory):
    # Unequal shards (dirichlet) so that a data-dependent count would show; fixed sigma (no calibration).
    return _run(tmp_path_factory, "sample", num_server_rounds=1, dp_mode="sample", noise_multiplier=1.0,
                partitioner="dirichlet", dirichlet_alpha=0.3, max_train_samples=150)


def _blob(msg: Message) -> bytes:
    """Every byte of the message as Flower ships it."""
    return b"".join(obj.deflate() for obj in get_all_nested_objects(msg).values())


def _shard(cfg, grid: InProcessGrid, node_id: int):
    node = grid.contexts[node_id].node_config
    return client_examples(cfg, int(node["partition-id"]), int(node["num-partitions"]))


def _lora_shapes(cfg) -> dict[str, tuple[int, ...]]:
    return {k: tuple(p.shape) for k, p in adapter_parameters(get_peft_model(cfg), cfg).items()}


# ----------------------------------------------------------------------------- the replies
def test_every_sampled_client_replied_once_per_round_from_its_own_node(plain):
    grid, cfg = plain["grid"], plain["cfg"]
    assert len(grid.exchanges) == NUM_CLIENTS * cfg.federation.num_server_rounds
    for ex in grid.exchanges:
        assert not ex.reply.has_error(), ex.reply.error
        assert ex.instruction.metadata.dst_node_id == ex.node_id
        assert ex.reply.metadata.src_node_id == ex.node_id
        assert ex.reply.metadata.reply_to_message_id == ex.instruction.metadata.message_id
        assert ex.reply.metadata.message_type == "train"
    for rnd in range(cfg.federation.num_server_rounds):
        round_nodes = [ex.node_id for ex in grid.exchanges[rnd * NUM_CLIENTS:(rnd + 1) * NUM_CLIENTS]]
        assert sorted(round_nodes) == sorted(grid.contexts)


def test_reply_arrays_are_exactly_the_lora_update_and_no_base_weight(plain):
    grid, cfg = plain["grid"], plain["cfg"]
    shapes = _lora_shapes(cfg)
    base_names = set(load_base_model(cfg.model.name, seed=cfg.train.seed).state_dict())
    trainable = plain["summary"]["trainable_params"]
    assert trainable == sum(math.prod(s) for s in shapes.values())
    for ex in grid.exchanges:
        content = ex.reply.content
        assert list(content.array_records) == ["arrays"]
        arrays = content["arrays"]
        assert set(arrays) == set(shapes)
        for key, arr in arrays.items():
            assert "lora_" in key
            assert not any(key == b or key.endswith("." + b) for b in base_names), key
            assert tuple(arr.shape) == shapes[key] and arr.dtype == "float32"
        payload = sum(arr.numpy().nbytes for arr in arrays.values())
        assert payload == 4 * trainable
        assert payload < 0.01 * plain["summary"]["full_model_bytes"]


def test_reply_metrics_are_numbers_and_no_config_record_goes_back(plain, dp_sample):
    for run in (plain, dp_sample):
        for ex in run["grid"].exchanges:
            content = ex.reply.content
            assert not content.config_records  # nothing free-form (strings) in a reply
            assert list(content.metric_records) == ["metrics"]
            for key, value in content["metrics"].items():
                items = value if isinstance(value, list) else [value]  # e.g. the DP ledger's sigmas
                assert all(isinstance(v, (int, float)) and not isinstance(v, (str, bool)) for v in items), (key, value)


def test_instructions_carry_the_run_config_but_not_the_servers_paths(plain):
    from fl_dplora.config import SERVER_ONLY_KEYS

    out_dir = str(plain["out"])
    for ex in plain["grid"].exchanges:
        sent = ex.instruction.content["config"]
        assert sent["task"] == plain["cfg"].data.task and sent["lora-rank"] == plain["cfg"].lora.rank
        assert not SERVER_ONLY_KEYS & set(sent.keys())
        assert out_dir.encode() not in _blob(ex.instruction)


def test_reply_holds_no_raw_text_of_the_clients_shard(plain, dp_sample):
    for run in (plain, dp_sample):
        grid, cfg = run["grid"], run["cfg"]
        words = load_task(cfg.data.task, cfg.train.seed).label_words
        for ex in grid.exchanges:
            blob = _blob(ex.reply)
            shard = _shard(cfg, grid, ex.node_id)
            assert shard
            for example in shard:
                text = example.prompt.split("\n\n", 1)[1]  # the tweet itself, without the instruction
                for piece in (text, text[:24], text[-24:]):
                    assert piece.encode() not in blob, piece
            for word in words:  # not even the answers (labels) in clear text
                assert word.encode() not in blob


def test_the_text_detector_would_catch_a_leak(plain):
    """Positive control for the test above: a reply that carries a tweet is flagged."""
    grid, cfg = plain["grid"], plain["cfg"]
    ex = grid.exchanges[0]
    text = _shard(cfg, grid, ex.node_id)[0].prompt.split("\n\n", 1)[1]
    leaky = RecordDict({**dict(ex.reply.content.items()), "debug": ConfigRecord({"sample": text})})
    leaked = wire_copy(Message(leaky, reply_to=ex.instruction))
    assert text[:24].encode() in _blob(leaked)


def test_plain_mode_reports_shard_size_and_loss(plain):
    grid, cfg = plain["grid"], plain["cfg"]
    for ex in grid.exchanges:
        m = ex.reply.content["metrics"]
        assert m["num-examples"] == len(_shard(cfg, grid, ex.node_id))
        assert m["train_loss"] > 0


def test_dp_sample_replies_carry_no_data_dependent_count_or_loss(dp_sample):
    grid, cfg = dp_sample["grid"], dp_sample["cfg"]
    sizes = {len(_shard(cfg, grid, nid)) for nid in grid.contexts}
    assert len(sizes) > 1  # the shards really differ in size
    for ex in grid.exchanges:
        assert not ex.reply.has_error(), ex.reply.error
        m = ex.reply.content["metrics"]
        assert "train_loss" not in m
        assert m["num-examples"] == cfg.train.local_steps * cfg.train.batch_size  # expected, not actual
        assert 0 < m["epsilon"] <= cfg.privacy.target_epsilon
        assert m["sigma"] == 1.0
        assert set(ex.reply.content["arrays"]) == set(_lora_shapes(cfg))


def test_client_level_replies_carry_no_raw_update_norm(tmp_path_factory):
    """dp-mode client/paper: the update's norm before clipping is private and un-noised (issue 15)."""
    run = _run(tmp_path_factory, "client-level", num_server_rounds=1, dp_mode="client", noise_multiplier=1.0)
    assert run["grid"].exchanges
    for ex in run["grid"].exchanges:
        assert not ex.reply.has_error(), ex.reply.error
        assert set(ex.reply.content["metrics"]) == {"partition-id", "num-examples"}  # no norm, no timing


def test_ffa_replies_carry_only_b(tmp_path_factory):
    run = _run(tmp_path_factory, "ffa", num_clients=2, num_server_rounds=1, lora_variant="ffa")
    shapes = _lora_shapes(run["cfg"])
    assert shapes and all("lora_B" in k for k in shapes)
    for ex in run["grid"].exchanges:
        keys = set(ex.reply.content["arrays"])
        assert keys == set(shapes) and not any("lora_A" in k for k in keys)
    assert run["summary"]["trainable_params"] == 2 * (64 * 8 + 32 * 8)  # layers x (B_q + B_v)


# ----------------------------------------------------------------------------- bytes on the wire
def test_wire_bytes_per_client_are_the_lora_payload_plus_fixed_framing(plain):
    """At rank 8 the 8 tensors are 1-2 KB each, so Flower's per-tensor framing (~0.5 KB) shows."""
    trainable = plain["summary"]["trainable_params"]
    num_tensors = len(_lora_shapes(plain["cfg"]))
    for ex in plain["grid"].exchanges:
        sent = wire_bytes(ex.reply.content)
        assert 4 * trainable < sent <= 4 * trainable + 700 * num_tensors + 1024


def test_wire_bytes_per_client_are_within_a_few_percent_of_the_lora_payload(tmp_path_factory):
    run = _run(tmp_path_factory, "rank64", num_clients=2, num_server_rounds=1, lora_rank=64)
    s = run["summary"]
    payload = 4 * s["trainable_params"]
    assert s["trainable_params"] == 2 * (64 * 64 + 64 * 64 + 64 * 64 + 32 * 64)
    row_bytes = read_operator(run["out"])[1]["bytes_up_total"] / 2
    assert payload <= row_bytes <= 1.05 * payload
    assert row_bytes < 0.01 * s["full_model_bytes"]
    for ex in run["grid"].exchanges:
        assert payload <= wire_bytes(ex.reply.content) <= 1.05 * payload


# ----------------------------------------------------------------------------- failures
def test_a_crashing_client_and_a_lost_reply_cost_their_updates_not_the_round(tmp_path_factory):
    # Node 1 has no partition in its node config: the real ClientApp raises (ConfigError).
    # Node 2's reply never arrives (dropped on the way back, like a timeout).
    configs = [{"partition-id": 0, "num-partitions": 3}, {}, {"partition-id": 2, "num-partitions": 3}]
    grid = InProcessGrid(3, node_configs=configs)
    good, bad, lost = list(grid.contexts)
    grid.after = lambda nid, msg, reply: None if nid == lost else reply
    run = _run(tmp_path_factory, "faults", grid=grid, num_server_rounds=1)
    replies = {ex.node_id: ex.reply for ex in grid.exchanges}
    assert replies[lost] is None and not replies[good].has_error()
    assert replies[bad].has_error()
    err: Error = replies[bad].error
    assert err.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "ConfigError" in err.reason and "partition-id" in err.reason
    assert replies[bad].metadata.src_node_id == bad

    row = read_operator(run["out"])[0][0]
    assert row["accepted"] == 1 and row["sampled"] == 3
    assert any(f"node {bad}: client error" in d for d in row["dropped"])
    assert not any(f"node {good}" in d for d in row["dropped"])
    assert run["summary"]["rounds"] == 1
    assert read_operator(run["out"])[1]["bytes_up_total"] == wire_bytes(replies[good].content)  # only what arrived
    saved = load_file(str(run["out"] / "adapter" / "adapter_model.safetensors"))
    update = replies[good].content["arrays"]
    for k, arr in update.items():  # FedAvg of the one good update: init + that client's delta
        if "lora_B" in k:
            assert torch.allclose(saved[k], torch.from_numpy(arr.numpy()), atol=1e-7)


# ----------------------------------------------------------------------------- runs in one process
def test_a_second_run_in_the_same_process_starts_from_the_seed_init(tmp_path_factory):
    """The process keeps one model: a run must not start from the adapter the previous run left."""
    first = _run(tmp_path_factory, "again1", num_clients=2, num_server_rounds=1)
    second = _run(tmp_path_factory, "again2", num_clients=2, num_server_rounds=1)
    a = load_file(str(first["out"] / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(second["out"] / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # dp-mode none, secure-rng false: deterministic
    for ex in second["grid"].exchanges:  # and what the server broadcast first was the untrained init
        arrays = ex.instruction.content["arrays"]
        assert all(not arr.numpy().any() for k, arr in arrays.items() if "lora_B" in k)
