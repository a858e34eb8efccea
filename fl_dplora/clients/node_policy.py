"""What a node accepts, whatever the server asks: its own privacy floor and ε log.

An organisation sets these in its SuperNode's node config (`flower-supernode --node-config ...`):

- `max-epsilon`: the most ε this node's data may spend. The node refuses to train (before touching
  its data) when the run's dp-mode gives no ε (none), when the run targets more, when this round
  would take its own ledger past it (a fixed noise-multiplier), or, for a node with its own
  `data-path`, when every run's ledger on that file composed would pass it: a server that starts a
  new `flwr run` gets a new run id, not a new budget on the same records.
- `max-delta`: the largest δ at which this node states its ε (default: 1e-5 when `max-epsilon` is
  set). The node checks `max-epsilon`, and calibrates its own DP-SGD noise, at min(run's δ,
  max-delta): a server that sends δ = 0.1 cannot make an ε look small.
- `require-dp-mode`: comma-separated dp-modes the node trains under (e.g. `"sample"`).
- `exact-eval`: `true` lets a node without a DP requirement answer federated evaluation with exact
  metrics of its `eval-path` file (outside any ε), in any run: the node decides from its own
  config, never from the dp-mode the evaluate message names; a node that requires DP never
  answers one (`NodePolicy.evaluation_refusal`).
- `shard-size`: a public number of examples this node declares for DP-SGD (dp-mode sample): its
  sample rate is batch-size / shard-size and the noisy sum is divided by the expected batch from it,
  so nothing the node sends depends on its file's size (privacy/sample_rate.py; ε under add/remove).
  Without it a node with its own file sets q from its n, which is then released, and accounts under
  replace-one (the adjacency consistent with a public size).
- `epsilon-log`: a JSONL file on the node: one line per round it trained (its ε, δ, dp-mode, unit)
  or refused (why). Default: `~/.fl-dplora/node-epsilon.jsonl` on a node with its own `data-path`
  (a real organisation), none for the simulation's virtual nodes.

Next to the ε log the node keeps its privacy ledger for each run (node_ledger.py:
`<log stem>.run-<run id>.data-<data hash>.ledger.jsonl`, append-only, fsynced, owner-only), charged before it trains:
it survives a restart of the SuperNode, and `max-epsilon` is checked against it, not against what
the server says. A node without an ε log keeps its ledger in memory (`context.state`).

A refusal raises NodeRefusal: Flower returns it to the server as the node's error reply, the server
logs it with the node id and the round goes on with the other nodes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl_dplora.config import ConfigError, DP_MODES, RunConfig, SCHEMA
from fl_dplora.privacy.accounting import PrivacyLedger

DEFAULT_MAX_DELTA = float(SCHEMA["delta"].default)  # a max-epsilon without a max-delta: the package's δ

def default_log() -> Path:
    """`$FL_DPLORA_HOME/node-epsilon.jsonl` (default home `~/.fl-dplora`)."""
    return Path(os.environ.get("FL_DPLORA_HOME") or "~/.fl-dplora").expanduser() / "node-epsilon.jsonl"


def data_key(node: Mapping[str, Any]) -> str:
    """Which data a ledger is for: its resolved `data-path`, else its partition. Two nodes that share
    one ε log (the default one, on one machine) keep separate ledgers; two that train the same file
    share one, since the same people's records are used twice."""
    if node.get("data-path"):
        ident = str(Path(os.path.expanduser(str(node["data-path"]))).resolve())
    elif node.get("partition-id") is not None:
        ident = f"partition-{node['partition-id']}"
    else:
        return ""
    return hashlib.sha256(ident.encode()).hexdigest()[:12]


class NodeRefusal(ConfigError):
    """This node will not train in this run (its own policy); the message says why."""


