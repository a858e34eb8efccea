"""Tasks, prompt templates, partitioning and tokenization.

A task is a train pool (partitioned across clients with flwr-datasets) and a central eval set.
Every example becomes (prompt, answer); the loss is on the answer tokens only.
Classification tasks also carry their label words, scored at the answer position in evaluation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from fl_dplora.config import PACKAGE_DIR, ConfigError, RunConfig
from fl_dplora.task_card import (  # Example lives there (rows become examples there); data's users import it here
    Example, TaskCard, card_for_rows, check_blank, examples_from_rows, is_card_path, load_card, loader_rows, node_card,
    read_rows,
)

def _find_data_dir() -> Path:
    """The bundled data files. `flwr run` imports this package from its app bundle (FAB), which
    keeps only code and text files, so look for the installed copy on sys.path as well."""
    import sys

    candidates = [os.environ.get("FL_DPLORA_DATA_DIR", ""), str(PACKAGE_DIR / "data_files")]
    candidates += [str(Path(p) / "fl_dplora" / "data_files") for p in sys.path if p]
    for cand in candidates:
        if cand and (Path(cand) / "tfns" / "sent_train.csv").is_file():
            return Path(cand)
    return PACKAGE_DIR / "data_files"


DATA_DIR = _find_data_dir()
FILE_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet")


@dataclass
class TaskData:
    name: str
    kind: str  # "classification" | "generation"
    train: list[Example]
    eval: list[Example]
    label_words: list[str] = field(default_factory=list)
    instruction: str = ""  # classification prompt prefix; reused for a SuperNode's own file
    card: TaskCard | None = None  # how rows become examples (label words, prompt, columns)
    test: list[Example] = field(default_factory=list)  # scored once, at the end of a run (data-to-text, fin-sentiment)


# ------------------------------------------------------------------ tasks (every one through a task card)
# built-in task -> its card under data_files/ (fin-sentiment-v1: the earlier TFNS protocol, for committed results)
BUILTIN_CARDS = {"fin-sentiment": "tfns/task.toml", "medical-qa": "pubmedqa/task.toml",
                 "general-instruct": "dolly15k/task.toml", "data-to-text": "e2e/task.toml",
                 "fin-sentiment-v1": "tfns/task-v1.toml"}


def builtin_card(name: str) -> TaskCard:
    return load_card(DATA_DIR / BUILTIN_CARDS[name])


def with_references(examples: Sequence[Example]) -> list[Example]:
    """Generation eval: one example per distinct prompt, in order of first appearance, holding every
    answer given for it as its references (the first is the one its loss is computed on)."""
    groups: dict[str, list[Example]] = {}
    for ex in examples:
        groups.setdefault(ex.prompt, []).append(ex)
    return [replace(g[0], references=tuple(e.answer for e in g)) for g in groups.values()]


def task_from_card(card: TaskCard, seed: int, eval_rows: list[dict] | None = None,
                   train_rows: list[dict] | None = None) -> TaskData:
    """The card's rows as a train pool and an eval set (10 % of the train rows, at most 1000,
    held out with the seed when the card names no eval file)."""
    test_rows: list[dict] = []
    if train_rows is None:
        if card.loader:
            train_rows, eval_rows, test_rows = loader_rows(card)
        elif card.train_file or card.eval_file:
            train_rows = read_rows(Path(card.train_file)) if card.train_file else []
            eval_rows = read_rows(Path(card.eval_file)) if card.eval_file else None
        else:
            raise ConfigError(f"task card {card.name}: needs train-file or eval-file (the server scores eval-file)")
    if eval_rows is None:
        if not train_rows:
            raise ConfigError(f"task: {card.name} has no rows")
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(train_rows), generator=g).tolist()
        n_eval = max(1, min(1000, len(train_rows) // 10))
        eval_rows = [train_rows[i] for i in order[:n_eval]]
        train_rows = [train_rows[i] for i in order[n_eval:]]
    make = lambda rows, what: examples_from_rows(card, rows, what) if rows else []
    scored = (lambda rows, what: with_references(make(rows, what))) if card.kind == "generation" else make
    return TaskData(card.name, card.kind, make(train_rows, card.train_file or card.name),
                    scored(eval_rows, card.eval_file or card.name), list(card.label_words), card.instruction, card,
                    test=scored(test_rows, card.name))


def _eval_file_for(path: Path) -> Path | None:
    """`train.csv` pairs with `valid.csv`/`validation.csv`/`test.csv` next to it when present."""
    for stem in ("valid", "validation", "test", "eval"):
        cand = path.with_name(path.name.replace("train", stem))
        if "train" in path.name and cand.is_file():
            return cand
    return None


def _hub_dataset(name: str, seed: int) -> TaskData:
    import datasets

    try:
        ds = datasets.load_dataset(name)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"task: cannot load {name!r} (not a built-in task, file, or reachable hub dataset): {str(exc).splitlines()[0]}") from exc
    train = ds["train"].to_list()
    eval_split = next((s for s in ("validation", "test") if s in ds), None)
    evals = ds[eval_split].to_list() if eval_split else None
    return task_from_card(card_for_rows(name, train + (evals or [])), seed, evals, train)


def looks_like_path(task: str) -> bool:
    return task.endswith(FILE_SUFFIXES) or os.sep in task and Path(task).suffix != ""


def check_task(task: str) -> None:
    """Up-front, cheap: a built-in name, an existing task card or data file, or a hub id."""
    if task in BUILTIN_CARDS:
        return
    if is_card_path(task):
        if not Path(os.path.expanduser(task)).is_file():
            raise ConfigError(f"task: task card not found: {task}")
        return
    if looks_like_path(task) or Path(os.path.expanduser(task)).exists():
        p = Path(os.path.expanduser(task))
        if p.suffix not in FILE_SUFFIXES:
            raise ConfigError(f"task: {task} must be a task card (.toml) or one of {', '.join(FILE_SUFFIXES)}")
        if not p.is_file():
            raise ConfigError(f"task: data file not found: {task}")
        return
    if "/" not in task:
        raise ConfigError(
            f"task: unknown task {task!r}; use {', '.join(BUILTIN_CARDS)}, a task card (.toml), "
            "a hub id (org/name) or a file path"
        )


@lru_cache(maxsize=2)
def load_task(task: str, seed: int = 42) -> TaskData:
    check_task(task)
    if task in BUILTIN_CARDS:
        return task_from_card(builtin_card(task), seed)
    if is_card_path(task):
        return task_from_card(load_card(task), seed)
    path = Path(os.path.expanduser(task))
    if path.is_file():
        eval_path = _eval_file_for(path)
        train_rows = read_rows(path)
        eval_rows = read_rows(eval_path) if eval_path else None
        check_blank(train_rows, "label", str(path))  # here, before the rows are shuffled: the row number is the file's
        check_blank(eval_rows or [], "label", str(eval_path))
        return task_from_card(card_for_rows(str(path), train_rows + (eval_rows or [])), seed, eval_rows, train_rows)
    return _hub_dataset(task, seed)


def task_for_node(card_json: str, seed: int) -> TaskData:
    """The run's task as a SuperNode sees it: the card the server sent (label words, prompt), no
    server files; the node's rows come from its own data-path."""
    card = TaskCard.from_wire(card_json)
    return TaskData(card.name, card.kind, [], [], list(card.label_words), card.instruction, card)


