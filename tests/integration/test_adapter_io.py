"""The adapter after training: evaluate --run, --eval-file, predict, export (adapter / merged), config."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from harness import run_in_process

from fl_dplora import label_head
from fl_dplora.cli import main
from fl_dplora.config import SCHEMA


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny DP run (example-level, eps 8) with the LoRA adapter and the label head trained in round 2."""
    out = tmp_path_factory.mktemp("adapter_io") / "run"
    summary, out = run_in_process(2, output_dir=out, **{
        "label-head": True, "head-rounds": 1, "loss": "label-words", "dp-mode": "sample", "target-epsilon": 8.0,
        "head-local-steps": 2})
    assert (out / "adapter" / label_head.FILE).is_file()
    return summary, out


def _run_main(args, capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_evaluate_run_reproduces_the_final_eval_with_no_other_flag(finished_run, tmp_path, capsys):
    summary, out = finished_run
    code, _, err = _run_main(["evaluate", "--run", str(out), "--output", str(tmp_path / "e.json")], capsys)
    assert code == 0, err
    got = json.loads((tmp_path / "e.json").read_text())["final_eval"]
    want = summary["final_eval"]
    assert got["num_examples"] == want["num_examples"] == 16
    assert got["accuracy"] == want["accuracy"] and got["macro_f1"] == want["macro_f1"]
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    # overriding a key of the run's config changes what is scored (here: how many examples)
    code, _, err = _run_main(["evaluate", "--run", str(out), "--run-config", "max-eval-samples=8",
                              "--output", str(tmp_path / "e8.json")], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "e8.json").read_text())["final_eval"]["num_examples"] == 8


def test_eval_file_is_scored_whole_with_the_task_label_words(finished_run, tmp_path, capsys):
    _, out = finished_run
    rows = pd.read_csv(__import__("fl_dplora.data", fromlist=["DATA_DIR"]).DATA_DIR / "tfns" / "sent_valid.csv").head(100)
    path = tmp_path / "test.csv"
    rows[["text", "label"]].to_csv(path, index=False)  # TFNS' own 0/1/2 labels: indices into the label words
    code, _, err = _run_main(["evaluate", "--run", str(out), "--eval-file", str(path), "--output",
                              str(tmp_path / "f.json")], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "f.json").read_text())["final_eval"]
    assert result["num_examples"] == 100  # not max-eval-samples (16), not a 10 % hold-out
    majority = rows["label"].value_counts().max() / 100
    assert result["majority_rate"] == pytest.approx(majority)
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"text": ["a", "b"], "label": ["benign", "neutral"]}).to_csv(bad, index=False)
    code, _, err = _run_main(["evaluate", "--run", str(out), "--eval-file", str(bad)], capsys)
    assert code == 2 and err.count("\n") == 1 and "--eval-file: label 'benign'" in err


