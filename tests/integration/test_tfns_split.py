"""fin-sentiment (TFNS) answered honestly (issue 26, item 7): sent_valid.csv is split with a fixed
permutation into a public dev part and a test part of 1,600 tweets that no earlier recipe choice saw,
scored once at the end of a run with every prediction kept for paired tests. The earlier protocol
stays as the task fin-sentiment-v1, so its committed results reproduce."""

from __future__ import annotations

import pytest

from fl_dplora import evaluate as evaluate_module
from fl_dplora.data import eval_examples, head_stat_examples, load_task
from fl_dplora.server import evaluation as server_evaluation
from fl_dplora.task_card import TFNS_TEST_TWEETS
from harness import run_in_process, tiny_config


def test_the_dev_and_test_parts_split_the_validation_file_and_never_overlap():
    task, v1 = load_task("fin-sentiment", 42), load_task("fin-sentiment-v1", 42)
    dev, test = [e.prompt for e in task.eval], [e.prompt for e in task.test]
    assert len(test) == TFNS_TEST_TWEETS and len(dev) == len(v1.eval) - TFNS_TEST_TWEETS == 788
    assert not set(dev) & set(test) and set(dev) | set(test) == {e.prompt for e in v1.eval}
    assert not set(test) & {e.prompt for e in task.train}
    # the clients' pool is the one the earlier protocol partitioned: the same shards for the same seed
    assert [(e.prompt, e.label) for e in task.train] == [(e.prompt, e.label) for e in v1.train]
    # fixed: another run seed gives the same parts
    assert [e.prompt for e in load_task("fin-sentiment", 7).test] == test
    assert v1.test == []  # the earlier protocol has no untouched test part


@pytest.mark.parametrize("scored", [100, 200, 300])
def test_every_tweet_the_earlier_protocol_looked_at_is_in_the_dev_part(scored):
    # its recipe choices read the scored tweets' labels and the head statistics' prompts
    cfg = tiny_config(task="fin-sentiment-v1", max_eval_samples=scored)
    seen = {e.prompt for e in eval_examples(cfg) + head_stat_examples(cfg)}
    assert len(seen) == scored + 256
    assert not seen & {e.prompt for e in load_task("fin-sentiment", 42).test}


def test_the_new_protocol_monitors_and_takes_head_statistics_from_the_dev_part_only():
    cfg = tiny_config(task="fin-sentiment", max_eval_samples=300)
    test = {e.prompt for e in load_task("fin-sentiment", 42).test}
    scored, stats = eval_examples(cfg), head_stat_examples(cfg)
    assert len(scored) == 300 and len(stats) == 256 and not {e.prompt for e in scored + stats} & test


def test_the_test_part_is_scored_once_after_the_last_round_with_every_prediction(monkeypatch):
    task = load_task("fin-sentiment", 42)
    calls = []
    real = server_evaluation.evaluate

    def spy(model, tokenizer, t, examples, *args, **kwargs):
        calls.append([e.prompt for e in examples])
        return real(model, tokenizer, t, examples, *args, **kwargs)

    monkeypatch.setattr(server_evaluation, "evaluate", spy)  # every round's scoring
    monkeypatch.setattr(evaluate_module, "evaluate", spy)  # the test part's (evaluate.score_test_part)
    summary, _ = run_in_process(2, num_server_rounds=2, max_test_samples=24)
    test_prompts = {e.prompt for e in task.test}
    assert len(calls) == 3 and not any(set(c) & test_prompts for c in calls[:2])
    assert calls[2] == [e.prompt for e in task.test[:24]]  # max-test-samples: the first N, in order
    test = summary["test_eval"]
    assert test["num_inputs"] == 24 and len(test["predictions"]) == 24 and "probabilities" not in test
    assert test["labels"] == [e.label for e in task.test[:24]]
    right = sum(p == y for p, y in zip(test["predictions"], test["labels"]))
    assert test["accuracy"] == pytest.approx(right / 24)
    assert test["accuracy_se"] == pytest.approx((test["accuracy"] * (1 - test["accuracy"]) / 24) ** 0.5)
    assert [s["label"] for s in test["samples"]] == [task.label_words[e.label] for e in task.test[:5]]
    assert [s["predicted"] for s in test["samples"]] == [task.label_words[p] for p in test["predictions"][:5]]


def test_the_earlier_protocol_reports_no_test_part():
    summary, _ = run_in_process(2, task="fin-sentiment-v1", num_server_rounds=1)
    assert "test_eval" not in summary and summary["final_eval"]["num_examples"] == 16


def test_the_untouched_test_tweets_are_rescored_from_the_committed_predictions():
    # 397 test tweets were scored by the earlier protocol's prior-shift check; the rest are rescored
    import importlib.util

    from harness import REPO

    spec = importlib.util.spec_from_file_location("tfns_untouched", REPO / "experiments" / "tfns_untouched.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    drawn = mod.prior_shift_draw()
    task = load_task("fin-sentiment", 42)
    assert len(drawn) == 450 and not drawn & {e.prompt for e in task.train}
    assert len(drawn & {e.prompt for e in task.test}) == 397
    import json

    committed = json.loads((REPO / "experiments" / "results" / "tfns-test" / "untouched.json").read_text())
    assert json.loads(json.dumps(mod.untouched())) == committed  # the same floats, through the same JSON
