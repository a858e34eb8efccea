"""Shared test setup: offline Hugging Face, quiet tokenizers, `harness` importable, CLI runner.

It sits in tests/, above the four layers (unit/, integration/, e2e/, tools/), so it applies to all of
them; pyproject's `pythonpath` also puts tests/ and each layer on sys.path."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # `from harness import run_in_process` in any layer's test file
    sys.path.insert(0, str(TESTS_DIR))

# No network here: never let a library try the hub (a wrong id must fail fast, not hang).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def cli():
    """`cli(args, timeout=..., env=...)` -> harness.CliResult: the real `fl-dplora` in a subprocess."""
    from harness import run_cli

    return run_cli


@pytest.fixture(autouse=True, scope="module")
def _fresh_model_cache():
    """Every test module starts with an empty process model cache, so that a module which converts
    or trains the cached model (`.double()`, a run's final adapter) cannot leak into the next one."""
    models = sys.modules.get("fl_dplora.models")
    if models is not None:
        models.forget_cached_model()
    yield


@pytest.fixture(autouse=True)
def _own_node_home(tmp_path_factory, monkeypatch):
    """Each test's nodes keep their default ε log and ledgers in a fresh folder, never in ~/.fl-dplora:
    a ledger left by another test (same run id, same data file) would continue there."""
    monkeypatch.setenv("FL_DPLORA_HOME", str(tmp_path_factory.mktemp("node_home")))


RAY_IMPORTED = 97  # exit code of the stand-in `ray` package below


@pytest.fixture(scope="session")
def no_ray(tmp_path_factory) -> dict[str, str]:
    """Environment whose `import ray` ends the process with RAY_IMPORTED: proves where the CLI stops."""
    import subprocess

    root = tmp_path_factory.mktemp("no_ray")
    (root / "ray").mkdir()
    (root / "ray" / "__init__.py").write_text(
        "import os, sys\nsys.stderr.write('TEST: ray was imported\\n'); sys.stderr.flush()\n"
        f"os._exit({RAY_IMPORTED})\n"
    )
    assert subprocess.run([sys.executable, "-c", "import ray"], env={**os.environ, "PYTHONPATH": str(root)},
                          capture_output=True, timeout=60).returncode == RAY_IMPORTED
    return {"PYTHONPATH": str(root)}
