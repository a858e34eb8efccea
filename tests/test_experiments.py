"""`fl-dplora experiment`: specs, the per-run cache, results.json/results.md/plots."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fl_dplora import experiments as ex
from fl_dplora.config import ConfigError

REPO = Path(__file__).resolve().parent.parent

TINY_SPEC = """
name = "tiny"
description = "two ranks and the zero-shot base model"
num-clients = 2
table = ["id", "lora_rank", "accuracy", "bytes_up_per_client_round", "pct_full_model"]

[config]
model = "tiny-random-llama"
max-train-samples = 40
max-eval-samples = 8
batch-size = 4
micro-batch-size = 4
local-steps = 1
num-server-rounds = 2
max-seq-len = 48
dp-mode = "none"
secure-rng = false
checkpoint-every = 0

[[runs]]
id = "rank-{lora_rank}"
series = "LoRA"
matrix = { lora-rank = [2, 4] }

[[runs]]
id = "zero-shot"
kind = "zero-shot"

[[plots]]
file = "bytes_vs_rank.png"
x = "lora_rank"
y = "bytes_up_per_client_round"
categorical = false
reverse = false

[[plots]]
file = "rounds.png"
kind = "rounds"
"""


@pytest.fixture
def spec_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FL_DPLORA_EXPERIMENTS", str(tmp_path))
    (tmp_path / "tiny.toml").write_text(TINY_SPEC)
    return tmp_path


def test_committed_specs_are_valid():
    """Every spec under experiments/ parses and every run's config resolves (typos fail here)."""
    names = ex.available(REPO / "experiments")
    assert {"dp-recipe", "epsilon-sweep", "comm-vs-rank", "non-iid", "mode-compare"} <= set(names)
    for name in names:
        spec = ex.load_spec(name, REPO / "experiments")
        assert spec.runs and len({r.id for r in spec.runs}) == len(spec.runs)


def test_matrix_ids_and_hashes(spec_dir):
    spec = ex.load_spec("tiny")
    assert [r.id for r in spec.runs] == ["rank-2", "rank-4", "zero-shot"]
    assert spec.runs[0].config["lora-rank"] == 2 and spec.runs[1].config["lora-rank"] == 4
    assert len({r.hash for r in spec.runs}) == 3
    # the hash ignores where a run writes, not what it computes
    again = ex.load_spec("tiny").runs[0]
    again.config["output-dir"] = "/elsewhere"
    assert again.hash == spec.runs[0].hash


@pytest.mark.parametrize("text, needle", [
    ("name='x'\n[[runs]]\nid='a'\nconfig={lora-rank=0}\n", "run a: lora-rank"),
    ("name='x'\n[[runs]]\nid='a'\nconfig={learning-rat=0.1}\n", "learning-rate"),
    ("name='x'\n[[runs]]\nid='a'\n[[runs]]\nid='a'\n", "duplicate run id"),
    ("name='x'\nrunz=[]\n", "unknown top-level"),
    ("name='x'\n[[runs]]\nid='a-{rank}'\nmatrix={lora-rank=[1]}\n", "not a matrix key"),
    ("name = \n", "not valid TOML"),
])
def test_bad_specs_fail_with_one_line_naming_the_problem(spec_dir, text, needle):
    (spec_dir / "bad.toml").write_text(text)
    with pytest.raises(ConfigError, match=needle):
        ex.load_spec("bad")


def test_report_only_never_trains(spec_dir, cli):
    res = cli(["experiment", "tiny", "--report-only"], env={**os.environ, "FL_DPLORA_EXPERIMENTS": str(spec_dir)})
    assert res.returncode == 0 and res.stdout.count("not run yet") == 3 and "running" not in res.stdout
    assert not (spec_dir / "results" / "runs").exists()
    data = json.loads((spec_dir / "results" / "tiny" / "results.json").read_text())
    assert data["runs"] == [] and not data["complete"]


