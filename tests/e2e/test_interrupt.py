"""Ctrl-C stops `fl-dplora simulate` (issue 28): one line, exit 130, what was written stays (its
rounds, the checkpoint that --resume reads); the ServerApp's thread no longer keeps the process alive."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from harness import FL_DPLORA, REPO, kill_tree

TINY = ("model=tiny-random-llama task=fin-sentiment local-steps=1 batch-size=8 micro-batch-size=4 "
        "max-train-samples=40 max-eval-samples=8 max-seq-len=48 num-server-rounds=200 eval-every=1")


def _group_members(pgid: int) -> list[int]:
    import psutil

    members = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid:
                members.append(p.pid)
        except (ProcessLookupError, psutil.Error):
            pass
    return members


@pytest.mark.slow
@pytest.mark.parametrize("to_group", [False, True], ids=["pid", "terminal-group"])
def test_sigint_stops_simulate_cleanly_keeping_what_was_written(tmp_path, to_group):
    # pid: `kill -INT`; terminal-group: what Ctrl-C in a terminal sends (the whole foreground group,
    # Ray's workers included)
    out = tmp_path / "run"
    proc = subprocess.Popen([str(FL_DPLORA), "simulate", "--num-clients", "2", "--output-dir", str(out),
                             "--run-config", TINY], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env={**os.environ, "CI": "true"})
    try:
        deadline = time.time() + 600
        metrics = out / "metrics.jsonl"
        while time.time() < deadline and proc.poll() is None:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2 and (out / "checkpoint.json").is_file():
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        if to_group:
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGINT)
        t0 = time.time()
        stdout, stderr = proc.communicate(timeout=90)
        assert time.time() - t0 < 60
        # Ray's local processes go with the driver (fate-sharing): nothing of the run is left behind
        left = _group_members(proc.pid)
        for _ in range(40):
            if not left:
                break
            time.sleep(0.5)
            left = _group_members(proc.pid)
        assert not left, f"processes left behind: {left}"
    finally:
        kill_tree(proc.pid, group=True)
    assert proc.returncode == 130, stderr[-3000:]
    last = [line for line in stderr.splitlines() if line.strip()][-1]
    assert last.startswith("fl-dplora: error: interrupted after ") and " of 200 rounds; what was written stays in " in last
    assert f"fl-dplora simulate --resume {out} continues it" in last
    assert "Traceback" not in stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert len(rows) >= 2 and not (out / "summary.json").exists()
    saved = json.loads((out / "checkpoint.json").read_text()) if (out / "checkpoint.json").is_file() else None
    assert saved is not None
