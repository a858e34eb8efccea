"""Running an experiment: one `fl-dplora simulate` (or `evaluate`) subprocess per run that is not
cached yet, into results/runs/<hash>/; `verify` reruns finished runs and compares their numbers;
`record` reads one finished run as the flat record results.json keeps."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fl_dplora.config import SCHEMA, ConfigError
from fl_dplora.privacy.modes import MODES
from fl_dplora.tools.experiments.spec import SPEC_BASE, Experiment, RunSpec, results_root
from fl_dplora.write_ahead import read_operator


def run_dir(run: RunSpec) -> Path:
    return results_root() / "runs" / run.hash


def is_done(run: RunSpec) -> bool:
    f = run_dir(run) / "summary.json"
    return f.is_file() and json.loads(f.read_text()).get("experiment_hash") == run.hash


def command(run: RunSpec, out: Path) -> list[str]:
    cli = [sys.executable, "-m", "fl_dplora.cli"]
    # the spec's keys, and those where the recipe it sits on differs from today's defaults
    moved = {k: v for k, v in SPEC_BASE.items() if v != SCHEMA[k].default}
    rc = " ".join(f"{k}={_toml(v)}" for k, v in sorted({**moved, **run.overrides}.items()))
    if run.kind == "zero-shot":
        return [*cli, "evaluate", "--run-config", rc, "--output", str(out / "summary.json")]
    # the runner owns runs/<hash>/: a failed or stale attempt there is replaced
    return [*cli, "simulate", "--num-clients", str(run.num_clients), "--run-config", rc, "--output-dir", str(out),
            "--overwrite"]


def _toml(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (str, bool)) else repr(v)


def _select(exp: Experiment, only: list[str] | None) -> list[RunSpec]:
    selected = [r for r in exp.runs if not only or r.id in only]
    if only and len(selected) != len(set(only)):
        missing = sorted(set(only) - {r.id for r in selected})
        raise ConfigError(f"experiment {exp.name}: no run(s) {', '.join(missing)}; runs: {', '.join(r.id for r in exp.runs)}")
    return selected


def execute(exp: Experiment, *, only: list[str] | None = None, force: bool = False, dry_run: bool = False,
            train: bool = True, log=print) -> list[dict[str, Any]]:
    """Run what is not cached yet (one subprocess per run, a progress line each); return the records."""
    selected = _select(exp, only)
    for i, run in enumerate(selected, 1):
        head = f"[{exp.name} {i}/{len(selected)}] {run.id} ({run.hash})"
        if is_done(run) and not force:
            log(f"{head}: cached, {_short(record(run))}")
            continue
        if not train:
            log(f"{head}: not run yet")
            continue
        if dry_run:
            log(f"{head}: would run: {' '.join(command(run, run_dir(run))[2:])}")
            continue
        log(f"{head}: running ...")
        seconds = _launch(run, run_dir(run), head)
        log(f"{head}: done in {seconds:.0f} s, {_short(record(run))}")
    return [record(r) for r in exp.runs if is_done(r)]


def _launch(run: RunSpec, out: Path, head: str) -> float:
    """One run as a subprocess into `out` (summary.json stamped with the run hash); returns its wall time."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)
    t0 = time.time()
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    with open(out / "run.log", "w") as logf:
        proc = subprocess.run(command(run, out), stdout=logf, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0 or not (out / "summary.json").is_file():
        tail = (out / "run.log").read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"{head} failed (exit {proc.returncode}): {tail[0]} (full log: {out / 'run.log'})")
    summary = json.loads((out / "summary.json").read_text())
    # The runner is the run's operator: its record keeps the byte totals of the operator log
    # (a run's released summary.json does not: they count the clients that took part).
    summary.update({k: v for k, v in read_operator(out)[1].items() if k in ("bytes_up_total", "bytes_down_total")})
    summary["experiment_hash"] = run.hash
    summary["experiment_wall_seconds"] = time.time() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary["experiment_wall_seconds"]


