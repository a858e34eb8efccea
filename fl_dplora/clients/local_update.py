"""What a node does with a train or evaluate message (the heavy half of the ClientApp).

client_app.py imports this module only when a message needs it, so the SecAgg+ key and share
stages (handled by the mod alone) never load torch or transformers in a fresh flwr-clientapp process.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import namedtuple
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fl_dplora import label_head, protocol
from fl_dplora.clients.node_ledger import STATE_KEY as NODE_LEDGER_KEY
from fl_dplora.clients.node_ledger import NodeLedger
from fl_dplora.clients.node_policy import NodePolicy
from fl_dplora.clients.node_privacy import (
    client_sigma, compare_instruction_sigma, data_file_epsilon, dp_sample_sigma, enforce, refuse, secagg_setup,
    share_sigma,
)
from fl_dplora.clients.secagg_mod import fitres_reply
from fl_dplora.config import ConfigError, RunConfig, resolve
from fl_dplora.data import audit_canaries, client_examples, encode_all, load_local_file, load_task, task_for_node
from fl_dplora.forward import label_token_ids
from fl_dplora.frozen_prefix import attach_prefix
from fl_dplora.model_loading import load_tokenizer, tokenizer_for
from fl_dplora.models import adapter_parameters, get_peft_model, load_adapter_weights, reset_adapter, round_keys
from fl_dplora.privacy.accounting import PrivacyLedger
from fl_dplora.privacy.engine import PrivacyEngine
from fl_dplora.privacy.mechanisms import make_generator
from fl_dplora.privacy.modes import DPMode, for_config
from fl_dplora.privacy.sample_rate import basis as sample_basis
from fl_dplora.thread_layout import log_thread_layout
from fl_dplora.train import DPSGD, GradientCanary, head_only_round, local_train, make_optimizer, stage_config
from fl_dplora.transport import from_array_record, to_array_record

STATE_KEY = "fl-dplora"
log = logging.getLogger(__name__)


def config_from_message(msg: Message) -> RunConfig:
    """The server sends the full resolved run config with every message (one source of truth)."""
    record = dict(msg.content["config"])
    run_cfg = {k: v for k, v in record.items() if not protocol.is_instruction_key(k)}
    return resolve(run_cfg)


def run_task(cfg: RunConfig, msg: Message, node: Mapping[str, Any]):
    """The run's task on this node: from the card the server sent when the node has its own data
    (it needs none of the server's files), else the task the run config names (simulation)."""
    card_json = str(msg.content["config"].get(protocol.TASK_CARD, ""))
    if card_json and (node.get("data-path") or node.get("eval-path")):
        return task_for_node(card_json, cfg.train.seed)
    return load_task(cfg.data.task, cfg.train.seed)


@lru_cache(maxsize=8)
def _encoded_shard(model: str, task: str, data_path: str, partition_id: int, num_partitions: int,
                   partitioner: str, alpha: float, seed: int, max_train: int, max_len: int, canaries: str = "",
                   system_prompt: str = "auto", card_json: str = "", own_card: str = ""):
    if data_path:  # a real organisation's own file, read with the run's card (and the node's own, if any)
        run = task_for_node(card_json, seed) if card_json else load_task(task, seed)
        examples = load_local_file(data_path, run, own_card=own_card)
    else:
        # the cache key holds only what the shard depends on (a whole RunConfig would miss whenever an
        # unrelated key changes); client_examples reads only these
        cfg = resolve({"task": task, "partitioner": partitioner, "dirichlet-alpha": alpha, "seed": seed,
                       "max-train-samples": max_train})
        examples = client_examples(cfg, partition_id, num_partitions, audit_canaries(canaries))
    return encode_all(load_tokenizer(model), examples, max_len, system_prompt)


def shard_for(cfg: RunConfig, context: Context, card_json: str = ""):
    node = context.node_config
    data_path = str(node.get("data-path", ""))
    if not data_path and "partition-id" not in node:
        raise ConfigError("node-config: set partition-id and num-partitions, or data-path")
    return _encoded_shard(
        cfg.model.name, cfg.data.task, data_path, int(node.get("partition-id", 0)), int(node.get("num-partitions", 1)),
        cfg.data.partitioner, cfg.data.dirichlet_alpha, cfg.train.seed, cfg.data.max_train_samples, cfg.data.max_seq_len,
        str(node.get("audit-canaries", "")), cfg.data.system_prompt, card_json, str(node.get("task-card", "")),
    )


def partition_label(context: Context) -> int:
    return int(context.node_config.get("partition-id", context.node_id % (2**31)))


def train(msg: Message, context: Context) -> Message:
    """The node's reply to a train instruction: the round's update (clipped and noised as the run's
    dp-mode says), or only the budget-exhausted flag when another round would pass the node's budget."""
    t0 = time.perf_counter()
    log_thread_layout("client")  # once per process, operator log only (thread_layout.py)
    cfg = config_from_message(msg)
    server_round = int(msg.content["config"][protocol.ROUND])
    mode = for_config(cfg)
    policy = NodePolicy.from_node_config(context.node_config)
    log_row = {"run-id": int(context.run_id), "round": server_round, "dp-mode": mode.name, "unit": mode.unit}
    enforce(policy, log_row, lambda: policy.check_run(cfg, mode.unit))  # before any data is read
    loaded = _load_model_and_shard(msg, context, cfg, server_round)
    privacy = _calibrate_and_charge(msg, context, cfg, server_round, mode, policy, log_row, loaded)
    if isinstance(privacy, Message):  # out of budget: no data touched, only the flag goes back
        return privacy
    stats, delta = _train_update(cfg, context, server_round, mode, loaded, privacy)
    return _build_reply(msg, context, cfg, mode, policy, log_row, loaded, privacy, stats, delta, t0)


# the round's model (global adapter loaded, label head as the run says) and this node's shard
_Loaded = namedtuple("_Loaded", "model tokenizer label_ids params keys global_weights head_only progress data "
                                "trained_keys canaries observe")
# what the node's privacy step settled for the round: its ledger (this round charged, if the mode charges), the
# public size basis, the stage, q, the DP-SGD step (example level), the generators, its σ and δ, ε after the round
_Privacy = namedtuple("_Privacy", "node_ledger sizes stage q dp sampling_gen noise_gen node_sigma node_delta "
                                  "epsilon_after")


def _load_model_and_shard(msg: Message, context: Context, cfg: RunConfig, server_round: int) -> _Loaded:
    """The node's shard (read and checked before any model loads), the process model with the round's
    global adapter and label head, and the shard's frozen-prefix states."""
    task = run_task(cfg, msg, context.node_config)
    card_json = str(msg.content["config"].get(protocol.TASK_CARD, ""))
    # the node's own rows are read (and checked: columns, labels) before any model is loaded
    shard = shard_for(cfg, context, card_json)
    model = get_peft_model(cfg)
    tokenizer = tokenizer_for(cfg)
    label_ids = label_ids_for(cfg, tokenizer, task)
    if cfg.train.label_head:
        label_head.install(model, label_ids.tolist(), *label_head.stats_from_config(msg.content["config"]))
    else:
        label_head.remove(model)
    params = adapter_parameters(model, cfg)
    keys = round_keys(cfg, server_round, params)
    global_weights = from_array_record(msg.content["arrays"], cfg.federation.transfer_dtype)
    if set(global_weights) != set(keys):
        raise ValueError("global adapter keys do not match this client's LoRA config")
    head_only = head_only_round(cfg, server_round)
    if head_only:
        reset_adapter(model)  # LoRA is still at its seed-shared init in the head-only rounds
    load_adapter_weights({k: params[k] for k in keys}, global_weights)
    progress = bool(int(os.environ.get("FL_DPLORA_PROGRESS", "0")))
    # the frozen blocks below the adapter run once per example, not once per step (frozen_prefix.py)
    data = attach_prefix(model, shard, cfg.model.prefix_cache, progress=progress)
    trained_keys = [k for k in keys if params[k].requires_grad]
    canaries, observe = audit_canaries_here(context, trained_keys)  # fl-dplora audit only
    return _Loaded(model, tokenizer, label_ids, params, keys, global_weights, head_only, progress, data,
                   trained_keys, canaries, observe)


def _calibrate_and_charge(msg: Message, context: Context, cfg: RunConfig, server_round: int, mode: DPMode,
                          policy: NodePolicy, log_row: dict[str, Any], loaded: _Loaded) -> _Privacy | Message:
    """The node's own σ and accounting for the round, its policy's checks, and the charge written to its
    ledger before its data is touched; the budget-exhausted reply instead when the round would pass
    target-epsilon."""
    state = context.state.get(STATE_KEY) or ConfigRecord()
    # the node's own ledger (node_ledger.py): a file next to its ε log, else context.state
    node_ledger = NodeLedger.open(policy.ledger_path(int(context.run_id)), str(state.get(NODE_LEDGER_KEY, "")))
    # DP-SGD's q and divisor from a public size, and the adjacency that is honest for it (sample_rate.py)
    # (an audit's canary-only client, client-level modes, counts its canaries)
    sizes = sample_basis(len(loaded.data) or len(loaded.canaries), policy.shard_size,
                         bool(context.node_config.get("data-path")))
    if mode.example_level:  # a resumed run: the server's saved ledger, if it holds more than the node's
        node_ledger.adopt(_handed_back(msg, context), sizes.adjacency)
    ledger = node_ledger.example_ledger(sizes.adjacency)
    stage = stage_config(cfg, server_round, sizes.size)
    q = sizes.rate(stage.train.batch_size)
    part = partition_label(context)
    # a node that requires DP never lets the server's seed pick its noise or sampling: with a
    # seeded draw the server could regenerate the noise and subtract it (issue 27 review)
    secure = cfg.privacy.secure_rng or policy.requires_dp
    sampling_gen = (
        torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
        if secure and mode.example_level
        else make_generator(cfg.train.seed, part, server_round, 1)
    )
    noise_gen = None if secure else make_generator(cfg.train.seed, part, server_round, 2)

    dp = None
    # every σ this node adds (local or distributed noise) is its own, from the run's public config,
    # the same calibration the server runs; the instruction's σ is only compared with it
    node_sigma, node_accountant_sigma = mode.noise_multipliers()
    # the node's own δ (node policy max-delta): every ε it checks, and its DP-SGD calibration, at it
    node_delta = policy.delta(cfg.privacy.delta)
    this_run = PrivacyLedger()  # what this run will have charged after this attempt, for the data-file check
    if mode.client_level:
        log_row.update(compare_instruction_sigma(mode, msg, node_sigma))
    if mode.example_level:
        engine = PrivacyEngine.for_run(cfg.privacy, ledger, delta=node_delta)  # the node's, at its own δ
        sigma = dp_sample_sigma(cfg, state, sizes.size, engine, server_round)
        log_row["adjacency"] = sizes.adjacency
        this_run, epsilon_after = engine.projected((sigma, q, stage.train.local_steps))  # with this round's steps
        if not engine.allows(epsilon_after):
            return _budget_exhausted(msg, cfg, ledger, sigma, q, part)  # no data touched, only the flag
        dp = DPSGD(sigma, cfg.privacy.max_grad_norm, noise_gen)
        charge = (sigma, q, stage.train.local_steps, sizes.adjacency)
        log_row["steps"] = this_run.total_steps
    elif mode.client_level:  # the run's client-level ledger after this attempt, counted from the node's own attempts
        charged = client_sigma(mode, node_ledger, server_round, node_accountant_sigma, log_row)
        if mode.placement.server_sees_noised_updates:  # the noise it adds is the σ it charges (client_sigma)
            node_sigma = node_sigma / node_accountant_sigma * charged
        elif mode.placement.node_shares:  # its share: the round's one σ, never below what it charges (node_privacy)
            node_sigma = share_sigma(policy, msg, node_sigma / node_accountant_sigma * charged, log_row)
        charge = mode.round_event(charged)
        log_row["rounds-charged"] = NodeLedger.rounds_charged([*node_ledger.attempts(mode.unit), server_round])
        if policy.active:
            this_run, epsilon_after = _client_level_after(mode, node_ledger, server_round, charge, node_delta, cfg, log_row)
        else:
            epsilon_after = float("nan")  # not computed (no policy)
    else:
        charge, epsilon_after = None, float("inf") if mode.unit is None else float("nan")
    if mode.secagg is not None:  # the SecAgg+ round this update goes into is the one the node's noise share is for
        dim = sum(loaded.params[k].numel() for k in loaded.keys)
        why = mode.secagg.setup_refusal(secagg_setup(msg, context), dim, node_sigma)
        if why:
            enforce(policy, log_row, lambda: refuse(why))
    seen_now = node_ledger.attempt_sigmas(mode.unit, charge[0]) if "epsilon-against-server" in log_row else []
    data_file = data_file_epsilon(policy, int(context.run_id), this_run, node_delta, cfg.privacy.accountant, log_row,
                                  seen_now, mode.unit or "example")
    enforce(policy, log_row, lambda: policy.check_round(epsilon_after, log_row.get("epsilon-against-server"), data_file))
    if charge is not None:  # write-ahead: charged (fsynced) before this node's data is touched for the round
        node_ledger.charge(server_round, mode.unit, *charge,
                           server_sees=mode.placement.node_noise_faces_server)  # NONE for other modes
        if node_ledger.path is None:
            state[NODE_LEDGER_KEY] = node_ledger.to_json()
        context.state[STATE_KEY] = state
    return _Privacy(node_ledger, sizes, stage, q, dp, sampling_gen, noise_gen, node_sigma, node_delta, epsilon_after)


def _budget_exhausted(msg: Message, cfg: RunConfig, ledger: PrivacyLedger, sigma: float, q: float,
                      part: int) -> Message:
    """The reply of a node whose next round would pass target-epsilon: the flag and its unchanged
    ledger, reported like after a training round; nothing else is sent and no data was touched."""
    record = ledger.to_record()
    metrics = {"partition-id": part, protocol.BUDGET_EXHAUSTED: 1, "num-examples": 0,
               "epsilon": PrivacyEngine.for_run(cfg.privacy, ledger).epsilon(), "sigma": sigma,
               "sample-rate": q, "steps-total": ledger.total_steps, **protocol.ledger_to_metrics(record)}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def _client_level_after(mode: DPMode, node_ledger: NodeLedger, server_round: int, charge, node_delta: float,
                        cfg: RunConfig, log_row: dict[str, Any]) -> tuple[PrivacyLedger, float]:
    """(the run's client-level ledger after this attempt, its ε): counted from the node's own attempts.
    With local or distributed noise, the node's own noise is all that stands between its data and the
    server, which chooses who takes part (the fraction-train it sends buys nothing there): that ε goes
    into the log row too."""
    engine = PrivacyEngine.for_run(cfg.privacy, delta=node_delta)
    engine.charge(*node_ledger.client_events(mode.unit, server_round, charge[0], charge[1]))
    against = mode.epsilon_against_server(node_ledger.attempt_sigmas(mode.unit, charge[0]), node_delta)
    if against is not None:
        log_row["epsilon-against-server"] = against
    return engine.ledger, engine.epsilon()


def _train_update(cfg: RunConfig, context: Context, server_round: int, mode: DPMode, loaded: _Loaded,
                  privacy: _Privacy) -> tuple[Any, dict[str, torch.Tensor]]:
    """(local_train's stats, the update): the local steps on the shard from the global adapter, then the
    mode's client-side clip and noise of the difference."""
    params, keys = loaded.params, loaded.keys
    trainable = [params[k] for k in loaded.trained_keys]
    head = label_head.get(loaded.model)
    optimizer = make_optimizer(trainable, cfg.train, head_params=list(head.parameters()) if head is not None else ())
    steps = privacy.stage.train.local_steps
    stats = local_train(
        loaded.model, trainable, loaded.data, privacy.stage, optimizer=optimizer, dp=privacy.dp,
        sampling_generator=privacy.sampling_gen, step_offset=(server_round - 1) * steps,
        total_steps=cfg.federation.num_server_rounds * steps, pad_id=loaded.tokenizer.pad_token_id,
        progress=loaded.progress, label_token_ids=loaded.label_ids, public_size=privacy.sizes.size,
        canaries=loaded.canaries, observe=loaded.observe,
    )
    if loaded.observe:
        record_observations(context, server_round, stats.observed)
    with torch.no_grad():
        delta = {k: (params[k].detach() - loaded.global_weights[k]) for k in keys}

    # client-level modes clip here (and add local noise, or a distributed share, of the node's own σ):
    # the raw norm never leaves the client; under SecAgg+ the wrapper hands on grid values instead
    return stats, (mode.secagg or mode).client_update(delta, privacy.node_sigma, privacy.noise_gen)


def _build_reply(msg: Message, context: Context, cfg: RunConfig, mode: DPMode, policy: NodePolicy,
                 log_row: dict[str, Any], loaded: _Loaded, privacy: _Privacy, stats, delta: dict[str, torch.Tensor],
                 t0: float) -> Message:
    """The update and the metrics the mode lets out (ε after the round, expected or raw counts), as a
    plain ArrayRecord or the SecAgg+ mod's FitRes; the round's row goes to the node's ε log."""
    metrics: dict[str, Any] = {"partition-id": partition_label(context)}
    if mode.example_level:
        ledger = privacy.node_ledger.example_ledger(privacy.sizes.adjacency)  # with this round's charge
        record = ledger.to_record()
        metrics.update({"epsilon": PrivacyEngine.for_run(cfg.privacy, ledger).epsilon(), "sigma": privacy.dp.noise_multiplier,
                        "sample-rate": privacy.q, "steps-total": ledger.total_steps, **protocol.ledger_to_metrics(record)})
    policy.record({**log_row, "epsilon": privacy.epsilon_after, "delta": privacy.node_delta if mode.unit else None,
                   "accountant": cfg.privacy.accountant if mode.unit else None})
    # Only dp-mode none reveals data-dependent counts, losses and timings; DP modes report expected
    # counts (a public constant, never the shard size, which a whole-shard head batch would be).
    if mode.releases_raw_counts:
        metrics.update({"num-examples": len(loaded.data), "train_loss": stats.mean_loss,
                        "compute-seconds": time.perf_counter() - t0})
    else:
        steps = privacy.stage.train.local_steps
        metrics["num-examples"] = steps * int(cfg.train.head_batch_size if loaded.head_only else cfg.train.batch_size)
    if mode.secagg is not None:  # the SecAgg+ mod masks these float32 grid values; transfer-dtype does not apply
        return Message(fitres_reply(delta, metrics), reply_to=msg)
    content = RecordDict({"arrays": to_array_record(delta, cfg.federation.transfer_dtype), "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=msg)


def audit_canaries_here(context: Context,
                        trained_keys: list[str]) -> tuple[list[GradientCanary], list[tuple[int, int]]]:
    """What `fl-dplora audit` planted on this simulated node (its node config `audit-canaries`; nothing
    outside an audit): the gradient canaries, examples whose per-example gradient is a fixed vector
    (train.GradientCanary), and the coordinates of every canary drawn for it, planted or not, whose
    gradient it records (local_train's `observe`). Both are placed by the position of their tensor among
    those trained this round; a tensor that does not train this round (a head-only round) gives a canary
    no entry (it is still sampled) and an observed coordinate position -1."""
    node = context.node_config
    planted = audit_canaries(str(node.get("audit-canaries", "")))
    if not planted or node.get("data-path") or "partition-id" not in node:
        return [], []
    pos = {k: i for i, k in enumerate(trained_keys)}
    canaries = [GradientCanary(tuple((pos[k], int(i), float(v)) for k, i, v in canary if k in pos))
                for canary in planted["gradients"]]
    return canaries, [(pos.get(k, -1), int(i)) for k, i in planted["observe"]]


def record_observations(context: Context, server_round: int, steps: list) -> None:
    """Append this round's per-step gradients at the canary coordinates to the file the node's canary
    file names. Audit only (simulation, the auditor's own machine): it holds the noised gradients
    DP-SGD's accounting already treats as released, so a DP run's audit bound must stay below its claim
    with them."""
    path = audit_canaries(str(context.node_config["audit-canaries"]))["observations"]
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"partition": partition_label(context), "round": server_round, "steps": steps}) + "\n")


def _handed_back(msg: Message, context: Context) -> dict[str, list] | None:
    """The ledger the server saved for this node (after a resume): by its Flower node id, else (a
    simulation restarted with new node ids) by its partition label. Only ever adopted if it extends
    the node's own ledger, so a wrong one can only charge this node more."""
    handed_back = msg.content["config"].get(protocol.CLIENT_LEDGERS)
    if not handed_back:
        return None
    saved = json.loads(str(handed_back))
    return saved.get(str(context.node_id)) or saved.get(f"{protocol.LABEL_KEY_PREFIX}{partition_label(context)}")



def label_ids_for(cfg: RunConfig, tokenizer, task) -> torch.Tensor | None:
    """The label words' first tokens when the run trains with loss = label-words on a classification task."""
    if cfg.train.loss != "label-words":
        return None
    return label_token_ids(tokenizer, task.label_words) if task.kind == "classification" else None
