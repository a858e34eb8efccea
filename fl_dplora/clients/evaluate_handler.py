"""What a node does with an evaluate message: the global adapter (and head) scored on its own held-out
data with the server's scorer (federated evaluation). Imported by client_app.py only when such a
message comes."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fl_dplora import label_head, protocol
from fl_dplora.clients.local_update import config_from_message, label_ids_for, partition_label, run_task
from fl_dplora.clients.node_policy import NodePolicy
from fl_dplora.config import ConfigError, RunConfig
from fl_dplora.data import load_local_file
from fl_dplora.model_loading import tokenizer_for
from fl_dplora.models import adapter_parameters, get_peft_model, load_adapter_weights
from fl_dplora.transport import from_array_record

log = logging.getLogger(__name__)


def local_eval_examples(cfg: RunConfig, msg: Message, node: Mapping[str, Any]):
    """This node's held-out data for federated evaluation: its `eval-path` file (every row), or in
    the simulation its slice of the task's evaluation split (virtual nodes have no files of their own)."""
    task = run_task(cfg, msg, node)
    if node.get("eval-path"):
        return task, load_local_file(str(node["eval-path"]), task, flag="node-config eval-path",
                                     own_card=str(node.get("task-card", "")))
    if node.get("data-path"):
        raise ConfigError("federated evaluation: this node has no eval-path in its node config")
    part, parts = int(node.get("partition-id", 0)), int(node.get("num-partitions", 1))
    return task, task.eval[part::parts]


def evaluate_global(msg: Message, context: Context) -> Message:
    """Score the global adapter (and head) on this node's held-out data with the server's scorer.
    The reply holds plain metrics of private data (the server keeps them in the operator log), so it
    goes through the node's policy first: a node that declines (NodePolicy.evaluation_refusal) reads
    nothing and returns only the flag and why. The majority rate (the file's class prior) never leaves."""
    from fl_dplora.evaluate import evaluate

    cfg = config_from_message(msg)
    refusal = NodePolicy.from_node_config(context.node_config).evaluation_refusal(context.node_config)
    if refusal is not None:
        log.info("federated evaluation declined: %s", refusal)
        return Message(RecordDict({"metrics": MetricRecord({protocol.EVAL_DECLINED: 1}),
                                   protocol.EVAL_DECLINED_REASON: ConfigRecord({"reason": refusal})}), reply_to=msg)
    task, examples = local_eval_examples(cfg, msg, context.node_config)
    if not examples:
        raise ConfigError("federated evaluation: this node's held-out data is empty")
    model = get_peft_model(cfg)
    tokenizer = tokenizer_for(cfg)
    if cfg.train.label_head:
        label_head.install(model, label_ids_for(cfg, tokenizer, task).tolist(), *label_head.stats_from_config(msg.content["config"]))
    else:
        label_head.remove(model)
    params = adapter_parameters(model, cfg)
    weights = from_array_record(msg.content["arrays"], cfg.federation.transfer_dtype)
    if set(weights) != set(params):
        raise ValueError("global adapter keys do not match this client's LoRA config")
    load_adapter_weights(params, weights)
    result = evaluate(model, tokenizer, task, examples, cfg.data.max_seq_len, system_prompt=cfg.data.system_prompt,
                      prefix_cache=cfg.model.prefix_cache, keep_states=True)
    metrics = {"partition-id": partition_label(context), "num-examples": int(result["num_examples"]),
               **{k.replace("_", "-"): float(v) for k, v in result.items() if k != "num_examples"}}
    for key in protocol.NEVER_FROM_NODE:
        metrics.pop(key, None)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
