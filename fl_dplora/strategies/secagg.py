"""One training round through Flower's SecAgg+: the server learns the sum of the updates, nothing else.

Flower 1.42 ships the protocol as `SecAggPlusWorkflow` (server) and `secaggplus_mod` (client); the
workflow drives a legacy `Strategy` through a `LegacyContext`. We keep every cryptographic step of
Flower's (key agreement, Shamir shares of the mask seeds, pairwise and private masks, unmasking of
dropped clients) and adapt only its edges to our Message-API ServerApp:

- a shim strategy whose `configure_fit` hands the workflow the nodes our strategy already sampled
  (Poisson, as the accountant assumes) and whose `aggregate_fit` just keeps the unmasked result;
- stage 2 ("collect masked vectors") carries our own instruction (arrays + config records) instead
  of a legacy FitIns, so the ClientApp's train function runs unchanged;
- the unmask stage is refused when fewer clients than the threshold survived stage 2: with
  distributed noise their noise shares would not add up to the σ the accountant charged.

Clients reply with weight 1 (`num_examples` = `max_weight` = 1): the workflow's weighted mean is the
plain mean of the survivors' updates, and survivors x mean is the sum.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import FitIns, FitRes, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fl_dplora.privacy.secagg_quantization import SecAggPlan
from fl_dplora.transport import wire_bytes

log = logging.getLogger("fl_dplora")


@dataclass
class SecureOutcome:
    total: dict[str, torch.Tensor] | None  # the unmasked sum of the survivors' updates; None = no release
    survivors: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    reason: str = ""  # why there is no sum
    stages: dict[str, dict[str, int]] = field(default_factory=dict)  # SecAgg+ stage -> {up, down, messages}

    @property
    def bytes_up(self) -> int:
        return sum(r["up"] for r in self.stages.values())

    @property
    def bytes_down(self) -> int:
        return sum(r["down"] for r in self.stages.values())


class _CountingGrid:
    """The run's grid, counting the wire bytes of every SecAgg+ stage (both directions)."""

    def __init__(self, grid: Grid) -> None:
        self._grid, self.stages = grid, {}

    def send_and_receive(self, messages, *, timeout: float | None = None):
        messages = list(messages)
        stage = str(messages[0].content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]) if messages else "?"
        row = self.stages.setdefault(stage, {"down": 0, "up": 0, "messages": 0})
        row["down"] += sum(wire_bytes(m.content) for m in messages)
        row["messages"] += len(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        row["up"] += sum(wire_bytes(r.content) for r in replies if not r.has_error())
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class _SampledNodes(Strategy):
    """The legacy Strategy the workflow calls: our sampled nodes in, the unmasked result out."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids
        self.results: list[tuple[Any, FitRes]] | None = None
        self.failures: list[Any] = []

    def configure_fit(self, server_round, parameters, client_manager):
        return [(SimpleNamespace(node_id=nid), FitIns(parameters, {})) for nid in self.node_ids]

    def aggregate_fit(self, server_round, results, failures):
        self.results, self.failures = list(results), list(failures)
        return None, {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class _Workflow(SecAggPlusWorkflow):
    def __init__(self, contents: Mapping[int, RecordDict], min_survivors: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.contents, self.min_survivors, self.refused = contents, min_survivors, ""

    def setup_stage(self, grid, context, state) -> bool:
        ok = super().setup_stage(grid, context, state)
        # stage 2 sends our instruction; a RecordDict of its own per node (the workflow writes into it)
        state.nid_to_fitins = {nid: RecordDict(dict(self.contents[nid].items())) for nid in state.nid_to_fitins}
        return ok

    def unmask_stage(self, grid, context, state) -> bool:
        survivors = len(state.active_node_ids)
        if survivors < self.min_survivors:
            self.refused = f"{survivors} masked updates < {self.min_survivors} needed: not unmasked"
            return False
        return super().unmask_stage(grid, context, state)


def secure_sum(grid: Grid, server_round: int, contents: Mapping[int, RecordDict], shapes: Mapping[str, tuple[int, ...]],
               grid_plan: SecAggPlan, min_survivors: int, shares: int, timeout: float | None) -> SecureOutcome:
    """Run SecAgg+ with the nodes of `contents` (node id -> its train instruction) and return the sum
    of the updates of the nodes that survived, keyed like `shapes` (sorted keys, as clients send)."""
    counting = _CountingGrid(grid)
    nodes = sorted(contents)
    strategy = _SampledNodes(nodes)
    state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round}),
                        MAIN_PARAMS_RECORD: ArrayRecord()})
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}), strategy=strategy)
    workflow = _Workflow(
        contents, max(2, min_survivors),
        num_shares=shares if shares else 1.0,  # 1.0: every sampled node holds a share of every other
        reconstruction_threshold=max(2, min_survivors), max_weight=1.0,
        clipping_range=grid_plan.clipping_range, quantization_range=grid_plan.quantization_range,
        modulus_range=grid_plan.modulus_range, timeout=timeout,
    )
    workflow(counting, context)
    failures = [str(f) for f in strategy.failures]
    outcome = SecureOutcome(None, failures=failures, stages=counting.stages)
    if strategy.results is None:
        outcome.reason = workflow.refused or "fewer nodes than the threshold got through a SecAgg+ stage: not unmasked"
        return outcome
    outcome.survivors = [int(proxy.node_id) for proxy, _ in strategy.results]
    if not outcome.survivors:
        outcome.reason = "no masked update survived"
        return outcome
    mean = parameters_to_ndarrays(strategy.results[0][1].parameters)
    keys = sorted(shapes)
    if len(mean) != len(keys):
        outcome.reason = f"unmasked {len(mean)} arrays, expected {len(keys)}"
        return outcome
    m = len(outcome.survivors)
    outcome.total = {k: torch.from_numpy(np.asarray(a, dtype=np.float64) * m).float().reshape(shapes[k])
                     for k, a in zip(keys, mean)}
    return outcome
