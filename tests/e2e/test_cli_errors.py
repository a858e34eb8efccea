"""Bad input to `fl-dplora simulate`: one clear line naming the key, exit code 2, no traceback,
and it fails before Ray starts.

"Before Ray" is proven, not guessed: the CLI runs with a stand-in `ray` package first on
PYTHONPATH that exits with code 97 the moment anything imports it (a positive control shows
that a valid run does reach it). The time bound is on the child's CPU time, which a busy
machine does not inflate the way it inflates wall time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import RAY_IMPORTED
CPU_BUDGET_S = 10.0
WALL_LIMIT_S = 120.0  # only a hang guard; the real bound is CPU_BUDGET_S

# (id, --run-config, --num-clients, key that the one error line must name)
CASES = [
    ("unknown-model-alias", "model=tiny-random-lama", 3, "model"),
    ("missing-data-file", "task={tmp}/missing.csv", 3, "task"),
    ("file-without-needed-columns", "task={tmp}/ab.csv", 3, "task"),
    ("lora-rank-zero", "lora-rank=0", 3, "lora-rank"),
    ("lora-rank-negative", "lora-rank=-4", 3, "lora-rank"),
    ("unknown-task", "task=fin-sentimnt", 3, "task"),
    ("unknown-dp-mode", "dp-mode=local", 3, "dp-mode"),
    ("unknown-partitioner", "partitioner=shards", 3, "partitioner"),
    ("more-clients-than-examples", "max-train-samples=5", 10, "num-clients"),
    ("unknown-run-config-key", "lora-rnak=4", 3, "lora-rnak"),
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli_data")
    (d / "ab.csv").write_text("a,b\n1,2\n3,4\n5,6\n")
    return d


def test_the_ray_stand_in_catches_an_import(no_ray):
    r = subprocess.run([sys.executable, "-c", "import ray"], env={**os.environ, **no_ray},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == RAY_IMPORTED and "ray was imported" in r.stderr


@pytest.mark.parametrize("case_id, run_config, num_clients, key", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_with_one_clear_line_before_ray(cli, no_ray, data_dir, tmp_path, case_id, run_config, num_clients, key):
    out = tmp_path / "out"
    r = cli(["simulate", "--num-clients", str(num_clients), "--run-config", run_config.format(tmp=data_dir),
             "--output-dir", str(out)], env=no_ray, timeout=WALL_LIMIT_S)
    err = r.stderr
    assert r.returncode != RAY_IMPORTED, f"Ray was imported before the input was rejected:\n{err}"
    assert r.returncode == 2, err
    assert "Traceback" not in err and "Traceback" not in r.stdout
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("fl-dplora: error: ")
    assert lines[0].removeprefix("fl-dplora: error: ").startswith(f"{key}:"), lines[0]
    assert r.stdout == ""
    assert not out.exists()  # nothing was written
    assert r.cpu_s < CPU_BUDGET_S, f"took {r.cpu_s:.1f} s of CPU ({r.wall_s:.1f} s wall)"


@pytest.mark.slow
def test_a_valid_run_does_reach_ray(cli, no_ray, tmp_path):
    """Positive control: with good input the same command gets as far as importing Ray."""
    r = cli(["simulate", "--num-clients", "2", "--run-config", "model=tiny-random-llama task=fin-sentiment max-train-samples=20",
             "--output-dir", str(tmp_path / "out")], env=no_ray, timeout=WALL_LIMIT_S)
    assert r.returncode == RAY_IMPORTED, r.stderr[-2000:]
