"""One privacy engine per party of a run, in the style of Opacus' `PrivacyEngine`: calibrate σ,
charge a ledger, report ε, guard the budget, and hand its state to a checkpoint.

The server holds one for its own ledger (client-level modes) and reads its copies of the nodes'
ledgers through it (server/ledgers.py); a node holds one for its DP-SGD ledger, at its own δ
(clients/node_privacy.py, clients/local_update.py); the client-level modes calibrate through it
(privacy/modes/client.py). The arithmetic is accounting.py's (Opacus' accountants); what is written
once here is which target, δ and accountant it runs at, and the budget guard's tolerance.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from fl_dplora.privacy.accounting import Event, PrivacyLedger, calibrate_remaining, calibrate_schedule

# Relative slack of every comparison against a calibrated value: two bisections (node and server, or
# one before and one after a resume) land within rounding of each other, never more than this apart.
BUDGET_TOLERANCE = 1e-6

if TYPE_CHECKING:
    from fl_dplora.config import PrivacyConfig

Schedule = tuple[tuple[float, int], ...]  # (sample rate, steps) stages, every step at one σ


def within_budget(epsilon: float, target_epsilon: float) -> bool:
    """The budget guard: ε (after a charge) is within target-epsilon, up to BUDGET_TOLERANCE."""
    return epsilon <= target_epsilon * (1 + BUDGET_TOLERANCE)


def falls_short(value: float, floor: float) -> bool:
    """`value` is below `floor` by more than BUDGET_TOLERANCE (e.g. an announced σ below a node's own)."""
    return value < floor * (1 - BUDGET_TOLERANCE)


class PrivacyEngine:
    """The privacy arithmetic of one party (the server's own ledger, or one node's) at one target ε, δ
    and accountant: `calibrate` / `calibrate_remaining` for σ, `projected` and `charge` for the ledger,
    `epsilon`, the guard `allows`, and `state_dict` / `load_state_dict` (the ledger's record, the format
    checkpoints always had)."""

    def __init__(self, target_epsilon: float, delta: float, accountant: str = "prv",
                 ledger: PrivacyLedger | None = None) -> None:
        self.target_epsilon, self.delta, self.accountant = target_epsilon, delta, accountant
        self.ledger = ledger if ledger is not None else PrivacyLedger()

    @classmethod
    def for_run(cls, privacy: PrivacyConfig, ledger: PrivacyLedger | None = None,
                delta: float | None = None) -> PrivacyEngine:
        """From the run config's privacy section (`cfg.privacy`); `delta`: a party's own δ (a node's
        max-delta), else the run's."""
        return cls(privacy.target_epsilon, privacy.delta if delta is None else delta, privacy.accountant, ledger)

    # ------------------------------------------------------------------ calibration
    def calibrate(self, schedule: Schedule, adjacency: str = "add-remove") -> float:
        """The smallest σ (to 1 %) such that every step of `schedule` at σ keeps ε <= target."""
        return calibrate_schedule(self.target_epsilon, self.delta, tuple(schedule), self.accountant,
                                  adjacency=adjacency)

    def calibrate_remaining(self, charged: Iterable[Sequence[float]], remaining: Schedule, at_least: float = 0.0,
                            adjacency: str = "add-remove") -> float:
        """σ for the steps of `remaining` after the events already `charged` (σ, q, steps), all within the
        target, reaching `at_least` (the uninterrupted plan's ε) when it can; ConfigError when nothing is left."""
        return calibrate_remaining(self.target_epsilon, self.delta, tuple(tuple(e) for e in charged), tuple(remaining),
                                   self.accountant, at_least, adjacency=adjacency)

    def plan_epsilon(self, sigma: float, schedule: Schedule, adjacency: str = "add-remove") -> float:
        """ε of `schedule` with every step at σ (what an uninterrupted run would end at)."""
        return self.epsilon(PrivacyLedger(((sigma, q, k) for q, k in schedule), adjacency))

    # ------------------------------------------------------------------ accounting and the guard
    def epsilon(self, ledger: PrivacyLedger | None = None) -> float:
        """ε of this engine's ledger (or of `ledger`) at the engine's δ and accountant."""
        return (self.ledger if ledger is None else ledger).epsilon(self.delta, self.accountant)

    def allows(self, epsilon: float) -> bool:
        """The budget guard at this engine's target (within_budget)."""
        return within_budget(epsilon, self.target_epsilon)

    def projected(self, *events: Event) -> tuple[PrivacyLedger, float]:
        """(a copy of the ledger with `events` charged, its ε); the engine's own ledger is unchanged."""
        ledger = PrivacyLedger.from_record(self.ledger.to_record())
        for event in events:
            ledger.step(*event)
        return ledger, self.epsilon(ledger)

    def charge(self, *events: Event) -> None:
        """Charge `events` (σ, q, steps) to the ledger, unguarded: what was released is charged."""
        for event in events:
            self.ledger.step(*event)

    def try_charge(self, *events: Event) -> float | None:
        """Charge `events` only if ε stays within the target: ε after them, or None (nothing charged)."""
        ledger, epsilon = self.projected(*events)
        if not self.allows(epsilon):
            return None
        self.ledger = ledger
        return epsilon

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, list]:
        return self.ledger.to_record()

    def load_state_dict(self, state: Mapping[str, Sequence]) -> None:
        self.ledger = PrivacyLedger.from_record(state)

    def __repr__(self) -> str:
        return (f"PrivacyEngine(target_epsilon={self.target_epsilon!r}, delta={self.delta!r}, "
                f"accountant={self.accountant!r}, ledger={self.ledger!r})")
