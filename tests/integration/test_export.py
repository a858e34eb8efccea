"""`fl-dplora export` carries what was learned: an all-zero LoRA B (the init) is refused unless
--allow-untrained, the adapter names a base that loads, and AutoPeftModelForCausalLM loads it alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from harness import run_in_process
from safetensors.torch import load_file, save_file

from fl_dplora import label_head
from fl_dplora.adapter_io import SMOLLM2_HUB_ID, lora_untrained
from fl_dplora.cli import main
from fl_dplora.config import ConfigError

KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"


def _fake_run(root: Path, *, trained: bool, **cfg) -> Path:
    """A run folder as the server writes it (summary.json + adapter/), without training anything."""
    from peft import LoraConfig

    run = root / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"rounds": 1, "config": {"task": "fin-sentiment", **cfg}}))
    LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM").save_pretrained(str(run / "adapter"))
    b = torch.zeros(8, 2)
    if trained:
        b[3, 1] = 1e-6  # one value off zero is enough: something was learned
    save_file({KEY.format("A"): torch.randn(2, 8), KEY.format("B"): b},
              str(run / "adapter" / "adapter_model.safetensors"))
    return run


def _export(capsys, *args) -> tuple[int, str]:
    code = main(["export", *map(str, args)])
    return code, capsys.readouterr().err


def _after_front_matter(card: str) -> list[str]:
    assert card.startswith("---\n")
    return card.split("\n---\n", 1)[1].splitlines()


def test_an_untrained_adapter_is_refused_in_one_line_unless_allowed(tmp_path, capsys):
    run = _fake_run(tmp_path, trained=False, model="tiny-random-llama")
    out = tmp_path / "out"
    code, err = _export(capsys, run, "--output", out)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("fl-dplora: error: export: every LoRA B matrix") and "--allow-untrained" in err
    assert not out.exists()  # nothing written
    code, err = _export(capsys, "--run", run, "--output", out, "--allow-untrained")
    assert code == 0, err
    assert (out / "adapter_model.safetensors").is_file()
    first = _after_front_matter((out / "README.md").read_text())[0]
    assert first.startswith("**Untrained LoRA update**") and "merged model equals the base model" in first


def test_untrained_means_every_lora_B_is_zero(tmp_path):
    assert not lora_untrained(_fake_run(tmp_path / "a", trained=True, model="tiny-random-llama") / "adapter")
    folder = _fake_run(tmp_path / "b", trained=False, model="tiny-random-llama") / "adapter"
    assert lora_untrained(folder)  # A is random (its init, FFA's frozen A too): only B says what was learned
    (folder / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match="not a readable safetensors file"):
        lora_untrained(folder)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(ConfigError, match="has no adapter_model.safetensors"):
        lora_untrained(folder)


def _bundled_gguf() -> str:
    from fl_dplora.model_loading import smollm2_gguf_path

    return str(smollm2_gguf_path())


@pytest.mark.parametrize("model, revision, want, want_revision", [
    ("smollm2-135m", "", SMOLLM2_HUB_ID, None),
    (_bundled_gguf, "", SMOLLM2_HUB_ID, None),
    ("local", "", "local", None),
    ("some-org/some-model", "v1.0", "some-org/some-model", "v1.0"),
    ("tiny-random-llama", "", "fl-dplora:tiny-random-llama", None),
])
def test_the_exported_adapter_names_a_loadable_base(tmp_path, capsys, model, revision, want, want_revision):
    if model == "local":  # a local model folder: named by its absolute path
        (tmp_path / "base").mkdir()
        (tmp_path / "base" / "config.json").write_text("{}")
        model = want = str(tmp_path / "base")
    model = model() if callable(model) else model
    run = _fake_run(tmp_path, trained=True, model=model, revision=revision)
    code, err = _export(capsys, run, "--output", tmp_path / "out")
    assert code == 0, err
    conf = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == want and conf["revision"] == want_revision
    card = (tmp_path / "out" / "README.md").read_text()
    if model == "tiny-random-llama":  # built in code: nothing to load, and the card says so
        assert "`AutoPeftModelForCausalLM` cannot load it by itself" in card and "base_model:" not in card
    elif want.startswith("/"):  # a local folder: adapter_config.json names it, the card only by its name
        assert ("A PEFT LoRA adapter on base (a local folder): `AutoPeftModelForCausalLM.from_pretrained(this_folder)` "
                "loads base and adapter where that folder is") in card and want not in card
    else:
        assert f"A PEFT LoRA adapter on `{want}`: `AutoPeftModelForCausalLM.from_pretrained(this_folder)`" in card
    assert ("base_model: " + want in card) == ("/" in want and not want.startswith("/"))  # hub ids only


@pytest.mark.slow
def test_a_head_only_run_is_untrained_and_its_card_leads_with_the_head(tmp_path, capsys):
    """The fin-sentiment recipe's shape: every round trains only the label head, LoRA stays at its init."""
    _, run = run_in_process(2, output_dir=tmp_path / "run", **{
        "label-head": True, "num-server-rounds": 1, "head-rounds": 1, "loss": "label-words", "head-local-steps": 2})
    capsys.readouterr()  # the run's own log (a handler an earlier main() left may write there too)
    weights = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert all(not t.any() for k, t in weights.items() if "lora_B" in k)
    saved = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "fl-dplora:tiny-random-llama"  # named at save time already
    out = tmp_path / "out"
    code, err = _export(capsys, run, "--output", out, "--merge")
    assert code == 2 and err.count("\n") == 1 and "trained only its label head" in err and not out.exists()
    code, err = _export(capsys, run, "--output", out, "--allow-untrained")
    assert code == 0, err
    first, _, second = _after_front_matter((out / "README.md").read_text())[:3]
    assert first.startswith("**The label head is a separate file, `label_head.safetensors`**")
    assert "fl-dplora predict --adapter THIS_FOLDER" in first and second.startswith("**Untrained LoRA update**")
    assert (out / label_head.FILE).is_file()
    # the card's command works on the exported folder
    code = main(["predict", "--adapter", str(out), "--run-config", "model=tiny-random-llama task=fin-sentiment",
                 "Shares jump 8%"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out.splitlines()[-1])["answer"] in ("negative", "neutral", "positive")


@pytest.mark.slow
def test_auto_peft_loads_an_export_on_a_local_base_alone(tmp_path, capsys, monkeypatch):
    from peft import AutoPeftModelForCausalLM

    from fl_dplora.model_loading import load_base_model, load_tokenizer

    base = tmp_path / "tiny-llama"  # a tiny random LLaMA as a local transformers folder, with a tokenizer
    load_base_model("tiny-random-llama", seed=3).save_pretrained(str(base))
    load_tokenizer("tiny-random-llama").save_pretrained(str(base))
    monkeypatch.chdir(tmp_path)  # the run names its model by a relative path
    _, run = run_in_process(2, output_dir=tmp_path / "run", model="./tiny-llama", lora_variant="ffa")
    capsys.readouterr()
    saved = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(base)  # absolute: loads from any folder
    code, err = _export(capsys, run, "--output", tmp_path / "out")
    assert code == 0, err
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    model = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    want = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    got = {k.replace(".default", ""): p for k, p in model.named_parameters() if "lora_" in k}
    assert set(got) == set(want) and any(k for k in want if "lora_B" in k)
    assert any(want[k].any() for k in want if "lora_B" in k)  # FFA trained B; A stays its init
    for k, t in want.items():
        assert torch.equal(got[k].detach(), t), k
