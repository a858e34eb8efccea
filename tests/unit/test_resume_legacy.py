"""Resuming from a checkpoint written before newer run-config keys existed.

`checkpoint.migrate` (run by `checkpoint.load`) adds a key that the saved config lacks at its
ADDED_KEYS value (what runs computed before the key existed), so `check_resume_config` accepts it; a
missing key without such a value still differs. Unit tests only: no model, no Flower run.
"""

from __future__ import annotations

import pytest

from fl_dplora import checkpoint
from fl_dplora.checkpoint import ADDED_KEYS
from fl_dplora.config import ConfigError, resolve
from fl_dplora.server.run_state import check_resume_config

OLD_KEYS = ("dtype", "quantization", "gradient-checkpointing")


def _current(**overrides):
    return resolve({"model": "tiny-random-llama", "population": 3, **overrides})


def _written_without(cfg, keys):
    """The config a checkpoint written before `keys` existed holds."""
    return {k: v for k, v in cfg.to_record().items() if k not in keys}


def _saved_without(cfg, keys):
    """The config of a checkpoint written before `keys` existed, as checkpoint.load returns it."""
    return checkpoint.migrate({"config": _written_without(cfg, keys)})["config"]


def test_missing_keys_at_legacy_values_resume():
    cfg = _current()
    record = cfg.to_record()
    assert all(record[k] == ADDED_KEYS[k] for k in OLD_KEYS)
    check_resume_config(_saved_without(cfg, OLD_KEYS), cfg)
    # every key ADDED_KEYS knows, missing at once (a checkpoint from before all of them)
    at_legacy = [k for k in ADDED_KEYS if k in record and record[k] == ADDED_KEYS[k]]
    assert set(OLD_KEYS) <= set(at_legacy)
    check_resume_config(_saved_without(cfg, at_legacy), cfg)


def test_missing_key_at_other_value_is_refused():
    cfg = _current(dtype="bfloat16")
    saved = _saved_without(cfg, OLD_KEYS)
    with pytest.raises(ConfigError) as err:
        check_resume_config(saved, cfg)
    lines = str(err.value).splitlines()
    assert len(lines) == 1 and lines[0].startswith("dtype: 'bfloat16' differs from the checkpoint's 'auto'")


def test_missing_key_without_legacy_value_is_refused():
    cfg = _current()
    assert "seed" not in ADDED_KEYS
    with pytest.raises(ConfigError) as err:
        check_resume_config(_saved_without(cfg, ("seed", *OLD_KEYS)), cfg)
    lines = str(err.value).splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"seed: {cfg.train.seed!r} differs from the checkpoint's None")


def test_differing_key_present_in_both_is_refused():
    cfg = _current()
    saved = {**cfg.to_record(), "num-server-rounds": cfg.federation.num_server_rounds + 1}
    with pytest.raises(ConfigError, match=r"^num-server-rounds: "):
        check_resume_config(saved, cfg)
    # a key present in the checkpoint is compared as saved, even at an ADDED_KEYS value
    saved = {**cfg.to_record(), "dtype": "float32"}
    with pytest.raises(ConfigError, match=r"^dtype: 'auto' differs from the checkpoint's 'float32'"):
        check_resume_config(saved, cfg)


def test_legacy_values_read_at_call_time(monkeypatch):
    """A key added to ADDED_KEYS later (e.g. by a newer feature) is honoured without re-import."""
    cfg = _current()
    with pytest.raises(ConfigError, match=r"^seed: "):
        check_resume_config(_saved_without(cfg, ("seed",)), cfg)
    monkeypatch.setitem(checkpoint.ADDED_KEYS, "seed", cfg.train.seed)
    check_resume_config(_saved_without(cfg, ("seed",)), cfg)
    monkeypatch.setattr(checkpoint, "ADDED_KEYS", {**checkpoint.ADDED_KEYS, "seed": cfg.train.seed + 1})
    with pytest.raises(ConfigError, match=r"^seed: "):
        check_resume_config(_saved_without(cfg, ("seed",)), cfg)


def test_a_checkpoint_from_when_audit_canaries_was_a_run_config_key(tmp_path):
    """Checkpoints written before issue 29 carry `audit-canaries` (empty in every run but an audit's):
    loaded without it, so the run resumes; an audit's own run (a canary file there) is refused in one line."""
    cfg = _current()
    checkpoint.save(tmp_path, {"round": 2, "config": {**cfg.to_record(), "audit-canaries": ""}})
    saved = checkpoint.load(tmp_path)["config"]
    assert saved == cfg.to_record()
    check_resume_config(saved, cfg)
    checkpoint.save(tmp_path, {"round": 2, "config": {**cfg.to_record(), "audit-canaries": "/runs/audit/canaries.json"}})
    with pytest.raises(ConfigError) as err:
        checkpoint.load(tmp_path)
    assert len(str(err.value).splitlines()) == 1 and "fl-dplora audit" in str(err.value)


def test_a_fin_sentiment_checkpoint_from_before_the_dev_test_split_resumes_only_as_v1(tmp_path):
    """A fin-sentiment checkpoint without max-test-samples ran the earlier protocol: it is named
    fin-sentiment-v1, so resuming it as today's fin-sentiment (other head statistics, monitored tweets
    and a test part) is refused, and resuming it as fin-sentiment-v1 goes on."""
    old = _written_without(_current(task="fin-sentiment"), ["max-test-samples"])
    checkpoint.save(tmp_path, {"round": 2, "config": old})
    saved = checkpoint.load(tmp_path)["config"]
    assert saved["task"] == "fin-sentiment-v1"
    with pytest.raises(ConfigError) as err:
        check_resume_config(saved, _current(task="fin-sentiment"))
    assert len(str(err.value).splitlines()) == 1 and "task" in str(err.value)
    check_resume_config(saved, _current(task="fin-sentiment-v1"))
    new = _current(task="fin-sentiment")  # written after the split: kept as it is
    checkpoint.save(tmp_path, {"round": 2, "config": new.to_record()})
    assert checkpoint.load(tmp_path)["config"] == new.to_record()
