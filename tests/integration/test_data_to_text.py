"""The data-to-text task (E2E NLG): MR-level partitioning, a dev part and a test part that never
overlap, multi-reference BLEU/ROUGE-L from sacrebleu/rouge-score, and the test part scored once."""

from __future__ import annotations

import itertools

import pytest
import sacrebleu

from fl_dplora import evaluate as evaluate_module
from fl_dplora.server import evaluation as server_evaluation
from fl_dplora.data import load_local_file, load_task, partition_indices, with_references
from fl_dplora.evaluate import corpus_bleu, rouge_l, rouge_l_best
from fl_dplora.task_card import E2E_DEV_MRS
from harness import run_in_process

D2T = {"task": "data-to-text", "max-new-tokens": 4, "max-eval-samples": 6, "max-train-samples": 80, "max-test-samples": 0}


def test_the_clients_pool_is_the_devset_and_the_server_splits_part_a_by_mr():
    task = load_task("data-to-text", 42)
    assert len(task.train) == 4672 and len({e.unit for e in task.train}) == 547
    dev, test = {e.prompt for e in task.eval}, {e.prompt for e in task.test}
    assert len(dev) == E2E_DEV_MRS == len(task.eval) and len(test) == 315 - E2E_DEV_MRS == len(task.test)
    assert not dev & test
    assert sum(len(e.references) for e in task.eval + task.test) == 2279  # every reference of part A, once
    assert not {e.prompt for e in task.train} & (dev | test)
    # fixed permutation: the same parts for another run seed
    again = load_task("data-to-text", 7)
    assert [e.prompt for e in again.test] == [e.prompt for e in task.test]


@pytest.mark.parametrize("clients,max_train", [(5, 0), (3, 500)])
def test_no_mr_is_split_across_clients(clients, max_train):
    task = load_task("data-to-text", 42)
    parts = partition_indices("data-to-text", clients, "iid", 0.5, 42, max_train)
    mrs = [{task.train[i].unit for i in p} for p in parts]
    assert all(not a & b for a, b in itertools.combinations(mrs, 2))
    for p, m in zip(parts, mrs):  # a client holds every reference of each of its MRs
        assert len(p) == sum(1 for e in task.train if e.unit in m)
    if max_train:
        assert max_train <= sum(map(len, parts)) < max_train + 20  # whole MRs up to the cap


def test_plain_tasks_partition_as_before():
    # no units: the partition is flwr-datasets' IidPartitioner over the seeded order, unchanged
    parts = partition_indices("fin-sentiment", 5, "iid", 0.5, 42, 0)
    assert [len(p) for p in parts] == [1909, 1909, 1909, 1908, 1908]
    assert parts[0][:5] == (2661, 4182, 6026, 4597, 7332)


def _write_mr_ref(path, rows):
    import csv

    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["mr", "ref"])
        w.writerows(rows)


def test_multi_reference_bleu_equals_sacrebleu_on_a_hand_made_example(tmp_path):
    rows = [("name[A], food[French]", "A serves French food in the city centre ."),
            ("name[B], area[riverside]", "B is a riverside pub that serves cheap food ."),
            ("name[A], food[French]", "The French restaurant A is in the centre of the city ."),
            ("name[C], eatType[pub]", "C is a pub near the river with a good rating ."),
            ("name[A], food[French]", "There is a place called A that serves French food ."),
            ("name[C], eatType[pub]", "The pub C has a good customer rating .")]
    _write_mr_ref(tmp_path / "three.csv", rows)
    task = load_task("data-to-text", 42)
    examples = with_references(load_local_file(str(tmp_path / "three.csv"), task, flag="--eval-file"))
    assert [len(e.references) for e in examples] == [3, 1, 2]  # rows of one MR are its references
    hyps = ["A serves French food in the centre of the city .", "B is a cheap riverside pub .",
            "C is a pub with a good customer rating ."]
    ours = corpus_bleu(hyps, [e.references for e in examples])
    by_hand = sacrebleu.corpus_bleu(hyps, [
        ["A serves French food in the city centre .", "B is a riverside pub that serves cheap food .",
         "C is a pub near the river with a good rating ."],
        ["The French restaurant A is in the centre of the city .", None, "The pub C has a good customer rating ."],
        ["There is a place called A that serves French food .", None, None],
    ]).score
    assert ours == pytest.approx(by_hand, abs=1e-9)
    first_only = sacrebleu.corpus_bleu(hyps, [[e.references[0] for e in examples]]).score
    assert ours > first_only + 5  # the other references count


def test_rouge_l_is_against_the_best_reference():
    refs = ["a b c d", "x y z", "the cat runs fast"]
    assert rouge_l_best(refs, "the cat running fast") == pytest.approx(1.0)
    assert rouge_l_best(refs, "a x d") == pytest.approx(max(rouge_l(r, "a x d") for r in refs))


def test_blank_reference_is_one_line_with_its_row(tmp_path):
    from fl_dplora.config import ConfigError

    _write_mr_ref(tmp_path / "blank.csv", [("name[A]", "A is a pub."), ("name[B]", "")])
    with pytest.raises(ConfigError, match=r"row 3: column 'ref' is empty"):
        load_local_file(str(tmp_path / "blank.csv"), load_task("data-to-text", 42))


