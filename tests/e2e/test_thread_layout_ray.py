"""Issue 30, thread layout: the real `fl-dplora simulate` (Ray) logs the layout measured inside the
ServerApp and inside each ClientApp actor, and it is the layout the environment asked for (the
function itself: tests/unit/test_thread_layout.py)."""

from __future__ import annotations

import os

import pytest

from fl_dplora.thread_layout import parse_layout_lines

RUN = ("model=tiny-random-llama task=fin-sentiment label-head=false head-rounds=0 lora-layers=0 lora-variant=lora "
       "lora-targets=q_proj,v_proj num-server-rounds=1 local-steps=1 batch-size=8 micro-batch-size=4 "
       "max-train-samples=40 max-eval-samples=8 max-test-samples=8 max-seq-len=48 dp-mode=none")


@pytest.mark.slow
def test_simulate_logs_the_measured_layout_of_server_and_client_processes(cli, tmp_path):
    """OMP_NUM_THREADS=1 with `--num-cpus 2`: Ray would set 2 in an actor where it is unset, so a client
    line saying 1 was measured in the actor, not copied from the resources."""
    res = cli(["simulate", "--num-clients", "2", "--num-cpus", "2", "--output-dir", str(tmp_path / "out"),
               "--run-config", RUN], env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = parse_layout_lines(res.stdout + res.stderr)
    server = [r for r in rows if r["role"] == "server"]
    clients = [r for r in rows if r["role"] == "client"]
    assert len(server) == 1 and clients, res.stderr[-4000:]
    assert all(r["pid"] != server[0]["pid"] for r in clients)  # each measured in its own process (a Ray actor)
    for r in [*server, *clients]:
        assert (r["torch_threads"], r["OMP_NUM_THREADS"], r["MKL_NUM_THREADS"]) == (1, 1, 1), r
    cpus = os.cpu_count() or 1
    assert {r["concurrent"] for r in clients} == {max(1, cpus // 2)}  # Ray's actors: cluster CPUs / 2 each
    assert server[0]["concurrent"] == 1
    assert "thread layout oversubscribed" not in res.stdout + res.stderr
    released = "".join(p.read_text(errors="replace") for p in (tmp_path / "out").rglob("*") if p.is_file()
                       and p.suffix in {".json", ".jsonl", ".md", ".txt"})
    assert "torch_threads" not in released  # the operator's log only, never a released file