def load_local_file(path: str, task: TaskData, flag: str = "data-path", own_card: str = "") -> list[Example]:
    """A SuperNode's own data file (deployment, or a file to score): every row, read with the task's
    label words and prompt. Labels may be the label words, their indices (TFNS ships 0/1/2), or the
    raw values a node-side task card (`own_card`, a .toml path) maps to them."""
    p = Path(os.path.expanduser(path))
    if p.suffix not in FILE_SUFFIXES or not p.is_file():
        raise ConfigError(f"{flag}: not a readable {'/'.join(FILE_SUFFIXES)} file: {path}")
    run_card = task.card or TaskCard(task.name, task.kind, tuple(task.label_words), instruction=task.instruction)
    card = node_card(run_card, load_card(own_card) if own_card else None)
    return examples_from_rows(card, read_rows(p, flag), path, flag)


# ------------------------------------------------------------------ partitioning
def _train_order(n: int, seed: int) -> list[int]:
    """The seeded shuffle of the training pool: its first max-train-samples go to the clients."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


@lru_cache(maxsize=4)
def partition_indices(task: str, num_partitions: int, partitioner: str, alpha: float, seed: int, max_train: int) -> tuple[tuple[int, ...], ...]:
    """Indices of each client's shard, made by flwr-datasets partitioners (deterministic given seed)."""
    data = load_task(task, seed)
    n = len(data.train) if max_train <= 0 else min(max_train, len(data.train))
    if num_partitions > n:
        raise ConfigError(f"num-clients: {num_partitions} clients but only {n} training examples")
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    order = _train_order(len(data.train), seed)
    units: dict[str, list[int]] = {}  # examples sharing a unit (E2E: an MR's references) stay together
    for i in order:
        units.setdefault(data.train[i].unit or f"#{i}", []).append(i)
    members, count = [], 0
    for idx in units.values():  # whole units in shuffled order, until max-train-samples is reached
        if count >= n:
            break
        members.append(idx)
        count += len(idx)
    if num_partitions > len(members):
        raise ConfigError(f"num-clients: {num_partitions} clients but only {len(members)} training inputs")
    ds = Dataset.from_dict({"idx": list(range(len(members))), "group": [data.train[m[0]].group for m in members]})
    if partitioner == "iid":
        part = IidPartitioner(num_partitions=num_partitions)
    else:
        if len(set(ds["group"])) < 2:
            raise ConfigError("partitioner: dirichlet needs a label or category column with at least two values")
        part = DirichletPartitioner(
            num_partitions=num_partitions, partition_by="group", alpha=alpha, seed=seed,
            min_partition_size=1, self_balancing=False, shuffle=True,
        )
    part.dataset = ds
    try:
        return tuple(tuple(i for u in part.load_partition(p)["idx"] for i in members[u]) for p in range(num_partitions))
    except ValueError as exc:
        raise ConfigError(f"partitioner: {str(exc).splitlines()[0]}") from exc


