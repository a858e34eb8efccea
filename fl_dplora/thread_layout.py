"""The process's thread layout, measured and logged once per process (operator log, never a released file).

A client and the server each log one line when they start work:

    thread layout: role=client pid=4242 torch_threads=2 interop_threads=2 OMP_NUM_THREADS=2
        MKL_NUM_THREADS=unset affinity_cpus=2 cpu_count=2 concurrent=1

`concurrent` is how many processes of this role compute at the same time on this machine: for a
client under Ray's simulation engine the actors that fit (cluster CPUs / the actor's CPUs), else 1;
for the server 1, because its own work (start, central evaluation, the test part) never overlaps a
client's training (the round loop waits for the replies; measured in docs/performance.md). When
torch threads × concurrent exceed the CPUs this process may run on, one warning line says what to set.
`parse_layout_lines` reads the lines back (`fl-dplora bench round-overhead` reads its child run's).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any

log = logging.getLogger("fl_dplora.thread_layout")
PREFIX = "thread layout: "
_logged: set[str] = set()  # roles already logged by this process


def measure() -> dict[str, Any]:
    """This process's threads and CPUs, as torch and the OS see them now."""
    import torch

    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        affinity = os.cpu_count() or 1
    return {"pid": os.getpid(), "torch_threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
            "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS", "unset"),
            "affinity_cpus": affinity, "cpu_count": os.cpu_count() or 1}


def ray_concurrent_clients() -> int:
    """Clients Ray runs at once when this process is a Ray actor (CPUs in the cluster / this actor's), else 1."""
    ray = sys.modules.get("ray")  # never import Ray here: a process that has not loaded it is no actor
    try:
        if ray is None or not ray.is_initialized():
            return 1
        mine = float(ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0))
        total = float(ray.cluster_resources().get("CPU", 0.0))
    except Exception:  # noqa: BLE001 - a driver, or a Ray without these calls: no better guess than 1
        return 1
    return max(1, int(total // mine)) if mine > 0 else 1


def oversubscription(layout: dict[str, Any]) -> str | None:
    """The warning's text when this role's compute threads exceed the CPUs, else None."""
    threads, concurrent, cpus = int(layout["torch_threads"]), int(layout["concurrent"]), int(layout["affinity_cpus"])
    if threads * concurrent <= cpus:
        return None
    fit = max(1, cpus // concurrent)
    if concurrent > 1:
        how = (f"{concurrent} {layout['role']}s at once x {threads} torch threads = {threads * concurrent} > "
               f"{cpus} CPUs: set OMP_NUM_THREADS={fit} (or fewer clients at once: simulate --num-cpus {cpus})")
    else:
        how = f"{threads} torch threads > {cpus} CPUs: set OMP_NUM_THREADS={fit}"
    return f"thread layout oversubscribed: {layout['role']} pid {layout['pid']}: {how}"


def format_layout(layout: dict[str, Any]) -> str:
    return PREFIX + " ".join(f"{k}={layout[k]}" for k in ("role", *(k for k in layout if k != "role")))


def parse_layout_lines(text: str) -> list[dict[str, Any]]:
    """Every layout line in `text` (a log, Ray's `(ClientAppActor pid=...)` prefixes included), as dicts."""
    rows = []
    for line in text.splitlines():
        at = line.find(PREFIX)
        if at < 0:
            continue
        pairs = re.findall(r"(\w+)=(\S+)", line[at + len(PREFIX):])
        rows.append({k: int(v) if v.isdigit() else v for k, v in pairs})
    return rows


def _ensure_handler() -> None:
    """A Ray actor or flwr-clientapp process has no handler for our logs: give this logger one (stderr)."""
    if not log.hasHandlers():
        from fl_dplora.console import stderr_handler

        log.addHandler(stderr_handler())
        log.propagate = False
    if log.getEffectiveLevel() > logging.INFO:  # a process whose loggers default to WARNING (a Ray actor)
        log.setLevel(logging.INFO)


def log_thread_layout(role: str, concurrent: int | None = None) -> dict[str, Any] | None:
    """Measure and log this process's layout for `role` once (None when already logged); warn once if
    it oversubscribes the CPUs. `concurrent`: processes of this role computing at once (default: Ray's
    actor count for a client, 1 otherwise)."""
    if role in _logged:
        return None
    _logged.add(role)
    if concurrent is None:
        concurrent = ray_concurrent_clients() if role == "client" else 1
    layout = {"role": role, **measure(), "concurrent": concurrent}
    _ensure_handler()
    log.info("%s", format_layout(layout))
    warning = oversubscription(layout)
    if warning:
        log.warning("%s", warning)
    return layout
