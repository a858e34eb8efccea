"""tfns-test on the test tweets that nothing ever looked at (issue 26, item 7; docs/recipe.md).

The earlier protocol's prior-shift check (experiments/prior_shift_check.py on a fin-sentiment-v1 run,
max-eval-samples 300) scored 450 class-balanced validation tweets with their labels, outside the 300
scored and the head-statistic prompts; 397 of them fell into today's 1,600-tweet test part. No
hyperparameter was tuned on them, but they informed the move from LoRA-only to the label head. This
script rebuilds that draw (the same code and seed), drops those tweets from the test part and rescores
every tfns-test run from its stored predictions: accuracy per run, mean +- SE per series, and exact
McNemar between LP and LP-FT of the same seed and pooled over seeds. No model runs.

    python experiments/tfns_untouched.py   # writes experiments/results/tfns-test/untouched.json
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from fl_dplora.config import resolve, tfns_recipe_defaults  # noqa: E402
from fl_dplora.data import eval_examples, head_stat_examples, load_task  # noqa: E402
from fl_dplora.tools.experiments.paired import discordant_counts, exact_mcnemar  # noqa: E402

RESULTS = ROOT / "experiments" / "results" / "tfns-test"
SEEDS = (42, 1, 2)


def prior_shift_draw(per_class: int = 150) -> set[str]:
    """The prompts prior_shift_check.py scored on the earlier protocol (its draw, reproduced)."""
    cfg = resolve({**tfns_recipe_defaults(), "task": "fin-sentiment-v1", "max-eval-samples": 300})
    task = load_task("fin-sentiment-v1", 42)
    server = {(e.prompt, e.label) for e in eval_examples(cfg) + head_stat_examples(cfg)}
    pool = [e for e in task.eval if (e.prompt, e.label) not in server]
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(0)).tolist()
    taken, drawn = {c: 0 for c in range(len(task.label_words))}, set()
    for i in order:
        if taken[pool[i].label] < per_class:
            taken[pool[i].label] += 1
            drawn.add(pool[i].prompt)
    return drawn


def untouched() -> dict:
    seen = prior_shift_draw()
    test = load_task("fin-sentiment", 42).test
    keep = [i for i, e in enumerate(test) if e.prompt not in seen]
    runs = {r["id"]: r for r in json.loads((RESULTS / "results.json").read_text())["runs"]}
    labels = [runs["lp-seed42"]["test_labels"][i] for i in keep]
    acc = {rid: sum(r["test_predictions"][i] == r["test_labels"][i] for i in keep) / len(keep) for rid, r in runs.items()}
    out = {"test_tweets": len(test), "seen_by_prior_shift_check": len(test) - len(keep), "untouched": len(keep),
           "majority_rate": max(labels.count(c) for c in set(labels)) / len(labels), "accuracy": acc, "series": {}, "paired": {}}
    for s in ("lp", "lpft"):
        v = [acc[f"{s}-seed{x}"] for x in SEEDS]
        out["series"][s] = {"mean": statistics.mean(v), "se": statistics.stdev(v) / len(v) ** 0.5}
    pooled = [0, 0]
    for x in SEEDS:
        a, b = runs[f"lp-seed{x}"], runs[f"lpft-seed{x}"]
        bb, cc = discordant_counts([a["test_predictions"][i] for i in keep], [b["test_predictions"][i] for i in keep], labels)
        out["paired"][f"seed{x}"] = {"b": bb, "c": cc, "p": exact_mcnemar(bb, cc)}
        pooled = [pooled[0] + bb, pooled[1] + cc]
    out["paired"]["pooled"] = {"b": pooled[0], "c": pooled[1], "p": exact_mcnemar(*pooled)}
    return out


def main() -> int:
    out = untouched()
    (RESULTS / "untouched.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "accuracy"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
