"""Tasks, partitioning and tokenization (fl_dplora.data)."""

from __future__ import annotations

import gzip
import json
from collections import Counter

import pandas as pd
import pytest

from fl_dplora.config import ConfigError, resolve
from fl_dplora.data import (
    DATA_DIR,
    Example,
    check_task,
    client_examples,
    collate,
    encode_example,
    eval_examples,
    load_local_file,
    load_task,
    partition_indices,
)
from fl_dplora.model_loading import load_tokenizer

MED_INSTRUCTION = "Answer the biomedical research question with one word: yes, no or maybe."  # the card's, pinned

_partition = partition_indices.__wrapped__  # bypass the process cache: determinism must not come from it


# ----------------------------------------------------------------------------- built-in tasks
def test_fin_sentiment_has_the_official_split_sizes_and_class_counts():
    t = load_task("fin-sentiment", 42)
    assert (len(t.train), len(t.eval), len(t.test)) == (9543, 788, 1600)  # sent_valid.csv = dev + test part
    assert t.kind == "classification"
    assert t.label_words == ["negative", "positive", "neutral"]
    assert Counter(e.answer for e in t.train) == {"negative": 1442, "positive": 1923, "neutral": 6178}
    assert Counter(e.answer for e in t.eval + t.test) == {"negative": 347, "positive": 475, "neutral": 1566}


@pytest.mark.parametrize(
    "row, text, word",
    [
        (0, "$BYND - JPMorgan reels in expectations on Beyond Meat", "negative"),  # TFNS 0 = Bearish
        (126, "$ALTG: Dougherty & Company starts at Buy", "positive"),  # 1 = Bullish
        (360, "Analysts React To FCC Decision On Intelsat C-Band Spectrum Auction", "neutral"),  # 2 = Neutral
    ],
)
def test_fin_sentiment_label_mapping_spot_check(row, text, word):
    t = load_task("fin-sentiment", 42)
    raw = pd.read_csv(DATA_DIR / "tfns" / "sent_train.csv")
    ex = t.train[row]
    assert raw.text[row].startswith(text)
    assert text in ex.prompt and ex.prompt.startswith("What is the sentiment")
    assert ex.answer == word and ex.group == word
    assert t.label_words[ex.label] == word == ["negative", "positive", "neutral"][raw.label[row]]


def test_medical_qa_evaluates_on_the_official_500_test_ids_and_trains_on_the_other_500():
    with gzip.open(DATA_DIR / "pubmedqa" / "ori_pqal.json.gz", "rt") as f:
        pqal = json.load(f)
    truth = json.loads((DATA_DIR / "pubmedqa" / "test_ground_truth.json").read_text())
    assert len(pqal) == 1000 and len(truth) == 500 and set(truth) <= set(pqal)
    t = load_task("medical-qa", 42)
    assert (len(t.train), len(t.eval)) == (500, 500)
    assert t.label_words == ["yes", "no", "maybe"]

    def ids_of(examples):
        out = []
        for ex in examples:
            hits = [pid for pid, rec in pqal.items() if f"Question: {rec['QUESTION']}\n" in ex.prompt
                    and rec["CONTEXTS"][0] in ex.prompt]
            assert len(hits) == 1, ex.prompt[:120]
            out.append(hits[0])
        return out

    eval_ids, train_ids = ids_of(t.eval), ids_of(t.train)
    assert set(eval_ids) == set(truth)
    assert set(train_ids) == set(pqal) - set(truth)
    for pid, ex in zip(eval_ids, t.eval):
        assert ex.answer == truth[pid] == pqal[pid]["final_decision"]
    # The question and instruction come last, so prompt truncation only ever cuts the context.
    assert all(ex.prompt.endswith(MED_INSTRUCTION) for ex in t.train + t.eval)


def test_general_instruct_eval_and_train_are_disjoint():
    t = load_task("general-instruct", 42)
    assert t.kind == "generation" and not t.label_words
    assert 480 <= len(t.eval) <= 520 and len(t.train) > 14000
    train_pairs = {(e.prompt, e.answer) for e in t.train}
    eval_pairs = {(e.prompt, e.answer) for e in t.eval}
    assert not train_pairs & eval_pairs  # Dolly has duplicate rows: none may straddle the split
    assert all(e.answer for e in t.eval)


def test_eval_subset_is_fixed_and_does_not_depend_on_the_run_seed():
    base = {"task": "fin-sentiment", "max-eval-samples": 50}
    a = eval_examples(resolve({**base, "seed": 1}))
    b = eval_examples(resolve({**base, "seed": 2}))
    assert len(a) == 50 and [e.prompt for e in a] == [e.prompt for e in b]
    assert len(eval_examples(resolve({**base, "seed": 1, "max-eval-samples": 0}))) == 788  # the whole dev part


