"""Evaluation metrics come from the maintained libraries (scikit-learn, rouge-score)."""

from __future__ import annotations

import pytest

from fl_dplora.evaluate import macro_f1, rouge_l


def test_macro_f1_counts_the_classes_present_and_scores_a_never_predicted_class_zero():
    # class 0: tp 2 fp 1 fn 0 -> 0.8; class 1: tp 0 fp 0 fn 1 -> 0; class 2 absent everywhere: not counted
    assert macro_f1([0, 0, 1], [0, 0, 0]) == pytest.approx(0.4)
    assert macro_f1([0, 1, 2, 2], [0, 1, 2, 2]) == 1.0
    assert macro_f1([], []) == 0.0


def test_rouge_l_uses_the_standard_tokenizer_and_stemmer():
    # stemming: "runs"/"running" -> "run"; tokenization drops punctuation and case
    assert rouge_l("The cat runs fast.", "the cat running fast") == pytest.approx(1.0)
    # LCS 2 of 4 reference tokens and 3 candidate tokens: P 2/3, R 1/2, F 4/7
    assert rouge_l("a b c d", "a x d") == pytest.approx(4 / 7)
    assert rouge_l("anything", "") == 0.0
