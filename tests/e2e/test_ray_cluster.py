"""`fl-dplora simulate --ray-address` attaches to a running Ray cluster instead of starting its own.

The cluster is a single head node on this machine (`ray start --head --block`, 2 CPUs, its own
--temp-dir). The test stops it by pid: the `ray start --block` process and its process tree.
It does not use `ray stop`, because that command stops every Ray process of the machine by
process name, including the Ray clusters of other users and of other test runs.

Proof of attachment:
- the head's session log folder gets a `python-core-driver-*_<pid>.log` for the simulate process;
- no second Ray session appears in the temp dir (a new local cluster would create one);
- the cluster is still up after the run (`ray status`), so the run did not own it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from harness import kill_tree

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # 30-85 s a test (or its module fixture) in CI

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
FL_DPLORA = str(BIN / "fl-dplora")
TINY = ("model=tiny-random-llama task=fin-sentiment num-server-rounds=1 local-steps=2 batch-size=8 micro-batch-size=4 "
        "max-eval-samples=32 max-train-samples=300 max-seq-len=64")

if not Path(RAY).is_file():
    pytest.skip(f"ray CLI not in {BIN}", allow_module_level=True)


def free_port() -> int:
    """A free port outside 10002-19999 (Ray's worker port range)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not 10002 <= port <= 19999:
            return port
    raise RuntimeError("no free port")


def processes_with_env(key: str, value: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["status"]):
        if p.pid == os.getpid() or p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if p.environ().get(key) == value:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def test_simulate_attaches_to_running_ray_cluster(tmp_path):
    # Ray's socket paths must stay short (AF_UNIX limit 107 bytes): not under pytest's tmp_path.
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"RAY_TMPDIR": str(ray_tmp), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"})
    head_log = (tmp_path / "ray-head.log").open("wb")
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--num-cpus", "2", "--port", str(port), "--node-ip-address", "127.0.0.1",
         "--temp-dir", str(ray_tmp), "--include-dashboard", "false", "--disable-usage-stats",
         "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
         "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port())],
        stdout=head_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    head_log.close()
    sim = None
    try:
        deadline = time.monotonic() + 90
        while subprocess.run([RAY, "status", "--address", address], env=env, capture_output=True).returncode != 0:
            assert head.poll() is None, f"ray start exited {head.returncode}\n{(tmp_path / 'ray-head.log').read_text()}"
            assert time.monotonic() < deadline, "Ray head not up after 90 s"
            time.sleep(1)
        sessions = sorted(ray_tmp.glob("session_2*"))
        assert len(sessions) == 1

        out = tmp_path / "out"
        sim_log = (tmp_path / "simulate.log").open("wb")
        sim = subprocess.Popen(
            [FL_DPLORA, "simulate", "--ray-address", address, "--num-clients", "2", "--num-cpus", "1",
             "--run-config", TINY, "--output-dir", str(out)],
            stdout=sim_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=tmp_path,
            start_new_session=True)
        sim_log.close()
        code = sim.wait(timeout=300)
        log = (tmp_path / "simulate.log").read_text(errors="replace")
        assert code == 0, log[-4000:]

        summary = json.loads((out / "summary.json").read_text())
        assert summary["rounds"] == 1
        assert summary["final_eval"]["loss"] is not None
        assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
        assert (out / "adapter" / "adapter_model.safetensors").is_file()

        # Attached, not a new local cluster:
        assert sorted(ray_tmp.glob("session_2*")) == sessions, "the run started its own Ray cluster"
        drivers = list((sessions[0] / "logs").glob(f"python-core-driver-*_{sim.pid}.log"))
        assert drivers, f"no driver log of pid {sim.pid} in the head's session: the run did not attach"
        assert list((sessions[0] / "logs").glob("python-core-worker-*.log")), "no Ray workers ran on the head"
        status = subprocess.run([RAY, "status", "--address", address], env=env, capture_output=True, text=True)
        assert status.returncode == 0 and "2.0 CPU" in status.stdout, status.stdout + status.stderr
    finally:
        if sim is not None and sim.poll() is None:
            kill_tree(sim.pid)
        kill_tree(head.pid)  # `ray start --block` stops its GCS, raylet and workers on SIGTERM
        head.wait(timeout=30)
        left = processes_with_env("RAY_TMPDIR", str(ray_tmp))
        for p in left:
            kill_tree(p.pid, signal.SIGKILL, grace=5)
        import shutil

        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not left, f"Ray processes left running: {[(p.pid, p.name()) for p in left]}"
