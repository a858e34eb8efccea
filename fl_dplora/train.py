"""The local training step, shared by every dp-mode, client, benchmark and experiment.

`local_train` runs `local-steps` optimizer steps on one client's shard (examples may carry their
cached frozen-prefix states, see frozen_prefix.py: then each step runs only the adapted top blocks):
- dp-mode none/client/paper: a uniformly shuffled batch, mean loss, plain gradient.
- dp-mode sample: DP-SGD. Each logical batch is Poisson-sampled with rate q = batch-size / size,
  processed in micro-batches (memory bounded by micro-batch-size), per-example gradients clipped
  to C, summed, noised once with N(0, sigma^2 C^2) and divided by the expected batch size q*size.
  That is exactly the subsampled Gaussian mechanism the accountant composes, once per step.
  `size` is the node's public size (privacy/sample_rate.py), not the private n of its shard.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from fl_dplora.config import RunConfig, TrainConfig
from fl_dplora.data import Encoded, collate
from fl_dplora.forward import answer_logits, per_example_loss  # noqa: F401 - re-exported
from fl_dplora.privacy.mechanisms import gaussian_like
from fl_dplora.privacy.per_sample import LoRAGradSampler


# ------------------------------------------------------------------ optimizer
def make_optimizer(params: Sequence[nn.Parameter], train: TrainConfig,
                   head_params: Sequence[nn.Parameter] = ()) -> torch.optim.Optimizer:
    """LoRA values at `learning-rate`, label-head values (if any) at `head-learning-rate` (`train`: cfg.train)."""
    head_ids = {id(p) for p in head_params}
    groups = [{"params": [p for p in params if id(p) not in head_ids], "base_lr": train.learning_rate},
              {"params": [p for p in params if id(p) in head_ids], "base_lr": train.head_learning_rate}]
    groups = [dict(g, lr=g["base_lr"]) for g in groups if g["params"]]
    if train.optimizer == "adamw":
        return torch.optim.AdamW(groups, weight_decay=0.0)
    return torch.optim.SGD(groups, momentum=train.momentum)


def lr_at(step: int, total: int, train: TrainConfig, base: float | None = None) -> float:
    """Learning rate at a global step (counted over the whole run, so resumed runs continue it)."""
    base = train.learning_rate if base is None else base
    frac = min(1.0, step / max(1, total))
    if train.lr_schedule == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * frac))
    if train.lr_schedule == "linear":
        return base * (1 - frac)
    return base


def head_only_round(cfg: RunConfig, server_round: int) -> bool:
    """Rounds 1..head-rounds train only the label head (linear probing before fine-tuning, LP-FT)."""
    return cfg.train.label_head and server_round <= cfg.train.head_rounds


def stage_config(cfg: RunConfig, server_round: int, n: int) -> RunConfig:
    """The run config as this round's training stage sees it: a head-only round trains with the
    head-* steps and batch size (head-batch-size 0 = the whole shard, q = 1)."""
    if not head_only_round(cfg, server_round):
        return cfg
    batch = cfg.train.head_batch_size or n
    return replace(cfg, train=replace(cfg.train, local_steps=cfg.train.head_local_steps, batch_size=batch,
                                      micro_batch_size=batch))


_ANSWER_STATES: OrderedDict[str, torch.Tensor] = OrderedDict()  # per process, like the prefix cache


def _with_answer_states(model: nn.Module, data: Sequence[Encoded], pad_id: int) -> list[Encoded]:
    """Attach each example's final state at its first answer position, computed once (no grad).

    Only valid while nothing below the label head trains (a head-only round): then every step's
    loss is a function of these fixed states and the head, and a step costs microseconds. The
    states are kept under a hash of every decoder weight (LoRA included) and the token ids, so the
    head-only rounds of a run, where LoRA stays at its init, compute them once per client."""
    from dataclasses import replace

    from fl_dplora import frozen_prefix, label_head

    key = frozen_prefix.features_key(model, data)
    if key:  # every decoder weight, the token ids and where each answer starts
        key = f"{key}:{hash(tuple(sum(1 for t in e.labels if t == -100) for e in data))}"
    states = _ANSWER_STATES.get(key) if key else None
    if states is None:
        states = label_head.first_answer_states(model, list(data), pad_id)
        if key:
            _ANSWER_STATES[key] = states
            while len(_ANSWER_STATES) > 16:
                _ANSWER_STATES.popitem(last=False)
    # the head's loss reads only these states: batches need not carry (and pad) the prefix states,
    # [B, T, H] per step (a batch that still needs a forward runs the full model, same numbers)
    return [replace(e, answer_hidden=h, prefix=None, prefix_start=0) for e, h in zip(data, states)]


def _head_only_inputs(model: nn.Module, params: Sequence[nn.Parameter], data: Sequence[Encoded], pad_id: int,
                      label_token_ids: torch.Tensor | None) -> tuple[Sequence[Encoded], dict[str, torch.Tensor] | None]:
    """(the shard, its head-only rows): when only the label head trains, the rest of the model is fixed,
    so each example's final state is computed once and every step reads that (else: unchanged, None)."""
    from fl_dplora import label_head

    probe = label_head.get(model)
    if probe is None or not {id(p) for p in params} <= {id(p) for p in probe.parameters()}:
        return data, None
    data = _with_answer_states(model, data, pad_id)
    return data, _head_rows(data, label_token_ids)


