"""The project's one forward pass and loss.

Training, evaluation, benchmarks and the audit all score a batch through `answer_logits`. A batch
that carries cached frozen-prefix states (frozen_prefix.py) runs only the blocks above the prefix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from fl_dplora.frozen_int8 import release
from fl_dplora.frozen_prefix import decoder_and_head, decoder_blocks, frozen_dtype, int8_top, prefix_start, prefix_states

LABEL_HEAD_FLOOR = -1e4  # logit of a non-label token where a label head answers (finite: no NaN in softmax)
LABEL_HEAD_ATTR = "fl_label_head"  # where label_head.install hangs the head on the (PEFT) model


def attached_label_head(model: nn.Module) -> nn.Module | None:
    """The label head attached to `model` (label_head.py), or None: looked up here so that this
    module needs nothing from label_head.py, which builds on it."""
    return getattr(model, LABEL_HEAD_ATTR, None)


# ------------------------------------------------------------------ the forward pass
@contextmanager
def top_blocks_only(decoder: nn.Module, name: str, blocks: nn.ModuleList, start: int, hidden: torch.Tensor,
                    top: Sequence[nn.Module] | None = None):
    """Run the decoder's own forward (masks, rotary, final norm) over blocks[start:] only (or `top`,
    their int8 copies: frozen_prefix.int8_top), with `hidden` as the input of the first of them (what the
    skipped blocks computed when it was cached). final_hidden's cached path; public for code that
    feeds its own cached states (experiments)."""
    run = list(top) if top is not None else list(blocks)[start:]

    def feed(module, args, kwargs):
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    # first: an int8 copy's own pre-hook rotates what it is fed (frozen_int8._rotate_stream)
    handle = run[0].register_forward_pre_hook(feed, with_kwargs=True, prepend=True)
    setattr(decoder, name, nn.ModuleList(run))
    try:
        yield
    finally:
        setattr(decoder, name, blocks)
        handle.remove()


def final_hidden(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The decoder's last hidden state [B, T, H] (after its final norm); a batch with
    `prefix_hidden` runs only the blocks after the cached prefix."""
    _, decoder, _ = decoder_and_head(model)
    if decoder is None:
        raise ValueError("this model's decoder blocks cannot be found (needed for the prefix cache and label-head)")
    if "prefix_hidden" not in batch and frozen_dtype(model) != "float32" and (start := prefix_start(model)):
        # prefix-cache off: the frozen prefix still computes in the frozen dtype, now, as the cache would
        batch = {**batch, "prefix_start": start,
                 "prefix_hidden": prefix_states(model, batch["input_ids"], batch["attention_mask"], start)}
    if "prefix_hidden" in batch:
        start = int(batch["prefix_start"])
        if start != prefix_start(model):  # a cache built for another split point is never reused
            raise ValueError(f"batch cached up to block {start}, model's LoRA starts at block {prefix_start(model)}")
        found = decoder_blocks(model)
        param = next(iter(decoder.parameters()))
        cached = batch["prefix_hidden"].to(device=param.device, dtype=param.dtype)
        top = int8_top(model, start)  # the top blocks in int8 too while nothing there trains or has trained
        try:
            with top_blocks_only(*found, start, cached, top):
                return decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        finally:
            if top is not None:
                release(top)
    return decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state


def answer_columns(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cols [B, A], valid [B, A]): each example's answer positions in hidden[:, :-1], left-aligned."""
    mask = labels[:, 1:] != -100
    counts = mask.sum(1)
    width = max(1, int(counts.max()))
    cols = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :width]
    valid = torch.arange(width, device=labels.device)[None, :] < counts[:, None]
    return cols, valid