# ----------------------------------------------------------------------------- partitioning
def _skew(parts: tuple[tuple[int, ...], ...], train: list[Example]) -> float:
    """Size-weighted mean total-variation distance of each shard's label mix from the pool's."""
    pool = Counter(train[i].group for p in parts for i in p)
    n = sum(pool.values())
    total = 0.0
    for p in parts:
        c = Counter(train[i].group for i in p)
        tv = 0.5 * sum(abs(c[g] / len(p) - pool[g] / n) for g in pool)
        total += tv * len(p) / n
    return total


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_partitions_are_disjoint_and_cover_the_capped_pool(partitioner):
    parts = _partition("fin-sentiment", 5, partitioner, 0.5, 42, 600)
    flat = [i for p in parts for i in p]
    assert len(parts) == 5 and all(len(p) >= 1 for p in parts)
    assert len(flat) == len(set(flat)) == 600  # disjoint, and every capped example is somewhere
    assert all(0 <= i < 9543 for i in flat)
    if partitioner == "iid":
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_partitions_are_deterministic_for_a_seed(partitioner):
    a = _partition("fin-sentiment", 4, partitioner, 0.3, 7, 400)
    b = _partition("fin-sentiment", 4, partitioner, 0.3, 7, 400)
    c = _partition("fin-sentiment", 4, partitioner, 0.3, 8, 400)
    assert a == b
    assert a != c


def test_dirichlet_alpha_0_1_is_far_more_label_skewed_than_iid():
    train = load_task("fin-sentiment", 42).train
    iid = _skew(_partition("fin-sentiment", 6, "iid", 0.1, 42, 1200), train)
    dirichlet = _skew(_partition("fin-sentiment", 6, "dirichlet", 0.1, 42, 1200), train)
    assert iid < 0.08
    assert dirichlet > 0.25
    assert dirichlet > 3 * iid


def test_client_examples_follow_the_partition():
    cfg = resolve({"task": "fin-sentiment", "partitioner": "iid", "dirichlet-alpha": 0.5, "seed": 42,
                   "max-train-samples": 90})
    train = load_task("fin-sentiment", 42).train
    shards = [client_examples(cfg, i, 3) for i in range(3)]
    parts = partition_indices("fin-sentiment", 3, "iid", 0.5, 42, 90)
    for shard, idx in zip(shards, parts):
        assert [e.prompt for e in shard] == [train[i].prompt for i in idx]


def test_more_partitions_than_examples_is_a_config_error():
    with pytest.raises(ConfigError, match="num-clients"):
        _partition("fin-sentiment", 10, "iid", 0.5, 42, 5)


# ----------------------------------------------------------------------------- tokenization
@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny-random-llama")


def _answer_ids(tok, answer: str) -> list[int]:
    return tok(answer + tok.eos_token, add_special_tokens=False).input_ids


def test_encode_masks_the_prompt_and_puts_the_answer_tokens_last(tok):
    ex = load_task("fin-sentiment", 42).train[0]
    enc = encode_example(tok, ex, 256)
    ans = _answer_ids(tok, ex.answer)
    k = len(ans)
    assert len(enc.input_ids) == len(enc.labels)
    assert enc.input_ids[-k:] == ans and enc.labels[-k:] == ans
    assert enc.labels[:-k] == [-100] * (len(enc.labels) - k)
    assert tok.decode(enc.input_ids[-k:]).startswith("negative")
    assert ex.prompt.splitlines()[-1] in tok.decode(enc.input_ids[:-k])


