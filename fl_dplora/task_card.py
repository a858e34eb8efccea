"""Task cards: what a task is (columns, label words, prompt), in one small TOML file.

Every task goes through a card: the built-in ones ship theirs (`data_files/*/task.toml`), a plain
CSV/JSONL task gets one derived from its rows, and a user's own card names its columns, label words,
prompt and files:

    name = "pathology-notes"
    kind = "classification"                     # or "generation"
    label-words = ["benign", "malignant"]       # what the model answers, in this order
    labels = { "0" = "benign", "1" = "malignant" }   # optional: values in the files -> label words
    instruction = "Is the finding benign or malignant? Answer with one word: benign or malignant."
    prompt-template = "{instruction}\\n\\n{text}"     # optional; {column} = that column of the row
    text-column = "text"                        # optional (label-column = "label" likewise)
    train-file = "train.csv"                    # optional, relative to the card
    eval-file = "test.csv"                      # optional; without it 10 % of train-file is held out
    licence = "internal, no redistribution"     # optional, goes into the exported model card

The server sends its card (without file names) with every instruction, so a SuperNode needs no copy
of the server's files: its own `data-path` rows are read with the run's label words and prompt, and
an optional node-side card (node-config `task-card`) says how its own file names columns and labels.
"""

from __future__ import annotations

import gzip
import json
import os
import string
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fl_dplora.config import ConfigError

CARD_KEYS = {"name", "kind", "label-words", "labels", "instruction", "prompt-template", "text-column",
             "label-column", "instruction-column", "response-column", "context-column", "train-file",
             "eval-file", "loader", "licence"}
LOADERS = ("pubmedqa", "dolly", "e2e", "tfns")  # bundled data whose rows need reading code (nested JSON, fixed splits)
DEFAULT_TEMPLATE = "{instruction}\n\n{text}"
GENERIC_INSTRUCTION = "Classify the text. Answer with one of: {labels}."


@dataclass
class Example:
    """One (prompt, answer) pair of a task (data.py partitions, tokenizes and scores them)."""

    prompt: str
    answer: str
    label: int = -1  # index into TaskData.label_words for classification, -1 otherwise
    group: str = ""  # what the dirichlet partitioner splits on (label word or category)
    unit: str = ""  # examples with the same unit go to one client (E2E: every reference of an MR)
    references: tuple[str, ...] = ()  # generation eval: every reference of this prompt (answer is the first)


@dataclass(frozen=True)
class TaskCard:
    name: str
    kind: str = "classification"
    label_words: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)  # raw file value -> label word
    instruction: str = ""
    prompt_template: str = DEFAULT_TEMPLATE
    text_column: str = "text"
    label_column: str = "label"
    instruction_column: str = "instruction"
    response_column: str = "response"
    context_column: str = "context"
    train_file: str = ""  # absolute once loaded
    eval_file: str = ""
    loader: str = ""
    licence: str = ""
    data_dir: str = ""  # where a loader finds its files (the card's folder)

    # ------------------------------------------------------------------ wire form
    def to_wire(self) -> str:
        """The card a node needs to read its own rows: no file names, no loader (server-side things)."""
        d = asdict(self)
        for key in ("train_file", "eval_file", "loader", "data_dir"):
            d.pop(key)
        d["labels"] = dict(self.labels)
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_wire(cls, text: str) -> TaskCard:
        d = json.loads(text)
        d["label_words"] = tuple(d.get("label_words", ()))
        return cls(**d)

    # ------------------------------------------------------------------ rows -> examples
    def label_index(self, raw: Any) -> int | None:
        value = str(raw)
        if value in self.labels:
            value = self.labels[value]
        if value in self.label_words:
            return self.label_words.index(value)
        if not self.labels and value.isdigit() and int(value) < len(self.label_words):
            return int(value)  # no mapping given: an integer label is an index into the label words
        return None

    def prompt(self, row: Mapping[str, Any]) -> str:
        values = {k: ("" if v is None else str(v)) for k, v in row.items()}
        values.update(instruction=self.instruction, text=values.get(self.text_column, ""))
        return self.prompt_template.format_map(values)


