"""Tasks, prompt templates, partitioning and tokenization.

A task is a train pool (partitioned across clients with flwr-datasets) and a central eval set.
Every example becomes (prompt, answer); the loss is on the answer tokens only.
Classification tasks also carry their label words, scored at the answer position in evaluation.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from fl_dplora.config import PACKAGE_DIR, ConfigError

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
class Example:
    prompt: str
    answer: str
    label: int = -1  # index into TaskData.label_words for classification, -1 otherwise
    group: str = ""  # what the dirichlet partitioner splits on (label word or category)


@dataclass
class TaskData:
    name: str
    kind: str  # "classification" | "generation"
    train: list[Example]
    eval: list[Example]
    label_words: list[str] = field(default_factory=list)
    instruction: str = ""  # classification prompt prefix; reused for a SuperNode's own file


# ------------------------------------------------------------------ prompts
FIN_INSTRUCTION = (
    "What is the sentiment of this financial tweet? Answer with one word: negative, neutral or positive."
)
MED_INSTRUCTION = "Answer the biomedical research question with one word: yes, no or maybe."
CLS_INSTRUCTION = "Classify the text. Answer with one of: {labels}."


def _cls_examples(texts: Sequence[str], labels: Sequence[int], words: list[str], instruction: str) -> list[Example]:
    return [
        Example(prompt=f"{instruction}\n\n{t}", answer=words[y], label=int(y), group=words[y])
        for t, y in zip(texts, labels)
    ]


# ------------------------------------------------------------------ built-in tasks
def _fin_sentiment() -> TaskData:
    import pandas as pd

    # TFNS labels: 0 = Bearish, 1 = Bullish, 2 = Neutral.
    words = ["negative", "positive", "neutral"]
    tr = pd.read_csv(DATA_DIR / "tfns" / "sent_train.csv")
    va = pd.read_csv(DATA_DIR / "tfns" / "sent_valid.csv")
    mk = lambda df: _cls_examples(df.text.astype(str).tolist(), df.label.tolist(), words, FIN_INSTRUCTION)
    return TaskData("fin-sentiment", "classification", mk(tr), mk(va), words, FIN_INSTRUCTION)


def _medical_qa() -> TaskData:
    with gzip.open(DATA_DIR / "pubmedqa" / "ori_pqal.json.gz", "rt") as f:
        pqal = json.load(f)
    test_ids = set(json.loads((DATA_DIR / "pubmedqa" / "test_ground_truth.json").read_text()))
    words = ["yes", "no", "maybe"]

    def ex(rec: dict) -> Example:
        context = " ".join(rec["CONTEXTS"])
        # Question and instruction come last so that truncation only ever cuts the context.
        prompt = f"Context: {context}\n\nQuestion: {rec['QUESTION']}\n\n{MED_INSTRUCTION}"
        y = words.index(rec["final_decision"])
        return Example(prompt=prompt, answer=words[y], label=y, group=words[y])

    train = [ex(r) for pid, r in sorted(pqal.items()) if pid not in test_ids]
    test = [ex(r) for pid, r in sorted(pqal.items()) if pid in test_ids]  # the official 500-id test split
    return TaskData("medical-qa", "classification", train, test, words, MED_INSTRUCTION)


def _instruct_example(rec: Mapping[str, Any]) -> Example:
    ctx = str(rec.get("context") or rec.get("input") or "").strip()
    prompt = str(rec["instruction"]).strip() + (f"\n\nContext: {ctx}" if ctx else "")
    return Example(prompt=prompt, answer=str(rec["response"]).strip(), group=str(rec.get("category", "")))


def _general_instruct() -> TaskData:
    with gzip.open(DATA_DIR / "dolly15k" / "databricks-dolly-15k.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    exs = [_instruct_example(r) for r in rows]
    # Fixed held-out set: every 30th row (~500), independent of the seed so runs compare.
    held_out = [e for i, e in enumerate(exs) if i % 30 == 0]
    # Dolly has exact duplicate rows: keep a held-out example's copies out of the training pool.
    seen = {(e.prompt, e.answer) for e in held_out}
    train = [e for i, e in enumerate(exs) if i % 30 and (e.prompt, e.answer) not in seen]
    return TaskData("general-instruct", "generation", train, held_out)


# ------------------------------------------------------------------ user files and hub datasets
def _rows_to_task(name: str, train_rows: list[dict], eval_rows: list[dict] | None, seed: int) -> TaskData:
    if not train_rows:
        raise ConfigError(f"task: {name} has no rows")
    cols = set(train_rows[0])
    if {"text", "label"} <= cols:
        raw = sorted({str(r["label"]) for r in train_rows + (eval_rows or [])})
        words = raw
        instr = CLS_INSTRUCTION.format(labels=", ".join(words))
        mk = lambda rows: _cls_examples([str(r["text"]) for r in rows], [words.index(str(r["label"])) for r in rows], words, instr)
        kind, make = "classification", mk
    elif {"instruction", "response"} <= cols:
        kind, words, instr, make = "generation", [], "", lambda rows: [_instruct_example(r) for r in rows]
    else:
        raise ConfigError(
            f"task: {name} needs columns text+label or instruction+response; it has {', '.join(sorted(cols)) or 'none'}"
        )
    if eval_rows is None:  # hold out 10 % (at most 1000) with a fixed seed
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(train_rows), generator=g).tolist()
        n_eval = max(1, min(1000, len(train_rows) // 10))
        eval_rows = [train_rows[i] for i in order[:n_eval]]
        train_rows = [train_rows[i] for i in order[n_eval:]]
    return TaskData(name, kind, make(train_rows), make(eval_rows), words, instr if words else "")


def _read_file(path: Path) -> list[dict]:
    import pandas as pd

    try:
        if path.suffix == ".csv":
            df = pd.read_csv(path)
        elif path.suffix == ".jsonl":
            df = pd.read_json(path, lines=True)
        elif path.suffix == ".json":
            df = pd.read_json(path)
        else:
            df = pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - any parse error is a user-input error here
        raise ConfigError(f"task: cannot read {path}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    return df.to_dict("records")


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
    return _rows_to_task(name, train, ds[eval_split].to_list() if eval_split else None, seed)


def looks_like_path(task: str) -> bool:
    return task.endswith(FILE_SUFFIXES) or os.sep in task and Path(task).suffix != ""


def check_task(task: str) -> None:
    """Up-front, cheap: a built-in name, an existing file with a known suffix, or a hub id."""
    if task in ("fin-sentiment", "medical-qa", "general-instruct"):
        return
    if looks_like_path(task) or Path(os.path.expanduser(task)).exists():
        p = Path(os.path.expanduser(task))
        if p.suffix not in FILE_SUFFIXES:
            raise ConfigError(f"task: {task} must be one of {', '.join(FILE_SUFFIXES)}")
        if not p.is_file():
            raise ConfigError(f"task: data file not found: {task}")
        return
    if "/" not in task:
        raise ConfigError(
            f"task: unknown task {task!r}; use fin-sentiment, medical-qa, general-instruct, a hub id (org/name) or a file path"
        )


@lru_cache(maxsize=2)
def load_task(task: str, seed: int = 42) -> TaskData:
    check_task(task)
    if task == "fin-sentiment":
        return _fin_sentiment()
    if task == "medical-qa":
        return _medical_qa()
    if task == "general-instruct":
        return _general_instruct()
    path = Path(os.path.expanduser(task))
    if path.is_file():
        eval_path = _eval_file_for(path)
        return _rows_to_task(str(path), _read_file(path), _read_file(eval_path) if eval_path else None, seed)
    return _hub_dataset(task, seed)


def load_local_file(path: str, task: TaskData, flag: str = "data-path") -> list[Example]:
    """A SuperNode's own data file (deployment): every row is this client's training data.

    Labels may be the task's label words or their indices (TFNS ships 0/1/2).
    """
    p = Path(os.path.expanduser(path))
    if p.suffix not in FILE_SUFFIXES or not p.is_file():
        raise ConfigError(f"{flag}: not a readable {'/'.join(FILE_SUFFIXES)} file: {path}")
    rows = _read_file(p)
    if not rows:
        raise ConfigError(f"{flag}: {path} has no rows")
    cols = set(rows[0])
    if task.kind == "classification":
        if not {"text", "label"} <= cols:
            raise ConfigError(f"{flag}: {path} needs columns text+label; it has {', '.join(sorted(cols))}")
        words = task.label_words
        labels = []
        for r in rows:
            raw = str(r["label"])
            if raw in words:
                labels.append(words.index(raw))
            elif raw.isdigit() and int(raw) < len(words):
                labels.append(int(raw))
            else:
                raise ConfigError(f"{flag}: label {raw!r} in {path} is not one of {words} (or their index)")
        return _cls_examples([str(r["text"]) for r in rows], labels, words, task.instruction)
    if not {"instruction", "response"} <= cols:
        raise ConfigError(f"{flag}: {path} needs columns instruction+response; it has {', '.join(sorted(cols))}")
    return [_instruct_example(r) for r in rows]


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

    order = _train_order(len(data.train), seed)[:n]
    ds = Dataset.from_dict({"idx": order, "group": [data.train[i].group for i in order]})
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
        return tuple(tuple(part.load_partition(i)["idx"]) for i in range(num_partitions))
    except ValueError as exc:
        raise ConfigError(f"partitioner: {str(exc).splitlines()[0]}") from exc


def client_examples(cfg: Mapping[str, Any], partition_id: int, num_partitions: int) -> list[Example]:
    data = load_task(cfg["task"], int(cfg["seed"]))
    canaries = audit_canaries(cfg.get("audit-canaries", ""))
    if canaries:  # privacy audit: the real data is split among the data clients; canary clients hold canaries only
        num_partitions = int(canaries["data-clients"])
        extra = [Example(p, a) for p, a in canaries["examples"].get(str(partition_id), [])]
        if partition_id >= num_partitions:
            return extra
    else:
        extra = []
    idx = partition_indices(
        cfg["task"], num_partitions, cfg["partitioner"], float(cfg["dirichlet-alpha"]), int(cfg["seed"]), int(cfg["max-train-samples"])
    )[partition_id]
    return [data.train[i] for i in idx] + extra


@lru_cache(maxsize=4)
def audit_canaries(path: str) -> dict[str, Any] | None:
    """The canary file of `fl-dplora audit`: {"data-clients": N, "examples": {partition: [[prompt, answer], ...]}}."""
    if not path:
        return None
    try:
        raw = json.loads(Path(path).read_text())
        return {"data-clients": int(raw["data-clients"]), "examples": dict(raw["examples"])}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"audit-canaries: cannot read {path}: {exc}") from None


def unused_train_examples(cfg: Mapping[str, Any]) -> list[Example]:
    """Training-pool examples that no client received (max-train-samples cut them): the cleanest
    non-members for membership inference, drawn from the same distribution as the members."""
    data = load_task(cfg["task"], int(cfg["seed"]))
    n = int(cfg["max-train-samples"])
    if n <= 0 or n >= len(data.train):
        return []
    return [data.train[i] for i in _train_order(len(data.train), int(cfg["seed"]))[n:]]


def eval_examples(cfg: Mapping[str, Any]) -> list[Example]:
    data = load_task(cfg["task"], int(cfg["seed"]))
    n = int(cfg["max-eval-samples"])
    if n <= 0 or n >= len(data.eval):
        return data.eval
    # A fixed random subset (seeded by 0, not the run seed) so every run is scored on the same examples.
    order = torch.randperm(len(data.eval), generator=torch.Generator().manual_seed(0)).tolist()
    return [data.eval[i] for i in order[:n]]


def head_stat_examples(cfg: Mapping[str, Any], limit: int = 256) -> list[Example]:
    """Public examples for the label head's feature statistics: the task's evaluation data that
    the server does not score (falling back to the scored subset when it scores all of it). Only
    their prompts are used, never their labels, and never a client's data."""
    data = load_task(cfg["task"], int(cfg["seed"]))
    scored = eval_examples(cfg)
    seen = {(e.prompt, e.answer) for e in scored}
    rest = [e for e in data.eval if (e.prompt, e.answer) not in seen]
    return (rest or scored)[:limit]


# ------------------------------------------------------------------ tokenization
def _render_prompt(tokenizer, prompt: str, system_prompt: str = "auto") -> str:
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
    prefix: torch.Tensor | None = None  # [T, H] state entering block `prefix_start` (forward.attach_prefix)
    prefix_start: int = 0
    answer_hidden: torch.Tensor | None = None  # [H] final state at the first answer position (label-head rounds)


def encode_example(tokenizer, ex: Example, max_len: int, system_prompt: str = "auto") -> Encoded:
    prompt_ids = tokenizer(_render_prompt(tokenizer, ex.prompt, system_prompt), add_special_tokens=False).input_ids
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
