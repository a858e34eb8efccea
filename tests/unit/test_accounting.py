"""Privacy accounting: checked against Google's independent dp_accounting library."""

import json
import math

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from opacus.accountants import PRVAccountant, RDPAccountant

from fl_dplora.config import ConfigError
from fl_dplora.privacy.accounting import (
    PrivacyLedger,
    calibrate_noise_multiplier,
    check_delta,
    epsilon_for,
    format_table,
    paper_noise_multiplier,
    privacy_table,
)

# Each case: (list of (sigma, q, steps) as they are stepped into the ledger, delta).
CASES = {
    "dpsgd": ([(1.0, 0.01, 1000)], 1e-5),
    "few-steps-large-q": ([(2.0, 0.1, 30)], 1e-4),
    "full-batch": ([(5.0, 1.0, 10)], 1e-5),
    "high-eps": ([(0.8, 0.05, 100)], 1e-5),
    # Client-level DP over 6 rounds: the client is absent in rounds 2 and 5 (no event; q=0 and
    # steps=0 both mean "not touched"), q changes in round 3, sigma changes in round 4.
    "federated-rounds": (
        [(1.0, 0.01, 200), (1.0, 0.0, 200), (1.0, 0.02, 200), (1.5, 0.02, 100), (1.5, 0.02, 0), (1.0, 0.01, 100)],
        1e-5,
    ),
}


def _ledger(events) -> PrivacyLedger:
    ledger = PrivacyLedger()
    for sigma, q, n in events:
        ledger.step(sigma, q, n)
    return ledger


def _google_event(events) -> dp_accounting.DpEvent:
    # Built from the raw events, not from the ledger, so a merging bug cannot cancel out.
    return dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), n)
        for s, q, n in events
        if q > 0 and n > 0
    ])


@pytest.mark.parametrize("case", CASES)
def test_rdp_matches_dp_accounting(case):
    events, delta = CASES[case]
    ours = _ledger(events).epsilon(delta, "rdp")
    # Same RDP orders as Opacus: the (eps, delta) conversion minimises over the orders, and Google's
    # default grid adds orders 128..1024 that can only lower epsilon, so the grids must match to
    # compare the RDP curves themselves rather than the grids.
    google = RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)
    google.compose(_google_event(events))
    ref = google.get_epsilon(delta)
    assert ours == pytest.approx(ref, rel=0.01)


@pytest.mark.parametrize("case", CASES)
def test_prv_matches_pld(case):
    events, delta = CASES[case]
    ours = _ledger(events).epsilon(delta, "prv")
    pld = PLDAccountant(value_discretization_interval=1e-3)
    pld.compose(_google_event(events))
    ref = pld.get_epsilon(delta)
    assert ours == pytest.approx(ref, rel=0.01)
    # Numerical accounting is much tighter than RDP here; if "prv" silently fell back to RDP
    # it would be 10-20% higher and fail the check above.
    assert ours < _ledger(events).epsilon(delta, "rdp")


def test_prv_failure_falls_back_to_rdp_bound(monkeypatch):
    def broken(self, delta, **kwargs):
        raise RuntimeError("Discrete mean differs significantly from continuous mean.")

    monkeypatch.setattr(PRVAccountant, "get_epsilon", broken)
    with pytest.warns(UserWarning, match="PRV accountant failed"):
        eps = epsilon_for(1.0, 0.01, 1000, 1e-5, "prv")
    assert eps == epsilon_for(1.0, 0.01, 1000, 1e-5, "rdp")


def test_prv_reports_rdp_for_meaningless_epsilon():
    # The paper's sigma for eps=50 composed 1000 times: epsilon ~ 3e4, where Opacus' PRV overflows.
    eps = epsilon_for(0.0969, 0.1, 1000, 1e-5, "prv")
    assert 1e4 < eps < math.inf
    assert eps == epsilon_for(0.0969, 0.1, 1000, 1e-5, "rdp")


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize("target, delta, q, steps", [(3.0, 1e-5, 0.02, 500), (0.5, 1e-6, 0.01, 200)])
def test_calibration_meets_target_and_is_tight(accountant, target, delta, q, steps):
    sigma = calibrate_noise_multiplier(target, delta, q, steps, accountant)
    assert epsilon_for(sigma, q, steps, delta, accountant) <= target
    assert epsilon_for(sigma * 0.98, q, steps, delta, accountant) > target


def test_record_roundtrip_preserves_epsilon_exactly():
    ledger = _ledger(CASES["federated-rounds"][0])
    record = ledger.to_record()
    assert set(record) == {"sigmas", "rates", "steps"}
    # Plain Python scalars only, so it fits a Flower ConfigRecord (and JSON).
    assert all(type(v) is float for v in record["sigmas"] + record["rates"])
    assert all(type(v) is int for v in record["steps"])
    back = PrivacyLedger.from_record(json.loads(json.dumps(record)))
    assert back.history == ledger.history
    for acc in ("rdp", "prv"):
        assert back.epsilon(1e-5, acc) == ledger.epsilon(1e-5, acc)
    other = PrivacyLedger()
    other.load_state_dict(ledger.state_dict())
    assert other.history == ledger.history


