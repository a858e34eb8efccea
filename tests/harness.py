"""In-process Flower driver for tests: the real ServerApp loop and ClientApp, no Ray, no SuperLink.

`InProcessGrid` is a `flwr.serverapp.Grid` whose nodes are Python objects: one Flower `Context`
per node (node_config partition-id/num-partitions, its own `state` RecordDict that persists across
rounds, as on a SuperNode). `send_and_receive` delivers each message to the ClientApp in this
process and returns what Flower would return:

- every message crosses a simulated wire: it is deflated into Flower 1.42's object bytes and
  inflated again (both directions), so the client never shares tensors or records with the server
  and a reply that Flower could not ship fails here too;
- an exception in the ClientApp becomes an error reply, built like Flower's runtime does
  (`Message(Error(code=CLIENT_APP_RAISED_EXCEPTION, reason="<class ...>:<'...'>"), reply_to=msg)`);
- replies carry `src_node_id` = the node's id (Flower derives it from `reply_to`).

Hooks for fault-injection tests: `before(node_id, msg)` may raise (the client "crashes") or
return a replacement message; `after(node_id, msg, reply)` may return a replacement reply, or
`None` to drop it (a timeout: no reply at all). Every (instruction, reply) pair is kept in
`grid.exchanges`.

`run_in_process(num_clients, **overrides)` resolves a run config (kebab-case keys, or the same
names with underscores) and runs `fl_dplora.server.loop.run_server` on such a grid:

    summary, out_dir = run_in_process(3, num_server_rounds=2, dp_mode="none")

`run_cli(["simulate", ...])` runs the installed `fl-dplora` console script in a subprocess and
returns its exit code, output, wall and CPU seconds (also the `cli` fixture of conftest.py).
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

# the grid itself lives in the package's testing namespace (fl-dplora bench secagg uses it too)
from fl_dplora.testing.inprocess_grid import (  # noqa: F401
    ClientFn,
    Exchange,
    InProcessGrid,
    error_reply,
    wire_copy,
)

if TYPE_CHECKING:
    from fl_dplora.config import RunConfig

REPO = Path(__file__).resolve().parent.parent
FL_DPLORA = Path(sys.executable).parent / "fl-dplora"  # the console script of this venv

# What the fast in-process tests run: tiny model, few short examples, no DP unless asked.
TINY_DEFAULTS: dict[str, Any] = {
    "model": "tiny-random-llama",
    "task": "fin-sentiment",
    "num-server-rounds": 2,
    "local-steps": 2,
    "batch-size": 8,
    "micro-batch-size": 4,
    "max-seq-len": 64,
    "max-train-samples": 120,
    "max-eval-samples": 16,
    "max-test-samples": 16,  # the test part (1,600 TFNS tweets, 215 E2E MRs) is scored at the end of every run
    "dp-mode": "none",
    "secure-rng": False,
    "checkpoint-every": 0,
    # the plain LoRA setup the tests were written for (pyproject's defaults carry the DP recipe;
    # tests/integration/test_recipe_e2e.py runs that recipe itself)
    "lora-variant": "lora",
    "lora-layers": 0,
    "lora-targets": "q_proj,v_proj",
    "optimizer": "sgd",
    "learning-rate": 0.05,
    "loss": "answer-tokens",
    "system-prompt": "auto",
    "label-head": False,
    "head-rounds": 0,
    # the package's defaults moved to the data-to-text job (2026-12); the tests keep what they had
    "lora-rank": 8,
    "max-new-tokens": 64,
    "eval-every": 1,
}

def tiny_config(defaults: Mapping[str, Any] | None = None, **overrides: Any) -> RunConfig:
    """A resolved run config: pyproject defaults <- `defaults` (TINY_DEFAULTS when None) <- overrides
    (underscores or dashes in key names). Raises ConfigError like the CLI would."""
    from fl_dplora.config import resolve

    base = TINY_DEFAULTS if defaults is None else defaults
    return resolve({**base, **{k.replace("_", "-"): v for k, v in overrides.items()}})


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl."""
    import json

    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def run_in_process(
    num_clients: int,
    *,
    output_dir: str | Path | None = None,
    grid: InProcessGrid | None = None,
    defaults: Mapping[str, Any] | None = None,
    node_configs: list[Mapping[str, Any]] | None = None,
    **overrides: Any,
) -> tuple[dict[str, Any], Path]:
    """Run the real server loop with `num_clients` in-process clients; return (summary, output dir).

    `overrides` are run-config keys (`dp_mode="sample"` or `**{"dp-mode": "sample"}`) on top of
    `defaults` (TINY_DEFAULTS when None; `{}` = pyproject's, as the CLI uses). Pass `grid` to inject
    faults or inspect `grid.exchanges` afterwards, or `node_configs` (one per node) for the grid's nodes.
    The output dir defaults to a fresh temp dir.
    """
    from fl_dplora.server.loop import run_server

    if output_dir is None:
        output_dir = tempfile.mkdtemp(prefix="fl-dplora-test-")
    overrides = {"population": num_clients, **overrides}  # declared like `simulate --num-clients` does
    cfg = tiny_config(defaults, **overrides, **{"output-dir": str(output_dir)})
    grid = grid if grid is not None else InProcessGrid(num_clients, node_configs=node_configs, seed=cfg.train.seed)
    summary = run_server(grid, cfg)
    return summary, Path(cfg.output.output_dir)


# ----------------------------------------------------------------------------- the real CLI
@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    cpu_s: float  # user + system CPU time of the child: robust to a busy machine, unlike wall time


def run_cli(args: list[str], *, timeout: float = 600, env: Mapping[str, str] | None = None,
            cwd: str | Path | None = None) -> CliResult:
    """Run `fl-dplora ARGS` (the installed console script) in a subprocess and capture everything."""
    if not FL_DPLORA.is_file():
        raise FileNotFoundError(f"console script missing: {FL_DPLORA} (pip install -e . in the venv)")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([str(FL_DPLORA), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=str(cwd or REPO))
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return CliResult(proc.returncode, proc.stdout, proc.stderr, wall, cpu)


# ----------------------------------------------------------------------------- processes
def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_tree(pid: int, sig: int = signal.SIGTERM, grace: float = 15.0, group: bool = False) -> None:
    """Signal a process and all its descendants (collected first), then SIGKILL what is left.

    group=True: `pid` was started with start_new_session=True, so its process group has id `pid`;
    signal that group too (it also reaches members whose parent already died). flower-superexec
    starts its own group, hence the tree as well.
    """
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    if group:
        _signal_group(pid, sig)
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    if group:
        _signal_group(pid, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=10)