def _template_fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def card_from_mapping(raw: Mapping[str, Any], where: str, base: Path | None = None) -> TaskCard:
    """Validate a card's keys and values; every problem is one line naming the card and the key."""
    unknown = sorted(set(raw) - CARD_KEYS)
    if unknown:
        raise ConfigError(f"task card {where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(CARD_KEYS))})")
    kind = raw.get("kind", "classification")
    if kind not in ("classification", "generation"):
        raise ConfigError(f"task card {where}: kind must be classification or generation, got {kind!r}")
    words = tuple(str(w) for w in raw.get("label-words", ()))
    if kind == "classification":
        if len(words) < 2 or len(set(words)) != len(words) or not all(w.strip() for w in words):
            raise ConfigError(f"task card {where}: label-words must be two or more distinct non-empty words, got {list(words)}")
    labels = {str(k): str(v) for k, v in dict(raw.get("labels", {})).items()}
    bad = sorted(v for v in labels.values() if v not in words)
    if bad:
        raise ConfigError(f"task card {where}: labels maps to {bad[0]!r}, which is not one of label-words {list(words)}")
    template = str(raw.get("prompt-template", DEFAULT_TEMPLATE))
    try:
        _template_fields(template)
    except ValueError as exc:
        raise ConfigError(f"task card {where}: prompt-template: {exc}") from None
    loader = str(raw.get("loader", ""))
    if loader and loader not in LOADERS:
        raise ConfigError(f"task card {where}: loader must be one of {', '.join(LOADERS)}, got {loader!r}")
    files = {}
    for key in ("train-file", "eval-file"):
        value = str(raw.get(key, ""))
        if value:
            path = Path(os.path.expanduser(value))
            path = path if path.is_absolute() or base is None else base / path
            if not path.is_file():
                raise ConfigError(f"task card {where}: {key} not found: {path}")
            value = str(path)
        files[key.replace("-", "_")] = value
    text_col = {k.replace("-", "_"): str(raw[k]) for k in ("text-column", "label-column", "instruction-column",
                                                         "response-column", "context-column") if k in raw}
    return TaskCard(name=str(raw.get("name", where)), kind=kind, label_words=words, labels=labels,
                    instruction=str(raw.get("instruction", "")), prompt_template=template, loader=loader,
                    licence=str(raw.get("licence", "")), data_dir=str(base) if base is not None and loader else "",
                    **files, **text_col)