def test_predict_answers_as_the_evaluation_scores(finished_run, capsys):
    from fl_dplora import adapter_io
    from fl_dplora.data import eval_examples, load_task
    from fl_dplora.evaluate import evaluate
    from fl_dplora.model_loading import load_tokenizer

    summary, out = finished_run
    cfg = adapter_io.run_config(out)
    task = load_task(cfg.data.task, cfg.train.seed)
    examples = eval_examples(cfg)[:4]
    texts = [e.prompt.split("\n\n", 1)[1] for e in examples]
    code, stdout, err = _run_main(["predict", "--run", str(out), *texts], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert [r["text"] for r in rows] == texts
    model = adapter_io.load_adapted_model(cfg, out / "adapter", task)
    scored = evaluate(model, load_tokenizer(cfg.model.name), task, examples, cfg.data.max_seq_len,
                      system_prompt=cfg.data.system_prompt, with_predictions=True)
    assert [r["answer"] for r in rows] == [task.label_words[p] for p in scored["predictions"]]
    for r, probs in zip(rows, scored["probabilities"]):
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert list(r["probabilities"].values()) == pytest.approx(probs, abs=1e-6)
    code, _, err = _run_main(["predict", "--run", str(out / "adapter")], capsys)  # the adapter folder, not the run
    assert code == 2 and "has no summary.json" in err


def test_export_adapter_with_a_model_card_that_states_the_privacy(finished_run, tmp_path, capsys):
    from peft import PeftModel

    from fl_dplora.model_loading import load_base_model

    summary, out = finished_run
    code, _, err = _run_main(["export", str(out), "--output", str(tmp_path / "adapter")], capsys)
    assert code == 0, err
    card = (tmp_path / "adapter" / "README.md").read_text()
    eps = summary["privacy"]["epsilon"]
    assert 0 < eps <= 8.0
    assert f"| epsilon | {eps:.4f} |" in card and "| dp-mode | sample |" in card
    assert f"| delta | {summary['config']['delta']} |" in card and "| training data licence | MIT" in card
    assert (tmp_path / "adapter" / label_head.FILE).is_file()
    model = PeftModel.from_pretrained(load_base_model(summary["config"]["model"], int(summary["config"]["seed"])),
                                      str(tmp_path / "adapter"))
    saved = PeftModel.from_pretrained(load_base_model(summary["config"]["model"], int(summary["config"]["seed"])),
                                      str(out / "adapter"))
    for (name, p), (_, q) in zip(model.named_parameters(), saved.named_parameters()):
        assert torch.equal(p, q), name
    # a non-empty output folder is refused and left as it was
    code, _, err = _run_main(["export", str(out), "--output", str(tmp_path / "adapter")], capsys)
    assert code == 2 and "not empty" in err
    assert (tmp_path / "adapter" / "README.md").read_text() == card


def test_merged_export_loads_with_transformers_alone_and_computes_base_plus_adapter(finished_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from fl_dplora import adapter_io
    from fl_dplora.data import collate, encode_example, eval_examples, load_task
    from fl_dplora.model_loading import load_tokenizer

    summary, out = finished_run
    code, _, err = _run_main(["export", str(out), "--output", str(tmp_path / "merged"), "--merge"], capsys)
    assert code == 0, err
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert "epsilon" in (tmp_path / "merged" / "README.md").read_text()
    cfg = adapter_io.run_config(out)
    tok = load_tokenizer(cfg.model.name)
    batch = collate([encode_example(tok, e, cfg.data.max_seq_len) for e in eval_examples(cfg)[:4]], tok.pad_token_id)
    adapted = adapter_io.load_adapted_model(cfg, out / "adapter", load_task(cfg.data.task))
    label_head.remove(adapted)  # the language model's own logits: the head is a separate file
    with torch.no_grad():
        want = adapted(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        base = adapted.get_base_model()
        with adapted.disable_adapter():
            plain = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (want - plain).abs().max() > 1e-4  # the adapter changed something, so the match below means something
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_config_lists_every_key_and_version(capsys):
    code, stdout, _ = _run_main(["config"], capsys)
    assert code == 0
    assert [line.split()[0] for line in stdout.splitlines()] == list(SCHEMA)
    code, stdout, _ = _run_main(["config", "--markdown"], capsys)
    assert code == 0 and stdout.count("\n| `") == len(SCHEMA)
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("fl-dplora ")


def test_save_every_keeps_a_snapshot_per_round_and_the_last_is_the_final_adapter(tmp_path, capsys):
    from safetensors.torch import load_file

    summary, out = run_in_process(2, output_dir=tmp_path / "run", **{"save-every": 1, "num-server-rounds": 2})
    snaps = sorted(p.name for p in (out / "adapters").iterdir())
    assert snaps == ["round-1", "round-2"]
    final = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    last = load_file(str(out / "adapters" / "round-2" / "adapter_model.safetensors"))
    first = load_file(str(out / "adapters" / "round-1" / "adapter_model.safetensors"))
    assert all(torch.equal(final[k], last[k]) for k in final)
    assert any(not torch.equal(final[k], first[k]) for k in final)  # round 1 is an earlier adapter
    code, _, err = _run_main(["evaluate", "--run", str(out), "--adapter", str(out / "adapters" / "round-1"),
                              "--output", str(tmp_path / "r1.json")], capsys)
    assert code == 0, err
    code, _, err = _run_main(["evaluate", "--run", str(out), "--adapter", str(out / "adapters" / "round-2"),
                              "--output", str(tmp_path / "r2.json")], capsys)
    assert code == 0, err
    r2 = json.loads((tmp_path / "r2.json").read_text())["final_eval"]
    assert r2["loss"] == pytest.approx(summary["final_eval"]["loss"], rel=1e-5)