def client_examples(cfg: RunConfig, partition_id: int, num_partitions: int,
                    canaries: Mapping[str, Any] | None = None) -> list[Example]:
    """Partition `partition_id` of `num_partitions` of the task's training data. `canaries`: what
    `fl-dplora audit` planted on this node (`audit_canaries`, from its node config): the real data is
    then split among the audit's data clients, and a canary client holds its canaries only."""
    data = load_task(cfg.data.task, cfg.train.seed)
    if canaries:  # privacy audit: the real data is split among the data clients; canary clients hold canaries only
        num_partitions = int(canaries["data-clients"])
        extra = [Example(p, a) for p, a in canaries["examples"]]
        if partition_id >= num_partitions:
            return extra
    else:
        extra = []
    idx = partition_indices(
        cfg.data.task, num_partitions, cfg.data.partitioner, cfg.data.dirichlet_alpha, cfg.train.seed, cfg.data.max_train_samples
    )[partition_id]
    return [data.train[i] for i in idx] + extra


@lru_cache(maxsize=4)
def audit_canaries(path: str) -> dict[str, Any] | None:
    """One simulated node's canary file, named by its node config `audit-canaries` (written by
    `fl-dplora audit`, never part of the run config): {"data-clients": N, "examples": [[prompt, answer], ...],
    "gradients": [canary, ...], "observe": [[adapter key, flat index], ...], "observations": FILE}, a
    gradient canary a list of [adapter key, flat index, value] (train.GradientCanary); `observe` names
    every canary's coordinate (planted or not), whose gradient the node appends to FILE after each
    round (the audit's white-box view). None without a file (every run but an audit's)."""
    if not path:
        return None
    try:
        raw = json.loads(Path(path).read_text())
        return {"data-clients": int(raw["data-clients"]), "examples": list(raw.get("examples", [])),
                "gradients": list(raw.get("gradients", [])), "observe": list(raw.get("observe", [])),
                "observations": str(raw.get("observations", ""))}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"node-config audit-canaries: cannot read {path}: {exc}") from None


def unused_train_examples(cfg: RunConfig) -> list[Example]:
    """Training-pool examples that no client received (max-train-samples cut them): the cleanest
    non-members for membership inference, drawn from the same distribution as the members."""
    data = load_task(cfg.data.task, cfg.train.seed)
    n = cfg.data.max_train_samples
    if n <= 0 or n >= len(data.train):
        return []
    return [data.train[i] for i in _train_order(len(data.train), cfg.train.seed)[n:]]


