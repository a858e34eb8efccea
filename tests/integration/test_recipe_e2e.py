"""The fin-sentiment preset's recipe (issue 16, the default before 2026-12) and the default data-to-text
DP-LoRA job, end to end through the real ServerApp/ClientApp loop, on the tiny model.

The recipe's own knobs (label-word loss, no system prompt, LoRA on all linear layers of the top
blocks, AdamW, DP-SGD) with `lora-layers = 1` on the 2-block tiny LLaMA, so the frozen-prefix cache
is active: block 0 runs once per example (the first time a client or the server sees it), never
again in later rounds, and the run computes what the uncached run computes.
"""

from __future__ import annotations

import pytest
import torch
from harness import read_metrics, run_in_process

from fl_dplora.config import defaults, tfns_recipe_defaults
from fl_dplora.frozen_prefix import clear_memory_cache, decoder_blocks
from fl_dplora.models import get_peft_model

pytestmark = pytest.mark.slow

RECIPE = {  # pyproject's defaults, made small: only size knobs and the tiny model differ
    "model": "tiny-random-llama", "num-server-rounds": 3, "local-steps": 2, "batch-size": 16,
    "micro-batch-size": 8, "max-seq-len": 64, "max-train-samples": 90, "max-eval-samples": 24,
    "lora-layers": 1, "dp-mode": "sample", "target-epsilon": 8.0, "secure-rng": False, "checkpoint-every": 0,
}


def _run_counting_block0(tmp_path, name: str, **extra):
    """(summary, metrics rows, calls of block 0 per round) of one in-process run."""
    from fl_dplora.config import resolve

    clear_memory_cache()
    model = get_peft_model(resolve({**RECIPE, **extra}))
    block0 = decoder_blocks(model)[2][0]
    calls: list[int] = []
    handle = block0.register_forward_hook(lambda *a: calls.append(1))
    rounds: list[int] = []
    import fl_dplora.server.loop as server_loop

    original = server_loop.evaluate_global

    def evaluate_and_mark(*args, **kwargs):  # called once per round, after the clients trained
        out = original(*args, **kwargs)
        rounds.append(len(calls))
        return out

    server_loop.evaluate_global = evaluate_and_mark
    try:
        summary, out = run_in_process(3, output_dir=tmp_path / name, defaults=tfns_recipe_defaults(), **{**RECIPE, **extra})
    finally:
        server_loop.evaluate_global = original
        handle.remove()
    per_round = [b - a for a, b in zip([0] + rounds[:-1], rounds)]
    return summary, read_metrics(out), per_round


def test_recipe_runs_with_the_prefix_cache_and_matches_the_uncached_run(tmp_path):
    cached, rows, calls = _run_counting_block0(tmp_path, "cached", **{"prefix-cache": "memory"})
    full, rows_full, calls_full = _run_counting_block0(tmp_path, "full", **{"prefix-cache": "off"})
    # block 0 ran in round 1 (building the clients' and the server's caches), never afterwards
    assert calls[0] > 0 and calls[1:] == [0, 0], calls
    # the preset's rounds are all head-only: nothing below the head changes after round 1, so even uncached
    # neither the clients nor the server run block 0 again (their answer states are reused; issue 30)
    assert calls_full[0] > 0 and calls_full[1:] == [0, 0], calls_full
    _, _, calls_lora = _run_counting_block0(tmp_path, "full-lora", **{"prefix-cache": "off", "head-rounds": 1})
    assert all(c > 0 for c in calls_lora), calls_lora  # uncached LoRA rounds run the whole model every round
    # same seeds, same data: the cache changes where block 0 runs, not what the run computes
    assert cached["final_eval"]["loss"] == pytest.approx(full["final_eval"]["loss"], rel=1e-4)
    assert cached["final_eval"]["accuracy"] == full["final_eval"]["accuracy"]
    assert cached["privacy"]["epsilon"] == pytest.approx(full["privacy"]["epsilon"]) and 0 < cached["privacy"]["epsilon"] <= 8.0
    # every accuracy stands next to the majority rate of the same examples, and macro-F1
    for row in rows:
        assert 0 < row["eval_majority_rate"] <= 1 and row["eval_macro_f1"] is not None
    assert cached["final_eval"]["majority_rate"] == rows[-1]["eval_majority_rate"]
    assert cached["config"]["loss"] == "label-words" and cached["config"]["system-prompt"] == ""
    torch.manual_seed(0)  # leave the global RNG as other tests expect it


def test_the_default_job_trains_lora_a_and_b_under_dp_and_scores_the_test_part(tmp_path):
    """The package's defaults (the data-to-text DP-LoRA job) with only the model and sizes made small:
    DP-SGD at epsilon <= 8 moves every LoRA B away from its zero init (the adapter, not a head, carries
    what was learned), and the run ends with BLEU on the test part."""
    from safetensors.torch import load_file

    small = {"model": "tiny-random-llama", "max-train-samples": 60, "max-eval-samples": 4, "local-steps": 2,
             "batch-size": 8, "micro-batch-size": 8, "max-new-tokens": 4, "lora-layers": 1, "secure-rng": False,
             "checkpoint-every": 0}
    assert set(small) & {"task", "dp-mode", "label-head", "lora-variant", "target-epsilon"} == set()
    summary, out = run_in_process(3, output_dir=tmp_path / "default", defaults={}, **small)
    assert summary["config"]["task"] == "data-to-text" and summary["config"]["dp-mode"] == "sample"
    assert 0 < summary["privacy"]["epsilon"] <= defaults()["target-epsilon"] * (1 + 1e-6)
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = [t for k, t in adapter.items() if "lora_B" in k]
    assert b and all(float(t.abs().max()) > 0 for t in b)
    assert not any("label_head" in k for k in adapter)
    assert summary["test_eval"]["num_examples"] > 0 and summary["test_eval"]["bleu"] is not None
    torch.manual_seed(0)
