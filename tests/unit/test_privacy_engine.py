"""The privacy engine (privacy/engine.py): calibration reaches the target from below, the guard refuses
a charge that crosses it (and only that), state round-trips in the checkpoint's ledger format, and the
server's and the node's call sites charge and guard through it."""

import math

import pytest

from fl_dplora.config import ConfigError, resolve
from fl_dplora.privacy.accounting import PrivacyLedger, calibrate_remaining, calibrate_schedule, epsilon_for
from fl_dplora.privacy.engine import BUDGET_TOLERANCE, PrivacyEngine, falls_short, within_budget

TARGET, DELTA = 4.0, 1e-5


def _engine(**kw) -> PrivacyEngine:
    return PrivacyEngine(TARGET, DELTA, "rdp", **kw)


def test_the_guard_admits_the_target_within_tolerance_and_refuses_beyond():
    assert within_budget(TARGET, TARGET) and within_budget(TARGET * (1 + BUDGET_TOLERANCE), TARGET)
    assert not within_budget(TARGET * (1 + 2 * BUDGET_TOLERANCE), TARGET)
    assert not within_budget(math.inf, TARGET)
    # the node's refusal of an announced σ below its own: only by more than the tolerance
    assert not falls_short(1.0 * (1 - BUDGET_TOLERANCE / 2), 1.0) and falls_short(1.0 * (1 - 2 * BUDGET_TOLERANCE), 1.0)
    assert BUDGET_TOLERANCE == 1e-6  # the value every run so far was guarded at (run hashes depend on it)


def test_calibrated_sigma_reaches_the_target_from_below_within_one_percent():
    engine, schedule = _engine(), ((1.0, 3), (0.2, 40))
    sigma = engine.calibrate(schedule)
    eps = engine.plan_epsilon(sigma, schedule)
    assert TARGET * 0.99 <= eps <= TARGET
    assert engine.plan_epsilon(sigma * 0.99, schedule) > eps  # smaller σ: more ε (not a flat answer)
    assert sigma == calibrate_schedule(TARGET, DELTA, schedule, "rdp")  # the accountant's own calibration
    # replace-one adjacency costs more, so it needs more noise for the same target
    assert engine.calibrate(schedule, "replace-one") > sigma


def test_the_node_delta_is_the_one_calibrated_at():
    cfg = resolve({"target-epsilon": TARGET, "delta": 1e-5, "accountant": "rdp"})
    run, own = PrivacyEngine.for_run(cfg.privacy), PrivacyEngine.for_run(cfg.privacy, delta=1e-7)
    assert (run.target_epsilon, run.delta, run.accountant) == (TARGET, 1e-5, "rdp") and own.delta == 1e-7
    assert own.calibrate(((0.5, 4),)) > run.calibrate(((0.5, 4),))


def test_calibrate_remaining_fits_what_was_charged():
    engine, plan = _engine(), ((0.5, 4),)
    sigma = engine.calibrate(plan)
    charged = [(sigma, 0.5, 3), (sigma, 0.5, 1)]  # a crashed round's attempt charged twice
    at_least = engine.plan_epsilon(sigma, plan)
    again = engine.calibrate_remaining(charged, ((0.5, 1),), at_least)
    assert again > sigma
    assert at_least <= engine.epsilon(PrivacyLedger([*charged, (again, 0.5, 1)])) <= TARGET
    assert again == calibrate_remaining(TARGET, DELTA, tuple(charged), ((0.5, 1),), "rdp", at_least)
    with pytest.raises(ConfigError):  # nothing left: the whole budget already charged
        engine.calibrate_remaining([(0.3, 1.0, 50)], ((0.5, 1),))


def test_try_charge_refuses_the_charge_that_crosses_the_target_and_charges_nothing():
    sigma = _engine().calibrate(((1.0, 3),))
    engine = _engine()
    for _ in range(3):  # the plan fits
        assert engine.try_charge((sigma, 1.0, 1)) is not None
    before = engine.state_dict()
    assert engine.epsilon() <= TARGET
    assert engine.try_charge((sigma, 1.0, 1)) is None  # a fourth round would cross it
    assert engine.state_dict() == before  # refused: the ledger is untouched
    ledger, eps = engine.projected((sigma, 1.0, 1))
    assert eps > TARGET * (1 + BUDGET_TOLERANCE) and not engine.allows(eps) and ledger.total_steps == 4
    assert engine.ledger.total_steps == 3  # projecting charges nothing


def test_charge_is_unguarded_and_epsilon_follows_the_ledger():
    engine = _engine()
    assert engine.epsilon() == 0.0
    engine.charge((1.0, 0.5, 10), (1.0, 0.5, 5), (2.0, 1.0, 1))
    assert engine.ledger.history == [(1.0, 0.5, 15), (2.0, 1.0, 1)]
    engine.charge((0.0, 1.0, 1))  # released without noise: charged anyway, ε infinite
    assert engine.epsilon() == math.inf and not engine.allows(engine.epsilon())
    assert _engine(ledger=PrivacyLedger([(1.0, 0.5, 15)])).epsilon() == epsilon_for(1.0, 0.5, 15, DELTA, "rdp")


def test_state_round_trips_in_the_checkpoint_ledger_format():
    engine = _engine(ledger=PrivacyLedger([(1.5, 0.2, 7), (2.0, 1.0, 1)], "replace-one"))
    state = engine.state_dict()
    assert state == engine.ledger.to_record()  # the format checkpoints were always written in
    restored = _engine()
    restored.load_state_dict(state)
    assert restored.ledger.history == engine.ledger.history and restored.ledger.adjacency == "replace-one"
    assert restored.epsilon() == engine.epsilon()
    old = {"sigmas": [1.0], "rates": [0.5], "steps": [3]}  # a record written before adjacency was stored
    restored.load_state_dict(old)
    assert restored.ledger.adjacency == "add-remove" and restored.state_dict() == old


def test_the_server_round_guard_goes_through_the_engine():
    from types import SimpleNamespace

    from fl_dplora.server.ledgers import charge_round

    cfg = resolve({"target-epsilon": TARGET, "delta": DELTA, "accountant": "rdp", "num-server-rounds": 3})
    sigma = _engine().calibrate(((1.0, 3),))
    mode = SimpleNamespace(round_event=lambda s: (s, 1.0, 1))
    engine = PrivacyEngine.for_run(cfg.privacy, PrivacyLedger([(sigma, 1.0, 2)]))
    charge = charge_round(mode, engine, sigma, sigma, 3, 3)
    assert charge.ledger.total_steps == 3 and charge.epsilon <= TARGET and engine.ledger.total_steps == 2
    engine.ledger = charge.ledger  # the round was sent (run_state.account_round)
    assert charge_round(mode, engine, sigma, sigma, 4, 3) is None  # round 4 would cross the target