def answer_states(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """[B, A, H]: the final hidden states at each example's answer positions (answer_columns' order,
    zeros where an example has fewer). Everything answer_logits computes above its heads."""
    hidden = final_hidden(model, batch)
    cols, valid = answer_columns(batch["labels"])
    gathered = hidden[:, :-1].gather(1, cols[..., None].expand(-1, -1, hidden.shape[-1]))
    return gathered * valid[..., None].to(gathered.dtype)


def answer_logits(model: nn.Module, batch: Mapping[str, torch.Tensor],
                  states: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits only where the next token is an answer token: (logits [N,V], targets [N], example [N]).

    The vocabulary projection is the largest matmul of a small LM; skipping it on prompt tokens
    is most of the cost of long prompts. A batch with `prefix_hidden` runs only the blocks after the
    cached prefix. With a label head (label_head.py), the label words' logits at each example's
    first answer position are the head's.
    """
    labels = batch["labels"]
    inner, decoder, head = decoder_and_head(model)
    if decoder is None:
        if "prefix_hidden" in batch or attached_label_head(model) is not None:
            raise ValueError("the prefix cache and label-head need a decoder whose blocks can be found")
        rows, cols = (labels[:, 1:] != -100).nonzero(as_tuple=True)
        logits = inner(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return logits[rows, cols], labels[rows, cols + 1], rows
    # Each example's answer positions gathered into [B, A, H] (left-aligned, zero-padded) rather than a
    # flat [N, H]: a LoRA on the head then still sees one batch row per example, which per-example
    # gradients need. Row-major order of the valid entries = the order of nonzero() (rows, then columns).
    # `states`: answer_states(model, batch) computed earlier with the same weights (evaluate's cache).
    cols, valid = answer_columns(labels)
    gathered = answer_states(model, batch) if states is None else states
    logits = head(gathered)[valid]
    targets = labels[:, 1:].gather(1, cols)[valid]
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(cols)[valid]
    scale = getattr(inner.config, "logit_scale", None)
    if isinstance(scale, (int, float)):
        logits = logits * scale
    probe = attached_label_head(model)
    if probe is not None:  # column 0 of `gathered` is each example's first answer position
        first = first_answer_positions(rows).nonzero()[:, 0]
        values = probe(gathered[:, :1])[:, 0][valid[:, 0]].to(logits.dtype)
        ids = probe.token_ids.to(logits.device)
        # A classifier answers with a label word: at the first answer position the other tokens are
        # ruled out, so the token loss there is the label-word loss and generation starts with a label.
        floor = torch.full_like(logits[first], LABEL_HEAD_FLOOR)
        logits = logits.index_put((first,), floor).index_put((first[:, None], ids[None, :]), values)
    return logits, targets, rows


def first_answer_index(labels: torch.Tensor) -> torch.Tensor:
    """[B] index into hidden[:, :-1] (and labels[:, 1:]) where each example's first answer token is predicted."""
    return (labels[:, 1:] != -100).int().argmax(1)


def first_answer_positions(rows: torch.Tensor) -> torch.Tensor:
    """Mask over answer_logits' rows: each example's first answer position (its first occurrence)."""
    first = torch.ones_like(rows, dtype=torch.bool)
    first[1:] = rows[1:] != rows[:-1]
    return first


def per_example_loss(model: nn.Module, batch: Mapping[str, torch.Tensor],
                     label_token_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example loss, shape [B].

    Default: mean cross-entropy over each example's answer tokens. With `label_token_ids` (the first
    tokens of a classification task's label words): an example whose answer starts with a label word
    is trained on exactly the decision the evaluation scores, cross-entropy over those K logits at its
    first answer position; any other example (an audit canary, say) keeps the answer-token loss.
    Either way each loss depends on its own example only, as per-example clipping requires.
    """
    fast = _label_head_loss(model, batch, label_token_ids)
    if fast is not None:
        return fast
    logits, targets, rows = answer_logits(model, batch)
    token_loss = F.cross_entropy(logits.float(), targets, reduction="none")
    bsz = batch["labels"].shape[0]
    zeros = torch.zeros(bsz, dtype=token_loss.dtype, device=token_loss.device)
    loss = zeros.index_add(0, rows, token_loss) / zeros.index_add(0, rows, torch.ones_like(token_loss)).clamp(min=1)
    if label_token_ids is None:
        return loss
    ids = label_token_ids.to(logits.device)
    first = first_answer_positions(rows)
    match = targets[first][:, None] == ids[None, :]
    is_label = match.any(1)
    label_loss = F.cross_entropy(logits[first][:, ids].float(), match.float().argmax(1), reduction="none")
    return loss.index_put((rows[first][is_label],), label_loss[is_label])


def _label_head_loss(model: nn.Module, batch: Mapping[str, torch.Tensor],
                     label_token_ids: torch.Tensor | None) -> torch.Tensor | None:
    """The label-word loss straight from precomputed final states (`answer_hidden`, set by
    local_train when only the label head trains): the same value as the full path, no decoder.
    None when the batch has no such states or holds an example whose answer is not a label word."""
    probe = attached_label_head(model)
    if probe is None or label_token_ids is None or "answer_hidden" not in batch:
        return None
    if "answer_token" in batch:  # local_train's head-only rows: each example's first answer token
        first = batch["answer_token"]
    else:
        labels = batch["labels"]
        first = labels[:, 1:].gather(1, first_answer_index(labels)[:, None])[:, 0]
    ids = label_token_ids.to(first.device)
    match = first[:, None] == ids[None, :]
    if not bool(match.any(1).all()) or probe.token_ids.tolist() != ids.tolist():
        return None
    logits = probe(batch["answer_hidden"][:, None, :])[:, 0]  # [B, 1, H]: one batch row per example
    return F.cross_entropy(logits.float(), match.float().argmax(1), reduction="none")


def label_first_tokens(tokenizer, label_words: Sequence[str]) -> list[int]:
    """First token of each label word: the evaluation scores these at the first answer position."""
    return [tokenizer(w, add_special_tokens=False).input_ids[0] for w in label_words]


def label_token_ids(tokenizer, label_words: Sequence[str]) -> torch.Tensor:
    """label_first_tokens for the label-word loss, which needs them distinct."""
    ids = label_first_tokens(tokenizer, label_words)
    if len(set(ids)) != len(ids):
        from fl_dplora.config import ConfigError

        raise ConfigError(f"loss: label-words needs label words with distinct first tokens; {label_words} share one")
    return torch.tensor(ids)

