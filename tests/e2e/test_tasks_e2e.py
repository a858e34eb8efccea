"""Every built-in task and a user CSV of each kind run end to end through `fl-dplora simulate` (the
Flower simulation engine, Ray), then `fl-dplora evaluate` and `fl-dplora export` on the run.

(fin-sentiment runs the same way in tests/e2e/test_simulate_e2e.py.) The runs are tiny-random-llama, one
round; two simulations at a time (Ray's start-up is mostly waiting)."""

from __future__ import annotations

import csv
import json
import subprocess
import time
from pathlib import Path

import pytest

from harness import FL_DPLORA, REPO, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # 30-85 s a test (or its module fixture) in CI

TINY = ("model=tiny-random-llama num-server-rounds=1 local-steps=2 batch-size=8 micro-batch-size=8 "
        "max-seq-len=64 max-train-samples=40 max-eval-samples=4 max-new-tokens=4 lora-variant=lora "
        "lora-layers=2 lora-targets=q_proj,v_proj optimizer=sgd learning-rate=0.5 loss=answer-tokens "
        "label-head=false head-rounds=0 secure-rng=false")


def _csv(path: Path, header: list[str], rows: list[list[str]]) -> str:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def _cases(root: Path) -> dict[str, str]:
    instruct = _csv(root / "instruct_train.csv", ["instruction", "response"],
                    [[f"Say the number {i}.", f"The number is {i}."] for i in range(40)])
    labelled = _csv(root / "labelled_train.csv", ["text", "label"],
                    [[f"review {i}: {'great' if i % 2 else 'awful'}", "pos" if i % 2 else "neg"] for i in range(40)])
    return {  # name -> task (and dp-mode: data-to-text is the DP-LoRA task, so it runs under DP here)
        "general-instruct": "task=general-instruct dp-mode=none",
        "medical-qa": "task=medical-qa dp-mode=none",
        "data-to-text": "task=data-to-text dp-mode=sample",
        "instruct-csv": f"task={instruct} dp-mode=none",
        "labelled-csv": f"task={labelled} dp-mode=none",
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    root = tmp_path_factory.mktemp("tasks")
    pending = list(_cases(root).items())
    active, done = [], {}
    t0 = time.perf_counter()
    while pending or active:
        while pending and len(active) < 2:
            name, extra = pending.pop(0)
            out = root / name
            log = (root / f"{name}.log").open("w")
            cmd = [str(FL_DPLORA), "simulate", "--num-clients", "2", "--num-cpus", "1", "--output-dir", str(out),
                   "--run-config", f"{TINY} {extra}"]
            active.append((name, out, log, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO))))
        for item in list(active):
            name, out, log, proc = item
            if proc.poll() is None and time.perf_counter() - t0 < 900:
                continue
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
            done[name] = (proc.returncode, (root / f"{name}.log").read_text(), out)
            active.remove(item)
        time.sleep(0.5)
    return done


@pytest.fixture(params=["general-instruct", "medical-qa", "data-to-text", "instruct-csv", "labelled-csv"])
def run(request, runs):
    code, log, out = runs[request.param]
    assert code == 0, f"simulate {request.param} exited {code}:\n{log[-3000:]}"
    return request.param, out


def test_the_run_finishes_with_its_task_metrics(run):
    name, out = run
    summary = json.loads((out / "summary.json").read_text())
    fe = summary["final_eval"]
    assert summary["rounds"] == 1 and fe["loss"] > 0
    if name in ("medical-qa", "labelled-csv"):
        assert 0 <= fe["accuracy"] <= 1
    else:
        assert fe["accuracy"] is None and 0 <= fe["bleu"] <= 100 and 0 <= fe["rouge_l"] <= 1
    assert ("test_eval" in summary) == (name == "data-to-text")
    if name == "data-to-text":
        assert summary["privacy"]["epsilon"] <= 8.0 and len(summary["test_eval"]["samples"]) == 5


def test_evaluate_and_export_read_the_run(run, tmp_path):
    name, out = run
    res = run_cli(["evaluate", "--run", str(out), "--output", str(tmp_path / "eval.json")], timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    written = json.loads((tmp_path / "eval.json").read_text())
    scored = written["final_eval"]
    assert ("bleu" in scored) == (name not in ("medical-qa", "labelled-csv"))
    assert ("test_eval" in written) == (name == "data-to-text")  # evaluate reports the test part as a run does
    res = run_cli(["export", "--run", str(out), "--output", str(tmp_path / "export")], timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "export" / "adapter_config.json").is_file()


def test_data_to_text_scores_an_mr_ref_file_and_predicts_from_an_mr(runs, tmp_path):
    code, log, out = runs["data-to-text"]
    assert code == 0, log[-3000:]
    f = _csv(tmp_path / "mine.csv", ["mr", "ref"], [["name[A], food[French]", "A serves French food."],
                                                   ["name[A], food[French]", "A is French."],
                                                   ["name[B]", "B is a pub."]])
    res = run_cli(["evaluate", "--run", str(out), "--eval-file", f], timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "bleu" in res.stdout and "rouge_l" in res.stdout and "num_examples 2" in res.stdout
    res = run_cli(["predict", "--run", str(out), "name[The Eagle], eatType[coffee shop]"], timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    row = json.loads(res.stdout.strip().splitlines()[-1])
    assert row["text"] == "name[The Eagle], eatType[coffee shop]" and isinstance(row["answer"], str)
