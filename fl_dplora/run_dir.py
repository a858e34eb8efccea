"""A run's output folder is never silently reused: an earlier run in it is refused, or replaced on request.

A folder holds a run when any of the files a run writes is there: summary.json, metrics.jsonl, the
checkpoint, the write-ahead log, the operator log, adapter/ or adapters/. Starting a new run (not
`resume`) in such a folder would truncate its metrics and write-ahead log and later replace its
checkpoint and summary: an interrupted run whose `--resume` was forgotten would lose its ledgers.
So it is refused in one line, nothing touched, unless `overwrite` is set; then that run's files
(only those) are deleted first, so that nothing of the old run (a stale checkpoint a later
`--resume` would load) survives next to the new one. `fl-dplora simulate` checks before Ray starts,
the ServerApp checks again (what `flwr run` reaches).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from fl_dplora.config import ConfigError, RunConfig, resolve_output_dir

# what a run writes into its output dir (checkpoint.py, write_ahead.py, server/)
RUN_FILES = ("summary.json", "metrics.jsonl", "checkpoint.pt", "checkpoint.json", "rounds.wal", "operator.jsonl",
             "adapter", "adapters", "metrics.png", "tensorboard")  # the last two: tracking.py
LEFTOVERS = ("summary.json.tmp", "checkpoint.pt.tmp", "checkpoint.json.tmp", "metrics.tmp.png")  # a crash's half-written files
REFUSAL = "use --resume DIR or --overwrite"


def run_files(out_dir: Path) -> list[str]:
    """The names of a run's files present in `out_dir` (empty: no run there)."""
    if not out_dir.is_dir():
        return []
    return [name for name in RUN_FILES if (out_dir / name).exists() or (out_dir / name).is_symlink()]


def refusal(out_dir: Path, found: list[str]) -> str:
    return (f"output-dir: {out_dir} already holds a run ({', '.join(found)}); {REFUSAL} "
            "(run-config resume=true or overwrite=true)")


def check_writable_dir(path: Path, flag: str) -> Path:
    """A folder that exists or can be made, and can be written: else one line, nothing made."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag}: {path} is a file, not a folder")
    parent = path
    while not parent.exists():  # the nearest existing ancestor is where the folder would be made
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{flag}: cannot make {path}: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag}: cannot write in {parent} (permission denied)")
    return path


def check_output_dir(cfg: RunConfig) -> Path:
    """Refuse (ConfigError, one line) a new run into a folder holding a run, unless overwrite, or a
    place no folder can be written; touches nothing."""
    out_dir = check_writable_dir(resolve_output_dir(cfg.output.output_dir), "output-dir")
    if cfg.output.resume and cfg.output.overwrite:
        raise ConfigError("overwrite: resume=true continues the run in output-dir, overwrite=true replaces it: give one")
    if cfg.output.resume:
        return out_dir  # continues the run there: checkpoint.load and the config check decide
    found = run_files(out_dir)
    if found and not cfg.output.overwrite:
        raise ConfigError(refusal(out_dir, found))
    return out_dir


def claim_output_dir(cfg: RunConfig) -> Path:
    """check_output_dir, then (overwrite) delete the earlier run's files, and only those."""
    out_dir = check_output_dir(cfg)
    if cfg.output.resume or not cfg.output.overwrite:
        return out_dir
    for name in (*run_files(out_dir), *LEFTOVERS):
        path = out_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    return out_dir
