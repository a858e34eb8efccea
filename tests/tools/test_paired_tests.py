"""Paired tests on a classification task's test part: exact McNemar, the results.md section, the record keys."""

from __future__ import annotations

import json

import pytest
from scipy.stats import binomtest

from fl_dplora.tools import experiments as ex
from fl_dplora.tools.experiments.paired import discordant_counts, mcnemar_p_value
from fl_dplora.tools.experiments.results import _generated_texts, column_text, paired_accuracy_tests
from test_experiments import _fake_run, spec_dir  # noqa: F401  (spec_dir: a fixture)

LABELS = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]


def _by_hand(a, b, labels):
    """b: A right and B wrong; c: A wrong and B right; counted one example at a time."""
    only_a = only_b = 0
    for i in range(len(labels)):
        a_right, b_right = a[i] == labels[i], b[i] == labels[i]
        if a_right and not b_right:
            only_a += 1
        elif b_right and not a_right:
            only_b += 1
    return only_a, only_b


def test_mcnemar_is_an_exact_binomial_test_on_the_discordant_pairs():
    a = [0, 1, 2, 0, 1, 2, 0, 1, 0, 1]  # right on the first 8
    b = [0, 2, 0, 1, 1, 2, 1, 0, 2, 1]  # right on 0, 4, 5, 8
    only_a, only_b = _by_hand(a, b, LABELS)
    assert (only_a, only_b) == (5, 1) == discordant_counts(a, b, LABELS)
    assert mcnemar_p_value(a, b, LABELS) == pytest.approx(binomtest(5, 6, 0.5).pvalue)
    assert mcnemar_p_value(a, b, LABELS) == pytest.approx(14 / 64)  # 2 * P(X >= 5), X ~ Bin(6, 1/2)
    assert mcnemar_p_value(b, a, LABELS) == pytest.approx(mcnemar_p_value(a, b, LABELS))  # two-sided
    # no discordant example (the same right/wrong pattern, even with different wrong answers): p = 1
    c = [0, 1, 2, 0, 1, 2, 0, 1, 1, 2]
    assert discordant_counts(a, c, LABELS) == (0, 0) and mcnemar_p_value(a, c, LABELS) == 1.0
    with pytest.raises(ValueError, match="equal lengths"):
        mcnemar_p_value(a, a[:-1], LABELS)


def _rec(run_id, series, seed, preds, kind="train", labels=LABELS):
    return {"id": run_id, "series": series, "seed": seed, "kind": kind, "test_predictions": preds, "test_labels": labels}


def test_paired_accuracy_section_compares_each_run_with_zero_shot_and_the_reference_series():
    zero = [0] * 10  # right on 0, 3, 6, 9: 40%
    good = list(LABELS)  # 100%
    half = [0, 1, 2, 0, 1, 0, 1, 2, 0, 0]  # right on 0-4 and 9: 60%
    records = [
        _rec("ref-seed42", "ref", 42, good), _rec("ref-seed1", "ref", 1, half),
        _rec("dp-seed42", "dp", 42, half), _rec("dp-seed1", "dp", 1, half),
        _rec("dp-seed2", "dp", 2, half[:-1], labels=LABELS[:-1]),  # fewer test inputs: compared with nothing
        _rec("zero-shot", "zero-shot", 42, zero, kind="zero-shot"),
        {"id": "old", "series": "dp", "seed": 7, "kind": "train"},  # an older summary: no predictions, no row
    ]
    lines = paired_accuracy_tests(records)
    assert lines[1] == "## Paired tests on the test part (accuracy difference, exact McNemar)"
    assert "| run | test accuracy | vs zero-shot | p | vs ref (same seed) | p |" in lines
    rows = {line.split(" | ")[0][2:]: line for line in lines if line.startswith("| ") and "-seed" in line.split(" | ")[0]}
    assert list(rows) == ["ref-seed42", "ref-seed1", "dp-seed42", "dp-seed1", "dp-seed2"]

    def p(a, b):
        only_a, only_b = _by_hand(a, b, LABELS)
        return f"{binomtest(only_a, only_a + only_b, 0.5).pvalue:.3f}" if only_a + only_b else "1.000"

    # the reference series' own rows: no same-seed column
    assert rows["ref-seed42"] == f"| ref-seed42 | 100.0% | +60.0 pp | {p(good, zero)} | – | – |"
    assert rows["ref-seed1"] == f"| ref-seed1 | 60.0% | +20.0 pp | {p(half, zero)} | – | – |"
    assert rows["dp-seed42"] == f"| dp-seed42 | 60.0% | +20.0 pp | {p(half, zero)} | -40.0 pp | {p(half, good)} |"
    assert rows["dp-seed1"] == f"| dp-seed1 | 60.0% | +20.0 pp | {p(half, zero)} | +0.0 pp | 1.000 |"
    assert rows["dp-seed2"] == "| dp-seed2 | 55.6% | – | – | – | – |"  # 9 predictions against 10: unpaired
    # pooled over the seeds both series have with equal lengths (42, 1): b = only ref right, c = only dp right
    b42, c42 = _by_hand(good, half, LABELS)
    pooled = binomtest(b42, b42, 0.5).pvalue  # seed 1: the same predictions, no discordant pair
    assert c42 == 0 and f"| ref vs dp | 42, 1 | 20 | {b42} | 0 | +{100 * b42 / 20:.1f} pp | {pooled:.3f} |" in lines
    # no classification predictions (a generation experiment): no section
    assert paired_accuracy_tests([{**r, "test_predictions": None} for r in records]) == []