@dataclass(frozen=True)
class NodePolicy:
    max_epsilon: float | None = None
    allowed_modes: tuple[str, ...] | None = None
    log_path: Path | None = None
    data_key: str = ""
    shard_size: int | None = None
    max_delta: float | None = None
    own_file: bool = False  # data_key names a data-path (composed across runs), not a simulation partition

    @classmethod
    def from_node_config(cls, node: Mapping[str, Any]) -> NodePolicy:
        max_eps = node.get("max-epsilon")
        if max_eps is not None:
            try:
                max_eps = float(max_eps)
            except (TypeError, ValueError):
                raise ConfigError(f"node-config max-epsilon: expected a number, got {max_eps!r}") from None
            if not max_eps > 0:
                raise ConfigError(f"node-config max-epsilon: must be > 0, got {max_eps}")
        modes = None
        if node.get("require-dp-mode"):
            modes = tuple(m.strip() for m in str(node["require-dp-mode"]).split(",") if m.strip())
            bad = [m for m in modes if m not in DP_MODES]
            if bad:
                raise ConfigError(f"node-config require-dp-mode: {', '.join(bad)} not one of {', '.join(DP_MODES)}")
        shard_size = node.get("shard-size")
        if shard_size is not None:
            if isinstance(shard_size, bool) or not isinstance(shard_size, int | str) or not str(shard_size).strip().isdigit() \
                    or int(shard_size) < 1:
                raise ConfigError(f"node-config shard-size: expected a whole number >= 1, got {shard_size!r}")
            shard_size = int(shard_size)
        max_delta = node.get("max-delta")
        if max_delta is not None:
            try:
                max_delta = float(max_delta)
            except (TypeError, ValueError):
                raise ConfigError(f"node-config max-delta: expected a number, got {max_delta!r}") from None
            if not 0 < max_delta < 1:
                raise ConfigError(f"node-config max-delta: must be in (0, 1), got {max_delta}")
        elif max_eps is not None:
            max_delta = DEFAULT_MAX_DELTA
        log = node.get("epsilon-log")
        if log:
            log_path = Path(os.path.expanduser(str(log)))
        elif node.get("data-path") or max_eps is not None:
            # a floor needs a ledger that survives a restart: without one a restarted node starts from zero
            log_path = default_log()
        else:
            log_path = None
        return cls(max_eps, modes, log_path, data_key(node), shard_size, max_delta, bool(node.get("data-path")))

    @property
    def active(self) -> bool:
        return self.max_epsilon is not None or self.log_path is not None

    def ledger_path(self, run_id: int) -> Path | None:
        """This node's durable ledger for the run, next to its ε log (None: kept in memory)."""
        from fl_dplora.clients.node_ledger import ledger_path

        return None if self.log_path is None else ledger_path(self.log_path, run_id, self.data_key)

    def check_run(self, cfg: RunConfig, unit: str | None) -> None:
        """Before any data is read: the run's dp-mode and planned budget against this node's floor."""
        if self.allowed_modes is not None and cfg.privacy.dp_mode not in self.allowed_modes:
            raise NodeRefusal(f"node policy: dp-mode {cfg.privacy.dp_mode} is not one this node trains under "
                              f"(require-dp-mode {', '.join(self.allowed_modes)})")
        if self.max_epsilon is None:
            return
        if unit is None:
            raise NodeRefusal(f"node policy: dp-mode none gives no epsilon; this node allows at most {self.max_epsilon:g}")
        if cfg.privacy.noise_multiplier <= 0 and cfg.privacy.target_epsilon > self.max_epsilon * (1 + 1e-9):
            raise NodeRefusal(f"node policy: the run targets epsilon {cfg.privacy.target_epsilon:g}; this node allows at "
                              f"most max-epsilon {self.max_epsilon:g}")

    def delta(self, run_delta: float) -> float:
        """The δ this node states its ε at: the run's, never above its own `max-delta`."""
        return float(run_delta) if self.max_delta is None else min(float(run_delta), self.max_delta)

    def prior_runs(self, run_id: int, unit: str = "example") -> tuple[PrivacyLedger | None, int, list[float]] | None:
        """What every other run on this node's data file charged, composed for the unit this run
        protects (NodeLedger.spent_for; None: a run there bounds nothing for that unit), how many
        runs, and the σ of their attempts the server saw with the node's own noise alone; None when
        the node keeps no file ledger or has no data file of its own."""
        from fl_dplora.clients.node_ledger import NodeLedger, other_runs

        if self.log_path is None or not self.own_file:
            return None
        runs = [NodeLedger.open(p) for p in other_runs(self.log_path, run_id, self.data_key)]
        ledgers = [r.spent_for(unit) for r in runs]
        seen = [s for r in runs for s in r.server_sees_sigmas()]
        if any(x is None for x in ledgers):
            return None, len(ledgers), seen
        adjacency = "replace-one" if any(x.adjacency == "replace-one" for x in ledgers) else "add-remove"
        return PrivacyLedger([e for x in ledgers for e in x.history], adjacency), len(ledgers), seen

    def check_round(self, epsilon_after: float, against_server: float | None = None,
                    data_file: tuple[float, int] | None = None) -> None:
        """The ε this node's data would have spent once this round is done: the run's, with local or
        distributed noise also the one against the server (its own noise at rate 1), and every run's
        on its data file composed (`data_file`: (ε, runs))."""
        if self.max_epsilon is None:
            return
        if epsilon_after > self.max_epsilon * (1 + 1e-9):
            raise NodeRefusal(f"node policy: this round would raise this node's epsilon to {epsilon_after:.4g} > "
                              f"max-epsilon {self.max_epsilon:g}")
        if against_server is not None and against_server > self.max_epsilon * (1 + 1e-9):
            raise NodeRefusal(f"node policy: this round would raise this node's epsilon against the server (its own "
                              f"noise, no amplification by the server's sampling) to {against_server:.4g} > "
                              f"max-epsilon {self.max_epsilon:g}")
        if data_file is not None and math.isinf(data_file[0]):
            raise NodeRefusal(f"node policy: an earlier run on this node's data file protected single examples only, "
                              f"which bounds no whole-node (client-level) epsilon: max-epsilon {self.max_epsilon:g} "
                              f"cannot hold over its {data_file[1]} runs")
        if data_file is not None and data_file[0] > self.max_epsilon * (1 + 1e-9):
            raise NodeRefusal(f"node policy: this round would raise the epsilon of this node's data file over its "
                              f"{data_file[1]} runs to {data_file[0]:.4g} > max-epsilon {self.max_epsilon:g}")

    @property
    def requires_dp(self) -> bool:
        """The node trains only under DP: a `max-epsilon`, or a `require-dp-mode` without `none`."""
        return self.max_epsilon is not None or (self.allowed_modes is not None and "none" not in self.allowed_modes)

    def evaluation_refusal(self, node: Mapping[str, Any]) -> str | None:
        """Why this node returns no metrics of its file to a federated evaluation, or None.

        Evaluation has no DP mechanism: its loss, accuracy, macro-F1 and count are exact answers
        about the node's file, charged to no ledger. So a node that requires DP never answers one,
        and a node with its own files answers only when its node config says `exact-eval = true`.
        Both from the node's own config alone: the dp-mode an evaluate message names is the server's
        word (a server could name none in it while training under DP). The simulation's virtual
        nodes (no files) score their slice of the task's public eval split."""
        if self.requires_dp:
            return ("node policy: federated evaluation releases exact metrics of this node's file, charged to no "
                    "ledger; this node requires DP (max-epsilon or require-dp-mode)")
        own_files = bool(node.get("eval-path") or node.get("data-path"))
        if own_files and str(node.get("exact-eval", "")).lower() not in ("true", "1"):
            return ("node policy: federated evaluation releases exact metrics of this node's file, outside any "
                    "epsilon; set exact-eval = true in the node config to allow it")
        return None

    def record(self, row: Mapping[str, Any]) -> None:
        """Append one line to the node's own ε log (owner-only file)."""
        if self.log_path is None:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        clean = {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in row.items()}
        with os.fdopen(fd, "a") as f:
            f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **clean}) + "\n")
