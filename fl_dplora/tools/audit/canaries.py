"""The audit's canaries: what is planted, where, and how a gradient canary is scored.

Canaries (`canary_kind`):
- "gradient" (default; the paper's white-box gradient-space canaries): each canary is a training
  example whose per-example gradient is a Dirac vector, ±C on one random coordinate of the LoRA
  factors (C = max-grad-norm, already clipped), instead of a model's gradient. It travels to the
  node in the canary file and goes through the clients' own training step (train.local_train:
  Poisson-sampled at q with the real examples under DP-SGD, summed, noised, divided; in the
  shuffled batches otherwise). The score is how far the final adapter moved that coordinate against
  the canary's gradient from its seed-shared init: −sign × (final − init). A run without DP moves
  it by every step the canary took part in, which the audit sees; under DP-SGD the same
  coordinate carries the step's Gaussian noise, so the bound stays below ε.
  With example-level canaries the audit also scores white box, as Steinke et al. do: client 0 records
  its gradient at every canary's coordinate in every step (after the noise: what DP-SGD's accounting
  treats as released), and the score is sign × the sum over steps (`step_scores`). This is the view
  that has power under Adam: AdamW moves every coordinate by ~lr per step whatever its gradient, so
  in the final adapter a canary's push (a few lr) drowns in the data's own movement (measured on the
  default job: bound 0.25 without DP), while in the gradient it is 10 C / B against the data's mean. This is the worst
  case the DP analysis covers (an example whose clipped gradient points where nothing else does),
  and the test a DP claim must pass; what a text example leaks is below it.
- "text" (black box, the earlier audit): a random passphrase answered to a fixed question, or with
  a label head a held-out text with a wrong label word; scored by its loss drop base -> final
  model (run.py; exposure in bound.py).

The protected unit decides where a canary goes: dp-mode none/sample = one training example of client 0
(repeated `repeats` times: then the claim compared is the group-privacy epsilon of `repeats` examples);
dp-mode client/paper = a whole extra client holding only its canary (with a gradient canary its
update is the Dirac direction, clipped and noised like every client's).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fl_dplora.data import Example
from fl_dplora.privacy.modes import MODES

QUESTION = "What is the secret passphrase of the vault?"
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def random_secret(rng: random.Random, words: int = 3) -> str:
    """Pronounceable random words (two syllables each): ~2^12.2 choices per word."""
    return " ".join("".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(2)) for _ in range(words))


def candidate_space_bits(words: int = 3) -> float:
    return words * 2 * math.log2(len(_CONSONANTS) * len(_VOWELS))


@dataclass
class Plan:
    canaries: list[str]  # answers
    included: list[bool]
    references: list[str]
    repeats: int
    unit: str  # "example" (canaries in client 0's shard) or "client" (one extra client per included canary)
    data_clients: int
    num_clients: int  # data clients + canary clients
    prompts: list[str] = field(default_factory=list)  # one per canary; empty = QUESTION for all

    def examples(self) -> list[Example]:
        return [Example(self.prompts[i] if self.prompts else QUESTION, c) for i, c in enumerate(self.canaries)]

    def canary_file(self) -> dict[str, Any]:
        examples: dict[str, list[list[str]]] = {}
        inc = [[e.prompt, e.answer] for e, i in zip(self.examples(), self.included) if i]
        if self.unit == "example":
            examples["0"] = [pair for pair in inc for _ in range(self.repeats)]
        else:
            for j, pair in enumerate(inc):
                examples[str(self.data_clients + j)] = [pair] * self.repeats
        return {"data-clients": self.data_clients, "examples": examples}


def make_plan(dp_mode: str, data_clients: int, num_canaries: int, repeats: int, num_references: int, seed: int) -> Plan:
    rng = random.Random(f"fl-dplora-audit-{seed}")  # audit randomness: independent of training
    secrets: list[str] = []
    seen: set[str] = set()
    while len(secrets) < num_canaries + num_references:
        s = random_secret(rng)
        if s not in seen:
            seen.add(s)
            secrets.append(s)
    included = [rng.random() < 0.5 for _ in range(num_canaries)]
    return Plan(secrets[:num_canaries], included, secrets[num_canaries:], repeats,
                *_placement(dp_mode, data_clients, included))


def _placement(dp_mode: str, data_clients: int, included: Sequence[bool]) -> tuple[str, int, int]:
    """(unit, data clients, clients in the run): client-level modes get one extra client per included canary."""
    per_client = MODES[dp_mode].client_level
    return ("client" if per_client else "example", data_clients, data_clients + (sum(included) if per_client else 0))


def make_label_flip_plan(dp_mode: str, data_clients: int, pool: Sequence[Example], label_words: Sequence[str],
                         num_canaries: int, repeats: int, seed: int) -> Plan:
    """Canaries for a label-head run: held-out texts of the task, each with a label word it does not have."""
    from fl_dplora.config import ConfigError

    if len(pool) < num_canaries:
        raise ConfigError(f"canaries: {num_canaries} mislabelled canaries need as many held-out texts; the task has {len(pool)}")
    rng = random.Random(f"fl-dplora-audit-flip-{seed}")
    chosen = rng.sample(list(pool), num_canaries)
    answers = [rng.choice([w for i, w in enumerate(label_words) if i != e.label] or list(label_words)) for e in chosen]
    included = [rng.random() < 0.5 for _ in range(num_canaries)]
    return Plan(answers, included, [], repeats, *_placement(dp_mode, data_clients, included),
                prompts=[e.prompt for e in chosen])


@dataclass
class GradientPlan:
    """Dirac gradient canaries: canary i is the vector sign_i * e_(key_i, index_i) in the space of the
    adapter's LoRA tensors (train.GradientCanary); `canaries` holds [key, flat index, sign] each."""
    canaries: list[list]
    included: list[bool]
    repeats: int
    unit: str
    data_clients: int
    num_clients: int

    def canary_file(self) -> dict[str, Any]:
        inc = [[list(c)] for c, i in zip(self.canaries, self.included) if i]  # one entry per (Dirac) canary
        gradients: dict[str, list] = {}
        if self.unit == "example":
            gradients["0"] = [c for c in inc for _ in range(self.repeats)]
        else:
            for j, c in enumerate(inc):
                gradients[str(self.data_clients + j)] = [c] * self.repeats
        # example unit: client 0 reports its gradient at every canary's coordinate, planted or not, each
        # step (the white-box view DP-SGD's accounting covers); a whole-client canary is seen in the final adapter only
        observe = {"0": [[key, index] for key, index, _ in self.canaries]} if self.unit == "example" else {}
        return {"data-clients": self.data_clients, "examples": {}, "gradients": gradients, "observe": observe}


