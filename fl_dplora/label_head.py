"""A DP linear probe on the label words: the classification head of `label-head = true`.

Why: example-level DP noise grows with the number of trained values (σC per value, ~0.6 M LoRA
values at r = 8), while a client holds a few hundred examples. A linear map from the final hidden
state at the answer position to the K label-word logits has (H + 1)·K values (1,731 for SmolLM2
and 3 labels): the same ε buys ~20x less noise per unit of signal (docs/label-head.md has the
measurements). The head replaces the label words' logits at each example's first answer position,
so the loss, the evaluation's scorer and every dp-mode use it without a second code path.

Its input is the final hidden state standardised per dimension with statistics of *public*
examples (the server's task data outside the scored subset, never a client's), then scaled to unit
norm: a few huge hidden dimensions would otherwise dominate every row and, after clipping, leave
no signal in the rest. A constant feature makes the bias part of the one Linear weight, so the
per-example gradient hooks of privacy/per_sample.py cover it unchanged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from fl_dplora import protocol
from fl_dplora.data import collate
from fl_dplora.forward import LABEL_HEAD_ATTR, final_hidden, first_answer_index

HEAD_KEY = "label_head.weight"  # its name in the transmitted adapter and in checkpoints
ATTR = LABEL_HEAD_ATTR  # where it hangs on the (PEFT) model (forward.py looks it up there)
FILE = "label_head.safetensors"


class LabelHead(nn.Module):
    def __init__(self, token_ids: Sequence[int], mean: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("token_ids", torch.as_tensor(list(token_ids), dtype=torch.long))
        self.register_buffer("mean", mean.detach().float().clone())
        self.register_buffer("scale", scale.detach().float().clamp_min(1e-6).clone())
        self.proj = nn.Linear(mean.numel() + 1, len(token_ids), bias=False)
        nn.init.zeros_(self.proj.weight)  # round 0 = no opinion; DP noise then moves it from 0

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        x = (hidden.float() - self.mean) / self.scale
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        ones = torch.ones_like(x[..., :1])
        return torch.cat([x, ones], dim=-1) / math.sqrt(2.0)  # every row has norm 1

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] final hidden states -> [..., K] label-word logits."""
        return self.proj(self.features(hidden))


def get(model: nn.Module) -> LabelHead | None:
    return getattr(model, ATTR, None)


def install(model: nn.Module, token_ids: Sequence[int], mean: torch.Tensor, scale: torch.Tensor) -> LabelHead:
    """Attach a zero head (or refresh the statistics of the one attached, keeping its weight)."""
    head = get(model)
    device = next(model.parameters()).device
    if head is None or head.token_ids.tolist() != list(token_ids) or head.mean.shape != mean.shape:
        head = LabelHead(token_ids, mean, scale).to(device)
        setattr(model, ATTR, head)
    else:
        with torch.no_grad():
            head.mean.copy_(mean)
            head.scale.copy_(scale.clamp_min(1e-6))
    return head


def remove(model: nn.Module) -> None:
    if get(model) is not None:
        delattr(model, ATTR)


@torch.no_grad()
def feature_stats(model: nn.Module, encoded, pad_id: int, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std of the final hidden state at the first answer position."""
    states = first_answer_states(model, encoded, pad_id, batch_size)
    return states.mean(0), states.std(0) if len(states) > 1 else torch.ones_like(states[0])


def neutral_stats(hidden_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Data-independent statistics (mean 0, scale 1: the head sees the unit-norm hidden state) for
    a run whose server scores every evaluation row, so that no public unscored prompt remains."""
    return torch.zeros(hidden_size), torch.ones(hidden_size)


@torch.no_grad()
def first_answer_states(model: nn.Module, encoded, pad_id: int, batch_size: int = 32) -> torch.Tensor:
    """[N, H] final hidden state where each example's first answer token is predicted (no grad).

    Batches of similar lengths (little padding); the rows come back in the order of `encoded`."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    out = torch.empty(len(encoded), 0)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate([encoded[i] for i in idx], pad_id).items()}
            hidden = final_hidden(model, batch)
            pos = first_answer_index(batch["labels"])
            rows = hidden[torch.arange(len(pos), device=device), pos].float().cpu()
            if out.shape[1] == 0:
                out = torch.empty(len(encoded), rows.shape[1])
            out[idx] = rows
    finally:
        model.train(was_training)
    return out


def save(model: nn.Module, folder: Path, label_words: Sequence[str]) -> None:
    """Write the head next to the PEFT adapter (PEFT does not know it); `load` reads it back."""
    from safetensors.torch import save_file

    head = get(model)
    if head is None:
        return
    tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(tensors, str(folder / FILE), metadata={"label_words": json.dumps(list(label_words))})


def load(model: nn.Module, folder: Path) -> LabelHead | None:
    """Attach the head saved in an adapter folder, if the run trained one."""
    from safetensors.torch import load_file

    path = Path(folder) / FILE
    if not path.is_file():
        remove(model)
        return None
    tensors = load_file(str(path))
    head = install(model, tensors["token_ids"].tolist(), tensors["mean"], tensors["scale"])
    with torch.no_grad():
        head.proj.weight.copy_(tensors["proj.weight"])
    return head


def stats_to_config(mean: torch.Tensor, scale: torch.Tensor) -> Mapping[str, list[float]]:
    """The public statistics as ConfigRecord values: the server computes them once, clients reuse them."""
    return {protocol.HEAD_MEAN: mean.tolist(), protocol.HEAD_SCALE: scale.tolist()}


def stats_from_config(config: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(list(config[protocol.HEAD_MEAN])), torch.tensor(list(config[protocol.HEAD_SCALE]))
