"""The README's `flwr run` command, verbatim, on a fresh Flower home (issue 28 defect 4).

The README block is run as a new user would after `make install`: its `export` lines, then its
`flwr run` line, with the example output path replaced by a temporary one and a second
`--run-config` of tiny settings (Flower merges repeated ones, later wins). FLWR_HOME is empty, so
`flwr` writes its default config.toml and starts its local SuperLink daemon; that daemon (found by
this test's FLWR_HOME) is stopped by pid at the end.

A config error inside the ServerApp is one line in the stream, no traceback, and the run's status
is finished:failed, Flower's app process exiting with its code 700 (`flwr run --stream` itself
exits 0 for any run: Flower 1.42).
"""

from __future__ import annotations

import re
import shlex
import signal
import time
from pathlib import Path

import pytest
from harness import kill_tree
from test_deployment_e2e import REPO, SMALL, Deployment, free_port, run_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # 30-85 s a test (or its module fixture) in CI

README = (REPO / "README.md").read_text()
EXAMPLE_OUT = "/abs/path/run1"


def readme_block() -> tuple[dict[str, str], list[str]]:
    """The `export` lines and the `flwr run` command of the README's laptop block."""
    block = next(b for b in re.findall(r"```bash\n(.*?)```", README, re.S) if "flwr run ." in b)
    env, cmd = {}, None
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["export"]:
            key, value = words[1].split("=", 1)
            env[key] = value
        elif words[:2] == ["flwr", "run"]:
            cmd = words
    assert cmd is not None, block
    return env, cmd


def wait_status(dep: Deployment, run_id: str) -> dict:
    deadline = time.monotonic() + 60
    status: dict = {}
    while time.monotonic() < deadline:  # the stream can end a moment before the status is final
        runs = dep.flwr_json("ls", "local", "--run-id", run_id).get("runs", [])
        status = runs[0] if runs else {}
        if str(status.get("status", "")).startswith("finished"):
            break
        time.sleep(1)
    return status


@pytest.fixture
def fresh_home(tmp_path):
    dep = Deployment(tmp_path)
    dep.env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(free_port())
    try:
        yield dep
    finally:
        for p in dep.leftovers():  # the local SuperLink daemon `flwr run` started, by pid
            kill_tree(p.pid, signal.SIGTERM, grace=10)


def test_readme_flwr_run_works_verbatim_and_config_errors_are_one_line(fresh_home: Deployment, tmp_path):
    dep = fresh_home
    env, cmd = readme_block()
    assert EXAMPLE_OUT in " ".join(cmd), cmd
    dep.env.update(env)
    assert not (dep.home / "config.toml").exists()  # a new user's Flower home

    # a config error inside the ServerApp: one line, no traceback, run failed, nothing written
    bad_out = tmp_path / "bad"
    bad = [w.replace(EXAMPLE_OUT, str(bad_out)) for w in cmd] + ["--run-config", "lora-rank=0"]
    res = dep.flwr(*bad[1:], timeout=300, check=False)
    out = res.stdout + res.stderr
    run_id = re.search(r"Successfully started run (\d+)", out)
    assert run_id, out
    assert "lora-rank: must be >= 1, got 0" in out, out
    assert "Traceback" not in out, out
    # ours is the only error line; Flower adds its exit-code note (700: the app process failed)
    assert [line for line in out.splitlines() if "ERROR" in line and "Exit Code: 700" not in line] == [
        next(line for line in out.splitlines() if "lora-rank: must be" in line)], out
    assert wait_status(dep, run_id.group(1)).get("status") == "finished:failed"
    assert not bad_out.exists()

    # the README command, verbatim, with tiny settings in a second --run-config
    out_dir = tmp_path / "run1"
    tiny = {**SMALL, "num-server-rounds": 1, "local-steps": 1, "max-train-samples": 64, "max-eval-samples": 8}
    good = [w.replace(EXAMPLE_OUT, str(out_dir)) for w in cmd]
    res = dep.flwr(*good[1:], "--run-config", run_config(**tiny), timeout=500, check=False)
    out = res.stdout + res.stderr
    run_id = re.search(r"Successfully started run (\d+)", out)
    assert run_id, out
    status = wait_status(dep, run_id.group(1))
    assert status.get("status") == "finished:completed", (status, out[-4000:])
    assert (out_dir / "summary.json").is_file() and (out_dir / "adapter").is_dir()