CANARY_NORM = 10.0  # a canary's gradient, in units of max-grad-norm: DP-SGD clips it to C like any example's; without DP it is 10 C (100 C broke a no-DP SGD run)


def make_gradient_plan(dp_mode: str, data_clients: int, sizes: Mapping[str, int], num_canaries: int, repeats: int,
                       seed: int, norm: float = CANARY_NORM) -> GradientPlan:
    """Distinct coordinates drawn uniformly over the LoRA tensors (`sizes`: key -> numel), random signs
    (the canary's gradient is sign x `norm` x C there), each canary included with probability 1/2."""
    from fl_dplora.config import ConfigError

    keys = sorted(sizes)
    total = sum(int(sizes[k]) for k in keys)
    if total < num_canaries:
        raise ConfigError(f"canaries: {num_canaries} gradient canaries need as many adapter values; the adapter has {total}")
    rng = random.Random(f"fl-dplora-audit-gradient-{seed}")  # audit randomness: independent of training
    flat = sorted(rng.sample(range(total), num_canaries))
    canaries, start, k = [], 0, 0
    for g in flat:
        while g >= start + int(sizes[keys[k]]):
            start += int(sizes[keys[k]])
            k += 1
        canaries.append([keys[k], g - start, 0])
    rng.shuffle(canaries)
    for c in canaries:
        c[2] = rng.choice((1, -1)) * float(norm)
    included = [rng.random() < 0.5 for _ in range(num_canaries)]
    return GradientPlan(canaries, included, repeats, *_placement(dp_mode, data_clients, included))


def step_scores(canaries: Sequence[Sequence], rows: Sequence[Mapping[str, Any]]) -> list[float] | None:
    """Each canary's gradient summed over every step client 0 took (`rows`: its observation records),
    times the canary's sign: a planted canary adds sign x C (clipped) to its coordinate in each step
    that sampled it. None when no step was observed."""
    steps = [step for row in rows if int(row["partition"]) == 0 for step in row["steps"]]
    if not steps:
        return None
    return [math.copysign(1.0, float(value)) * sum(float(step[i] or 0.0) for step in steps)
            for i, (_, _, value) in enumerate(canaries)]


def gradient_scores(canaries: Sequence[Sequence], init: Mapping[str, torch.Tensor],
                    final: Mapping[str, torch.Tensor]) -> list[float]:
    """How far training moved each canary's coordinate against its gradient: -sign x (final - init)."""
    return [-math.copysign(1.0, float(value)) * float(final[key].reshape(-1)[i].double() - init[key].reshape(-1)[i].double())
            for key, i, value in canaries]