# The numbers a rerun must reproduce: final-eval metrics, privacy spent, bytes uploaded. Not bytes
# down: the server's instructions carry the run config, whose strings (a task file's path) may
# differ between machines without changing what the run computes.
_VERIFIED = (("final_eval", "accuracy"), ("final_eval", "macro_f1"), ("final_eval", "loss"),
             ("final_eval", "perplexity"), ("privacy", "epsilon"), ("privacy", "noise_multiplier"),
             ("bytes_up_total",), ("test_eval", "accuracy"), ("test_eval", "bleu"))  # test part: None where a task has none


def _verified_numbers(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The _VERIFIED values of a summary, keyed 'final_eval.accuracy' etc. (None where absent)."""
    out = {}
    for path in _VERIFIED:
        value: Any = summary
        for key in path:
            value = value.get(key) if isinstance(value, Mapping) else None
        out[".".join(path)] = value
    return out


def compare_summaries(cached: Mapping[str, Any], fresh: Mapping[str, Any], rel_tol: float = 1e-4) -> list[str]:
    """What differs between two summaries of the same run (empty when the rerun reproduced it)."""
    diffs = []
    new = _verified_numbers(fresh)
    for name, a in _verified_numbers(cached).items():
        b = new[name]
        same = (a == b) if not (isinstance(a, float) and isinstance(b, float)) else \
            math.isclose(a, b, rel_tol=rel_tol, abs_tol=1e-9) or (math.isnan(a) and math.isnan(b))
        if not same:
            diffs.append(f"{name} {a} -> {b}")
    return diffs


def verify(exp: Experiment, *, only: list[str] | None = None, scratch: Path, log=print) -> int:
    """Rerun finished runs into `scratch` (the cache is left alone) and compare with the cached numbers.

    Returns the number of runs whose rerun differs."""
    selected = _select(exp, only)
    checks = []
    for i, run in enumerate(selected, 1):
        head = f"[{exp.name} verify {i}/{len(selected)}] {run.id} ({run.hash})"
        if not is_done(run):
            log(f"{head}: not run yet, nothing to verify")
            continue
        log(f"{head}: rerunning ...")
        seconds = _launch(run, scratch / run.hash, head)
        cached = json.loads((run_dir(run) / "summary.json").read_text())
        fresh = json.loads((scratch / run.hash / "summary.json").read_text())
        diffs = compare_summaries(cached, fresh)
        before, after = _verified_numbers(cached), _verified_numbers(fresh)
        checked = {k: v for k, v in before.items() if v is not None}
        checks.append({"id": run.id, "hash": run.hash, "reproduced": not diffs, "differences": diffs,
                       "checked": checked, "rerun": after, "bit_identical": before == after,
                       "rerun_wall_seconds": round(seconds, 1)})
        if diffs:
            log(f"{head}: DIFFERS after {seconds:.0f} s: {'; '.join(diffs)}")
        else:
            log(f"{head}: reproduced in {seconds:.0f} s: {', '.join(f'{k} {v}' for k, v in checked.items())}")
    if checks:  # committed evidence next to the results it vouches for
        out = results_root() / exp.name
        out.mkdir(parents=True, exist_ok=True)
        (out / "verify.json").write_text(json.dumps({
            "command": f"fl-dplora experiment {exp.name} --only {','.join(c['id'] for c in checks)} --verify",
            "date": time.strftime("%Y-%m-%d"), "runs": checks}, indent=2))
    return sum(not c["reproduced"] for c in checks)


def _short(rec: Mapping[str, Any]) -> str:
    parts = []
    if rec.get("accuracy") is not None:
        parts.append(f"acc {rec['accuracy']:.3f}")
    if rec.get("test_accuracy") is not None:
        parts.append(f"test acc {rec['test_accuracy']:.3f}")
    if rec.get("bleu") is not None:
        parts.append(f"bleu {rec['bleu']:.2f}")
    if rec.get("eval_loss") is not None:
        parts.append(f"loss {rec['eval_loss']:.3f}")
    if rec.get("epsilon") is not None:
        parts.append(f"eps {rec['epsilon']:.2f}")
    return ", ".join(parts)


# record key <- test_eval key of a classification task's test part
_CLASSIFICATION_TEST = {
    "test_accuracy": "accuracy", "test_accuracy_se": "accuracy_se", "test_macro_f1": "macro_f1",
    "test_majority_rate": "majority_rate", "test_loss": "loss", "test_inputs": "num_inputs",
    "test_samples": "samples", "test_predictions": "predictions", "test_labels": "labels",
}


def record(run: RunSpec) -> dict[str, Any]:
    """The numbers of one finished run, flat, as results.json keeps them."""
    d = run_dir(run)
    s = json.loads((d / "summary.json").read_text())
    fe = s.get("final_eval", {})
    cfg = run.run_config
    unit = MODES[cfg.privacy.dp_mode].unit  # None: no DP, no (epsilon, delta) claim
    rec: dict[str, Any] = {
        "id": run.id, "series": run.series, "kind": run.kind, "hash": run.hash, "overrides": run.overrides,
        "task": cfg.data.task, "dp_mode": cfg.privacy.dp_mode if run.kind == "train" else None,
        "lora_variant": cfg.lora.variant if run.kind == "train" else None,
        "lora_rank": cfg.lora.rank, "partitioner": cfg.data.partitioner, "seed": cfg.train.seed,
        "dirichlet_alpha": cfg.data.dirichlet_alpha if cfg.data.partitioner == "dirichlet" else None,
        "target_epsilon": cfg.privacy.target_epsilon if unit and run.kind == "train" else None,
        "accuracy": fe.get("accuracy"), "macro_f1": fe.get("macro_f1"), "eval_loss": fe.get("loss"),
        "perplexity": fe.get("perplexity"), "eval_examples": fe.get("num_examples"),
        "majority_rate": fe.get("majority_rate"),  # always answering the most frequent label (None: older runs)
        "bleu": fe.get("bleu"), "rouge_l": fe.get("rouge_l"),  # generation, on the dev part / eval set
        "wall_seconds": round(float(s.get("experiment_wall_seconds", s.get("wall_seconds", 0.0))), 1),
    }
    test = s.get("test_eval")  # the task's test part, scored once at the end of the run
    if test and "accuracy" in test:  # classification: per-example predictions, for paired (McNemar) tests
        rec.update({k: test[t] for k, t in _CLASSIFICATION_TEST.items() if t in test})  # older summaries lack some
    elif test:  # generation
        rec.update({"test_bleu": test.get("bleu"), "test_bleu_se": test.get("bleu_se"), "test_rouge_l": test.get("rouge_l"),
                    "test_rouge_l_se": test.get("rouge_l_se"), "test_loss": test.get("loss"),
                    "test_inputs": test.get("num_inputs"), "test_samples": test.get("samples", []),
                    "test_generations": test.get("generations")})
    if run.kind == "train":
        priv = s["privacy"]
        rounds = int(s["rounds"])
        up, down = s["bytes_up_total"], s["bytes_down_total"]  # the runner's copy of the operator log's totals
        rec.update({
            "epsilon": priv.get("epsilon"), "delta": priv.get("delta") if unit else None,
            "noise_multiplier": priv.get("noise_multiplier"), "rounds": rounds,
            "num_clients": run.num_clients,
            "examples_processed": run.num_clients * rounds * cfg.train.local_steps * cfg.train.batch_size,
            "trainable_params": s["trainable_params"], "bytes_up_total": up, "bytes_down_total": down,
            "bytes_up_per_client_round": up / max(1, rounds * run.num_clients),
            "pct_full_model": 100.0 * up / max(1, rounds * run.num_clients) / s["full_model_bytes"],
        })
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
        rec["per_round"] = [{"round": r["round"], "accuracy": r.get("eval_accuracy"), "macro_f1": r.get("eval_macro_f1"),
                             "eval_loss": r.get("eval_loss"), "epsilon": r.get("epsilon")} for r in rows]
    else:
        rec.update({"epsilon": None, "rounds": 0, "examples_processed": 0})
    return rec

