"""Privacy accounting for Poisson-subsampled Gaussian mechanisms (DP-SGD steps, DP-FedAvg rounds).

Thin layer over Opacus' accountants ("rdp", "prv"): a per-party composition ledger that fits a
Flower ConfigRecord, noise calibration with a verified guarantee, and a comparison table for the
`fl-dplora privacy` command. No Flower imports.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from fl_dplora.config import ConfigError

ACCOUNTANTS = ("rdp", "prv")
# add-remove: neighbouring datasets differ by one record (the sizes differ, so a size must not be
# released); replace-one: by one record's value (same size: the one consistent with public sizes)
ADJACENCIES = ("add-remove", "replace-one")
MAX_SIGMA = 1e4  # beyond this the model learns nothing; treat the budget as unreachable
PRV_MAX_EPSILON = 1000.0  # above this "prv" reports the RDP bound (PRV gets slow, then overflows)

Event = tuple[float, float, int]  # (noise_multiplier, sample_rate, num_steps), Opacus' history format


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"accountant: unknown value {accountant!r}; choose one of {', '.join(ACCOUNTANTS)}")


def _check_delta(delta: float) -> None:
    if not (isinstance(delta, numbers.Real) and 0.0 < delta < 1.0):
        raise ConfigError(f"delta: must be in (0, 1), got {delta!r}")


@contextlib.contextmanager
def _quiet_alpha_warning():
    # Opacus' "Optimal order is the largest alpha" only means the RDP bound could be a bit tighter;
    # it is still a valid upper bound, and calibration would print it dozens of times.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        yield


def _rdp_epsilon(history: Sequence[Event], delta: float) -> float:
    acc = RDPAccountant()
    acc.history = list(history)
    with _quiet_alpha_warning():
        return float(acc.get_epsilon(delta))


def _replace_one_epsilon(history: Sequence[Event], delta: float) -> float:
    """ε under replace-one adjacency. No Opacus accountant composes that relation for Poisson sampling;
    Mironov's weak triangle inequality for Rényi divergence (RDP paper, Prop. 11) through D without the
    record (remove, then add) bounds it from the add/remove RDP curve ε(·) at every order α > 1:
        ε_R(α) <= (α - 1/2)/(α - 1) · ε(2α) + ε(2α - 1),
    which composes additively like any RDP curve. A valid upper bound whatever the accountant asked."""
    orders = [float(a) for a in RDPAccountant.DEFAULT_ALPHAS if a > 1]

    def curve(alphas: list[float]) -> np.ndarray:
        return sum(np.asarray(compute_rdp(q=q, noise_multiplier=s, steps=n, orders=alphas), dtype=float)
                   for s, q, n in history)

    double, odd = curve([2 * a for a in orders]), curve([2 * a - 1 for a in orders])
    rdp = [(a - 0.5) / (a - 1) * x + y for a, x, y in zip(orders, double, odd)]
    with _quiet_alpha_warning():
        return float(get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0])


def _prv_epsilon(history: Sequence[Event], delta: float) -> float:
    eps_rdp = _rdp_epsilon(history, delta)
    if eps_rdp > PRV_MAX_EPSILON:
        return eps_rdp  # no meaningful privacy left to measure tightly; PRV's grid grows with eps
    # PRV's upper bound is ~ estimate + eps_error. RDP over-estimates by only ~10-30%, so
    # 0.5% of it keeps the reported value within ~1% of the true epsilon; the floor and cap
    # bound the FFT grid (cost ~ 1/eps_error) and stay in the regime Opacus supports (< 1).
    eps_error = min(max(0.005 * eps_rdp, 2e-3), 0.5)
    acc = PRVAccountant()
    acc.history = list(history)  # one entry per distinct (sigma, q) run; Opacus composes them all
    try:
        # PRV sizes its grid with an internal RDP accountant (alpha warning); huge-epsilon
        # corners overflow exp() inside Opacus, which the finiteness check below handles.
        with _quiet_alpha_warning(), np.errstate(all="ignore"):
            eps_prv = float(acc.get_epsilon(delta, eps_error=eps_error))
    except (RuntimeError, ValueError) as e:  # Opacus' discretisation gives up in some corners
        eps_prv, why = math.nan, str(e)
    else:
        why = f"non-finite result {eps_prv}"
    if not math.isfinite(eps_prv):
        warnings.warn(f"PRV accountant failed ({why}); reporting the RDP bound {eps_rdp:.4g}", stacklevel=3)
        return eps_rdp
    # Both are valid upper bounds; for tiny epsilons PRV's additive eps_error can exceed RDP's slack.
    return min(eps_prv, eps_rdp)


class PrivacyLedger:
    """Composition history of one protected party (an example, or a client).

    A list of (noise_multiplier, sample_rate, num_steps) events; consecutive events with the same
    (sigma, q) are merged, exactly like an Opacus accountant's `.history`. Rounds in which the
    party could not have been touched simply add no event.
    """

    def __init__(self, history: Iterable[Sequence[float]] = (), adjacency: str = "add-remove") -> None:
        if adjacency not in ADJACENCIES:
            raise ValueError(f"adjacency: expected one of {', '.join(ADJACENCIES)}, got {adjacency!r}")
        self.adjacency = adjacency
        self.history: list[Event] = []
        for sigma, q, n in history:
            self.step(sigma, q, int(n))

    def step(self, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        sigma, q, n = float(noise_multiplier), float(sample_rate), int(num_steps)
        if not (math.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier!r}")
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"sample_rate must be in [0, 1], got {sample_rate!r}")
        if n < 0:
            raise ValueError(f"num_steps must be >= 0, got {num_steps!r}")
        if n == 0 or q == 0.0:
            return  # nothing about this party was released
        if self.history and self.history[-1][:2] == (sigma, q):
            self.history[-1] = (sigma, q, self.history[-1][2] + n)
        else:
            self.history.append((sigma, q, n))

    @property
    def total_steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def epsilon(self, delta: float, accountant: str = "prv") -> float:
        """Epsilon spent so far at `delta` (an upper bound)."""
        _check_accountant(accountant)
        _check_delta(delta)
        if not self.history:
            return 0.0
        if any(sigma == 0.0 for sigma, _, _ in self.history):
            return math.inf  # an un-noised release of a sampled party
        if self.adjacency == "replace-one":
            return _replace_one_epsilon(self.history, delta)
        return _rdp_epsilon(self.history, delta) if accountant == "rdp" else _prv_epsilon(self.history, delta)

    # -- serialisation: plain lists so it fits a Flower ConfigRecord / JSON
    def to_record(self) -> dict[str, list[float] | list[int]]:
        record = {
            "sigmas": [float(s) for s, _, _ in self.history],
            "rates": [float(q) for _, q, _ in self.history],
            "steps": [int(n) for _, _, n in self.history],
        }
        if self.adjacency != "add-remove":  # the default is left out: records written before it read the same
            record["adjacency"] = self.adjacency
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Sequence[float] | Sequence[int]]) -> PrivacyLedger:
        sigmas, rates, steps = (list(record.get(k, [])) for k in ("sigmas", "rates", "steps"))
        if not len(sigmas) == len(rates) == len(steps):
            raise ValueError(f"privacy ledger record has unequal lengths: {len(sigmas)}, {len(rates)}, {len(steps)}")
        return cls(zip(sigmas, rates, steps), str(record.get("adjacency", "add-remove")))

    def state_dict(self) -> dict[str, list[float] | list[int]]:
        return self.to_record()

    def load_state_dict(self, state: Mapping[str, Sequence[float] | Sequence[int]]) -> None:
        restored = PrivacyLedger.from_record(state)
        self.history, self.adjacency = restored.history, restored.adjacency

    def __repr__(self) -> str:
        return f"PrivacyLedger({self.history!r}, {self.adjacency!r})"


def extends(stored: Mapping[str, Sequence], reported: Mapping[str, Sequence]) -> bool:
    """Whether the `reported` ledger record continues the `stored` one: every step the stored ledger
    holds is in the reported one, in the same order, with the same (σ, q); it may add steps after
    them. A server keeps a node's stored ledger when a report does not extend it (issue 27)."""
    old_ledger, new_ledger = PrivacyLedger.from_record(stored), PrivacyLedger.from_record(reported)
    old, new = old_ledger.history, new_ledger.history
    if old and new_ledger.adjacency != old_ledger.adjacency:  # a switch of adjacency is another history
        return False
    if not old:
        return True
    if len(new) < len(old) or new[: len(old) - 1] != old[:-1]:
        return False
    (s_sigma, s_q, s_n), (r_sigma, r_q, r_n) = old[-1], new[len(old) - 1]
    return (r_sigma, r_q) == (s_sigma, s_q) and r_n >= s_n


