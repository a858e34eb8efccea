"""`fl-dplora experiment`: specs, the per-run cache, results.json/results.md/plots."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from fl_dplora.tools import experiments as ex
from fl_dplora.config import ConfigError

REPO = Path(__file__).resolve().parents[2]

# The run config both test specs share (each adds its dp-mode below it).
TINY_CONFIG = """model = "tiny-random-llama"
max-train-samples = 40
max-eval-samples = 8
batch-size = 4
micro-batch-size = 4
local-steps = 1
num-server-rounds = 2
max-seq-len = 48
secure-rng = false
checkpoint-every = 0
label-head = false
"""

TINY_SPEC = """
name = "tiny"
description = "two ranks and the zero-shot base model"
num-clients = 2
table = ["id", "lora_rank", "accuracy", "bytes_up_per_client_round", "pct_full_model"]

[config]
""" + TINY_CONFIG + """dp-mode = "none"

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
    assert spec.runs[0].run_config.lora.rank == 2 and spec.runs[1].run_config.lora.rank == 4
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
@pytest.mark.timeout(900)  # 85 s in CI
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


# ----------------------------------------------------------------------------- cells over seeds (spec key `aggregate`)
SEEDS_SPEC = """
name = "seeds"
description = "two ranks, three seeds each"
num-clients = 2
aggregate = ["seed"]
table = ["id", "seed", "lora_rank", "epsilon", "accuracy", "macro_f1", "majority_rate", "eval_loss"]

[config]
""" + TINY_CONFIG + """dp-mode = "sample"
target-epsilon = 8.0

[[runs]]
id = "rank{lora_rank}-seed{seed}"
series = "LoRA"
matrix = { lora-rank = [2, 4], seed = [42, 1, 2] }

[[plots]]
file = "accuracy_vs_rank.png"
x = "lora_rank"
y = "accuracy"
categorical = false
reverse = false

[[plots]]
file = "accuracy_bars.png"
kind = "bar"
x = "lora_rank"
y = "accuracy"

[[plots]]
file = "accuracy_by_seed.png"
kind = "bar"
x = "seed"
y = "accuracy"

[[plots]]
file = "rounds.png"
kind = "rounds"
"""