def load_card(path: str | Path) -> TaskCard:
    p = Path(os.path.expanduser(str(path)))
    try:
        raw = tomllib.loads(p.read_text())
    except OSError as exc:
        raise ConfigError(f"task card {path}: cannot read ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"task card {path}: not valid TOML ({exc})") from None
    return card_from_mapping(raw, str(path), p.resolve().parent)


def is_card_path(task: str) -> bool:
    return task.endswith(".toml")


def card_for_rows(name: str, rows: Sequence[Mapping[str, Any]]) -> TaskCard:
    """The card of a plain data file: text+label (label words = its sorted label values) or
    instruction+response."""
    cols = set(rows[0]) if rows else set()
    if {"text", "label"} <= cols:
        words = tuple(sorted({str(r["label"]) for r in rows if not _blank(r["label"])}))
        return TaskCard(name=name, label_words=words, instruction=GENERIC_INSTRUCTION.format(labels=", ".join(words)))
    if {"instruction", "response"} <= cols:
        return TaskCard(name=name, kind="generation")
    raise ConfigError(f"task: {name} needs columns text+label or instruction+response; it has {', '.join(sorted(cols)) or 'none'}")


def examples_from_rows(card: TaskCard, rows: Sequence[Mapping[str, Any]], source: str, flag: str = "task"):
    """Rows -> Examples with the card's prompt and label words; a missing column or an unknown label
    is one line naming the file, before anything is trained."""
    if not rows:
        raise ConfigError(f"{flag}: {source} has no rows")
    cols = set(rows[0])
    fields = _template_fields(card.prompt_template)
    if card.kind == "generation":
        if {card.instruction_column, card.response_column} <= cols:
            return [_instruct_example(r, card) for r in rows]
        if not card.instruction:  # no prompt template to fill: the rows must hold the instruction
            need = sorted({card.instruction_column, card.response_column})
            raise ConfigError(f"{flag}: {source} needs columns {'+'.join(need)}; it has {', '.join(sorted(cols))}")
        # a card with an instruction and a template (data-to-text): prompt = the template over the row
        need = ([card.text_column] if "text" in fields else []) + sorted(fields - {"instruction", "text"}) + [card.response_column]
        if not set(need) <= cols:
            raise ConfigError(f"{flag}: {source} needs columns {'+'.join(need)}; it has {', '.join(sorted(cols))}")
        out = []
        for i, r in enumerate(rows):
            answer = r[card.response_column]
            if _blank(answer):
                raise ConfigError(f"{flag}: {source} row {i + 2}: column {card.response_column!r} is empty")
            prompt = card.prompt(r)
            # rows with the same prompt are references of one input (E2E: all references of an MR):
            # they share a unit, which partitioning keeps on one client
            out.append(Example(prompt=prompt, answer=str(answer).strip(), unit=prompt))
        return out
    need = ([card.text_column] if "text" in fields else []) + sorted(fields - {"instruction", "text"}) + [card.label_column]
    if not set(need) <= cols:
        raise ConfigError(f"{flag}: {source} needs columns {'+'.join(need)}; it has {', '.join(sorted(cols))}")
    check_blank(rows, card.label_column, source, flag)
    out = []
    for i, r in enumerate(rows):
        y = card.label_index(r[card.label_column])
        if y is None:
            extra = f" (or {', '.join(card.labels)})" if card.labels else " (or their index)"
            raise ConfigError(f"{flag}: label {str(r[card.label_column])!r} in {source} is not one of "
                              f"{list(card.label_words)}{extra} (row {i + 2})")
        word = card.label_words[y]
        out.append(Example(prompt=card.prompt(r), answer=word, label=y, group=word))
    return out


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value) or not str(value).strip()


def check_blank(rows: Sequence[Mapping[str, Any]], column: str, source: str, flag: str = "task") -> None:
    """A blank cell (pandas reads it as NaN) is named by its row, counting the header as row 1."""
    for i, r in enumerate(rows):
        if column in r and _blank(r[column]):
            raise ConfigError(f"{flag}: {source} row {i + 2}: column {column!r} is empty")


def _instruct_example(rec: Mapping[str, Any], card: TaskCard) -> Example:
    ctx = str(rec.get(card.context_column) or rec.get("input") or "").strip()
    prompt = str(rec[card.instruction_column]).strip() + (f"\n\nContext: {ctx}" if ctx else "")
    return Example(prompt=prompt, answer=str(rec[card.response_column]).strip(), group=str(rec.get("category", "")))


def node_card(run_card: TaskCard, own: TaskCard | None) -> TaskCard:
    """How a node reads its own file: the run's label words and prompt, with the node card's column
    names and raw-label mapping. A node card whose words are not the run's is refused."""
    if own is None:
        return run_card
    if own.kind != run_card.kind or (own.kind == "classification" and set(own.label_words) != set(run_card.label_words)):
        raise ConfigError(f"node-config task-card: its label words {list(own.label_words)} are not the run's "
                          f"{list(run_card.label_words)}")
    return replace(run_card, labels=dict(own.labels), text_column=own.text_column, label_column=own.label_column,
                   instruction_column=own.instruction_column, response_column=own.response_column,
                   context_column=own.context_column)