def epsilon_for(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "prv"
) -> float:
    """Epsilon after `steps` Poisson-subsampled Gaussian steps with the same (sigma, q)."""
    ledger = PrivacyLedger()
    ledger.step(noise_multiplier, sample_rate, steps)
    return ledger.epsilon(delta, accountant)


def _check_calibration_inputs(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> None:
    if not (isinstance(target_epsilon, numbers.Real) and math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ConfigError(f"target-epsilon: must be finite and > 0 to calibrate noise, got {target_epsilon!r}")
    _check_delta(delta)
    if not (isinstance(sample_rate, numbers.Real) and 0.0 < sample_rate <= 1.0):
        raise ConfigError(
            f"sample rate: must be in (0, 1], got {sample_rate!r} (batch-size / records, or fraction-train)"
        )
    if not (isinstance(steps, numbers.Integral) and steps >= 1):
        raise ConfigError(f"steps: must be an integer >= 1, got {steps!r}")


@lru_cache(maxsize=256)  # pure in its arguments; every client of a run asks the same question
def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
    epsilon_tolerance: float = 0.01,
) -> float:
    """Smallest noise multiplier whose epsilon after `steps` steps is <= target_epsilon."""
    return calibrate_schedule(target_epsilon, delta, ((sample_rate, steps),), accountant, epsilon_tolerance)


@lru_cache(maxsize=256)
def calibrate_schedule(
    target_epsilon: float,
    delta: float,
    schedule: tuple[tuple[float, int], ...],
    accountant: str = "prv",
    epsilon_tolerance: float = 0.01,
    adjacency: str = "add-remove",
) -> float:
    """Smallest noise multiplier σ such that the composition of `schedule` ((sample rate, steps)
    stages, e.g. label-head rounds then LoRA rounds), every step with σ, has epsilon <= target.

    Bisection on sigma (epsilon decreases in sigma). Stops when the epsilon reached is within
    `epsilon_tolerance` (relative) below the target, or the sigma bracket is within 0.1%. The
    returned sigma is always one whose epsilon was computed and found <= target.
    """
    _check_accountant(accountant)
    if not schedule:
        raise ConfigError("steps: a schedule needs at least one stage")
    for sample_rate, steps in schedule:
        _check_calibration_inputs(target_epsilon, delta, sample_rate, steps)
    described = " + ".join(f"{steps} steps at q={q:g}" for q, steps in schedule)

    def eps(sigma: float) -> float:
        ledger = PrivacyLedger(adjacency=adjacency)
        for q, steps in schedule:
            ledger.step(sigma, q, steps)
        return ledger.epsilon(delta, accountant)

    return _bisect(eps, target_epsilon, delta, described, accountant, epsilon_tolerance)


def _bisect(eps, target_epsilon: float, delta: float, described: str, accountant: str, epsilon_tolerance: float,
            at_least: float = 0.0) -> float:
    """Smallest σ (to tolerance) with eps(σ) <= target, eps decreasing in σ. Bisection stops when the
    epsilon reached is within `epsilon_tolerance` (relative) below the target and >= `at_least`, or
    the σ bracket is within 0.1% (1e-9 while `at_least` is unmet). The returned σ is always one
    whose epsilon was computed and found <= target."""
    lo, hi = 0.0, 1.0  # grow an upper bracket geometrically
    eps_hi = eps(hi)
    while eps_hi > target_epsilon:
        if hi >= MAX_SIGMA:
            raise ConfigError(
                f"target-epsilon: {target_epsilon:g} is unreachable with delta={delta:g}, {described}: "
                f"even noise multiplier {MAX_SIGMA:g} gives epsilon={eps_hi:.4g} ({accountant})"
            )
        lo, hi = hi, min(2 * hi, MAX_SIGMA)
        eps_hi = eps(hi)

    floor = max(target_epsilon * (1 - epsilon_tolerance), min(at_least, target_epsilon))
    while eps_hi < floor and hi - lo > (1e-9 if eps_hi < at_least else 1e-3) * hi:
        mid = (lo + hi) / 2
        eps_mid = eps(mid)
        if eps_mid <= target_epsilon:
            hi, eps_hi = mid, eps_mid
        else:
            lo = mid

    # Guarantee: hi is only ever set to a sigma that was measured <= target; check anyway,
    # since a silently over-budget sigma is the one failure this function must never have.
    if not eps_hi <= target_epsilon:  # pragma: no cover
        raise RuntimeError(f"noise calibration failed: sigma={hi} gives epsilon={eps_hi} > {target_epsilon}")
    return hi


@lru_cache(maxsize=256)
def calibrate_remaining(
    target_epsilon: float,
    delta: float,
    charged_history: tuple[Event, ...],
    remaining_schedule: tuple[tuple[float, int], ...],
    accountant: str = "prv",
    at_least: float = 0.0,
    epsilon_tolerance: float = 0.01,
    adjacency: str = "add-remove",
) -> float:
    """Smallest σ for the steps still to come (`remaining_schedule`: (sample rate, steps) stages)
    such that they, composed after everything already charged (`charged_history`, (σ, q, steps)
    events, e.g. a crashed round's attempt charged twice), keep epsilon <= target: after a resume
    all rounds still run. `at_least`: bisect on until epsilon reaches it too (the uninterrupted
    plan's epsilon), so an extra attempt never ends a run below the plan. Events are composed in a
    canonical order (composition commutes), so a node and the server that hold the same events get
    the same σ. Raises ConfigError when what is charged leaves no room."""
    _check_accountant(accountant)
    if not remaining_schedule:
        raise ConfigError("steps: a schedule needs at least one stage")
    for sample_rate, steps in remaining_schedule:
        _check_calibration_inputs(target_epsilon, delta, sample_rate, steps)
    charged = PrivacyLedger(sorted(PrivacyLedger(charged_history).history)).history
    described = (f"{sum(n for *_, n in charged)} steps already charged + "
                 + " + ".join(f"{steps} steps at q={q:g}" for q, steps in remaining_schedule))

    def eps(sigma: float) -> float:
        ledger = PrivacyLedger(charged, adjacency)
        for q, steps in remaining_schedule:
            ledger.step(sigma, q, steps)
        return ledger.epsilon(delta, accountant)

    return _bisect(eps, target_epsilon, delta, described, accountant, epsilon_tolerance, at_least)


def paper_noise_multiplier(epsilon: float, delta: float) -> float:
    """The DP-LoRA paper's formula: sigma = sqrt(2 ln(1.25/delta)) / epsilon.

    This is the classic Gaussian-mechanism calibration for ONE release (valid for epsilon < 1),
    with no subsampling and no composition across steps or rounds; it is reported for comparison
    and is not a guarantee for a whole training run.
    """
    _check_delta(delta)
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ConfigError(f"target-epsilon: must be finite and > 0, got {epsilon!r}")
    return math.sqrt(2 * math.log(1.25 / delta)) / epsilon


def check_delta(delta: float, num_records: int) -> None:
    """delta must be well below 1/n, otherwise 'leak one record in full' satisfies (eps, delta)-DP."""
    _check_delta(delta)
    if num_records < 1:
        raise ConfigError(f"delta: cannot check against 1/n with n = {num_records} records")
    if delta >= 1.0 / num_records:
        raise ConfigError(
            f"delta: {delta:g} is not < 1/n = 1/{num_records} = {1.0 / num_records:.3g}; "
            f"use delta << 1/n (e.g. {10 ** math.floor(math.log10(0.1 / num_records)):g})"
        )


def privacy_table(
    target_epsilon: float | None,
    noise_multiplier: float | None,
    delta: float,
    sample_rate: float,
    steps: int,
) -> list[dict]:
    """One row per accountant: sigma for a target epsilon, or epsilon for a given sigma.

    With a target epsilon, a last row shows the paper's per-step sigma and the epsilon it
    actually gives over `steps` composed steps.
    """
    if (target_epsilon is None) == (noise_multiplier is None):
        raise ConfigError("privacy: give exactly one of target-epsilon or noise-multiplier")
    if noise_multiplier is not None:
        sigma = noise_multiplier
        if not (isinstance(sigma, numbers.Real) and math.isfinite(sigma) and sigma >= 0):
            raise ConfigError(f"noise-multiplier: must be finite and >= 0, got {noise_multiplier!r}")
        _check_calibration_inputs(1.0, delta, sample_rate, steps)
    common = {"delta": delta, "sample_rate": sample_rate, "steps": steps}
    rows: list[dict] = []
    for acc in ACCOUNTANTS:
        if target_epsilon is not None:
            sigma = calibrate_noise_multiplier(target_epsilon, delta, sample_rate, steps, acc)
        else:
            sigma = float(noise_multiplier)
        rows.append({"method": acc, "noise_multiplier": sigma,
                     "epsilon": epsilon_for(sigma, sample_rate, steps, delta, acc), **common})
    if target_epsilon is not None:
        # The paper's sigma, and what it really costs over the whole run (composed with PRV).
        sigma = paper_noise_multiplier(target_epsilon, delta)
        rows.append({"method": "paper formula (eps per step), composed by prv", "noise_multiplier": sigma,
                     "epsilon": epsilon_for(sigma, sample_rate, steps, delta, "prv"), **common})
    return rows


def format_table(rows: Sequence[Mapping[str, object]]) -> str:
    """Small aligned text table; floats in %.4g."""
    if not rows:
        return ""
    cols = list(rows[0].keys())
    cells = [[f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = [cols, ["-" * w for w in widths], *cells]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in lines)
