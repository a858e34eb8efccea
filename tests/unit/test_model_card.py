"""The model card `fl-dplora export` writes: Hub metadata `license:` and `datasets:` in its front
matter (valid YAML), and no local absolute path anywhere in it (issue 28)."""

from __future__ import annotations

import pytest
import yaml

from fl_dplora.adapter_io import HUB_DATASETS, model_card
from fl_dplora.config import resolve

SUMMARY = {"rounds": 2, "final_eval": {"accuracy": 0.5, "loss": 1.0},
           "privacy": {"mode": "sample", "epsilon": 7.9, "delta": 1e-5, "unit": "example", "accountant": "prv"}}


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("\n---\n", 1)[0].removeprefix("---\n"))


@pytest.mark.parametrize("task", sorted(HUB_DATASETS))
def test_built_in_tasks_name_their_hub_dataset_and_a_licence(task):
    card = model_card(SUMMARY, resolve({"task": task}), merged=False, has_head=False)
    meta = _front_matter(card)
    assert meta["license"] == "apache-2.0"  # SmolLM2-135M-Instruct's
    assert meta["datasets"] == [HUB_DATASETS[task]]
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["library_name"] == "peft"
    assert "not known to fl-dplora" not in card  # the data's licence is in the table too


def test_a_hub_model_and_hub_dataset():
    meta = _front_matter(model_card(SUMMARY, resolve({"model": "some-org/some-llm", "task": "some-org/reviews"}),
                                    merged=True, has_head=False))
    assert meta == {"base_model": "some-org/some-llm", "license": "other", "datasets": ["some-org/reviews"],
                    "library_name": "transformers", "tags": ["fl-dplora", "federated-learning",
                                                             "differential-privacy", "lora"]}


@pytest.mark.parametrize("head", [False, True])
def test_local_model_and_data_leave_no_path_in_the_card(tmp_path, head):
    model = tmp_path / "models" / "my-llm"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    data = tmp_path / "data" / "train.csv"
    data.parent.mkdir()
    data.write_text("text,label\nup,positive\n")
    cfg = resolve({"model": str(model), "task": str(data)})
    card = model_card(SUMMARY, cfg, merged=False, has_head=head)
    assert str(tmp_path) not in card and "/data/" not in card and "/models/" not in card, card
    meta = _front_matter(card)
    assert meta["license"] == "other" and "datasets" not in meta and "base_model" not in meta
    assert "| base model | my-llm (a local folder) |" in card and "| task | train.csv (a local file) |" in card
    if head:  # the command the card gives names placeholders, not this machine's paths
        assert '--run-config "model=MODEL_PATH task=TASK_PATH"' in card


def test_the_tiny_test_model_is_fl_dplora_s_own():
    meta = _front_matter(model_card(SUMMARY, resolve({"model": "tiny-random-llama", "task": "fin-sentiment"}),
                                    merged=False, has_head=False))
    assert meta["license"] == "apache-2.0" and meta["datasets"] == ["zeroshot/twitter-financial-news-sentiment"]
    assert "base_model" not in meta  # no hub id holds a model built in code
