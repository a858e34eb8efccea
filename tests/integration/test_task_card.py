"""Task cards: built-in tasks through their cards, user cards, node-side cards, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest
from harness import REPO, InProcessGrid, run_in_process

from fl_dplora import protocol
from fl_dplora.config import ConfigError
from fl_dplora.data import DATA_DIR, load_local_file, load_task, task_for_node
from fl_dplora.task_card import TaskCard, card_from_mapping, load_card
from fl_dplora.write_ahead import read_operator


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("hospitals")
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_hospital_demo.py"), str(out), "--rows", "40"],
                   check=True, capture_output=True)
    return out


def test_builtin_tasks_are_their_cards():
    fin = load_task("fin-sentiment")
    rows = pd.read_csv(DATA_DIR / "tfns" / "sent_train.csv")
    assert fin.card.name == "fin-sentiment" and fin.card.loader == "tfns"
    assert load_task("fin-sentiment-v1").card.train_file.endswith("sent_train.csv")
    for i in (0, 17, 9000):  # the card's template and index labels give the prompts the runs trained on
        assert fin.train[i].prompt == f"{fin.instruction}\n\n{rows.text[i]}"
        assert fin.train[i].answer == fin.label_words[int(rows.label[i])]
    med = load_task("medical-qa")
    assert med.train[0].prompt.startswith("Context: ") and med.train[0].prompt.endswith(f"\n\n{med.instruction}")
    assert "\n\nQuestion: " in med.train[0].prompt
    gen = load_task("general-instruct")
    assert gen.kind == "generation" and gen.card.loader == "dolly" and not gen.label_words


def test_a_user_card_names_columns_labels_prompt_and_files(demo):
    task = load_task(str(demo / "server" / "task.toml"))
    assert task.name == "pathology-notes" and task.label_words == ["benign", "malignant"]
    test = pd.read_csv(demo / "server" / "test.csv")
    assert len(task.eval) == len(test) and task.train == []
    for ex, (_, row) in zip(task.eval, test.iterrows()):
        assert ex.prompt == f"{task.instruction}\n\n{row.note}"
        assert ex.answer == ("malignant" if row.finding == 1 else "benign")


@pytest.mark.parametrize("raw, message", [
    ({"name": "x", "label-words": ["a", "b"], "colour": "red"}, "unknown key 'colour'"),
    ({"name": "x", "kind": "regression"}, "kind must be classification or generation"),
    ({"name": "x", "label-words": ["a"]}, "label-words must be two or more distinct"),
    ({"name": "x", "label-words": ["a", "b"], "labels": {"0": "c"}}, "labels maps to 'c'"),
    ({"name": "x", "label-words": ["a", "b"], "prompt-template": "{text"}, "prompt-template:"),
    ({"name": "x", "label-words": ["a", "b"], "train-file": "/no/such.csv"}, "train-file not found"),
    ({"name": "x", "label-words": ["a", "b"], "loader": "s3"}, "loader must be one of"),
])
def test_card_problems_are_one_line(raw, message):
    with pytest.raises(ConfigError) as info:
        card_from_mapping(raw, "card.toml")
    assert message in str(info.value) and "\n" not in str(info.value) and str(info.value).startswith("task card card.toml:")


def test_card_files_that_do_not_parse_are_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(ConfigError, match=r"^task card .*bad.toml: not valid TOML"):
        load_card(bad)
    with pytest.raises(ConfigError, match="^task: task card not found"):
        load_task(str(tmp_path / "missing.toml"))


def test_a_node_reads_its_own_file_with_the_runs_card_and_its_own_columns(demo, tmp_path):
    run = task_for_node(load_task(str(demo / "server" / "task.toml")).card.to_wire(), 42)
    assert run.train == [] and run.eval == [] and "test.csv" not in run.card.to_wire()  # no server paths travel
    own = demo / "hospital-a" / "task.toml"
    examples = load_local_file(str(demo / "hospital-a" / "train.csv"), run, own_card=str(own))
    rows = pd.read_csv(demo / "hospital-a" / "train.csv")
    assert [e.label for e in examples] == rows.finding.tolist()
    assert examples[0].prompt == f"{run.instruction}\n\n{rows.note[0]}"
    # a node file whose columns differ is read through that node's card
    other = tmp_path / "other.csv"
    rows.rename(columns={"note": "report", "finding": "y"}).assign(y=rows.finding.map({0: "B", 1: "M"})).to_csv(other, index=False)
    card = tmp_path / "other.toml"
    card.write_text('label-words = ["benign", "malignant"]\nlabels = { B = "benign", M = "malignant" }\n'
                    'text-column = "report"\nlabel-column = "y"\n')
    assert [e.label for e in load_local_file(str(other), run, own_card=str(card))] == rows.finding.tolist()
    # an unknown label, a missing column, or other label words: one line naming the file, nothing read
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"note": ["x", "y"], "finding": [0, 7]}).to_csv(bad, index=False)
    with pytest.raises(ConfigError, match=r"^data-path: label '7' in .*bad.csv is not one of \['benign', 'malignant'\]"):
        load_local_file(str(bad), run, own_card=str(own))
    with pytest.raises(ConfigError, match="needs columns note\\+finding; it has finding, text"):
        pd.DataFrame({"text": ["x"], "finding": [0]}).to_csv(bad, index=False)
        load_local_file(str(bad), run, own_card=str(own))
    words = tmp_path / "words.toml"
    words.write_text('label-words = ["yes", "no"]\n')
    with pytest.raises(ConfigError, match=r"node-config task-card: its label words \['yes', 'no'\] are not the run's"):
        load_local_file(str(demo / "hospital-a" / "train.csv"), run, own_card=str(words))


def test_wire_form_round_trips():
    card = load_task("fin-sentiment").card
    back = TaskCard.from_wire(card.to_wire())
    assert back.label_words == card.label_words and back.instruction == card.instruction
    assert back.train_file == "" and back.prompt_template == card.prompt_template


@pytest.mark.slow
def test_nodes_train_on_their_own_files_without_the_servers_task_file(demo, tmp_path):
    """Three hospitals in process: each has only its own CSV (labels 0/1) and card; the run's task
    path is made unreadable on the nodes' side, so they can only use the card the server sent.
    Hospital c's file has an unknown label: it refuses before training, the others train."""
    bad = tmp_path / "c-train.csv"
    pd.read_csv(demo / "hospital-c" / "train.csv").assign(finding=lambda d: d.finding.replace({1: 2})).to_csv(bad, index=False)
    nodes = [{"data-path": str(demo / "hospital-a" / "train.csv"), "task-card": str(demo / "hospital-a" / "task.toml")},
             {"data-path": str(demo / "hospital-b" / "train.csv"), "task-card": str(demo / "hospital-b" / "task.toml")},
             {"data-path": str(bad), "task-card": str(demo / "hospital-c" / "task.toml")}]
    sent_words = []

    def elsewhere(node_id, msg):  # the node's machine has no copy of the server's card or files
        config = msg.content["config"]
        sent_words.append(TaskCard.from_wire(str(config[protocol.TASK_CARD])).label_words)
        config["task"] = "/server/only/task.toml"
        return msg

    grid = InProcessGrid(3, node_configs=nodes, before=elsewhere)
    summary, out = run_in_process(3, output_dir=tmp_path / "run", grid=grid, task=str(demo / "server" / "task.toml"),
                                  **{"loss": "label-words", "label-head": True, "head-rounds": 1, "dp-mode": "sample",
                                     "max-eval-samples": 0})
    assert set(sent_words) == {("benign", "malignant")}
    rows = read_operator(out)[0]
    assert [r["accepted"] for r in rows] == [2] * summary["rounds"]
    assert all(len(r["dropped"]) == 1 and "label '2' in" in r["dropped"][0] for r in rows)
    assert summary["final_eval"]["num_examples"] == len(pd.read_csv(demo / "server" / "test.csv"))
