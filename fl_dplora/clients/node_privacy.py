"""A node's own privacy arithmetic for a train message, from the run's public config and the node's
own ledger, never from the server's word: σ for DP-SGD (the whole run's schedule, recalibrated after a
rerun), σ for a client-level attempt, the instruction's σ compared with its own, ε over every run on
its data file, the SecAgg+ setup its share is checked against, and its policy's refusals (logged in
its ε log before the server hears of them). local_update.train calls these in order.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from flwr.app import ConfigRecord, Context, Message

from fl_dplora import protocol
from fl_dplora.clients.node_ledger import NodeLedger
from fl_dplora.clients.node_policy import NodePolicy, NodeRefusal
from fl_dplora.config import ConfigError, RunConfig
from fl_dplora.privacy.accounting import PrivacyLedger
from fl_dplora.privacy.engine import PrivacyEngine, falls_short
from fl_dplora.train import stage_config

log = logging.getLogger(__name__)


def sample_schedule(cfg: RunConfig, n: int, first: int = 1) -> tuple[tuple[float, int], ...]:
    """(sample rate, steps) of every DP-SGD stage of rounds `first`..R for a client whose public size
    (sample_rate.basis) is n, if it takes part in every round: head-only rounds, then the LoRA rounds."""
    rounds = cfg.federation.num_server_rounds
    head = min(rounds, cfg.train.head_rounds) if cfg.train.label_head else 0
    stages = []
    for start, count in ((1, head), (head + 1, rounds - head)):
        lo = max(start, first)
        if start + count - lo > 0:
            st = stage_config(cfg, lo, n)
            stages.append((min(1.0, st.train.batch_size / n), (start + count - lo) * st.train.local_steps))
    return tuple(stages)


def dp_sample_sigma(cfg: RunConfig, state: ConfigRecord, n: int, engine: PrivacyEngine, server_round: int) -> float:
    # n: the node's public size (sample_rate.basis); engine: the node's, at its own δ, over its ledger, whose
    # adjacency is the relation it is calibrated for
    """σ for DP-SGD: fixed, or calibrated so that every step of the whole run fits the target. Once the
    node's ledger holds more steps than the plan charges before this round (a rerun after a crash, or a
    handed-back worst case), σ for the steps left is recalibrated from the ledger (all rounds still run)."""
    ledger = engine.ledger
    if cfg.privacy.noise_multiplier > 0:
        return cfg.privacy.noise_multiplier
    plan, left = sample_schedule(cfg, n), sample_schedule(cfg, n, server_round)
    extra = ledger.total_steps - sum(k for _, k in plan) + sum(k for _, k in left)
    if "sigma" in state and extra <= int(state.get("sigma-extra", 0)):
        return float(state["sigma"])
    sigma = engine.calibrate(plan, ledger.adjacency)  # worst case for this client: it takes part in every round
    if extra > 0 and left:
        at_least = engine.plan_epsilon(sigma, plan, ledger.adjacency)
        try:
            sigma = engine.calibrate_remaining(ledger.history, left, at_least, ledger.adjacency)
        except ConfigError:  # nothing left to spend: train's budget check refuses the round
            pass
    state["sigma"], state["sigma-extra"] = sigma, max(0, extra)
    return sigma


def secagg_setup(msg: Message, context: Context) -> Mapping[str, Any] | None:
    """What this node's SecAgg+ mod was set up with for this round (threshold, grid), or None when the
    train message did not come through the mod (client_app.secagg_when_asked engages it)."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE

    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return None
    state = context.state.config_records.get(RECORD_KEY_STATE)
    return dict(state) if state is not None else None


def refuse(why: str) -> None:
    """The node turns the round down for `why` (a SecAgg+ setup it will not trust), like its policy's checks."""
    raise NodeRefusal(f"node policy: {why}")


def data_file_epsilon(policy: NodePolicy, run_id: int, this_run: PrivacyLedger, delta: float, accountant: str,
                      log_row: dict[str, Any], seen_now: list[float], unit: str = "example") -> tuple[float, int] | None:
    """(ε of every run on this node's data file composed, runs) once this attempt is charged: the other
    runs' ledgers next to the ε log, stated for the unit this run protects (`unit`; per-unit budgets,
    NodeLedger.spent_for: inf when an earlier run bounds nothing for it), and this run's events, in
    one composition (the same records each time); with local or distributed noise in any of them,
    also every attempt the server saw with the node's own noise alone, composed against the server
    (the larger is checked). None: no floor, no file ledger or no other run."""
    prior = policy.prior_runs(run_id, unit) if policy.max_epsilon is not None else None
    if prior is None or prior[1] == 0:
        return None
    ledger, runs, seen = prior
    if ledger is None:
        total = math.inf
    else:
        adjacency = "replace-one" if "replace-one" in (ledger.adjacency, this_run.adjacency) else "add-remove"
        total = PrivacyLedger([*ledger.history, *this_run.history], adjacency).epsilon(delta, accountant)
    log_row.update({"epsilon-data-file": total if math.isfinite(total) else None, "runs-on-data-file": runs + 1})
    sigmas = [*seen, *seen_now]
    if sigmas:  # ClientDP.epsilon_against_server's composition: rate 1, σ/2 per attempt
        against = PrivacyLedger([(s / 2.0, 1.0, 1) for s in sigmas]).epsilon(delta, accountant)
        log_row["epsilon-against-server-data-file"] = against
        total = max(total, against)
    return total, runs + 1


