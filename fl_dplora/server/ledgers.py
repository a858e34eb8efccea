"""The server's privacy bookkeeping: its own ledger (client-level modes), its copy of each node's
ledger (example-level modes) and the run's ε, all through the run's one PrivacyEngine (RunState.engine:
its ledger is the server's own; the nodes' copies are read at its target, δ and accountant).

The server's copies are keyed by the node's Flower node id (the SuperLink's authenticated identity
of the replying node), never by a number the node reports.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, NamedTuple

from fl_dplora import protocol
from fl_dplora.privacy.accounting import PrivacyLedger, extends
from fl_dplora.privacy.engine import PrivacyEngine
from fl_dplora.train import stage_config
from fl_dplora.write_ahead import WriteAhead

log = logging.getLogger("fl_dplora")


class Charge(NamedTuple):
    """A round's charge on the server's own ledger, computed before the round starts.

    event None: the server charges nothing itself (example-level DP, or no DP)."""

    event: tuple | None
    ledger: PrivacyLedger | None = None
    epsilon: float | None = None


def charge_round(mode, engine: PrivacyEngine, server_sigma: float, accountant_sigma: float, rnd: int,
                 rounds: int) -> Charge | None:
    """Every round is accounted (Poisson client sampling): never start one that overruns the budget.
    None (logged) when round `rnd` (of `rounds`) would. The engine's ledger is not changed here."""
    event = mode.round_event(accountant_sigma)
    if event is None:
        return Charge(None)
    next_ledger, next_epsilon = engine.projected(event)
    if not engine.allows(next_epsilon):
        log.error("stopping early: round %d would raise epsilon to %.4g > target-epsilon %g "
                  "(noise-multiplier %g is too small for %d rounds; set it <= 0 to calibrate)",
                  rnd, next_epsilon, engine.target_epsilon, server_sigma, rounds)
        return None
    return Charge(event, next_ledger, next_epsilon)


def run_epsilon(mode, engine: PrivacyEngine, client_ledgers: Mapping[str, Mapping[str, list]]) -> float:
    """The run's ε: the server's own ledger (client-level), or the worst node's (example-level)."""
    if mode.client_level:
        return engine.epsilon()
    if mode.example_level:
        return max((engine.epsilon(PrivacyLedger.from_record(r)) for r in client_ledgers.values()), default=0.0)
    return 0.0


def charge_unaccounted(attempts, mode, accountant_sigma: float, engine: PrivacyEngine,
                       client_ledgers: dict[str, dict[str, list]], client_eps: dict[int, dict[str, Any]], cfg) -> int:
    """Charge every round begun after the checkpoint (write_ahead.py), in the order they began."""
    for att in attempts:
        event = mode.round_event(accountant_sigma if att.sigma is None else float(att.sigma))
        if event is not None:
            engine.charge(event)  # begun: charged, whatever the budget (the next round's guard stops the run)
        if not mode.example_level:
            continue
        if att.ledgers is not None:  # the ledgers its replies reported (they include that round)
            client_ledgers.update({k: dict(v) for k, v in att.ledgers.items()})
            continue
        for key in att.asked:  # replies lost: the worst case of that round for each asked client
            if key not in client_ledgers:
                log.warning("resume: node %s was asked in round %d but never reported a ledger; it cannot be charged here "
                            "(its own ledger, if it kept one, is charged on the node)", key, att.round)
                continue
            charge_worst_case(key, att.round, client_ledgers, client_eps, cfg)
    for key in client_ledgers:  # what the summary reports per client follows the ledger
        refresh_client_eps(key, client_ledgers, client_eps, engine)
    return len(attempts)


def charge_worst_case(key: str, rnd: int, client_ledgers: dict[str, dict[str, list]],
                      client_eps: dict[int, dict[str, Any]], cfg) -> None:
    """One round's steps on the server's copy of a node's ledger, with the σ and q it last reported."""
    ledger = PrivacyLedger.from_record(client_ledgers[key])
    known = client_eps.get(int(key), {}) if key.isdigit() else {}
    sigma = float(known.get("sigma", ledger.history[-1][0] if ledger.history else 0.0))
    rate = float(known.get("sample-rate", 1.0))
    n = int(round(cfg.train.batch_size / rate)) if 0 < rate < 1 else 1  # q unknown -> q = 1
    stage = stage_config(cfg, rnd, n)
    ledger.step(sigma, min(1.0, stage.train.batch_size / n) if n > 1 else 1.0, stage.train.local_steps)
    client_ledgers[key] = ledger.to_record()


def refresh_client_eps(key: str, client_ledgers, client_eps: dict[int, dict[str, Any]], engine: PrivacyEngine) -> None:
    if key.isdigit() and int(key) in client_eps:
        ledger = PrivacyLedger.from_record(client_ledgers[key])
        client_eps[int(key)].update(epsilon=engine.epsilon(ledger), **{"steps-total": ledger.total_steps})


def take_reported_ledger(m: Mapping[str, Any], rnd: int, client_ledgers: dict[str, dict[str, list]],
                         client_eps: dict[int, dict[str, Any]], wal: WriteAhead, engine: PrivacyEngine, cfg) -> bool:
    """Store the ledger a node's reply reports, under the node's Flower node id (set by the server from
    the message the reply answers, never from the reply's metrics). A report that does not extend the
    stored ledger (shorter, or another history) is rejected: the stored one stays, charged with this
    round's steps if the node trained, and the rejection goes to the operator log. True if taken."""
    key = str(int(m["node_id"]))
    reported = protocol.ledger_from_metrics(m)
    stored = client_ledgers.get(key)
    if stored is None or extends(stored, reported):
        client_eps[int(key)] = {k: v for k, v in m.items() if not k.startswith(protocol.LEDGER_PREFIX)}
        client_ledgers[key] = reported
        return True
    trained = not m.get(protocol.BUDGET_EXHAUSTED)
    why = (f"reported ledger ({sum(reported['steps'])} steps) does not extend the stored one "
           f"({sum(stored['steps'])} steps)")
    log.warning("round %d: node %s: %s; kept the stored ledger%s", rnd, key, why,
                ", charged with this round's steps" if trained else "")
    wal.operator({"round": rnd, "event": "ledger-rejected", "node": key, "partition-id": m.get("partition-id"),
                  "why": why, "stored": dict(stored), "reported": reported, "charged": trained})
    if trained:
        charge_worst_case(key, rnd, client_ledgers, client_eps, cfg)
    refresh_client_eps(key, client_ledgers, client_eps, engine)
    return False


def handback(client_ledgers: Mapping[str, Mapping[str, list]], client_eps: Mapping[int, Mapping[str, Any]]):
    """The ledgers a resumed run sends its nodes: by node id, and (for a simulation restarted with new
    node ids) the longest one per reported partition label. A node adopts one only if it extends its own."""
    out: dict[str, Any] = dict(client_ledgers)
    for key, record in client_ledgers.items():
        label = client_eps.get(int(key), {}).get("partition-id") if key.isdigit() else None
        if label is None:
            continue
        name = f"{protocol.LABEL_KEY_PREFIX}{int(label)}"
        if name not in out or sum(record["steps"]) > sum(out[name]["steps"]):
            out[name] = dict(record)
    return out
