"""What the server computes on its own public data: the label head's feature statistics, the global
adapter's score after a round, and the test part scored once at the end."""

from __future__ import annotations

import logging
from typing import Any

from fl_dplora import label_head
from fl_dplora.config import ConfigError, RunConfig
from fl_dplora.data import encode_all, head_stat_examples
from fl_dplora.evaluate import evaluate, score_test_part
from fl_dplora.forward import label_token_ids
from fl_dplora.frozen_prefix import attach_prefix
from fl_dplora.models import load_adapter_weights

log = logging.getLogger("fl_dplora")


def setup_label_head(model, tokenizer, task, cfg: RunConfig) -> dict[str, list[float]]:
    """label-head: a fresh zero head whose feature statistics come from public examples (the task's
    evaluation data outside the scored subset); returns them as the config entries clients read."""
    label_head.remove(model)
    if not cfg.train.label_head:
        return {}
    if task.kind != "classification":
        raise ConfigError(f"label-head: needs a classification task; {cfg.data.task} is {task.kind}")
    ids = label_token_ids(tokenizer, task.label_words)
    public = encode_all(tokenizer, head_stat_examples(cfg), cfg.data.max_seq_len, cfg.data.system_prompt)
    if public:
        public = attach_prefix(model, public, cfg.model.prefix_cache)
        mean, scale = label_head.feature_stats(model, public, tokenizer.pad_token_id)
    else:  # every evaluation row is scored: no scored prompt may shape the head, so no data at all
        mean, scale = label_head.neutral_stats(int(model.config.hidden_size))
        log.warning("label-head: the server scores all of the task's evaluation rows, so no public unscored prompt is "
                    "left for the feature statistics: data-independent ones (mean 0, scale 1) are used; set "
                    "max-eval-samples below the eval set's size to take them from the rows it does not score")
    label_head.install(model, ids.tolist(), mean, scale)
    head_rounds = min(cfg.train.head_rounds, cfg.federation.num_server_rounds)
    stages = (f"rounds 1-{head_rounds} train only the head" if head_rounds else "") + (
        f"{', then ' if head_rounds else ''}rounds {head_rounds + 1}-{cfg.federation.num_server_rounds} LoRA and head"
        if head_rounds < cfg.federation.num_server_rounds else "")
    log.info("label-head: %d values (%d labels), feature statistics from %d public examples; %s",
             label_head.get(model).proj.weight.numel(), len(ids), len(public), stages)
    return dict(label_head.stats_to_config(mean, scale))


def evaluate_global(model, params, strategy, tokenizer, task, evals, cfg: RunConfig) -> dict[str, float]:
    load_adapter_weights(params, strategy.global_weights)
    return evaluate(model, tokenizer, task, evals, cfg.data.max_seq_len, max_new_tokens=cfg.data.max_new_tokens,
                    system_prompt=cfg.data.system_prompt, prefix_cache=cfg.model.prefix_cache, keep_states=True)


def score_test(model, params, strategy, tokenizer, task, cfg: RunConfig) -> dict[str, Any] | None:
    load_adapter_weights(params, strategy.global_weights)
    result = score_test_part(model, tokenizer, task, cfg)
    if result is not None:
        log.info("test part (%d inputs, scored once): %s", result["num_inputs"],
                 " ".join(f"{k}={v:.4f}" for k, v in result.items() if isinstance(v, float)))
    return result
