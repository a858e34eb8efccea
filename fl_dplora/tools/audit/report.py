"""The audit's own files besides audit.json: audit.md (the table and the verdict) and audit.png
(score histograms)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def average(xs: Sequence[float]) -> float:
    """The mean, 0 for no values."""
    return sum(xs) / len(xs) if xs else 0.0


def markdown(r: Mapping[str, Any]) -> str:
    """audit.md from `run_audit`'s result: the measures and the verdict."""
    claimed = "∞ (no DP)" if r["epsilon_claimed"] is None else f"{r['epsilon_claimed']:.3f}"
    verdict = ("**FLAGGED: the measured lower bound exceeds the claimed epsilon; the DP claim is false.**"
               if r["flagged"] else "Consistent: the measured lower bound does not exceed the claimed epsilon.")
    o = r["one_run"]
    exposure_rows = [] if r["exposure_mean"] is None else [
        f"| canary exposure mean / max (bits, cap {r['exposure_cap_bits']:.1f}) | {r['exposure_mean']:.2f} / {r['exposure_max']:.2f} |",
        f"| exposure of canaries not trained on (chance level) | {r['exposure_mean_not_trained']:.2f} |"]
    return "\n".join([
        f"# Privacy audit (dp-mode {r['dp_mode']}, canary = one {r['canary_unit']}, {r.get('canary_kind', 'passphrase')})", "",
        "| measure | value |", "|---|---|",
        f"| claimed epsilon (delta {r['delta']:g}) | {claimed} |",
        f"| one-run lower bound on epsilon ({r['one_run']['confidence'] * 100:g} %) | {r['epsilon_lower_bound']:.3f} ({o['correct']}/{o['guesses']} right guesses, "
        f"{o['included']}/{o['canaries']} canaries included) |",
        *[f"| ... seen in the {v['view']} ({r['one_run']['confidence'] * 100:g} % each) | {v['epsilon_lower_bound']:.3f} "
          f"({v['correct']}/{v['guesses']}) |" for v in r.get("one_run_views", []) if len(r["one_run_views"]) > 1],
        *exposure_rows,
        f"| membership inference AUC (loss threshold) | {r['mia_auc']:.3f} |",
        f"| MIA TPR at 1 % FPR | {r['mia_tpr_at_1pct_fpr']:.3f} |",
        f"| MIA AUC / TPR at 1 % FPR, calibrated by the base model's loss | {r['mia_auc_calibrated']:.3f} / "
        f"{r['mia_tpr_at_1pct_fpr_calibrated']:.3f} |", "",
        verdict, "", "![score histograms](audit.png)", ""])


def histograms(path: Path, mem: Sequence[float], non: Sequence[float], can_in: Sequence[float], can_out: Sequence[float],
               canary_axis: str) -> None:
    """audit.png: membership-inference scores and canary scores, trained on vs not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    for ax, (a, b), title, xlabel in (
        (axes[0], (mem, non), "membership inference", "score = −mean answer-token loss (nats)"),
        (axes[1], (can_in, can_out), "canaries (one-run audit)", canary_axis),
    ):
        bins = 30
        ax.hist(a, bins=bins, alpha=0.6, label="members / trained on", density=True)
        ax.hist(b, bins=bins, alpha=0.6, label="non-members / not trained on", density=True)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