def _fake_run(run: ex.RunSpec, accuracy: float, *, macro_f1: float = 0.3, loss: float = 0.9, epsilon: float = 7.99,
              majority_rate: float | None = 0.63) -> None:
    """A finished run's summary.json/metrics.jsonl in its cache dir, as `_launch` leaves them."""
    d = ex.run_dir(run)
    d.mkdir(parents=True, exist_ok=True)
    final = {"accuracy": accuracy, "macro_f1": macro_f1, "loss": loss, "perplexity": 2.5, "num_examples": 8}
    if majority_rate is not None:  # older summaries have no majority_rate
        final["majority_rate"] = majority_rate
    summary = {"final_eval": final, "rounds": 2, "trainable_params": 100, "bytes_up_total": 1600, "bytes_down_total": 1600,
               "full_model_bytes": 10**6, "experiment_hash": run.hash, "experiment_wall_seconds": 60.0}
    if run.kind == "train":
        summary["privacy"] = {"epsilon": epsilon, "delta": 1e-5, "noise_multiplier": 0.5}
        rows = [{"round": r, "eval_accuracy": accuracy, "eval_loss": loss, "eval_macro_f1": macro_f1, "epsilon": epsilon * r / 2}
                for r in (1, 2)]
        (d / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (d / "summary.json").write_text(json.dumps(summary))


def test_seed_matrix_names_runs_and_changes_their_hash(spec_dir):
    (spec_dir / "seeds.toml").write_text(SEEDS_SPEC)
    spec = ex.load_spec("seeds")
    assert spec.aggregate == ["seed"]
    assert [r.id for r in spec.runs] == [f"rank{r}-seed{s}" for r in (2, 4) for s in (42, 1, 2)]
    assert [r.run_config.train.seed for r in spec.runs[:3]] == [42, 1, 2] and len({r.hash for r in spec.runs}) == 6


def test_bad_aggregate_key_fails(spec_dir):
    (spec_dir / "bad.toml").write_text("name='x'\naggregate=['sed']\n[[runs]]\nid='a'\n")
    with pytest.raises(ConfigError, match="aggregate: sed is not a run-config key"):
        ex.load_spec("bad")


def test_majority_rate_flows_from_summary_into_the_record(spec_dir):
    spec = ex.load_spec("tiny")
    _fake_run(spec.runs[0], 0.5, majority_rate=0.625)
    _fake_run(spec.runs[1], 0.5, majority_rate=None)  # an older cached summary
    rec, old = ex.record(spec.runs[0]), ex.record(spec.runs[1])
    assert rec["majority_rate"] == 0.625 and old["majority_rate"] is None
    assert rec["per_round"][-1] == {"round": 2, "accuracy": 0.5, "macro_f1": 0.3, "eval_loss": 0.9, "epsilon": 7.99}
    assert ex.column_text(rec, "majority_rate") == "62.5%" and ex.column_text(old, "majority_rate") == "–"
    assert ex.COLUMNS["majority_rate"][0] == "majority"


def test_seeds_aggregate_into_cells_with_mean_and_standard_error(tmp_path, monkeypatch):
    import importlib.util
    import statistics

    import matplotlib.axes

    spec_dir = tmp_path / "experiments"  # laid out like the checkout, for readme_results below
    spec_dir.mkdir()
    monkeypatch.setenv("FL_DPLORA_EXPERIMENTS", str(spec_dir))
    (spec_dir / "seeds.toml").write_text(SEEDS_SPEC)
    spec = ex.load_spec("seeds")
    runs = {r.id: r for r in spec.runs}
    accs, f1s = [0.50, 0.60, 0.85], [0.30, 0.40, 0.20]
    for seed, acc, f1, maj in zip((42, 1, 2), accs, f1s, (0.6, 0.6, None)):
        _fake_run(runs[f"rank2-seed{seed}"], acc, macro_f1=f1, majority_rate=maj)
    _fake_run(runs["rank4-seed1"], 0.7, macro_f1=0.5)  # the other seeds of rank 4 are not run yet

    errorbars, bars = [], []
    real_errorbar, real_bar = matplotlib.axes.Axes.errorbar, matplotlib.axes.Axes.bar
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", lambda ax, *a, **k: errorbars.append(k) or real_errorbar(ax, *a, **k))
    monkeypatch.setattr(matplotlib.axes.Axes, "bar", lambda ax, *a, **k: bars.append(k) or real_bar(ax, *a, **k))
    records = ex.execute(spec, train=False, log=lambda *_: None)
    out = ex.report(spec, records, "fl-dplora experiment seeds")

    data = json.loads((out / "results.json").read_text())
    assert len(data["runs"]) == 4 and data["aggregate"] == ["seed"]
    two, four = data["cells"]
    # by hand: mean = sum / n; SE = sqrt(sum((x - mean)^2) / (n - 1)) / sqrt(n)
    mean = (0.50 + 0.60 + 0.85) / 3
    se = (((0.50 - mean) ** 2 + (0.60 - mean) ** 2 + (0.85 - mean) ** 2) / 2) ** 0.5 / 3 ** 0.5
    assert two["accuracy_mean"] == pytest.approx(mean) and two["accuracy_se"] == pytest.approx(se)
    assert two["accuracy_se"] == pytest.approx(statistics.stdev(accs) / 3 ** 0.5)
    assert two["macro_f1_mean"] == pytest.approx(0.3) and two["macro_f1_se"] == pytest.approx(0.1 / 3 ** 0.5)
    assert two["epsilon_mean"] == pytest.approx(7.99) and two["epsilon_se"] == pytest.approx(0.0, abs=1e-12)
    assert two["noise_multiplier_mean"] == 0.5 and two["eval_loss_mean"] == pytest.approx(0.9)
    assert two["majority_rate_mean"] == pytest.approx(0.6)  # the older summary (no majority_rate) is left out
    assert (two["n"], two["seed"], two["ids"]) == (3, [42, 1, 2], ["rank2-seed42", "rank2-seed1", "rank2-seed2"])
    assert (two["series"], two["lora_rank"], two["target_epsilon"], two["dp_mode"], two["task"]) == \
        ("LoRA", 2, 8.0, "sample", "fin-sentiment-v1")  # the specs' base: the earlier protocol
    # n < 2: a mean, no standard error
    assert (four["n"], four["seed"], four["lora_rank"]) == (1, [1], 4)
    assert four["accuracy_mean"] == 0.7 and four["accuracy_se"] is None and four["macro_f1_se"] is None

    md = (out / "results.md").read_text()
    assert f"| LoRA | 2 | 42, 1, 2 | 7.99 ± 0.00 | {mean:.1%} ± {se:.1%} (3) | 0.300 ± {0.1 / 3 ** 0.5:.3f} (3) |" in md
    assert "| LoRA | 4 | 1 | 7.99 | 70.0% (1) | 0.500 (1) |" in md
    assert md.index("Mean ± standard error") < md.index("| rank2-seed42 | 42 |")  # cells first, then every run

    for name in ("accuracy_vs_rank.png", "accuracy_bars.png", "accuracy_by_seed.png", "rounds.png"):
        assert (out / name).stat().st_size > 5_000, name
    # line plot: one errorbar call for the series, with the SE of each cell (NaN, no bar, for n = 1); bar(yerr=...)
    # draws its error bars by errorbar(fmt="none") too
    lines = [k for k in errorbars if k.get("fmt") != "none"]
    assert len(lines) == 1 and lines[0]["yerr"] == pytest.approx([se, math.nan], nan_ok=True)
    # bar plot over cells has yerr; the bar plot over the aggregated key (x = seed) is one bar per run
    assert [b.get("yerr") is not None for b in bars] == [True, False]
    assert bars[0]["yerr"] == pytest.approx([se, math.nan], nan_ok=True)

    # the README block shows the cells (the per-run table stays in results.md)
    mod_spec = importlib.util.spec_from_file_location("readme_results", REPO / "experiments" / "readme_results.py")
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "ROOT", tmp_path)
    monkeypatch.setattr(mod, "ORDER", ["seeds"])
    block = mod.block()
    assert "### seeds (partial: 4 of 6 runs finished)" in block and "Mean ± standard error" in block
    assert f"{mean:.1%} ± {se:.1%} (3)" in block and "| rank2-seed42 |" not in block


def test_spec_without_aggregate_has_no_cells(spec_dir):
    spec = ex.load_spec("tiny")
    assert spec.aggregate == []
    for run, acc in zip(spec.runs, (0.5, 0.6, 0.2)):
        _fake_run(run, acc)
    records = ex.execute(spec, train=False, log=lambda *_: None)
    out = ex.report(spec, records, "fl-dplora experiment tiny")
    data = json.loads((out / "results.json").read_text())
    assert "cells" not in data and "aggregate" not in data and len(data["runs"]) == 3
    assert [r["majority_rate"] for r in data["runs"]] == [0.63] * 3
    md = (out / "results.md").read_text()
    assert "Mean ± standard error" not in md and "| rank-4 | 4 | 60.0% |" in md
    assert (out / "bytes_vs_rank.png").is_file() and (out / "rounds.png").is_file()
