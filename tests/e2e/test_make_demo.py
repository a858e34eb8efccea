"""`make demo` (issue 28): the whole flow on the tiny model with DP on, train, evaluate, predict,
export, in about a minute; run as a user would, through make (CI runs it with the suite)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest
import yaml

from fl_dplora.config import load_preset, resolve
from harness import REPO


def test_the_demo_preset_is_the_tiny_model_with_dp_on():
    cfg = resolve(base=load_preset("demo"))
    assert (cfg.model.name, cfg.privacy.dp_mode, cfg.privacy.target_epsilon) == ("tiny-random-llama", "sample", 8.0)
    assert cfg.federation.num_server_rounds <= 2 and cfg.data.max_train_samples <= 64


@pytest.mark.slow
@pytest.mark.timeout(900)  # 69 s in CI
def test_make_demo_trains_evaluates_predicts_and_exports(tmp_path):
    demo = tmp_path / "demo"
    t0 = time.time()
    # -o: this venv is the installed one (make test installed it); the demo itself is what is tested
    r = subprocess.run(["make", "--no-print-directory", "-o", ".venv/.installed", "demo", f"DEMO={demo}"], cwd=REPO,
                       capture_output=True, text=True, timeout=900, env={**os.environ, "CI": "true"})
    wall = time.time() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    out = r.stdout
    trained = re.search(r"^fl-dplora: 2 rounds, accuracy \d\.\d{4}, eval loss \d+\.\d{4}, epsilon ([\d.]+), output ",
                        out, re.M)
    assert trained and 0 < float(trained.group(1)) <= 8.0, out  # DP on, within its budget
    assert re.search(r"^fl-dplora: loss \d+\.\d{4}, .*accuracy \d\.\d{4}, ", out, re.M), out  # evaluate
    answers = [json.loads(line) for line in out.splitlines() if line.startswith("{")]  # predict
    assert [a["text"] for a in answers] == ["Stocks rally after strong earnings", "Shares slump as guidance is cut"]
    assert all(a["answer"] in ("negative", "neutral", "positive") for a in answers)
    assert f"fl-dplora: adapter with model card in {demo / 'export'}" in out  # export
    card = (demo / "export" / "README.md").read_text()
    meta = yaml.safe_load(card.split("\n---\n", 1)[0].removeprefix("---\n"))
    assert meta["license"] == "apache-2.0" and meta["datasets"] == ["zeroshot/twitter-financial-news-sentiment"]
    assert (demo / "metrics.png").is_file() and (demo / "export" / "adapter_model.safetensors").is_file()
    print(f"make demo: {wall:.0f} s wall")
    assert wall < 600, f"make demo took {wall:.0f} s"

    # a second `make demo` replaces the first (its export included)
    r = subprocess.run(["make", "--no-print-directory", "-o", ".venv/.installed", "demo", f"DEMO={demo}"], cwd=REPO,
                       capture_output=True, text=True, timeout=900, env={**os.environ, "CI": "true"})
    assert r.returncode == 0, r.stderr[-3000:]
