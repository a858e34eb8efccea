"""Round checkpoints: everything needed to continue a run as if it had never stopped.

`checkpoint.pt` (owner-only) holds the global adapter, the round, the strategy's RNG states (seeded
runs only: a secure run samples from the OS CSPRNG, which has no state to save), every privacy
ledger the server knows (its own, and each client's as last reported), byte totals and the
config. It is written to a temp file, fsynced and renamed, and `checkpoint.json` next to it records
its SHA-256 and size (written last), so a partial or corrupt file is detected and refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import torch

from fl_dplora.config import ConfigError

CKPT = "checkpoint.pt"
META = "checkpoint.json"
# Keys a checkpoint's config may carry from before they left the run config, with the one value a run
# that continues without them computed the same at. audit-canaries: `fl-dplora audit`'s canaries now
# reach only the canary clients, in their node config (issue 29); every other run saved it empty.
RETIRED_KEYS = {"audit-canaries": ""}
# Keys added to the run config after runs were recorded, at the value that computes what runs did before
# the key existed: a checkpoint written before a key existed gets it at this value on load (`migrate`), and
# an experiment's cache hash leaves a key out at this value, so older results stay matched
# (fl_dplora/tools/experiments/spec.py). A new key that changes nothing at some value goes here with it.
ADDED_KEYS: dict[str, Any] = {"system-prompt": "auto", "loss": "answer-tokens", "label-head": False,
                              "head-rounds": 0, "head-local-steps": 16, "head-batch-size": 0,
                              "head-learning-rate": 0.2, "fraction-evaluate": 0.0,
                              "revision": "", "trust-remote-code": False, "dtype": "auto",
                              "quantization": "none", "gradient-checkpointing": False,
                              "secure-aggregation": False, "secagg-shares": 0, "secagg-threshold": 0,
                              "secagg-dropout-rate": 0.0, "max-new-tokens": 64, "report-to": "none",
                              "frozen-dtype": "float32", "max-test-samples": 0}


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # a leftover from a crash may have other permissions
    # owner-only: the ledgers and the noise generator state (seeded runs) are the operator's
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(out_dir: Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    _atomic_write(out_dir / CKPT, data)
    meta = {"round": state["round"], "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    _atomic_write(out_dir / META, json.dumps(meta).encode())


def load(out_dir: Path) -> dict[str, Any]:
    """The last complete checkpoint of `out_dir`; ConfigError (one line) if missing or damaged."""
    path, meta_path = out_dir / CKPT, out_dir / META
    if not path.is_file() or not meta_path.is_file():
        raise ConfigError(f"resume: no checkpoint in {out_dir} (expected {CKPT} and {META})")
    data = path.read_bytes()
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"resume: {meta_path} is damaged ({exc.msg}); refusing to resume") from exc
    if len(data) != meta.get("bytes") or hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise ConfigError(
            f"resume: {path} is truncated or corrupt ({len(data)} bytes, expected {meta.get('bytes')}; "
            "sha256 mismatch); refusing to resume"
        )
    return migrate(torch.load(io.BytesIO(data), weights_only=True))


def migrate(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint written before a RETIRED_KEYS key left the run config: the key dropped at its
    retired value; at another value (an audit's own run, whose canaries a resume would not plant) the
    resume is refused in one line. A fin-sentiment run from before the dev/test split is named by the
    task it ran, fin-sentiment-v1 (resuming it as today's fin-sentiment would change its head statistics,
    monitored tweets and test part). A key the checkpoint lacks (written before the key existed) is
    added at its ADDED_KEYS value, the one its run computed with; a missing key without one stays
    missing (a resume refuses it: server/run_state.check_resume_config)."""
    config = state.get("config")
    if isinstance(config, dict):
        for key, value in RETIRED_KEYS.items():
            if key in config and config[key] != value:
                raise ConfigError(f"resume: the checkpoint is of an `fl-dplora audit` run ({key} = {config[key]!r}); "
                                  "an audit is not resumed: run fl-dplora audit again")
            config.pop(key, None)
        # written before fin-sentiment gained its dev/test split (the same change added max-test-samples):
        # the run was on the earlier protocol, which is now called fin-sentiment-v1
        if config.get("task") == "fin-sentiment" and "max-test-samples" not in config:
            config["task"] = "fin-sentiment-v1"
        for key, value in ADDED_KEYS.items():  # read now: a test may add a key
            config.setdefault(key, value)
    return state