def test_general_instruct_is_scored_without_a_crash():
    # issue 26: the server's evaluation of a generation task raised IndexError in argmax
    summary, out = run_in_process(2, task="general-instruct", num_server_rounds=1, local_steps=1,
                                  max_train_samples=20, max_eval_samples=4, max_new_tokens=4)
    fe = summary["final_eval"]
    assert fe["accuracy"] is None and fe["loss"] > 0 and 0 <= fe["bleu"] <= 100 and 0 <= fe["rouge_l"] <= 1
    assert "test_eval" not in summary  # Dolly has no separate test part


def test_the_test_part_is_scored_once_after_the_last_round(monkeypatch):
    task = load_task("data-to-text", 42)
    test_prompts = {e.prompt for e in task.test}
    calls = []
    real = server_evaluation.evaluate

    def spy(model, tokenizer, t, examples, *args, **kwargs):
        calls.append({e.prompt for e in examples})
        return real(model, tokenizer, t, examples, *args, **kwargs)

    monkeypatch.setattr(server_evaluation, "evaluate", spy)  # every round's scoring
    monkeypatch.setattr(evaluate_module, "evaluate", spy)  # the test part's (evaluate.score_test_part)
    summary, out = run_in_process(2, num_server_rounds=2, **{k.replace("-", "_"): v for k, v in D2T.items()})
    assert len(calls) == 3  # round 1, round 2, then the test part
    assert all(not c & test_prompts for c in calls[:2]) and calls[2] == test_prompts
    assert all(c <= {e.prompt for e in task.eval} for c in calls[:2])
    test = summary["test_eval"]
    assert test["num_examples"] == len(task.test) and 0 <= test["bleu"] <= 100
    assert [s["input"] for s in test["samples"]] == [e.prompt for e in task.test[:5]]
    assert all(s["references"] == list(e.references) for s, e in zip(test["samples"], task.test))
    rows = [__import__("json").loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["eval_bleu"] is not None and r["eval_rouge_l"] is not None for r in rows)


def test_bleu_standard_error_is_a_bootstrap_over_inputs():
    from fl_dplora.evaluate import bleu_bootstrap_se

    refs = [["the cat sat on the mat", "a cat sat on the mat"], ["there is a pub near the river"],
            ["Blue Spice serves French food in the city centre"], ["a cheap family friendly coffee shop"]]
    perfect = [r[0] for r in refs]
    assert bleu_bootstrap_se(perfect, refs) == pytest.approx(0.0, abs=1e-9)  # every resample scores 100
    mixed = ["the cat sat on the mat", "a pub is near a river", "French food at Blue Spice", "cheap coffee"]
    se = bleu_bootstrap_se(mixed, refs)
    assert 0 < se < 50 and se == bleu_bootstrap_se(mixed, refs)  # seeded: the same SE on a rerun
    assert bleu_bootstrap_se(mixed[:1], refs[:1]) is None  # one input: no spread to measure


def test_bleu_standard_error_from_summed_statistics_equals_rescoring_each_resample():
    """The fast bootstrap (per-input n-gram statistics summed per resample) is the same number as
    scoring each resampled corpus with sacrebleu from its text."""
    import torch

    from fl_dplora.evaluate import BOOTSTRAP_RESAMPLES, bleu_bootstrap_se, corpus_bleu

    refs = [["the cat sat on the mat", "a cat sat on the mat"], ["there is a pub near the river"],
            ["Blue Spice serves French food in the city centre", "Blue Spice is in the centre"],
            ["a cheap family friendly coffee shop"], ["The Eagle is a pub", "Eagle: a pub by the river", "a pub"]]
    hyps = ["the cat sat on a mat", "a pub is near a river", "French food at Blue Spice", "cheap coffee", "The Eagle pub"]
    g, n, draws = torch.Generator().manual_seed(0), len(hyps), []
    for _ in range(BOOTSTRAP_RESAMPLES):
        idx = torch.randint(n, (n,), generator=g).tolist()
        draws.append(corpus_bleu([hyps[i] for i in idx], [refs[i] for i in idx]))
    assert bleu_bootstrap_se(hyps, refs) == pytest.approx(float(torch.tensor(draws, dtype=torch.float64).std()), rel=1e-9)


def test_paired_bleu_test_separates_a_better_system_and_not_itself():
    from fl_dplora.evaluate import paired_bleu_p_value

    refs = [["the cat sat on the mat", "a cat sat on the mat"], ["there is a pub near the river"],
            ["Blue Spice serves French food in the city centre"], ["a cheap family friendly coffee shop"]] * 10
    good = ["the cat sat on the mat", "a pub is near the river", "Blue Spice serves French food", "a cheap coffee shop"] * 10
    bad = ["a dog", "pub", "food", "shop"] * 10
    assert paired_bleu_p_value(bad, good, refs) < 0.01
    assert paired_bleu_p_value(good, good, refs) == 1.0
