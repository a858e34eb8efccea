"""`fl_dplora.json` beside every saved or exported adapter: the run config it was trained with and
its base model.

A PEFT folder alone does not say enough to rebuild the model it belongs to: `adapter_config.json`
names a base (for a code-built tiny model a placeholder) but not its seed, task, prompt or
sequence length. With this record `fl-dplora evaluate/predict --adapter DIR` needs no other flag,
and an adapter loaded on another base is named in one line instead of PEFT's size-mismatch wall.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fl_dplora.config import SCHEMA, ConfigError, RunConfig, resolve

RECORD = "fl_dplora.json"
# where or how a run was executed, not what its adapter is
RUN_ONLY = ("output-dir", "resume", "overwrite")


def write(folder: str | Path, cfg: RunConfig, base_model: str) -> None:
    config = {k: v for k, v in cfg.to_record().items() if k not in RUN_ONLY}
    record = {"model": cfg.model.name, "base_model": base_model, "config": config}
    (Path(folder) / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def read(folder: str | Path) -> dict[str, Any] | None:
    """The record, or None for an adapter saved before records existed."""
    path = Path(folder) / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError(f"--adapter: {path} is not valid JSON ({exc})") from None
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise ConfigError(f"--adapter: {path} holds no run config")
    return record


def run_config(folder: str | Path, overrides: Mapping[str, Any]) -> RunConfig:
    """The adapter's own config (from its record, else the defaults), `overrides` on top."""
    record = read(folder) or {"config": {}}
    saved = {k: v for k, v in record["config"].items() if k in SCHEMA and k not in RUN_ONLY}
    return resolve({**saved, **dict(overrides)})


def wrong_base(folder: str | Path, model: str) -> str | None:
    """One line when the adapter in `folder` was trained on another model than `model`."""
    record = read(folder)
    if record is not None and record.get("model") and record["model"] != model:
        return f"adapter: {folder} was trained on {record['model']}, not {model}; pass model={record['model']}"
    return None
