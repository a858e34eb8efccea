"""label-head: a DP linear probe on the label words that every path (loss, evaluation, DP step,
transport, accounting, saved adapter) sees the same way.

If the head's fast path (states computed once per head-only round) computed another function than
the full forward, DP-SGD would clip and noise the gradients of the wrong model; if a head-only round
sent the LoRA tensors, communication would not shrink; if the two-stage schedule were accounted as
one stage, the reported epsilon would be false. Each test below fails in that case.
"""

from __future__ import annotations

import pytest
import torch
from harness import run_in_process

from fl_dplora.write_ahead import read_operator
from fl_dplora import forward, frozen_prefix, label_head, models
from fl_dplora.config import ConfigError, resolve
from fl_dplora.data import collate, encode_all, eval_examples, head_stat_examples, load_task
from fl_dplora.forward import answer_logits, first_answer_positions, label_token_ids, per_example_loss
from fl_dplora.model_loading import load_tokenizer
from fl_dplora.models import get_peft_model
from fl_dplora.privacy.accounting import PrivacyLedger, calibrate_schedule
from fl_dplora.privacy.per_sample import LoRAGradSampler
from fl_dplora.train import DPSGD, local_train, make_optimizer, stage_config

ATOL = 1e-5


@pytest.fixture(autouse=True)
def fresh_model(monkeypatch, tmp_path):
    monkeypatch.setenv("FL_DPLORA_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    models.forget_cached_model()
    frozen_prefix.clear_memory_cache()
    yield
    frozen_prefix.clear_memory_cache()
    models.forget_cached_model()
    torch.set_num_threads(threads)


def setup(n: int = 12, **extra):
    """(cfg, model with a random head attached, encoded fin-sentiment examples, label ids, pad id)."""
    cfg = resolve({"model": "tiny-random-llama", "lora-targets": "q_proj,v_proj", "lora-rank": 4, "lora-layers": 1,
                   "lora-variant": "lora", "loss": "label-words", "label-head": True, **extra})
    model = get_peft_model(cfg).eval()
    tok = load_tokenizer(cfg.model.name)
    ids = label_token_ids(tok, load_task("fin-sentiment").label_words)
    enc = encode_all(tok, load_task("fin-sentiment").train[:n], 64, "")
    mean, scale = label_head.feature_stats(model, encode_all(tok, load_task("fin-sentiment").eval[:20], 64, ""),
                                           tok.pad_token_id)
    head = label_head.install(model, ids.tolist(), mean, scale)
    with torch.no_grad():
        head.proj.weight.copy_(torch.randn(head.proj.weight.shape, generator=torch.Generator().manual_seed(3)))
    return cfg, model, enc, ids, tok.pad_token_id


def test_head_scores_the_label_words_at_the_first_answer_position_only():
    _, model, enc, ids, pad = setup()
    batch = collate(enc, pad)
    with torch.no_grad():
        logits, targets, rows = answer_logits(model, batch)
        head = label_head.get(model)
        label_head.remove(model)
        plain, _, _ = answer_logits(model, batch)
        setattr(model, label_head.ATTR, head)
        states = label_head.first_answer_states(model, enc, pad)
    first = first_answer_positions(rows)
    torch.testing.assert_close(logits[first][:, ids], head(states), rtol=0, atol=ATOL)
    other = torch.ones(logits.shape[1], dtype=torch.bool)
    other[ids] = False
    assert bool((logits[first][:, other] == forward.LABEL_HEAD_FLOOR).all())  # only label words at the first position
    torch.testing.assert_close(logits[~first], plain[~first])  # later answer tokens untouched
    assert not torch.allclose(logits[first][:, ids], plain[first][:, ids])


def test_fast_path_gives_the_full_paths_losses_and_per_example_gradients(monkeypatch):
    _, model, enc, ids, pad = setup()
    head = label_head.get(model)
    full_batch = collate(enc, pad)
    states = label_head.first_answer_states(model, enc, pad)
    fast_batch = {**full_batch, "answer_hidden": states}
    with monkeypatch.context() as m:  # the fast path is taken: no decoder pass
        m.setattr(forward, "answer_logits", lambda *a: pytest.fail("the full path ran"))
        per_example_loss(model, fast_batch, ids)

    def per_example(batch):
        with LoRAGradSampler(model, [head.proj.weight]) as sampler:
            loss = per_example_loss(model, batch, ids)
            loss.sum().backward()
            grads = sampler.per_example()[0]
        head.proj.weight.grad = None
        return loss.detach(), grads

    loss_full, g_full = per_example(full_batch)
    loss_fast, g_fast = per_example(fast_batch)
    torch.testing.assert_close(loss_fast, loss_full, rtol=0, atol=ATOL)
    torch.testing.assert_close(g_fast, g_full, rtol=0, atol=ATOL)
    # and they are each example's own gradient: one example alone gives its row
    _, g_one = per_example(collate(enc[3:4], pad))
    torch.testing.assert_close(g_full[3], g_one[0], rtol=0, atol=ATOL)
    assert g_full.abs().sum() > 0


def test_head_only_local_train_equals_the_full_forward_run(monkeypatch):
    cfg, model, enc, ids, pad = setup(n=20, **{"local-steps": 3, "batch-size": 10, "micro-batch-size": 10,
                                              "optimizer": "adamw", "head-learning-rate": 0.1})
    head = label_head.get(model)
    init = head.proj.weight.detach().clone()

    def run(noise_seed: int) -> torch.Tensor:
        with torch.no_grad():
            head.proj.weight.copy_(init)
        params = [head.proj.weight]
        local_train(model, params, enc, cfg, optimizer=make_optimizer(params, cfg.train, head_params=params),
                    dp=DPSGD(1.0, 0.5, torch.Generator().manual_seed(noise_seed)),
                    sampling_generator=torch.Generator().manual_seed(5), pad_id=pad, label_token_ids=ids)
        return head.proj.weight.detach().clone()

    fast = run(1)
    import fl_dplora.train as train

    monkeypatch.setattr(train, "_with_answer_states", lambda model, data, pad_id: list(data))  # full forward every step
    full = run(1)
    assert (fast - init).abs().max() > 1e-3
    torch.testing.assert_close(fast, full, rtol=0, atol=ATOL)
    assert (run(2) - full).abs().max() > 1e-4  # not vacuous: other noise, other head


def test_optimizer_gives_the_head_its_own_learning_rate():
    cfg, model, *_ = setup(**{"learning-rate": 1e-3, "head-learning-rate": 0.3})
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    head = list(label_head.get(model).parameters())
    opt = make_optimizer(lora + head, cfg.train, head_params=head)
    assert sorted(g["lr"] for g in opt.param_groups) == [1e-3, 0.3]


def test_two_stage_schedule_is_calibrated_and_accounted_as_composed():
    from opacus.accountants import PRVAccountant

    schedule = ((1.0, 32), (0.08, 32))  # head rounds at q = 1, then LoRA rounds at q = 0.08
    sigma = calibrate_schedule(8.0, 1e-5, schedule, "prv")
    acc = PRVAccountant()
    acc.history = [(sigma, q, steps) for q, steps in schedule]
    eps = acc.get_epsilon(1e-5)
    assert 7.8 <= eps <= 8.0
    # accounting only the LoRA stage would have allowed far less noise: the head stage is charged
    assert sigma > calibrate_schedule(8.0, 1e-5, schedule[1:], "prv") * 1.5


def test_stage_config_uses_the_head_keys_in_head_rounds_only():
    cfg = resolve({"task": "fin-sentiment", "loss": "label-words", "label-head": True, "head-rounds": 2, "num-server-rounds": 3, "head-batch-size": 0,
                   "head-local-steps": 7, "local-steps": 3, "batch-size": 16, "micro-batch-size": 8})
    assert (stage_config(cfg, 2, 50).train.batch_size, stage_config(cfg, 2, 50).train.local_steps) == (50, 7)
    assert (stage_config(cfg, 3, 50).train.batch_size, stage_config(cfg, 3, 50).train.local_steps) == (16, 3)
    from fl_dplora.clients.node_privacy import sample_schedule

    assert sample_schedule(cfg, 50) == ((1.0, 14), (16 / 50, 3))
    kept = {k: v for k, v in cfg.to_record().items() if k in ("task", "loss", "label-head", "head-local-steps")}
    only_head = resolve({**kept, "head-rounds": 9, "num-server-rounds": 3})
    assert sample_schedule(only_head, 50) == ((1.0, 21),)  # head-rounds beyond the run: every round head-only


@pytest.mark.parametrize("bad, match", [
    ({"label-head": True, "loss": "answer-tokens"}, "^label-head: needs loss = label-words"),
    ({"label-head": True, "loss": "label-words", "dp-mode": "paper", "population": 5}, "^label-head: not with dp-mode = paper"),
])
def test_bad_label_head_configs_are_one_line_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        resolve(bad)


def test_statistics_come_from_public_examples_outside_the_scored_and_training_sets():
    cfg = resolve({"task": "fin-sentiment", "max-eval-samples": 300})
    public = head_stat_examples(cfg)
    scored = {e.prompt for e in eval_examples(cfg)}
    train = {e.prompt for e in load_task("fin-sentiment").train}
    assert len(public) == 256
    assert not {e.prompt for e in public} & scored
    assert not {e.prompt for e in public} & train


def test_no_statistics_prompt_is_ever_in_the_scored_set(tmp_path, monkeypatch):
    """max-eval-samples = 0 (or an eval file no larger than max-eval-samples, like the hospital demo's):
    every eval row is scored, so no prompt is left for the statistics; the head gets data-independent
    ones and the server encodes no prompt for them."""
    import pandas as pd

    from fl_dplora.server import evaluation as server_evaluation
    from fl_dplora.data import DATA_DIR

    # the earlier protocol scores the whole validation file; today's task the whole dev part (788 of 2,388)
    for task, size in (("fin-sentiment-v1", 2000), ("fin-sentiment", 780)):
        cfg = resolve({"task": task, "max-eval-samples": 0})
        scored = {e.prompt for e in eval_examples(cfg)}
        assert len(scored) > size and not {e.prompt for e in head_stat_examples(cfg)} & scored
    valid = pd.read_csv(DATA_DIR / "tfns" / "sent_valid.csv")
    valid.iloc[:120][["text", "label"]].to_csv(tmp_path / "train.csv", index=False)
    valid.iloc[120:160][["text", "label"]].to_csv(tmp_path / "test.csv", index=False)  # 40 rows <= 300
    small = resolve({"task": str(tmp_path / "train.csv")})
    assert len(eval_examples(small)) == 40 and head_stat_examples(small) == []
    part = resolve({"task": str(tmp_path / "train.csv"), "max-eval-samples": 30})
    assert len(head_stat_examples(part)) == 10
    assert not {e.prompt for e in head_stat_examples(part)} & {e.prompt for e in eval_examples(part)}
    # the server's setup: nothing scored reaches the statistics
    encoded = []
    real_encode = server_evaluation.encode_all
    monkeypatch.setattr(server_evaluation, "encode_all", lambda tok, ex, *a: encoded.extend(ex) or real_encode(tok, ex, *a))
    run_cfg, model, *_ = setup()
    run_cfg = run_cfg.with_values({"max-eval-samples": 0})
    tok = load_tokenizer(run_cfg.model.name)
    stats = server_evaluation.setup_label_head(model, tok, load_task("fin-sentiment"), run_cfg)
    assert not {e.prompt for e in encoded} & scored
    mean, scale = label_head.stats_from_config(stats)
    assert torch.equal(mean, torch.zeros(model.config.hidden_size)) and torch.equal(scale, torch.ones_like(mean))
    assert label_head.get(model) is not None


def test_generation_task_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match="^label-head: needs a classification task"):
        run_in_process(1, output_dir=tmp_path / "gen", task="general-instruct", **{"label-head": True,
                       "loss": "label-words"})