@pytest.mark.parametrize("max_len", [24, 48, 96])
def test_truncation_never_cuts_the_answer(tok, max_len):
    ex = load_task("fin-sentiment", 42).train[126]
    long = Example(prompt=ex.prompt + " more words" * 400, answer=ex.answer, label=ex.label, group=ex.group)
    full_prompt = encode_example(tok, long, 100_000).input_ids[: -len(_answer_ids(tok, long.answer))]
    enc = encode_example(tok, long, max_len)
    ans = _answer_ids(tok, long.answer)
    assert len(full_prompt) > max_len  # the case really truncates
    assert len(enc.input_ids) <= max_len
    assert enc.input_ids[-len(ans):] == ans and enc.labels[-len(ans):] == ans
    assert sum(1 for y in enc.labels if y != -100) == len(ans)
    prompt = enc.input_ids[: -len(ans)]
    # Head and tail of the prompt survive (template header; question and assistant turn header).
    tail = min(16, len(prompt) // 2)
    assert prompt[-tail:] == full_prompt[-tail:]
    assert prompt[:2] == full_prompt[:2]


def test_truncated_medical_prompts_keep_question_instruction_and_answer(tok):
    for ex in load_task("medical-qa", 42).eval[:40]:
        enc = encode_example(tok, ex, 96)
        ans = _answer_ids(tok, ex.answer)
        assert len(enc.input_ids) <= 96
        assert enc.input_ids[-len(ans):] == ans
        assert MED_INSTRUCTION in tok.decode(enc.input_ids[: -len(ans)])


def test_collate_pads_with_ignored_labels(tok):
    exs = load_task("fin-sentiment", 42).train[:3]
    encs = [encode_example(tok, e, 64) for e in exs]
    batch = collate(encs, tok.pad_token_id)
    width = max(len(e.input_ids) for e in encs)
    assert batch["input_ids"].shape == batch["labels"].shape == (3, width)
    for i, e in enumerate(encs):
        n = len(e.input_ids)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
        assert batch["labels"][i, n:].eq(-100).all()
        assert batch["labels"][i, :n].tolist() == e.labels


# ----------------------------------------------------------------------------- user files
def test_user_csv_with_text_and_label_is_a_classification_task(tmp_path):
    path = tmp_path / "mine.csv"
    pd.DataFrame({"text": [f"row {i}" for i in range(40)], "label": ["spam", "ham"] * 20}).to_csv(path, index=False)
    t = load_task(str(path), 42)
    assert t.kind == "classification" and t.label_words == ["ham", "spam"]
    assert len(t.eval) == 4 and len(t.train) == 36  # 10 % held out
    rows = {f"row {i}": ["spam", "ham"][i % 2] for i in range(40)}
    for ex in t.train + t.eval:
        text = ex.prompt.split("\n\n", 1)[1]
        assert ex.answer == rows[text] and t.label_words[ex.label] == ex.answer
    assert {ex.prompt for ex in t.train}.isdisjoint({ex.prompt for ex in t.eval})


def test_user_train_file_pairs_with_its_valid_file(tmp_path):
    pd.DataFrame({"text": ["a", "b", "c"], "label": [0, 1, 0]}).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame({"text": ["d", "e"], "label": [1, 2]}).to_csv(tmp_path / "valid.csv", index=False)
    t = load_task(str(tmp_path / "train.csv"), 42)
    assert len(t.train) == 3 and len(t.eval) == 2
    assert t.label_words == ["0", "1", "2"]  # from both files
    assert [e.answer for e in t.eval] == ["1", "2"]


def test_user_jsonl_with_instruction_and_response_is_a_generation_task(tmp_path):
    path = tmp_path / "chat.jsonl"
    rows = [{"instruction": f"Say {i}", "response": f"{i}!", "context": "" if i % 2 else "ctx"} for i in range(20)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    t = load_task(str(path), 42)
    assert t.kind == "generation" and t.label_words == []
    assert len(t.train) + len(t.eval) == 20 and len(t.eval) == 2
    for ex in t.train + t.eval:
        i = int(ex.prompt.split()[1])
        assert ex.answer == f"{i}!"
        assert ("Context: ctx" in ex.prompt) == (i % 2 == 0)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_user_file_without_the_needed_columns_is_a_config_error(tmp_path, suffix):
    path = tmp_path / f"bad{suffix}"
    df = pd.DataFrame({"a": [1, 2, 3], "b": [4, 5, 6]})
    df.to_csv(path, index=False) if suffix == ".csv" else df.to_json(path, orient="records", lines=True)
    with pytest.raises(ConfigError, match=r"task: .*needs columns text\+label or instruction\+response.*a, b"):
        load_task(str(path), 42)


def test_check_task_rejects_unknown_names_and_missing_files(tmp_path):
    with pytest.raises(ConfigError, match="task: unknown task 'fin-sentimnt'"):
        check_task("fin-sentimnt")
    with pytest.raises(ConfigError, match="task: data file not found"):
        check_task(str(tmp_path / "missing.csv"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="task: .* must be a task card \(.toml\) or one of"):
        check_task(str(tmp_path / "notes.txt"))
    check_task("fin-sentiment")
    check_task("org/some-dataset")  # a hub id passes the cheap check


def test_supernode_local_file_accepts_label_words_or_indices_and_rejects_others(tmp_path):
    task = load_task("fin-sentiment", 42)
    good = tmp_path / "mine.csv"
    pd.DataFrame({"text": ["up", "down", "flat"], "label": ["positive", 0, "2"]}).to_csv(good, index=False)
    exs = load_local_file(str(good), task)
    assert [e.answer for e in exs] == ["positive", "negative", "neutral"]
    bad_cols = tmp_path / "ab.csv"
    pd.DataFrame({"a": [1], "b": [2]}).to_csv(bad_cols, index=False)
    with pytest.raises(ConfigError, match="data-path: .*text\\+label"):
        load_local_file(str(bad_cols), task)
    bad_label = tmp_path / "lab.csv"
    pd.DataFrame({"text": ["x"], "label": ["bullish"]}).to_csv(bad_label, index=False)
    with pytest.raises(ConfigError, match="data-path: label 'bullish'"):
        load_local_file(str(bad_label), task)
