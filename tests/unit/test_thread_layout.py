"""The thread layout a process logs (fl_dplora/thread_layout.py): measured from torch and the OS, logged
once per process and role, read back by `fl-dplora bench round-overhead`, and the oversubscription
warning's arithmetic. The same lines from a real Ray run: tests/e2e/test_thread_layout_ray.py."""

from __future__ import annotations

import logging

import pytest
import torch

from fl_dplora import thread_layout
from fl_dplora.thread_layout import format_layout, log_thread_layout, oversubscription, parse_layout_lines


@pytest.fixture
def fresh(monkeypatch):
    """A process that has logged no layout yet."""
    monkeypatch.setattr(thread_layout, "_logged", set())


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    @property
    def text(self) -> str:
        return "\n".join(r.getMessage() for r in self.records)


@pytest.fixture
def logged():
    """The layout logger's records (attached to it directly: whatever the propagate flags above it say)."""
    handler, logger = _Records(), thread_layout.log
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
def threads():
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


def _layout(**kw):
    return {"role": "client", "pid": 7, "torch_threads": 1, "interop_threads": 1, "OMP_NUM_THREADS": "unset",
            "MKL_NUM_THREADS": "unset", "affinity_cpus": 2, "cpu_count": 2, "concurrent": 1, **kw}


def test_the_logged_layout_is_what_torch_runs_with(fresh, threads, logged):
    torch.set_num_threads(1)
    layout = log_thread_layout("client", concurrent=1)
    assert layout["torch_threads"] == 1 and layout["interop_threads"] == torch.get_num_interop_threads()
    [row] = parse_layout_lines(logged.text)
    assert row == {**layout, "OMP_NUM_THREADS": _as_logged(layout["OMP_NUM_THREADS"]),
                   "MKL_NUM_THREADS": _as_logged(layout["MKL_NUM_THREADS"])}
    assert row["torch_threads"] == 1 and row["role"] == "client"


def _as_logged(v: str):
    return int(v) if v.isdigit() else v


def test_logged_once_per_process_and_role(fresh, logged):
    assert log_thread_layout("server") is not None
    assert log_thread_layout("server") is None
    assert log_thread_layout("client", concurrent=1) is not None
    assert [r["role"] for r in parse_layout_lines(logged.text)] == ["server", "client"]


def test_a_ray_prefixed_line_parses():
    line = "\x1b[36m(ClientAppActor pid=895)\x1b[0m 12/07/2026 18:47:10:INFO:" + format_layout(
        _layout(pid=895, OMP_NUM_THREADS="2", torch_threads=2))
    assert parse_layout_lines("noise\n" + line + "\nmore") == [_layout(pid=895, OMP_NUM_THREADS=2, torch_threads=2)]


def test_oversubscription_is_threads_times_concurrent_over_cpus():
    assert oversubscription(_layout(torch_threads=2, concurrent=1)) is None  # Ray's default here: 1 client x 2
    assert oversubscription(_layout(torch_threads=1, concurrent=2)) is None  # --num-cpus 1: 2 clients x 1
    warn = oversubscription(_layout(torch_threads=2, concurrent=2))
    assert "2 clients at once x 2 torch threads = 4 > 2 CPUs" in warn and "OMP_NUM_THREADS=1" in warn
    warn = oversubscription(_layout(role="server", torch_threads=4))
    assert "4 torch threads > 2 CPUs: set OMP_NUM_THREADS=2" in warn and "\n" not in warn


def test_an_oversubscribed_process_warns_once(fresh, logged, threads):
    torch.set_num_threads(2)
    layout = log_thread_layout("client", concurrent=layout_cpus() + 1)
    log_thread_layout("client", concurrent=layout_cpus() + 1)
    warnings = [r for r in logged.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "OMP_NUM_THREADS=1" in warnings[0].getMessage()
    assert layout["concurrent"] == layout_cpus() + 1


def layout_cpus() -> int:
    return thread_layout.measure()["affinity_cpus"]


def test_no_ray_means_one_client_at_a_time():
    assert thread_layout.ray_concurrent_clients() == 1  # this process is no Ray actor
