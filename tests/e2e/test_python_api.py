"""The Python API (docs/python-api.md): `fl_dplora.simulate`, `load_run` and a `Run`, and the
Opacus-style `fl_dplora.privacy.epsilon` / `noise_multiplier`; the page's example runs as written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fl_dplora.config import ConfigError
from harness import REPO

DOC = REPO / "docs" / "python-api.md"


def _doc_example() -> str:
    blocks = re.findall(r"^```python\n(.*?)^```", DOC.read_text(), re.S | re.M)
    assert len(blocks) == 1, "docs/python-api.md: one python example"
    return blocks[0]


def test_import_fl_dplora_is_light():
    code = ("import sys, fl_dplora; from fl_dplora import simulate, load_run, Run; import fl_dplora.privacy; "
            "print(sorted(m for m in ('torch', 'flwr', 'transformers', 'opacus', 'peft', 'ray') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_unknown_attribute_is_an_attribute_error():
    import fl_dplora

    with pytest.raises(AttributeError):
        fl_dplora.simulat  # noqa: B018


# ----------------------------------------------------------------------------- privacy helpers
def test_epsilon_is_opacus_for_one_schedule():
    from opacus.accountants import RDPAccountant

    from fl_dplora.privacy import epsilon
    from fl_dplora.privacy.accounting import epsilon_for

    acc = RDPAccountant()
    acc.history = [(1.1, 0.02, 500)]
    assert epsilon(noise_multiplier=1.1, sample_rate=0.02, steps=500, delta=1e-5, accountant="rdp") == \
        pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    prv = epsilon(noise_multiplier=1.1, sample_rate=0.02, steps=500, delta=1e-5)
    assert prv == epsilon_for(1.1, 0.02, 500, 1e-5, "prv") and prv < acc.get_epsilon(1e-5)


def test_noise_multiplier_is_the_smallest_sigma_within_the_target():
    from fl_dplora.privacy import epsilon, noise_multiplier

    sigma = noise_multiplier(target_epsilon=4.0, sample_rate=0.05, steps=200, delta=1e-5)
    spent = epsilon(noise_multiplier=sigma, sample_rate=0.05, steps=200, delta=1e-5)
    assert 0.97 * 4.0 <= spent <= 4.0
    assert epsilon(noise_multiplier=0.97 * sigma, sample_rate=0.05, steps=200, delta=1e-5) > 4.0
    # more steps at the same target need more noise
    assert noise_multiplier(target_epsilon=4.0, sample_rate=0.05, steps=800, delta=1e-5) > sigma


@pytest.mark.parametrize("kwargs, word", [
    ({"sample_rate": 0.0}, "sample rate"), ({"delta": 1.5}, "delta"), ({"steps": 0}, "steps"),
    ({"accountant": "gdp"}, "accountant"),
])
def test_privacy_helpers_refuse_bad_input_in_one_line(kwargs, word):
    from fl_dplora.privacy import epsilon, noise_multiplier

    args = {"sample_rate": 0.01, "steps": 100, "delta": 1e-5, **kwargs}
    for call in (lambda: epsilon(noise_multiplier=1.0, **args), lambda: noise_multiplier(target_epsilon=8.0, **args)):
        with pytest.raises(ValueError, match=word) as info:
            call()
        assert "\n" not in str(info.value)


def test_privacy_helpers_take_keywords_only():
    from fl_dplora.privacy import epsilon

    with pytest.raises(TypeError):
        epsilon(1.0, 0.01, 100, 1e-5)  # which is sigma, which q? as Opacus, names are required


# ----------------------------------------------------------------------------- simulate / load_run
def test_simulate_refuses_a_typo_before_anything_runs(tmp_path):
    from fl_dplora import simulate

    with pytest.raises(ConfigError, match=r"lora-rnak: unknown run-config key \(did you mean 'lora-rank'\?\)"):
        simulate({"model": "tiny-random-llama", "lora-rnak": 4}, num_clients=2, output_dir=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_simulate_takes_a_toml_file_like_run_config(tmp_path):
    """The same parser as --run-config FILE.toml: a bad value in the file is named with the file."""
    from fl_dplora import simulate

    f = tmp_path / "job.toml"
    f.write_text('model = "tiny-random-llama"\nlora-rank = 0\n')
    with pytest.raises(ConfigError, match=r"lora-rank: must be >= 1, got 0 \[in run-config .*job.toml\]"):
        simulate(f, num_clients=2, output_dir=tmp_path / "x")


def test_load_run_refuses_a_folder_without_a_finished_run(tmp_path):
    from fl_dplora import load_run

    with pytest.raises(ConfigError, match="has no summary.json"):
        load_run(tmp_path)


@pytest.fixture(scope="module")
def doc_run(tmp_path_factory) -> tuple[Path, str]:
    """The page's example, run as a user would paste it (a fresh interpreter, its own folder)."""
    cwd = tmp_path_factory.mktemp("api_doc")
    r = subprocess.run([sys.executable, "-c", _doc_example()], cwd=cwd, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return cwd / "runs" / "api-demo", r.stdout


@pytest.mark.slow
def test_the_documented_example_runs(doc_run):
    out, stdout = doc_run
    assert (out / "summary.json").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    assert re.search(r"^Run\('.*api-demo': 1 rounds, dp-mode sample, epsilon \d", stdout, re.M), stdout


@pytest.mark.slow
def test_a_run_is_what_its_folder_holds(doc_run):
    from fl_dplora import load_run

    out, _ = doc_run
    run = load_run(out)
    summary = json.loads((out / "summary.json").read_text())
    assert run.config == summary["config"] and run.config["model"] == "tiny-random-llama"
    assert run.privacy == summary["privacy"] and run.privacy["mode"] == "sample"
    assert 0 < run.privacy["epsilon"] <= 8.0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert run.metrics == rows and [r["round"] for r in rows] == [1]
    assert run.adapter_dir == out / "adapter"


@pytest.mark.slow
def test_run_predict_and_evaluate_are_the_cli_s(doc_run, capsys):
    from fl_dplora import load_run
    from fl_dplora.cli import main

    out, _ = doc_run
    run = load_run(out)
    text = "Stocks rally after strong earnings"
    one = run.predict(text)
    assert main(["predict", "--run", str(out), text]) == 0
    cli_row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert one["answer"] == cli_row["answer"] and one["probabilities"] == pytest.approx(cli_row["probabilities"])
    assert [r["answer"] for r in run.predict([text, text])] == [one["answer"]] * 2
    # the run's own final evaluation, recomputed from the saved adapter
    scored = run.evaluate()["final_eval"]
    assert scored["accuracy"] == run.final_eval["accuracy"] and scored["loss"] == pytest.approx(run.final_eval["loss"], rel=1e-4)
    assert main(["evaluate", "--run", str(out), "--output", str(out.parent / "eval.json")]) == 0
    assert json.loads((out.parent / "eval.json").read_text())["final_eval"]["accuracy"] == scored["accuracy"]
