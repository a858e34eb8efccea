"""The audit's statistics: the one-run lower bound on ε, membership inference, exposure.

One-run audit (Steinke, Nasr and Jagielski 2023, "Privacy Auditing with One (1) Training Run"):
m canaries, each included independently with probability 1/2; the auditor guesses "in" for the k
canaries it is most confident were trained on and "out" for the k least; the number of right
guesses gives, at 95 % confidence, a lower bound on ε at the run's δ (their Theorem 3.3 / Algorithm
3 p-value: P[>= v right] <= P[Binomial(r, e^ε/(1+e^ε)) >= v] + 2 m δ α). Four k are tried,
Bonferroni-corrected.

Loss-threshold membership inference: AUC and TPR at 1 % FPR. Canary exposure (Carlini et al. 2019,
"The Secret Sharer"): exposure = log2(R + 1) - log2(1 + #of R random reference passphrases the
model finds likelier).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def p_value_dp(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[>= v right guesses out of r] for an (eps, delta)-DP run (Steinke et al. 2023, Thm 3.3/Alg. 3).

    Written here from the paper's published p-value function (tests/tools/test_audit.py checks it against a
    direct transcription of that loop and against closed forms): the maintained implementation,
    jax_privacy.auditing, needs JAX, which this PyTorch project does not otherwise install."""
    import numpy as np
    from scipy.stats import binom

    q = 1.0 / (1.0 + math.exp(-eps))
    beta = float(binom.sf(v - 1, r, q))
    if v == 0 or delta == 0:
        return min(1.0, beta)
    # alpha = max_i P[v > Binomial(r, q) >= v - i] / i, for i = 1..v
    cumulative = np.cumsum(binom.pmf(np.arange(v - 1, -1, -1), r, q))
    alpha = float(np.max(cumulative / np.arange(1, v + 1)))
    return min(1.0, beta + alpha * delta * 2 * m)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, p: float = 0.05) -> float:
    """Largest eps that the guesses reject at level p (0 when nothing is rejected)."""
    if r == 0 or p_value_dp(m, r, v, 0.0, delta) >= p:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value_dp(m, r, v, hi, delta) < p and hi < 100:
        hi *= 2
    for _ in range(40):
        mid = (lo + hi) / 2
        if p_value_dp(m, r, v, mid, delta) < p:
            lo = mid
        else:
            hi = mid
    return lo


def one_run_audit(scores: Sequence[float], included: Sequence[bool], delta: float, confidence: float = 0.95,
                  guess_fractions: Sequence[float] = (1 / 16, 1 / 8, 1 / 4, 1 / 2)) -> dict[str, Any]:
    """Guess the top-k scores "in" and the bottom-k "out"; best bound over the k tried (Bonferroni)."""
    m = len(scores)
    order = sorted(range(m), key=lambda i: scores[i], reverse=True)
    level = (1 - confidence) / len(guess_fractions)
    best = {"epsilon_lower_bound": 0.0, "guesses": 0, "correct": 0}
    for f in guess_fractions:
        k = max(1, int(m * f))
        if 2 * k > m:
            continue
        v = sum(included[i] for i in order[:k]) + sum(not included[i] for i in order[-k:])
        eps = epsilon_lower_bound(m, 2 * k, v, delta, level)
        if eps >= best["epsilon_lower_bound"]:
            best = {"epsilon_lower_bound": eps, "guesses": 2 * k, "correct": v}
    return best


def auc(pos: Sequence[float], neg: Sequence[float]) -> float:
    """P[score(member) > score(non-member)] (+ half the ties): the Mann-Whitney AUC."""
    if not pos or not neg:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def tpr_at_fpr(pos: Sequence[float], neg: Sequence[float], fpr: float = 0.01) -> float:
    neg_sorted = sorted(neg, reverse=True)
    k = int(math.floor(fpr * len(neg_sorted)))  # at most this many non-members above the threshold
    threshold = neg_sorted[k] if k < len(neg_sorted) else -math.inf
    return sum(p > threshold for p in pos) / max(1, len(pos))


def exposure(canary_nll: float, reference_nll: Sequence[float]) -> float:
    rank = 1 + sum(r < canary_nll for r in reference_nll)
    return math.log2(len(reference_nll) + 1) - math.log2(rank)

