"""The server strategy: sample clients, validate replies, aggregate LoRA updates the dp-mode's way.

Clients send updates (local adapter minus global), so every mode is "global += aggregate(updates)";
the run's dp-mode object (privacy/modes/) says how: FedAvg weights, a uniform mean, or (client-level
modes) Poisson client sampling, clipping, noise of a fixed variance and a public divisor.
A reply that fails validation (keys, shapes, dtype, finiteness) is dropped and logged by node id.
"""

from __future__ import annotations

import logging
import random
import statistics
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fl_dplora import protocol
from fl_dplora.config import RunConfig
from fl_dplora.privacy.mechanisms import global_norm, make_generator
from fl_dplora.privacy.modes import DPMode, for_config
from fl_dplora.transport import from_array_record, to_array_record, wire_bytes

log = logging.getLogger("fl_dplora")
OUTLIER_FACTOR = 10.0


@dataclass
class RoundStats:
    sampled: int = 0
    received: int = 0
    accepted: int = 0
    dropped: list[str] = field(default_factory=list)
    bytes_down: int = 0
    bytes_up: int = 0
    client_metrics: list[dict[str, Any]] = field(default_factory=list)


class DPLoRAFedAvg(FedAvg):
    """FedAvg over LoRA updates with the dp-modes of docs/privacy.md. Works with `strategy.start()` too."""

    def __init__(self, cfg: RunConfig, global_weights: Mapping[str, torch.Tensor], server_sigma: float = 0.0,
                 mode: DPMode | None = None):
        """`mode`: the run's dp-mode object (the ServerApp builds it once); built from `cfg` when not given."""
        super().__init__(
            fraction_train=cfg.federation.fraction_train, fraction_evaluate=0.0,
            min_train_nodes=1, min_available_nodes=cfg.federation.min_available,
        )
        self.cfg = cfg
        self.mode = mode if mode is not None else for_config(cfg)
        self.global_weights = {k: v.detach().clone().float() for k, v in global_weights.items()}
        self.server_sigma = server_sigma
        self.reply_sigma = 0.0  # local noise after a resume: the most an honest node adds (run_state.resume)
        secure = cfg.privacy.secure_rng
        # secure: client sampling from the OS CSPRNG, which has no state a checkpoint could leak
        self._rng = random.SystemRandom() if secure else random.Random(cfg.train.seed)
        # federated evaluation samples from its own stream: it never changes which clients train next
        self._eval_rng = random.SystemRandom() if secure else random.Random(cfg.train.seed + 1)
        self._noise_gen = None if secure else make_generator(cfg.train.seed, -1)
        self.stats = RoundStats()

    # -------------------------------------------------------------- sampling
    def fix_secure_members(self, grid: Grid, timeout: float) -> list[int]:
        """SecAgg+: the federation is the nodes connected at start, and they must be the declared
        `population` (the planned refusal odds, the modulus and the noise top-up assume it). Waits up
        to `timeout` seconds for missing nodes, then refuses in one line, before any client trains;
        later rounds sample only these nodes (one gone is a dropout, a newcomer is never sampled)."""
        from fl_dplora.config import ConfigError

        population = self.cfg.federation.population
        deadline = time.monotonic() + timeout
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) > population or (len(nodes) < population and time.monotonic() >= deadline):
                raise ConfigError(f"population: {len(nodes)} nodes connected but population = {population}; secure aggregation "
                                  "needs them equal (set population to the number of nodes in the federation)")
            if len(nodes) == population:
                self.secure_members = nodes
                return nodes
            log.info("secure aggregation: waiting for nodes: %d of population %d connected", len(nodes), population)
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    def _connected(self, grid: Grid) -> list[int]:
        nodes = sorted(grid.get_node_ids())
        members = getattr(self, "secure_members", None)
        if members is None:
            return nodes
        strangers = sorted(set(nodes) - set(members))
        if strangers:
            log.warning("secure aggregation: %d node(s) connected that were not in the federation at start: never sampled",
                        len(strangers))
        return [n for n in nodes if n in set(members)]

    def sample(self, grid: Grid) -> list[int]:
        nodes = self._connected(grid)
        while len(nodes) < self.min_available_nodes:
            log.info("waiting for nodes: %d connected, %d needed", len(nodes), self.min_available_nodes)
            time.sleep(1)
            nodes = self._connected(grid)
        members = getattr(self, "secure_members", None)
        if members is not None and len(nodes) < len(members):
            log.warning("secure aggregation: %d of the %d nodes of the federation are not connected: they count as dropouts "
                        "(secagg-dropout-rate %g declared)", len(members) - len(nodes), len(members),
                        self.cfg.secagg.dropout_rate)
        q = self.fraction_train
        if self.mode.client_level:
            # Poisson sampling, exactly what the accountant assumes (may pick none: a noise-only round).
            return [n for n in nodes if self._rng.random() < q]
        size = max(1, min(len(nodes), round(q * len(nodes))))
        return sorted(self._rng.sample(nodes, size))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        node_ids = self.sample(grid)
        config[protocol.ROUND] = server_round
        self._round_keys = sorted(arrays.keys())  # a head-only round sends (and expects back) the head alone
        record = RecordDict({"arrays": arrays, "config": config})
        self.stats = RoundStats(sampled=len(node_ids), bytes_down=wire_bytes(record) * len(node_ids))
        # Kept so that aggregate_train can name the sampled nodes that never replied: the grid
        # assigns each message its id on push, and simply leaves out replies that miss the timeout.
        self._sent = list(self._construct_messages(record, node_ids, MessageType.TRAIN))
        return self._sent

    # -------------------------------------------------------------- validation
    def validate(self, msg: Message) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any], str]:
        """(update, metrics, "") for a good reply, (None, metrics, reason) for a bad one."""
        if msg.has_error():
            return None, {}, f"client error: {msg.error.reason}"
        content = msg.content
        metrics = dict(content["metrics"]) if "metrics" in content.metric_records else {}
        if metrics.get(protocol.BUDGET_EXHAUSTED):
            return None, metrics, "privacy budget exhausted"
        if "arrays" not in content.array_records:
            return None, metrics, "no arrays in reply"
        record = content["arrays"]
        expected = set(getattr(self, "_round_keys", None) or self.global_weights)
        got = set(record)
        if got != expected:
            missing, extra = sorted(expected - got), sorted(got - expected)
            return None, metrics, f"wrong keys (missing {missing[:2]}{'...' if len(missing) > 2 else ''}, extra {extra[:2]}{'...' if len(extra) > 2 else ''})"
        try:
            update = from_array_record(record, self.cfg.federation.transfer_dtype)
        except ValueError as exc:
            return None, metrics, str(exc)
        for key, t in update.items():
            if tuple(t.shape) != tuple(self.global_weights[key].shape):
                return None, metrics, f"{key}: shape {tuple(t.shape)}, expected {tuple(self.global_weights[key].shape)}"
            if not torch.isfinite(t).all():
                return None, metrics, f"{key}: non-finite values"
        return update, metrics, ""

    # -------------------------------------------------------------- aggregation
    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        updates, weights, senders = [], [], []
        # message id -> sampled node. Error replies made by the SuperLink (e.g. node unavailable)
        # come from node 0, so name the node by the message the reply answers.
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in getattr(self, "_sent", []) if m.metadata.message_id}
        answered = set()
        for msg in replies:
            self.stats.received += 1
            if not msg.has_error():
                self.stats.bytes_up += wire_bytes(msg.content)
            update, metrics, reason = self.validate(msg)
            if update is not None and (bound := self.mode.reject_reason(update, max(self.server_sigma, self.reply_sigma))):
                update, reason = None, bound
            answered.add(msg.metadata.reply_to_message_id)
            node = sent.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            if metrics:
                self.stats.client_metrics.append({**metrics, "node_id": node})  # the id the server sent to, not one the reply claims
            if update is None:
                self.stats.dropped.append(f"node {node}: {reason}")
                log.warning("round %d: dropped reply from node %s: %s", server_round, node, reason)
                continue
            updates.append(self.mode.accept(update))  # e.g. central client-level DP clips here, trusting no client
            senders.append(node)
            weights.append(self.mode.reply_weight(metrics))
        for msg_id, node in sent.items():
            if msg_id not in answered:
                reason = "no reply (timeout or node lost)"
                self.stats.dropped.append(f"node {node}: {reason}")
                log.warning("round %d: dropped node %s: %s", server_round, node, reason)
        self._sent = []
        keys = getattr(self, "_round_keys", None) or list(self.global_weights)
        if self.mode.drops_outliers() and len(updates) >= 3:
            updates, weights = self._drop_norm_outliers(server_round, updates, weights, senders)
        self.stats.accepted = len(updates)
        zeros = {k: torch.zeros_like(self.global_weights[k]) for k in keys}
        agg = self.mode.aggregate(updates, weights, zeros, self.min_available_nodes, self.server_sigma, self._noise_gen)
        if agg is None:
            log.warning("round %d: %d good replies < min-available %d; global adapter unchanged",
                        server_round, len(updates), self.min_available_nodes)
            return None, None
        for k, v in agg.items():
            self.global_weights[k] += v
        return ArrayRecord({k: v for k, v in to_array_record(self.global_weights).items()}), MetricRecord(
            {"accepted": len(updates)}
        )

    def aggregate_secure(self, server_round: int, grid: Grid) -> None:
        """The round's SecAgg+ (strategies/secagg.py) with the nodes configure_train sampled: the
        server unmasks the sum only, and only when at least the threshold of them survive."""
        from fl_dplora.strategies.secagg import SecureOutcome, secure_sum

        sent, self._sent = getattr(self, "_sent", []), []
        keys = getattr(self, "_round_keys", None) or sorted(self.global_weights)
        shapes = {k: tuple(self.global_weights[k].shape) for k in keys}
        dim = sum(self.global_weights[k].numel() for k in keys)
        needed = self.mode.secagg.needed()  # max(2, secagg-threshold, min-available), as planned
        if len(sent) < needed:
            outcome = SecureOutcome(None, reason=f"{len(sent)} sampled < {needed} needed (secagg-threshold, min-available): "
                                                 "round refused")
        else:
            contents = {m.metadata.dst_node_id: m.content for m in sent}
            outcome = secure_sum(grid, server_round, contents, shapes, self.mode.secagg.plan(dim, self.server_sigma),
                                 needed, self.cfg.secagg.shares, self.cfg.federation.round_timeout)
        # the instruction bytes configure_train counted are replaced by what the four stages moved
        self.stats.bytes_down, self.stats.bytes_up = outcome.bytes_down, outcome.bytes_up
        self.stats.received = self.stats.accepted = len(outcome.survivors)
        for failure in outcome.failures:
            self.stats.dropped.append(f"secure aggregation: {failure}")
            log.warning("round %d: secure aggregation: %s", server_round, failure)
        if outcome.failures and not self.cfg.secagg.dropout_rate:
            log.warning("round %d: secure aggregation: sampled nodes dropped out but secagg-dropout-rate is 0: "
                        "delta_extra does not count refusals they cause (declare the rate)", server_round)
        agg = self.mode.secagg.aggregate(outcome.total, len(outcome.survivors), self.server_sigma, dim, self._noise_gen)
        if agg is None:
            self.stats.accepted = 0
            log.warning("round %d: secure aggregation: %s; global adapter unchanged", server_round, outcome.reason)
            return
        for k, v in agg.items():
            self.global_weights[k] += v

    def _drop_norm_outliers(self, server_round, updates, weights, senders):
        """Without a bound the server enforces (no DP, or example-level DP), an update whose norm is
        more than OUTLIER_FACTOR x the round's median is dropped: one client cannot blow up the
        global adapter. (Client-level modes bound every update by clipping instead.)"""
        norms = [float(global_norm(list(u.values()))) for u in updates]
        limit = OUTLIER_FACTOR * statistics.median(norms)
        kept_u, kept_w = [], []
        for u, w, node, norm in zip(updates, weights, senders, norms):
            if norm > limit:
                reason = f"update norm {norm:.4g} > {OUTLIER_FACTOR:g} x round median ({limit / OUTLIER_FACTOR:.4g})"
                self.stats.dropped.append(f"node {node}: {reason}")
                log.warning("round %d: dropped reply from node %s: %s", server_round, node, reason)
                continue
            kept_u.append(u)
            kept_w.append(w)
        return kept_u, kept_w

    # -------------------------------------------------------------- federated evaluation
    def federated_evaluate(self, server_round: int, config: ConfigRecord, grid: Grid) -> dict[str, Any] | None:
        """Sampled nodes score the global adapter on their own held-out data (fraction-evaluate).

        Returns per-node metrics and their means weighted by each node's example count (macro-F1:
        the weighted mean of the nodes' own macro-F1), or None when no node was asked. The numbers
        describe private data: the caller writes them to the operator log only."""
        frac = self.cfg.federation.fraction_evaluate
        nodes = sorted(grid.get_node_ids())
        if frac <= 0 or not nodes:
            return None
        chosen = sorted(self._eval_rng.sample(nodes, max(1, min(len(nodes), round(frac * len(nodes))))))
        config = ConfigRecord({**dict(config), protocol.ROUND: server_round})
        record = RecordDict({"arrays": self.global_record(), "config": config})
        sent = list(self._construct_messages(record, chosen, MessageType.EVALUATE))
        to_node = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
        replies = grid.send_and_receive(sent, timeout=self.cfg.federation.round_timeout)
        per_node, failed, declined = [], [], []
        for msg in replies:
            node = to_node.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            if msg.has_error() or "metrics" not in msg.content.metric_records:
                reason = msg.error.reason if msg.has_error() else "no metrics in reply"
                failed.append(f"node {node}: {reason}")
                log.warning("round %d: federated evaluation: node %s: %s", server_round, node, reason)
                continue
            metrics = dict(msg.content["metrics"])
            if metrics.get(protocol.EVAL_DECLINED) or "num-examples" not in metrics:  # its policy: no metrics of its file
                why = msg.content.config_records.get(protocol.EVAL_DECLINED_REASON, {}).get("reason", "no metrics in reply")
                declined.append(f"node {node}: {why}")
                log.info("round %d: federated evaluation: node %s declined: %s", server_round, node, why)
                continue
            for key in protocol.NEVER_FROM_NODE:  # even from a node that sent it: never kept
                metrics.pop(key, None)
            per_node.append({"node_id": node, **metrics})
        total = sum(int(m["num-examples"]) for m in per_node)
        means = {}
        for key in ("accuracy", "loss", "macro-f1"):
            have = [m for m in per_node if key in m]
            n = sum(int(m["num-examples"]) for m in have)
            if n:
                means[key] = sum(float(m[key]) * int(m["num-examples"]) for m in have) / n
        return {"asked": len(chosen), "replied": len(per_node), "declined": declined, "failed": failed,
                "num-examples": total, "weighted": means, "nodes": per_node}

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to continue sampling and noise exactly where they were."""
        return {
            "global_weights": {k: v.clone() for k, v in self.global_weights.items()},
            # only seeded (non-secure) runs keep the sampling state: whoever reads it could replay it
            "rng": None if isinstance(self._rng, random.SystemRandom) else self._rng.getstate(),
            "noise_gen": self._noise_gen.get_state() if self._noise_gen is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if set(state["global_weights"]) != set(self.global_weights):
            raise ValueError("checkpoint adapter keys do not match this LoRA config")
        self.global_weights = {k: v.clone().float() for k, v in state["global_weights"].items()}
        if state.get("rng") is not None and not isinstance(self._rng, random.SystemRandom):
            version, internal, gauss = state["rng"]
            self._rng.setstate((version, tuple(internal), gauss))
        if self._noise_gen is not None and state["noise_gen"] is not None:
            self._noise_gen.set_state(state["noise_gen"])

    def global_record(self, keys: Iterable[str] | None = None) -> ArrayRecord:
        """The broadcast form of the current global adapter (in the transfer dtype), or of `keys` of it."""
        weights = self.global_weights if keys is None else {k: self.global_weights[k] for k in keys}
        return to_array_record(weights, self.cfg.federation.transfer_dtype)

    def summary(self) -> None:
        log.info("DPLoRAFedAvg: dp-mode=%s fraction-train=%.3f", self.mode.name, self.fraction_train)
