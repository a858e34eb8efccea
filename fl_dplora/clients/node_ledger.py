"""A node's own privacy ledger: durable, append-only, charged before its data is used (write-ahead).

One JSONL file per run and data file (`max-epsilon` composes every run's file on the same data,
node_policy.prior_runs), next to the node's ε log
(`<log stem>.run-<run id>.data-<hash of the data-path>.ledger.jsonl`, owner-only,
every line fsynced before the node trains). It outlives the ClientApp process and the SuperNode: a
fresh process on the same node with the same run id continues it, so the node's `max-epsilon` check
and its ε log never start again from zero. A node without an ε log (the simulation's virtual nodes)
keeps the same lines in memory (Flower's `context.state`).

Lines:
- `{"event": "charge", "round", "unit", "sigma", "rate", "steps"}`: one per attempt the node began,
  written before it trains; a rerun of a round after a server crash is a second attempt, charged again.
  Optional: `"adjacency": "replace-one"` (the node's n set q and was released: sample_rate.py) and
  `"server-sees": true` (local or distributed noise: the server got the node's own noise alone).
- `{"event": "adopt", "sigmas", "rates", "steps"}`: the example-level ledger the server handed back
  after a resume, taken only when it extends what this node has charged (it knows more: never less).

What a node has spent (pure Python, no Flower):
- example level (dp-mode sample): the adopted ledger, then every charge's (σ, q, steps) event;
- client level: the run's ledger has one event per round of the run (Poisson client sampling), so
  the node counts `max(round)` events plus one per attempt that did not advance the round (a rerun,
  or a server that repeats a round number): never `steps × server_round` alone. Each attempt is
  composed at the σ it charged, each skipped round at the smallest σ charged. With local or
  distributed noise the node also bounds what the server saw: its own attempts at rate 1 (the
  server knows who took part, so sampling amplifies nothing), modes.epsilon_against_server.
"""

from __future__ import annotations

import glob
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fl_dplora.privacy.accounting import PrivacyLedger, extends

STATE_KEY = "node-ledger"  # in context.state when the node keeps no file


def ledger_path(log_path: Path, run_id: int, data_key: str = "") -> Path:
    """The node's ledger for one run and one data file (node_policy.data_key), next to its ε log."""
    data = f".data-{data_key}" if data_key else ""
    return log_path.with_name(f"{log_path.stem}.run-{int(run_id)}{data}.ledger.jsonl")


def other_runs(log_path: Path, run_id: int, data_key: str) -> list[Path]:
    """The ledgers of every other run on the same data file next to this ε log: a server that starts a
    new `flwr run` gets a new run id, never a fresh budget on the same records."""
    if not data_key:
        return []
    mine = ledger_path(log_path, run_id, data_key)
    pattern = f"{glob.escape(log_path.stem)}.run-*.data-{data_key}.ledger.jsonl"  # a stem may hold [ or *
    return sorted(p for p in log_path.parent.glob(pattern) if p != mine)


