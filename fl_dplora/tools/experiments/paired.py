"""Paired tests of two classifiers on the same test examples: exact McNemar on the discordant pairs.

Two runs scored on the same inputs are not independent samples, so comparing their accuracies with
two binomial SEs overstates the noise; McNemar uses only the examples where exactly one run is right."""

from __future__ import annotations

from collections.abc import Sequence


def discordant_counts(pred_a: Sequence[int], pred_b: Sequence[int], labels: Sequence[int]) -> tuple[int, int]:
    """(b, c): examples only A gets right, examples only B gets right."""
    if not len(pred_a) == len(pred_b) == len(labels):
        raise ValueError(f"paired predictions need equal lengths, got {len(pred_a)}, {len(pred_b)}, {len(labels)}")
    b = sum(a == y != p for a, p, y in zip(pred_a, pred_b, labels))
    c = sum(p == y != a for a, p, y in zip(pred_a, pred_b, labels))
    return b, c


def exact_mcnemar(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: under 'A and B are equally accurate' each discordant example is
    a fair coin, b ~ Binomial(b + c, 1/2). No discordant example: no evidence of a difference, p = 1."""
    if b + c == 0:
        return 1.0
    from scipy.stats import binomtest  # scipy comes with scikit-learn; imported here, only reports need it

    return float(binomtest(b, b + c, 0.5).pvalue)


def mcnemar_p_value(pred_a: Sequence[int], pred_b: Sequence[int], labels: Sequence[int]) -> float:
    return exact_mcnemar(*discordant_counts(pred_a, pred_b, labels))


def accuracy_of(pred: Sequence[int], labels: Sequence[int]) -> float:
    return sum(p == y for p, y in zip(pred, labels)) / max(1, len(labels))