def _head_rows(data: Sequence[Encoded], label_token_ids: torch.Tensor | None) -> dict[str, torch.Tensor] | None:
    """A head-only round's whole shard as two tensors that a step indexes instead of collating its
    examples (~70 ms per whole-shard step on 1,900 tweets): each example's first-answer state and its
    first answer token, all the head's loss reads. None (collate as usual) when an answer does not
    start with a label word: that example needs the full path."""
    if label_token_ids is None or not data or any(e.answer_hidden is None for e in data):
        return None
    words = set(label_token_ids.tolist())
    first = [next((t for t in e.labels[1:] if t != -100), None) for e in data]
    if any(t not in words for t in first):
        return None
    return {"answer_hidden": torch.stack([e.answer_hidden for e in data]), "answer_token": torch.tensor(first)}


# ------------------------------------------------------------------ the local training loop
@dataclass
class DPSGD:
    noise_multiplier: float
    max_grad_norm: float
    generator: torch.Generator | None  # None = OS CSPRNG


@dataclass(frozen=True)
class GradientCanary:
    """A privacy-audit canary (`fl-dplora audit`, Steinke et al. 2023's gradient-space canary): a
    training example whose per-example gradient is this fixed sparse vector times max-grad-norm,
    instead of the model's. It is sampled like every example (DP-SGD: Poisson at q; otherwise in the
    shuffled epochs), counts in the batch, and under DP-SGD is clipped to max-grad-norm like every
    per-example gradient. entries: (position in local_train's `params`, flat index, value)."""
    entries: tuple[tuple[int, int, float], ...]


@dataclass
class TrainStats:
    steps: int
    examples: int
    mean_loss: float
    seconds: float
    sample_rate: float
    observed: list[list[float | None]] = field(default_factory=list)  # per step, the audit's coordinates


def _micro_batches(indices: list[int], size: int):
    for start in range(0, len(indices), size):
        yield indices[start : start + size]