def eval_examples(cfg: RunConfig) -> list[Example]:
    data = load_task(cfg.data.task, cfg.train.seed)
    n = cfg.data.max_eval_samples
    if n <= 0 or n >= len(data.eval):
        return data.eval
    # A fixed random subset (seeded by 0, not the run seed) so every run is scored on the same examples.
    order = torch.randperm(len(data.eval), generator=torch.Generator().manual_seed(0)).tolist()
    return [data.eval[i] for i in order[:n]]


def head_stat_examples(cfg: RunConfig, limit: int = 256) -> list[Example]:
    """Public examples for the label head's feature statistics: the task's evaluation data that
    the server does not score. Only their prompts are used, never their labels, and never a
    client's data. Never a scored prompt: when the server scores every evaluation row
    (`max-eval-samples = 0`, or an eval file of at most `max-eval-samples` rows) this is empty and
    the head uses data-independent statistics (label_head.neutral_stats)."""
    data = load_task(cfg.data.task, cfg.train.seed)
    scored = {e.prompt for e in eval_examples(cfg)}
    return [e for e in data.eval if e.prompt not in scored][:limit]


# ------------------------------------------------------------------ tokenization
def render_prompt(tokenizer, prompt: str, system_prompt: str = "auto") -> str:
    """The prompt in the model's chat template. system_prompt: `auto` = whatever the template does
    (SmolLM2 adds a 20-token default), "" = no system turn at all, other text = that system turn."""
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": prompt}]
        if system_prompt == "auto":
            return tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        system = [{"role": "system", "content": system_prompt}]
        text = tokenizer.apply_chat_template(system + user, tokenize=False, add_generation_prompt=True)
        if not system_prompt:  # drop the empty system turn the template rendered, if it rendered one
            empty = tokenizer.apply_chat_template(system, tokenize=False)
            text = text[len(empty):] if text.startswith(empty) else text
        return text
    head = f"{system_prompt}\n\n" if system_prompt not in ("", "auto") else ""
    return f"{head}### Instruction:\n{prompt}\n\n### Response:\n"


def _answer_suffix(tokenizer) -> str:
    # The answer ends the way the template ends an assistant turn, so the model learns to stop.
    return tokenizer.eos_token or ""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # -100 on prompt and padding
    prefix: torch.Tensor | None = None  # [T, H] state entering block `prefix_start` (frozen_prefix.attach_prefix)
    prefix_start: int = 0
    answer_hidden: torch.Tensor | None = None  # [H] final state at the first answer position (label-head rounds)


def encode_example(tokenizer, ex: Example, max_len: int, system_prompt: str = "auto") -> Encoded:
    prompt_ids = tokenizer(render_prompt(tokenizer, ex.prompt, system_prompt), add_special_tokens=False).input_ids
    answer_ids = tokenizer(ex.answer + _answer_suffix(tokenizer), add_special_tokens=False).input_ids
    answer_ids = answer_ids[: max(1, max_len // 2)]
    budget = max_len - len(answer_ids)
    if len(prompt_ids) > budget:
        # Keep the head (system/role header) and the tail (question, instruction, assistant header).
        tail = min(len(prompt_ids), max(budget * 2 // 3, budget - 16))
        prompt_ids = prompt_ids[: budget - tail] + prompt_ids[len(prompt_ids) - tail :]
    return Encoded(prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids)


def collate(encoded: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, e in enumerate(encoded):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    starts = {e.prefix_start if e.prefix is not None else 0 for e in encoded}
    if starts != {0}:  # every example carries its cached prefix state: pad them like the ids
        if len(starts) != 1 or any(e.prefix is None for e in encoded):
            raise ValueError("collate: a batch mixes examples with and without (or with different) prefix caches")
        hidden = torch.zeros(len(encoded), width, encoded[0].prefix.shape[-1], dtype=encoded[0].prefix.dtype)
        for i, e in enumerate(encoded):
            hidden[i, : len(e.input_ids)] = e.prefix
        batch["prefix_hidden"] = hidden
        batch["prefix_start"] = torch.tensor(starts.pop())
    if all(e.answer_hidden is not None for e in encoded):
        batch["answer_hidden"] = torch.stack([e.answer_hidden for e in encoded])
    return batch


def encode_all(tokenizer, examples: Sequence[Example], max_len: int, system_prompt: str = "auto") -> list[Encoded]:
    return [encode_example(tokenizer, ex, max_len, system_prompt) for ex in examples]