def client_sigma(mode, node_ledger: NodeLedger, server_round: int, planned: float, log_row: dict[str, Any]) -> float:
    """The σ this node charges a client-level attempt at: the run's, or after a rerun attempt in its
    own ledger, recalibrated from that ledger for the rounds left (the server does so from its own).
    Local noise: also the σ of the noise the node adds (local_update scales its σ by it), so its ε
    against the server is composed from these charges, and after a rerun it is the larger of the run's
    recalibration and the one that keeps that ε within the uninterrupted plan's
    (modes.ClientDP.remaining_against_server). The server never takes a node's word for its noise: it
    tops each reply up to its own σ as if the node had added the config's (modes.ClientDP.aggregate),
    so the sum carries at least the server's σ, and only widens its norm screen to the largest σ an
    honest node can compute (run_state.resume). Distributed noise: the same two rules give the node's
    own floor for its share (share_sigma)."""
    rate = mode.cfg.federation.fraction_train
    history = node_ledger.client_history(mode.unit, server_round, planned, rate)
    if sum(k for *_, k in history) <= server_round - 1:
        return planned
    last = [s for _, s, _ in node_ledger.charges(mode.unit)][-1:]
    again = mode.remaining_noise_multipliers(history, mode.cfg.federation.num_server_rounds - server_round + 1,
                                             last[0] if last else None)
    if again is None:  # σ fixed, or nothing left to spend (the node's own check refuses)
        return planned
    sigma = again[1]
    if mode.placement.node_noise_faces_server:
        seen = mode.remaining_against_server([s for _, s, _ in node_ledger.charges(mode.unit)],
                                             mode.cfg.federation.num_server_rounds - server_round + 1,
                                             last[0] if last else None)
        sigma = max(sigma, seen[1]) if seen is not None else sigma  # None: nothing left (the check refuses)
    log_row["sigma-recalibrated"] = sigma
    return sigma


def share_sigma(policy: NodePolicy, msg: Message, own: float, log_row: dict[str, Any]) -> float:
    """Distributed noise: the σ of this node's share. Every share and the SecAgg+ grid need one σ, the
    instruction's (after a resume the server's recalibration, run_state.resume); the node never adds less
    than its own (client_sigma), and refuses a round announced below it (by more than engine.BUDGET_TOLERANCE:
    two bisections' rounding)."""
    instructed = float(msg.content["config"].get(protocol.SIGMA, own))
    if falls_short(instructed, own):
        enforce(policy, log_row, lambda: refuse(
            f"distributed noise: the round's noise multiplier {instructed:.6g} is below this node's own {own:.6g} "
            "for the run's config and its ledger; its share would not carry the noise it charges"))
    return max(own, instructed)


def compare_instruction_sigma(mode, msg: Message, node_sigma: float) -> dict[str, Any]:
    """The node's own σ for its ε log row, and the instruction's σ when it differs: the node never
    adds the server's σ (a server that sent 0 would receive clipped updates with no noise); a lower
    one is logged as a warning, on the operator's console and in the node's ε log."""
    row: dict[str, Any] = {"sigma": node_sigma}
    instructed = msg.content["config"].get(protocol.SIGMA)
    if instructed is None or math.isclose(float(instructed), node_sigma, rel_tol=1e-9, abs_tol=1e-12):
        return row
    row["instruction-sigma"] = float(instructed)
    if mode.placement.node_noise_faces_server and float(instructed) < node_sigma:
        row["warning"] = (f"the server's instruction asks for noise multiplier {float(instructed):.6g}, below this "
                          f"node's own {node_sigma:.6g} for the run's config: this node adds its own")
        log.warning("node policy: %s", row["warning"])
    return row


def enforce(policy: NodePolicy, log_row: dict[str, Any], check) -> None:
    """Run one of the node's policy checks; a refusal goes to the node's own log, then to the server."""
    try:
        check()
    except NodeRefusal as exc:
        policy.record({**log_row, "refused": str(exc)})
        raise

