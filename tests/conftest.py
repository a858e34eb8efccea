"""Shared test setup: offline Hugging Face, quiet tokenizers, `harness` importable, CLI runner."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent
if str(TESTS_DIR) not in sys.path:  # `from harness import run_in_process` in any test file
    sys.path.insert(0, str(TESTS_DIR))

# No network here: never let a library try the hub (a wrong id must fail fast, not hang).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FL_DPLORA = Path(sys.executable).parent / "fl-dplora"  # the real console script of this venv


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    cpu_s: float  # user + system CPU time of the child (robust to a busy machine, unlike wall time)


def run_cli(args: list[str], *, timeout: float = 600, env: dict[str, str] | None = None,
            cwd: str | Path | None = None) -> CliResult:
    """Run `fl-dplora ARGS` in a subprocess and capture everything."""
    if not FL_DPLORA.is_file():
        pytest.fail(f"console script missing: {FL_DPLORA} (pip install -e . in the venv)")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([str(FL_DPLORA), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=str(cwd or REPO))
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return CliResult(proc.returncode, proc.stdout, proc.stderr, wall, cpu)


@pytest.fixture(scope="session")
def cli():
    """`cli(args, ...)` -> CliResult; see `run_cli`."""
    return run_cli