# ------------------------------------------------------------------ bundled loaders
def read_rows(path: Path, flag: str = "task") -> list[dict]:
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
        raise ConfigError(f"{flag}: cannot read {path}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    return df.to_dict("records")


E2E_DEV_MRS = 100  # of the 315 MRs of testset_part_a.csv; the other 215 are the test part


def e2e_rows(base: Path) -> tuple[list[dict], list[dict], list[dict]]:
    """E2E: clients' pool = devset.csv; testset_part_a.csv split by MR with a fixed permutation (seed 0,
    never the run's) into a public dev part and a test part scored once at the end of a run."""
    import torch

    train = read_rows(base / "devset.csv")
    held = read_rows(base / "testset_part_a.csv")
    mrs = list(dict.fromkeys(r["mr"] for r in held))  # distinct MRs in file order
    order = torch.randperm(len(mrs), generator=torch.Generator().manual_seed(0)).tolist()
    dev = {mrs[i] for i in order[:E2E_DEV_MRS]}
    return train, [r for r in held if r["mr"] in dev], [r for r in held if r["mr"] not in dev]


TFNS_TEST_TWEETS = 1600  # of sent_valid.csv's 2,388: one SE ~1.0 point at 80 %; the other 788 are the dev part
TFNS_V1_SCORED, TFNS_V1_HEAD_ROWS = 300, 320  # what the earlier protocol (task fin-sentiment-v1) looked at


def tfns_split(n_valid: int) -> tuple[list[int], list[int]]:
    """Row indices of sent_valid.csv: (dev part, test part), both in file order. Fixed (seed 0, never the
    run's). Every tweet the earlier protocol used for a choice stays in the dev part: the 300 it scored
    (the seed-0 permutation's first 300, a superset of every smaller max-eval-samples subset) and the
    head-statistic prompts, the first unscored rows of the file (all inside its first 320 rows)."""
    import torch

    order = torch.randperm(n_valid, generator=torch.Generator().manual_seed(0)).tolist()
    dev = set(order[:TFNS_V1_SCORED]) | set(range(min(TFNS_V1_HEAD_ROWS, n_valid)))
    room = max(0, n_valid - TFNS_TEST_TWEETS - len(dev))
    dev |= set([i for i in order if i not in dev][:room])
    return sorted(dev), [i for i in range(n_valid) if i not in dev]


def tfns_rows(base: Path) -> tuple[list[dict], list[dict], list[dict]]:
    """TFNS: clients' pool = sent_train.csv; sent_valid.csv split into a public dev part (monitoring,
    head statistics, recipe choices) and a test part of 1,600 tweets scored once at the end of a run."""
    valid = read_rows(base / "sent_valid.csv")
    dev, test = tfns_split(len(valid))
    return read_rows(base / "sent_train.csv"), [valid[i] for i in dev], [valid[i] for i in test]


def loader_rows(card: TaskCard) -> tuple[list[dict], list[dict], list[dict]]:
    """(train rows, eval rows, test rows) of a bundled format, read from the card's folder. The test
    rows (E2E and TFNS have them) are scored once, at the end of a run; eval rows every round."""
    base = Path(card.data_dir)
    if card.loader == "e2e":
        return e2e_rows(base)
    if card.loader == "tfns":
        return tfns_rows(base)
    if card.loader == "pubmedqa":
        with gzip.open(base / "ori_pqal.json.gz", "rt") as f:
            pqal = json.load(f)
        test_ids = set(json.loads((base / "test_ground_truth.json").read_text()))
        rows = {pid: {"context": " ".join(r["CONTEXTS"]), "question": r["QUESTION"], "label": r["final_decision"]}
                for pid, r in sorted(pqal.items())}
        # the official 500-id test split
        return [r for pid, r in rows.items() if pid not in test_ids], [r for pid, r in rows.items() if pid in test_ids], []
    # dolly: a fixed held-out set of every 30th row (~500), independent of the seed so runs compare
    with gzip.open(base / "databricks-dolly-15k.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    held_out = [r for i, r in enumerate(rows) if i % 30 == 0]
    # Dolly has exact duplicate rows: keep a held-out example's copies out of the training pool
    key = lambda r: (lambda e: (e.prompt, e.answer))(_instruct_example(r, card))
    seen = {key(r) for r in held_out}
    return [r for i, r in enumerate(rows) if i % 30 and key(r) not in seen], held_out, []
