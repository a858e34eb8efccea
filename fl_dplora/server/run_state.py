"""What a run carries from round to round, what its checkpoint holds, and resuming from one.

The checkpoint (checkpoint.py) is written every `checkpoint-every` rounds; the write-ahead log
(write_ahead.py) covers the rounds begun after it, so a resume charges them before round one more.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl_dplora import checkpoint
from fl_dplora.config import ConfigError, RunConfig
from fl_dplora.privacy.engine import PrivacyEngine
from fl_dplora.server.ledgers import Charge, charge_unaccounted, run_epsilon, take_reported_ledger
from fl_dplora.write_ahead import WriteAhead

log = logging.getLogger("fl_dplora")


@dataclass
class RunState:
    """Everything a round changes (and a checkpoint restores)."""

    server_sigma: float  # the noise the strategy adds (client-level modes)
    accountant_sigma: float  # the noise the accountant sees
    engine: PrivacyEngine  # the run's one privacy engine: its ledger is the server's own (client-level modes)
    client_eps: dict[int, dict[str, Any]] = field(default_factory=dict)
    # what the server knows of each node's ledger, keyed by the node's Flower node id (ledgers.py)
    client_ledgers: dict[str, dict[str, list]] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=lambda: {"up": 0, "down": 0})
    last_eval: dict[str, float] = field(default_factory=dict)  # rows between evaluations repeat the last one
    epsilon: float = 0.0
    rounds_done: int = 0
    resumed: bool = False


def check_resume_config(saved: Mapping[str, Any], cfg: RunConfig) -> None:
    """Resuming with other settings would not be the same run: name every key that differs.

    `saved` is a loaded checkpoint's config (checkpoint.load migrates it: a key added since it was
    written is there at the value its run computed with); a key it still lacks differs.
    """
    ignore = {"resume", "overwrite", "output-dir", "round-timeout", "save-every"}
    missing = object()  # a key the checkpoint lacks: differs from anything
    now = cfg.to_record()
    was = {k: saved[k] if k in saved else missing for k in now}
    diff = [k for k in now if k not in ignore and was[k] != now[k]]
    if diff:
        raise ConfigError("\n".join(f"{k}: {now[k]!r} differs from the checkpoint's "
                                     f"{None if was[k] is missing else was[k]!r}; resume with the same config"
                                     for k in diff))


def resume(state: RunState, resumed: Mapping[str, Any], strategy, wal: WriteAhead, mode, cfg: RunConfig,
           out_dir: Path) -> None:
    """Restore `state` and the strategy from a checkpoint, then charge the rounds begun after it."""
    strategy.load_state_dict(resumed["strategy"])
    state.resumed = True
    state.engine.load_state_dict(resumed["server_ledger"])
    state.client_eps = {int(k): v for k, v in resumed["client_eps"].items()}
    state.client_ledgers, state.totals = resumed["client_ledgers"], resumed["totals"]
    state.last_eval = dict(resumed.get("last_eval", {}))
    state.rounds_done = rounds_done = int(resumed["round"])
    charged = charge_unaccounted(wal.unaccounted(rounds_done), mode, state.accountant_sigma, state.engine,
                                 state.client_ledgers, state.client_eps, cfg)
    state.epsilon = run_epsilon(mode, state.engine, state.client_ledgers)
    rounds, ledger = cfg.federation.num_server_rounds, state.engine.ledger
    if mode.client_level and ledger.total_steps > rounds_done:  # a crash charged a lost attempt
        history = ledger.history
        again = mode.remaining_noise_multipliers(history, rounds - rounds_done, history[-1][0])
        if again is not None and again[1] != state.accountant_sigma:  # None: σ fixed, or nothing left to spend
            log.info("resume: %d attempts charged; noise multiplier %.4f -> %.4f so that the last %d round(s) fit "
                     "target-epsilon %g", ledger.total_steps, state.server_sigma, again[0],
                     rounds - rounds_done, cfg.privacy.target_epsilon)
            (state.server_sigma, state.accountant_sigma), strategy.server_sigma = again, again[0]
        # local noise: a node that began every attempt adds up to this σ (node_privacy.client_sigma); the
        # norm screen admits it, the top-up still assumes the config's σ (modes.ClientDP.aggregate)
        seen = mode.remaining_against_server([s for s, _, k in history for _ in range(k)], rounds - rounds_done)
        if seen is not None and mode.placement.node_shares:  # one σ for every share and the SecAgg+ grid, announced in
            # the instruction: no node's own recalibration exceeds it (node_privacy.share_sigma), the accountant keeps its own
            state.server_sigma = strategy.server_sigma = max(state.server_sigma, seen[0])
        elif seen is not None:
            strategy.reply_sigma = max(strategy.server_sigma, seen[0])
    log.info("resuming %s after round %d (epsilon so far %.4g, %d begun round(s) after the checkpoint charged)",
             out_dir, rounds_done, state.epsilon, charged)


def account_round(state: RunState, mode, charge: Charge, client_metrics, rnd: int, attempt: str, wal: WriteAhead,
                  cfg: RunConfig) -> None:
    """After the replies: the round's charge, the ledgers the nodes reported, and the write-ahead row
    that says the round's replies are in."""
    if charge.event is not None:  # the round's charge, projected before it was sent (ledgers.charge_round)
        state.engine.ledger, state.epsilon = charge.ledger, charge.epsilon
    if mode.example_level:
        for m in client_metrics:
            if "epsilon" in m:
                take_reported_ledger(m, rnd, state.client_ledgers, state.client_eps, wal, state.engine, cfg)
        state.epsilon = run_epsilon(mode, state.engine, state.client_ledgers)
    wal.replied(attempt, rnd, state.client_ledgers if mode.example_level else {})


def save_checkpoint(out_dir: Path, rnd: int, cfg: RunConfig, strategy, state: RunState) -> None:
    checkpoint.save(out_dir, {
        "round": rnd, "config": cfg.to_record(), "strategy": strategy.state_dict(),
        "server_ledger": state.engine.state_dict(),
        "client_eps": {str(k): v for k, v in state.client_eps.items()},
        "client_ledgers": state.client_ledgers, "totals": state.totals, "epsilon": float(state.epsilon),
        "last_eval": dict(state.last_eval),
    })