@pytest.mark.slow
def test_lp_ft_run_sends_only_the_head_first_and_saves_a_head_that_reloads(tmp_path):
    from fl_dplora.cli import main

    summary, out = run_in_process(2, output_dir=tmp_path / "run", **{
        "label-head": True, "head-rounds": 2, "num-server-rounds": 3, "loss": "label-words", "dp-mode": "sample",
        "head-local-steps": 3, "secure-rng": False, "target-epsilon": 8.0})
    rows = read_operator(out)[0]  # bytes per round: the operator log
    assert rows[0]["bytes_up"] * 3 < rows[2]["bytes_up"]  # head-only rounds: 1 small tensor per client
    assert (out / "adapter" / label_head.FILE).is_file()
    # every client's epsilon is the composition of its two stages (q = 1 head steps, then LoRA steps)
    cfg = summary["config"]
    history = summary["privacy"]["history"]
    assert [(q, steps) for _, q, steps in history] == [(1.0, 2 * int(cfg["head-local-steps"])),
                                                      (summary["privacy"]["sample_rate"], int(cfg["local-steps"]))]
    for client in summary["privacy"]["per_client"].values():
        ledger = PrivacyLedger()
        n = round(int(cfg["batch-size"]) / client["sample_rate"])
        ledger.step(client["sigma"], 1.0, 2 * int(cfg["head-local-steps"]))
        ledger.step(client["sigma"], min(1.0, int(cfg["batch-size"]) / n), int(cfg["local-steps"]))
        assert client["epsilon"] == pytest.approx(ledger.epsilon(cfg["delta"], "prv"), rel=1e-6)
        assert client["epsilon"] <= 8.0
    # the saved adapter + head score exactly what the server scored last
    overrides = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={str(v).lower()}"
                         for k, v in cfg.items() if k in ("model", "task", "max-eval-samples", "max-seq-len", "seed",
                                                          "lora-layers", "system-prompt", "prefix-cache"))
    result = tmp_path / "eval.json"
    assert main(["evaluate", "--adapter", str(out / "adapter"), "--run-config", overrides, "--output", str(result)]) == 0
    import json

    assert json.loads(result.read_text())["final_eval"]["accuracy"] == pytest.approx(summary["final_eval"]["accuracy"])

