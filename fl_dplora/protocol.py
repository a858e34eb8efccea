"""The messages between the server and its clients, in one place.

A train instruction carries the resolved run config (kebab-case keys, as in pyproject.toml) plus
the keys below, which start with "_" (never a run-config key) or are the round number. A reply
carries the update (ArrayRecord "arrays") and a MetricRecord "metrics" with the keys below.
A privacy ledger travels in one encoding on the wire, in the WAL and in checkpoints: the
{"sigmas", "rates", "steps"} lists of `PrivacyLedger.to_record()`; in a reply's metrics (flat
numbers only) under the `ledger-` prefix.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# server -> client (ConfigRecord "config")
ROUND = "server-round"
SIGMA = "_sigma"  # client-level modes: the server's noise multiplier; a node compares it with its own and adds its own
CLIENT_LEDGERS = "_client-ledgers"  # after a resume: JSON {node id: ledger record, "label:<partition-id>": record}
LABEL_KEY_PREFIX = "label:"  # a saved ledger by the partition label its node reported (simulation restarts)
HEAD_MEAN, HEAD_SCALE = "_head-mean", "_head-scale"  # label-head feature statistics (public data)
TASK_CARD = "_task-card"  # the run's task card (JSON, no file names): how a node reads its own rows

# client -> server (MetricRecord "metrics")
BUDGET_EXHAUSTED = "budget-exhausted"
EVAL_DECLINED = "eval-declined"  # federated evaluation: the node's policy returns no metrics of its file
EVAL_DECLINED_REASON = "eval-declined"  # ConfigRecord of a declining reply: {"reason": why}
NEVER_FROM_NODE = ("majority-rate",)  # a node's class prior: never in an evaluation reply
LEDGER_PREFIX = "ledger-"
LEDGER_FIELDS = ("sigmas", "rates", "steps")
LEDGER_REPLACE_ONE = LEDGER_PREFIX + "replace-one"  # 1: the ledger is accounted under replace-one (sample_rate.py)


def is_instruction_key(key: str) -> bool:
    """A config entry the protocol adds, not a run-config key."""
    return key.startswith("_") or key == ROUND


def ledger_to_metrics(record: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {LEDGER_PREFIX + f: list(record[f]) for f in LEDGER_FIELDS}
    if record.get("adjacency") == "replace-one":  # metrics hold numbers only
        out[LEDGER_REPLACE_ONE] = 1
    return out


def ledger_from_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    record: dict[str, Any] = {f: list(metrics[LEDGER_PREFIX + f]) for f in LEDGER_FIELDS}
    if int(metrics.get(LEDGER_REPLACE_ONE, 0)):
        record["adjacency"] = "replace-one"
    return record