def _read(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash: its fsync never returned, nothing was trained
            continue
    return lines


class NodeLedger:
    def __init__(self, path: Path | None = None, lines: Iterable[Mapping[str, Any]] = ()) -> None:
        self.path = path
        self.lines: list[dict[str, Any]] = [dict(x) for x in lines]

    @classmethod
    def open(cls, path: Path | None, memory: str = "") -> NodeLedger:
        """The file's ledger (`path`), or the in-memory one (`memory`: the JSON kept in context.state)."""
        if path is not None:
            return cls(path, _read(path))
        return cls(None, json.loads(memory) if memory else [])

    def to_json(self) -> str:
        return json.dumps(self.lines)

    def _append(self, line: dict[str, Any]) -> None:
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **line}
        if self.path is not None:  # durable before anything else happens
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.fchmod(fd, 0o600)
                size = os.fstat(fd).st_size
                cut = size > 0 and os.pread(fd, 1, size - 1) != b"\n"  # a line a crash cut: end it, keep it unread
                os.write(fd, (("\n" if cut else "") + json.dumps(line) + "\n").encode())
                os.fsync(fd)
            finally:
                os.close(fd)
        self.lines.append(line)

    # ---------------------------------------------------------------- example level
    def example_ledger(self, adjacency: str = "add-remove") -> PrivacyLedger:
        """Every example-level event, accounted under replace-one once any charge released the node's
        size (sample_rate.py): from then on only replace-one statements mean anything, and the bound
        holds for every event (each one's RDP curve is valid whatever set its q)."""
        ledger = PrivacyLedger()
        for line in self.lines:
            if line["event"] == "adopt":
                ledger = PrivacyLedger.from_record(line)
            elif line["event"] == "charge" and line.get("unit") == "example":
                ledger.step(float(line["sigma"]), float(line["rate"]), int(line["steps"]))
                if line.get("adjacency") == "replace-one":
                    adjacency = "replace-one"
        return PrivacyLedger(ledger.history, "replace-one" if "replace-one" in (adjacency, ledger.adjacency) else "add-remove")

    def adopt(self, record: Mapping[str, Sequence] | None, adjacency: str = "add-remove") -> bool:
        """Take the server's handed-back example-level ledger if it holds more than this node's."""
        if not record:
            return False
        mine = self.example_ledger(adjacency).to_record()
        theirs = PrivacyLedger.from_record(record).to_record()
        if theirs == mine or not extends(mine, theirs):
            return False
        self._append({"event": "adopt", **theirs})
        return True

    # ---------------------------------------------------------------- client level
    def charges(self, unit: str) -> list[tuple[int, float, float]]:
        """(round, σ, rate) of every attempt charged at this unit, in the order begun."""
        return [(int(x["round"]), float(x["sigma"]), float(x["rate"]))
                for x in self.lines if x["event"] == "charge" and x.get("unit") == unit]

    def attempts(self, unit: str) -> list[int]:
        return [r for r, _, _ in self.charges(unit)]

    @staticmethod
    def rounds_charged(rounds: Sequence[int]) -> int:
        """Events of the run's client-level ledger after these attempts (in the order begun)."""
        count, top = 0, 0
        for r in rounds:
            count += max(0, r - top) if r > top else 1  # a new round adds the rounds up to it; a rerun adds one
            top = max(top, r)
        return count

    def client_events(self, unit: str, server_round: int, sigma: float, rate: float) -> list[tuple[float, float, int]]:
        """The run's client-level ledger as this node bounds it, were it to attempt `server_round` at
        (σ, rate): every attempt at the σ and rate it charged (a server that lowered σ mid-run is
        counted at the lower σ, never at today's), and every round it skipped (Poisson sampling
        makes each round of the run an event for every client) at the most expensive of them."""
        attempts = [*self.charges(unit), (int(server_round), float(sigma), float(rate))]
        events = [(s, q, 1) for _, s, q in attempts]
        skipped = self.rounds_charged([r for r, _, _ in attempts]) - len(attempts)
        if skipped > 0:
            events.append((min(s for _, s, _ in attempts), max(q for _, _, q in attempts), skipped))
        return events

    def client_history(self, unit: str, server_round: int, sigma: float, rate: float) -> list[tuple[float, float, int]]:
        """The run's client-level events as this node bounds them before it attempts `server_round`:
        its attempts, and the rounds before it that it skipped (at the smallest σ it charged, else
        `sigma`). More than server_round - 1 of them: an attempt was rerun (modes.remaining_noise_multipliers)."""
        attempts = self.charges(unit)
        top = max((r for r, _, _ in attempts), default=0)
        skipped = self.rounds_charged([r for r, _, _ in attempts]) + max(0, server_round - 1 - top) - len(attempts)
        events = [(s, q, 1) for _, s, q in attempts]
        if skipped > 0:
            events.append((min((s for _, s, _ in attempts), default=sigma),
                           max((q for *_, q in attempts), default=rate), skipped))
        return events

    def spent(self) -> PrivacyLedger:
        """Every event this (finished or interrupted) run charged: its example-level ledger, and for a
        client-level unit every attempt and every round before the last it skipped, as client_history
        bounds them; replace-one when the example ledger is (sample_rate.py)."""
        ledger = self.example_ledger()
        for event in self._client_level_events():
            ledger.step(*event)
        return ledger

    def _client_level_events(self) -> list[tuple[float, float, int]]:
        """Every client-level unit's attempts and the rounds before its last attempt it skipped, as
        client_history bounds them."""
        events = []
        for unit in dict.fromkeys(x.get("unit") for x in self.lines if x["event"] == "charge"):
            charges = self.charges(unit) if unit != "example" else []
            if charges:
                top = max(r for r, _, _ in charges)
                events += self.client_history(unit, top + 1, charges[-1][1], charges[-1][2])
        return events

    def spent_for(self, unit: str) -> PrivacyLedger | None:
        """What this run spent, stated for the unit `unit` protects (per-unit budgets). For "example":
        its example-level events, and each client-level event at σ/2 and rate 1: one example changed
        moves the node's clipped update by up to 2C (a replacement of the whole update), and the
        server's sampling of nodes is not counted. For a client-level unit: its events, or None when
        this run protected single examples, which bounds nothing about a whole node's participation."""
        ledger = self.example_ledger()
        if unit != "example":
            return None if ledger.history else self.spent()
        for sigma, _, k in self._client_level_events():
            ledger.step(sigma / 2.0, 1.0, k)
        return ledger

    def server_sees_sigmas(self) -> list[float]:
        """σ of every attempt whose own noise alone stood between the data and the server (any unit)."""
        return [float(x["sigma"]) for x in self.lines if x["event"] == "charge" and x.get("server-sees")]

    def attempt_sigmas(self, unit: str, sigma: float) -> list[float]:
        """σ of every attempt this node began, this one (at `sigma`) included: what the server saw."""
        return [s for _, s, _ in self.charges(unit)] + [float(sigma)]

    # ---------------------------------------------------------------- both
    def charge(self, server_round: int, unit: str, sigma: float, rate: float, steps: int,
               adjacency: str = "add-remove", server_sees: bool = False) -> None:
        """Write-ahead: this attempt is on disk before the node touches its data for it. `server_sees`:
        the server gets this node's own noise alone (local or distributed noise: ε against the server)."""
        extra = {"adjacency": adjacency} if adjacency != "add-remove" else {}
        if server_sees:
            extra["server-sees"] = True
        self._append({"event": "charge", "round": int(server_round), "unit": unit, "sigma": float(sigma),
                      "rate": float(rate), "steps": int(steps), **extra})
