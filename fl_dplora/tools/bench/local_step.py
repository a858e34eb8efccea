"""The local step the step benchmarks time (dp-overhead, throughput, prefix-cache): one fixed batch,
one `train.local_train` call per repetition, parameters and optimizer reset before each."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fl_dplora.config import RunConfig
from fl_dplora.tools.bench.common import Variant


@dataclass
class LocalStep:
    """What step_variants set up: the model, its trainable adapter values, the DP-SGD mechanism, and
    the untimed `reset()` with its `state` (state["opt"], state["examples"])."""

    model: Any
    params: list[Any]
    dp: Any
    reset: Callable[[], None]
    state: dict[str, Any]


def fixed_batch(cfg: RunConfig, n: int):
    """The first `n` training examples of the task, tokenized: the one batch every variant sees."""
    from fl_dplora.data import encode_all, load_task
    from fl_dplora.model_loading import load_tokenizer

    task = load_task(cfg.data.task, cfg.train.seed)
    tok = load_tokenizer(cfg.model.name)
    return encode_all(tok, task.train[:n], cfg.data.max_seq_len), tok


def timed_local_step(model, params, start, cfg: RunConfig, pad_id: int, state: dict[str, Any]):
    """(reset, step) for timing one local_train call: `reset()` puts `params` back to `start` with a
    fresh optimizer (untimed, before every repetition); `step(data, dp)` is the timed call, with the
    same Poisson draw every time; state["examples"] = examples it processed."""
    import torch

    from fl_dplora.train import local_train, make_optimizer

    def reset() -> None:  # same weights, fresh optimizer before every timed step
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
                p.grad = None
        state["opt"] = make_optimizer(params, cfg.train)

    def step(data, dp) -> Callable[[], None]:
        def run() -> None:
            stats = local_train(model, params, data, cfg, optimizer=state["opt"], dp=dp,
                                sampling_generator=torch.Generator().manual_seed(1), pad_id=pad_id)
            state["examples"] = stats.examples
        return run

    return reset, step


def step_variants(cfg: RunConfig, data, pad_id: int) -> tuple[list[Variant], dict[str, Any], Callable[[], None], LocalStep]:
    """Local-step variants `none` and `sample` on the same model, parameters, batch and optimizer
    settings; the LocalStep lets a benchmark add a reference variant on the same set-up.

    Fixed sampling: the shard is exactly `batch-size` examples, so the DP step's Poisson rate is
    q = batch-size / n = 1 and it takes every example: the DP and the plain step process the same
    examples in the same micro-batches of the same padded shapes. (With a real shard the Poisson batch size
    varies around batch-size; per-example time would then be the fair unit.)
    """
    import torch

    from fl_dplora.models import adapter_parameters, get_peft_model
    from fl_dplora.train import DPSGD

    model = get_peft_model(cfg)
    params = [p for p in adapter_parameters(model, cfg).values() if p.requires_grad]
    original = [p.detach().clone() for p in params]
    start = [p.detach().clone() for p in params]
    # Non-zero B so that every LoRA factor has a non-trivial gradient (B = 0 at init zeroes A's).
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in start:
            if not p.abs().sum():
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    state: dict[str, Any] = {}
    reset, step = timed_local_step(model, params, start, cfg, pad_id, state)
    # Secure RNG for the noise (generator None), as the client does by default (secure-rng = true).
    dp = DPSGD(noise_multiplier=1.0, max_grad_norm=cfg.privacy.max_grad_norm, generator=None)
    variants = [Variant("none", step(data, None), reset), Variant("sample", step(data, dp), reset)]
    info: dict[str, Any] = {"trainable_params": sum(p.numel() for p in params)}

    def restore() -> None:  # the PEFT model is cached per process: leave it as we found it
        with torch.no_grad():
            for p, s in zip(params, original):
                p.copy_(s)
                p.grad = None

    return variants, info, restore, LocalStep(model, params, dp, reset, state)

