"""Write-ahead accounting and the operator log: what a run did, kept apart from what it releases.

`rounds.wal` (owner-only, each line fsynced): before a round's train messages go out the server
records that the round began and whom it asked; as soon as the replies are in, the ledgers they
reported. A resume charges every round begun after its checkpoint (once per attempt, so a rerun
round counts twice): the server's client-level ledger gets one event per attempt (at the σ the
begin row records; after a resume σ is recalibrated for the rounds left), and each asked
client's example-level ledger continues from the last ledger it reported, plus a worst-case charge
for every later attempt whose replies never arrived. Without it, a server killed between replies
and checkpoint would rerun the round with fresh noise and report the ε of one run.

`operator.jsonl`: per-round operational facts (sampled/accepted counts, dropped nodes and why,
bytes, timings). They depend on who took part and are not DP: the operator's, not for release.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WAL = "rounds.wal"
OPERATOR_LOG = "operator.jsonl"


def _append(path: Path, row: Mapping[str, Any]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (json.dumps(row) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Attempt:
    id: str
    round: int
    asked: list[str]
    ledgers: dict[str, dict[str, list]] | None  # None: its replies never reached the log
    sigma: float | None = None  # the accountant's σ of a client-level round (None: a log without it)


class WriteAhead:
    def __init__(self, out_dir: Path, fresh: bool) -> None:
        self.path = out_dir / WAL
        self.operator_path = out_dir / OPERATOR_LOG
        if fresh:
            for p in (self.path, self.operator_path):
                p.unlink(missing_ok=True)

    def begin(self, rnd: int, asked: Iterable[str], sigma: float | None = None) -> str:
        attempt = uuid.uuid4().hex
        row = {"event": "begin", "attempt": attempt, "round": rnd, "asked": list(asked)}
        _append(self.path, row if sigma is None else {**row, "sigma": float(sigma)})
        return attempt

    def replied(self, attempt: str, rnd: int, ledgers: Mapping[str, Mapping[str, list]]) -> None:
        _append(self.path, {"event": "ledgers", "attempt": attempt, "round": rnd, "ledgers": dict(ledgers)})

    def operator(self, row: Mapping[str, Any]) -> None:
        _append(self.operator_path, row)

    def unaccounted(self, checkpoint_round: int) -> list[Attempt]:
        """Every attempt at a round after the checkpoint's, in the order they began."""
        if not self.path.is_file():
            return []
        attempts: dict[str, Attempt] = {}
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the crash: its fsync never returned
                continue
            if int(row.get("round", 0)) <= checkpoint_round:
                continue
            if row["event"] == "begin":
                attempts[row["attempt"]] = Attempt(row["attempt"], int(row["round"]), list(row["asked"]), None,
                                                  row.get("sigma"))
            elif row["event"] == "ledgers" and row["attempt"] in attempts:
                attempts[row["attempt"]].ledgers = dict(row["ledgers"])
        return list(attempts.values())


def read_operator(out_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(per-round rows, the run's summary row) of a run's operator log; empty when it has none."""
    path = Path(out_dir) / OPERATOR_LOG
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    summaries = [r for r in rows if r.get("event") == "summary"]
    return [r for r in rows if "event" not in r], (summaries[-1] if summaries else {})