def local_train(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    data: Sequence[Encoded],
    cfg: RunConfig,
    *,
    optimizer: torch.optim.Optimizer,
    dp: DPSGD | None,
    sampling_generator: torch.Generator,
    step_offset: int = 0,
    total_steps: int = 0,
    pad_id: int = 0,
    progress: bool = False,
    device: torch.device | None = None,
    label_token_ids: torch.Tensor | None = None,
    public_size: int | None = None,
    canaries: Sequence[GradientCanary] = (),
    observe: Sequence[tuple[int, int]] = (),
) -> TrainStats:
    """Run cfg.train.local_steps optimizer steps. The one training loop of the project.

    `public_size`: the size DP-SGD's q and divisor come from (sample_rate.basis); None = the
    shard's n (benchmarks and tests; a node always passes its basis).
    `canaries`: audit gradient canaries, examples n.. of the shard (empty outside an audit).
    `observe`: (position in `params`, flat index) of every audit canary's coordinate, planted or not
    (position -1: not trained this round); each step's gradient there, after the noise and the
    divisor (what DP-SGD's accounting assumes released), goes into TrainStats.observed."""
    from tqdm.auto import tqdm

    steps, batch_size, micro = cfg.train.local_steps, cfg.train.batch_size, cfg.train.micro_batch_size
    n = len(data)
    total = n + len(canaries)  # indices >= n are gradient canaries
    size = n if public_size is None else int(public_size)
    q = min(1.0, batch_size / size)
    divisor = q * size  # the expected batch from public numbers: no scale that depends on the private n
    device = device or next(iter(params)).device
    params = list(params)
    data, head_rows = _head_only_inputs(model, params, data, pad_id, label_token_ids)
    model.train()
    t0 = time.perf_counter()
    losses, seen = [], 0
    observed: list[list[float | None]] = []
    order: list[int] = []
    sampler = LoRAGradSampler(model, params) if dp else None
    bar = tqdm(range(steps), desc="local steps", leave=False, disable=not progress, unit="step")
    try:
        if sampler:
            sampler.__enter__()
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step_offset + step, total_steps or steps, cfg.train, group.get("base_lr"))
            batch_idx, order = _draw_batch(dp is not None, total, q, batch_size, order, sampling_generator)
            sums = _canary_sums(params, batch_idx, n, canaries, dp, cfg.privacy.max_grad_norm)
            # micro-batches of similar lengths pad less; the (clipped) sum does not depend on the order
            real = sorted((i for i in batch_idx if i < n), key=lambda i: len(data[i].input_ids))
            for mb in _micro_batches(real, micro):
                rows = {k: v[mb] for k, v in head_rows.items()} if head_rows else collate([data[i] for i in mb], pad_id)
                batch = {k: v.to(device) for k, v in rows.items()}
                losses.append(_add_gradients(model, params, sums, batch, label_token_ids, dp, sampler, len(batch_idx)))
            seen += len(batch_idx)
            for s, p in zip(sums, params):
                if dp:
                    noise = gaussian_like(s, dp.noise_multiplier * dp.max_grad_norm, dp.generator)
                    p.grad = (s + noise) / divisor
                else:
                    p.grad = s
            if observe:  # fl-dplora audit (white box): the step's released gradient at each canary's coordinate
                observed.append([float(params[pos].grad.view(-1)[flat]) if pos >= 0 else None for pos, flat in observe])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if progress and losses:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        if sampler:
            sampler.__exit__(None, None, None)
        model.eval()
    return TrainStats(steps, seen, float(sum(losses) / max(1, len(losses))), time.perf_counter() - t0, q, observed)


def _draw_batch(poisson: bool, total: int, q: float, batch_size: int, order: list[int],
                generator: torch.Generator) -> tuple[list[int], list[int]]:
    """(the step's example indices, the rest of the shuffled order). DP-SGD: Poisson sampling, each
    example independently with probability q; otherwise epochs of a shuffled order, batch_size at a time."""
    if poisson:
        return (torch.rand(total, generator=generator) < q).nonzero().flatten().tolist(), order
    while len(order) < batch_size:
        order = order + torch.randperm(total, generator=generator).tolist()
    return order[:batch_size], order[batch_size:]


def _canary_sums(params: Sequence[nn.Parameter], batch_idx: Sequence[int], n: int,
                 canaries: Sequence[GradientCanary], dp: DPSGD | None, max_grad_norm: float) -> list[torch.Tensor]:
    """The step's gradient sums, started with the sampled canaries' gradients: each its fixed vector
    x C (clipped to C under DP-SGD), in the same sum as the examples' (zeros outside an audit)."""
    sums = [torch.zeros_like(p) for p in params]
    for i in batch_idx:
        entries = canaries[i - n].entries if i >= n else ()
        norm = math.sqrt(sum(v * v for *_, v in entries))
        scale = (dp.max_grad_norm / max(1.0, norm)) if dp else max_grad_norm / len(batch_idx)
        for pos, flat, value in entries:
            sums[pos].view(-1)[flat] += value * scale
    return sums


def _add_gradients(model: nn.Module, params: Sequence[nn.Parameter], sums: list[torch.Tensor], batch,
                   label_token_ids: torch.Tensor | None, dp: DPSGD | None, sampler, batch_len: int) -> float:
    """Add one micro-batch's gradient to `sums` (DP-SGD: each example's, clipped; otherwise the
    batch mean's share); returns the micro-batch's mean loss."""
    loss_vec = per_example_loss(model, batch, label_token_ids)
    if dp:
        loss_vec.sum().backward()  # sum reduction: what per-example gradients assume
        clipped, _ = sampler.clipped_sum(dp.max_grad_norm)
        for s, c in zip(sums, clipped):
            s += c
    else:
        (loss_vec.sum() / batch_len).backward()
        for s, p in zip(sums, params):
            s += p.grad
    for p in params:
        p.grad = None
    return float(loss_vec.detach().mean())