def test_record_keeps_a_classification_test_part_flat(spec_dir):  # noqa: F811
    spec = ex.load_spec("tiny")
    run, old = spec.runs[0], spec.runs[1]
    _fake_run(run, 0.5)
    _fake_run(old, 0.5)
    test = {"loss": 0.8, "perplexity": 2.2, "num_examples": 4, "accuracy": 0.75, "macro_f1": 0.6, "majority_rate": 0.5,
            "accuracy_se": (0.75 * 0.25 / 4) ** 0.5, "num_inputs": 4, "predictions": [0, 1, 2, 2], "labels": [0, 1, 2, 1],
            "samples": [{"input": "tweet", "predicted": "neutral", "label": "neutral"}]}
    summary = json.loads((ex.run_dir(run) / "summary.json").read_text())
    (ex.run_dir(run) / "summary.json").write_text(json.dumps({**summary, "test_eval": test}))
    older = json.loads((ex.run_dir(old) / "summary.json").read_text())  # a test part before predictions were kept
    (ex.run_dir(old) / "summary.json").write_text(json.dumps({**older, "test_eval": {"accuracy": 0.7, "loss": 0.9}}))

    rec = ex.record(run)
    assert {k: rec[k] for k in ("test_accuracy", "test_accuracy_se", "test_macro_f1", "test_majority_rate", "test_loss",
                                "test_inputs", "test_predictions", "test_labels")} == {
        "test_accuracy": 0.75, "test_accuracy_se": test["accuracy_se"], "test_macro_f1": 0.6, "test_majority_rate": 0.5,
        "test_loss": 0.8, "test_inputs": 4, "test_predictions": [0, 1, 2, 2], "test_labels": [0, 1, 2, 1]}
    assert "test_bleu" not in rec and "test_generations" not in rec
    rec_old = ex.record(old)
    assert rec_old["test_accuracy"] == 0.7 and "test_predictions" not in rec_old and "test_accuracy_se" not in rec_old
    # the markdown table: percentages like accuracy, long lists as a count (never a 1,600-entry cell)
    assert column_text(rec, "test_accuracy") == "75.0%" and column_text(rec, "test_accuracy_se") == "21.7%"
    assert column_text(rec, "test_predictions") == "(4 values)" and column_text(rec_old, "test_macro_f1") == "–"
    # classification samples are not generated texts; the section still shows where they come from
    assert _generated_texts([rec]) == []
    md = ex.markdown(spec, [rec, rec_old], "fl-dplora experiment tiny")
    assert "Generated texts" not in md and "| rank-2 | 2 | 50.0% |" in md
    assert "## Paired tests on the test part (accuracy difference, exact McNemar)" in md


def test_generation_record_unchanged_by_the_classification_keys(spec_dir):  # noqa: F811
    spec = ex.load_spec("tiny")
    run = spec.runs[0]
    _fake_run(run, 0.5)
    summary = json.loads((ex.run_dir(run) / "summary.json").read_text())
    test = {"bleu": 9.7, "bleu_se": 0.4, "loss": 1.1, "num_inputs": 2, "generations": ["a b", "c d"],
            "samples": [{"input": "x", "generated": "a b", "references": ["a b"]}]}
    (ex.run_dir(run) / "summary.json").write_text(json.dumps({**summary, "test_eval": test}))
    rec = ex.record(run)
    assert (rec["test_bleu"], rec["test_inputs"], rec["test_generations"]) == (9.7, 2, ["a b", "c d"])
    assert "test_accuracy" not in rec and "test_predictions" not in rec
    assert _generated_texts([rec])[1] == "## Generated texts (test part, the same first inputs in every run)"