def test_merges_consecutive_equal_events_only():
    ledger = PrivacyLedger()
    ledger.step(1.0, 0.01, 3)
    ledger.step(1.0, 0.01)
    ledger.step(1.0, 0.0, 7)  # not sampled: no event, and does not break the run
    ledger.step(1.0, 0.01, 0)
    ledger.step(1.0, 0.01, 2)
    assert ledger.history == [(1.0, 0.01, 6)]
    ledger.step(1.0, 0.02, 4)
    ledger.step(1.0, 0.01, 1)  # equal to an earlier event, but not consecutive
    assert ledger.history == [(1.0, 0.01, 6), (1.0, 0.02, 4), (1.0, 0.01, 1)]
    assert ledger.total_steps == 11
    assert _ledger([(1.0, 0.01, 1)] * 40).epsilon(1e-5, "rdp") == epsilon_for(1.0, 0.01, 40, 1e-5, "rdp")


@pytest.mark.filterwarnings("error")  # and without warnings from the accountants
def test_empty_and_zero_noise():
    assert PrivacyLedger().epsilon(1e-5, "prv") == 0.0
    for acc in ("rdp", "prv"):
        assert epsilon_for(0.0, 0.01, 10, 1e-5, acc) == math.inf
        assert _ledger([(1.0, 0.01, 10), (0.0, 0.01, 1)]).epsilon(1e-5, acc) == math.inf


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(target_epsilon=0.0), "target-epsilon"),
        (dict(target_epsilon=-1.0), "target-epsilon"),
        (dict(target_epsilon=math.inf), "target-epsilon"),
        (dict(target_epsilon=math.nan), "target-epsilon"),
        (dict(delta=0.0), "delta"),
        (dict(delta=1.0), "delta"),
        (dict(sample_rate=0.0), "sample rate"),
        (dict(sample_rate=1.5), "sample rate"),
        (dict(steps=0), "steps"),
        (dict(accountant="gdp"), "accountant"),
        # sigma = 1e4 still gives eps ~ 0.015 with q=1 over 1000 steps
        (dict(target_epsilon=1e-3, sample_rate=1.0, steps=1000), "unreachable"),
    ],
)
def test_calibration_rejects_bad_input(kwargs, key):
    args = dict(target_epsilon=3.0, delta=1e-5, sample_rate=0.01, steps=100, accountant="rdp") | kwargs
    with pytest.raises(ConfigError, match=key) as err:
        calibrate_noise_multiplier(**args)
    assert "\n" not in str(err.value)


def test_unreachable_message_has_numbers():
    with pytest.raises(ConfigError, match=r"^target-epsilon: 0\.001 is unreachable.*noise multiplier 10000"):
        calibrate_noise_multiplier(1e-3, 1e-5, 1.0, 1000, "rdp")


def test_check_delta():
    check_delta(1e-5, 500)
    check_delta(1.9e-3, 500)
    with pytest.raises(ConfigError, match=r"^delta: 0\.002 is not < 1/n = 1/500"):
        check_delta(2e-3, 500)
    with pytest.raises(ConfigError, match=r"^delta: 0\.001 is not < 1/n = 1/1000"):
        check_delta(1e-3, 1000)


def test_paper_formula():
    # sqrt(2 ln(1.25e5)) = 4.8448...
    assert paper_noise_multiplier(1.0, 1e-5) == pytest.approx(4.8448, abs=1e-4)
    assert paper_noise_multiplier(2.0, 1e-5) == pytest.approx(paper_noise_multiplier(1.0, 1e-5) / 2)


def test_privacy_table_from_sigma():
    rows = privacy_table(None, 1.1, 1e-5, 0.01, 1000)
    assert [r["method"] for r in rows] == ["rdp", "prv"]
    for r in rows:
        assert r["noise_multiplier"] == 1.1
        assert r["epsilon"] == epsilon_for(1.1, 0.01, 1000, 1e-5, r["method"])
    text = format_table(rows)
    lines = text.splitlines()
    assert len(lines) == 4 and lines[0].split()[:3] == ["method", "noise_multiplier", "epsilon"]
    assert lines[2].split()[:3] == ["rdp", "1.1", f"{rows[0]['epsilon']:.4g}"]
    # aligned: every row's epsilon column starts where its header does
    col = lines[0].index("epsilon")
    assert all(line[col - 2 : col] == "  " and line[col] != " " for line in lines[2:])


def test_privacy_table_from_target():
    rows = privacy_table(2.0, None, 1e-5, 0.02, 300)
    assert [r["method"] for r in rows[:2]] == ["rdp", "prv"]
    assert all(r["epsilon"] <= 2.0 for r in rows[:2])
    assert rows[1]["noise_multiplier"] < rows[0]["noise_multiplier"]  # PRV is tighter
    assert "paper" in rows[2]["method"]
    assert rows[2]["noise_multiplier"] == pytest.approx(paper_noise_multiplier(2.0, 1e-5))
    with pytest.raises(ConfigError, match="exactly one"):
        privacy_table(2.0, 1.0, 1e-5, 0.02, 300)