def test_unknown_experiment_lists_the_available_ones(spec_dir, cli):
    res = cli(["experiment", "nope"], env={**os.environ, "FL_DPLORA_EXPERIMENTS": str(spec_dir)})
    assert res.returncode == 2 and "tiny" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_experiment_runs_caches_and_reports(spec_dir, cli):
    env = {**os.environ, "FL_DPLORA_EXPERIMENTS": str(spec_dir)}
    first = cli(["experiment", "tiny"], env=env, timeout=900)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.count("running ...") == 3
    out = spec_dir / "results" / "tiny"
    data = json.loads((out / "results.json").read_text())
    assert data["complete"] and [r["id"] for r in data["runs"]] == ["rank-2", "rank-4", "zero-shot"]
    r2, r4, zs = data["runs"]
    assert r4["bytes_up_per_client_round"] > r2["bytes_up_per_client_round"] > 0
    assert r2["trainable_params"] * 2 == r4["trainable_params"]
    assert len(r2["per_round"]) == 2 and zs["rounds"] == 0 and 0 <= zs["accuracy"] <= 1
    md = (out / "results.md").read_text()
    assert "| rank-4 | 4 |" in md and "fl-dplora experiment tiny" in md
    assert (out / "bytes_vs_rank.png").stat().st_size > 5_000 and (out / "rounds.png").stat().st_size > 5_000

    # Finished runs are never repeated; a changed run is.
    second = cli(["experiment", "tiny"], env=env, timeout=300)
    assert second.returncode == 0 and second.stdout.count("cached") == 3 and "running" not in second.stdout
    (spec_dir / "tiny.toml").write_text(TINY_SPEC.replace("[2, 4]", "[2, 3]"))
    third = cli(["experiment", "tiny", "--dry-run"], env=env, timeout=300)
    assert third.stdout.count("cached") == 2 and "rank-3" in third.stdout and "would run" in third.stdout

    # A rerun of one cheap run reproduces its numbers (seeded): --verify reruns it in a scratch dir and
    # compares; --force reruns it in place.
    cached = json.loads((out / "results.json").read_text())["runs"][0]
    verified = cli(["experiment", "tiny", "--only", "rank-2,zero-shot", "--verify"], env=env, timeout=600)
    assert verified.returncode == 0, verified.stdout[-2000:] + verified.stderr[-2000:]
    assert verified.stdout.count("): reproduced in") == 2 and "all reruns reproduced" in verified.stdout
    record = json.loads((out / "verify.json").read_text())
    assert [(r["reproduced"], r["bit_identical"]) for r in record["runs"]] == [(True, True)] * 2
    assert record["runs"][0]["checked"]["final_eval.accuracy"] == cached["accuracy"]
    forced = cli(["experiment", "tiny", "--only", "rank-2", "--force"], env={**env}, timeout=600)
    assert forced.returncode == 0, forced.stderr[-2000:]
    after = next(r for r in json.loads((out / "results.json").read_text())["runs"] if r["id"] == "rank-2")
    for key in ("accuracy", "eval_loss", "bytes_up_total"):
        assert after[key] == cached[key], key


def test_verify_compares_every_reproduced_number():
    cached = {"final_eval": {"accuracy": 0.675, "loss": 0.8, "macro_f1": None}, "bytes_up_total": 1000,
              "privacy": {"epsilon": 7.99, "noise_multiplier": 0.41}}
    same = json.loads(json.dumps(cached))
    same["final_eval"]["loss"] = 0.8 * (1 + 1e-7)  # thread-order float noise is not a difference
    assert ex.compare_summaries(cached, same) == []
    for path, value in [(("final_eval", "accuracy"), 0.68), (("final_eval", "loss"), 0.81), (("bytes_up_total",), 1001),
                        (("privacy", "epsilon"), 8.5), (("privacy", "noise_multiplier"), 0.3)]:
        changed = json.loads(json.dumps(cached))
        node = changed
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        diffs = ex.compare_summaries(cached, changed)
        assert len(diffs) == 1 and diffs[0].startswith(".".join(path)), (path, diffs)
    missing = json.loads(json.dumps(cached))
    del missing["privacy"]
    assert len(ex.compare_summaries(cached, missing)) == 2


def test_evaluate_a_saved_adapter_reproduces_the_runs_final_eval(tmp_path, cli):
    """`fl-dplora evaluate --adapter` (how a user scores a trained adapter on another test set)."""
    from harness import TINY_DEFAULTS, run_in_process

    summary, out = run_in_process(2, output_dir=tmp_path / "run")
    rc = " ".join(f"{k}={json.dumps(v) if isinstance(v, (str, bool)) else v}" for k, v in TINY_DEFAULTS.items())
    res = cli(["evaluate", "--adapter", str(out / "adapter"), "--run-config", rc, "--output", str(tmp_path / "eval.json")])
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads((tmp_path / "eval.json").read_text())["final_eval"]
    assert got["accuracy"] == summary["final_eval"]["accuracy"]
    assert got["loss"] == pytest.approx(summary["final_eval"]["loss"], rel=1e-5)
    base = cli(["evaluate", "--run-config", rc])  # zero-shot: the untrained base model scores differently
    assert base.returncode == 0 and f"loss {got['loss']:.4f}" not in base.stdout
    bad = cli(["evaluate", "--adapter", str(tmp_path), "--run-config", rc])
    assert bad.returncode == 2 and "adapter_config.json" in bad.stderr
