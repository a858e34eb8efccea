"""RunConfig (fl_dplora/config/run_config.py): every SCHEMA key is one typed field of one section, the
object is frozen, it round-trips through the flat kebab-case record, and the runtime reads the config by
attribute (`cfg.train.local_steps`), not by string (a ratchet: the count of string reads only goes down)."""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from pathlib import Path

import pytest

from fl_dplora.config import SCHEMA, SECTIONS, WHERE, ConfigError, RunConfig, defaults, resolve
from fl_dplora.config import run_config as run_config_module

PACKAGE = Path(__file__).resolve().parents[2] / "fl_dplora"


def test_every_schema_key_is_exactly_one_section_field_and_back():
    fields = [(section, f.name, f.metadata["key"]) for section, cls in SECTIONS.items()
              for f in dataclasses.fields(cls)]
    keys = [k for _, _, k in fields]
    assert sorted(keys) == sorted(SCHEMA), set(keys) ^ set(SCHEMA)
    assert len(keys) == len(set(keys))  # no key in two fields
    assert {k: (s, n) for s, n, k in fields} == WHERE
    assert [f.name for f in dataclasses.fields(RunConfig)] == list(SECTIONS)


def test_round_trip_of_every_key():
    cfg = resolve()
    record = cfg.to_record()
    assert list(record) == list(SCHEMA) and record == defaults()
    assert RunConfig.from_record(record) == cfg
    for name, (section, attr) in WHERE.items():
        assert getattr(getattr(cfg, section), attr) == cfg[name] == record[name]
    # a non-default value for every key travels through the record and back to the same field
    changed = resolve({"lora-rank": 8, "local-steps": 3, "max-grad-norm": 0.5, "secure-rng": False,
                       "output-dir": "/tmp/x", "task": "fin-sentiment"})
    assert (changed.lora.rank, changed.train.local_steps, changed.privacy.max_grad_norm,
            changed.privacy.secure_rng, changed.output.output_dir, changed.data.task) == (8, 3, 0.5, False, "/tmp/x",
                                                                                        "fin-sentiment")
    assert RunConfig.from_record(json.loads(json.dumps(changed.to_record()))) == changed


def test_field_types_match_the_schema():
    cfg = resolve()
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls, vars(run_config_module))
        for f in dataclasses.fields(cls):
            assert hints[f.name] is SCHEMA[f.metadata["key"]].type, (section, f.name)
            assert type(getattr(getattr(cfg, section), f.name)) is hints[f.name], (section, f.name)


def test_frozen_and_read_only():
    cfg = resolve()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.local_steps = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train = cfg.train  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg["local-steps"] = 3  # type: ignore[index]
    assert cfg.with_values({"local-steps": 3}).train.local_steps == 3 and cfg.train.local_steps == 12


def test_mapping_view_for_the_migration():
    cfg = resolve({"lora-rank": 8})
    assert cfg["lora-rank"] == 8 and cfg.get("nope", 1) == 1 and "seed" in cfg and "nope" not in cfg
    assert dict(cfg) == {**cfg} == cfg.to_record() and len(cfg) == len(SCHEMA)
    assert cfg == cfg.to_record() and cfg != {**cfg.to_record(), "lora-rank": 4}
    with pytest.raises(KeyError):
        cfg["nope"]  # noqa: B018
    assert RunConfig.of(cfg) is cfg and RunConfig.of(cfg.to_record()) == cfg


def test_validation_happens_in_from_run_config_with_one_line_errors():
    with pytest.raises(ConfigError, match=r"^lora-rnak: unknown run-config key \(did you mean 'lora-rank'\?\)$"):
        RunConfig.from_run_config({"lora-rnak": 4})
    with pytest.raises(ConfigError, match="missing keys"):
        RunConfig.from_record({"seed": 1})


# ------------------------------------------------------------------------ the ratchet
# A string read of a run-config key: cfg["local-steps"], cfg.get("dp-mode"), self.cfg['seed'], stage["batch-size"],
# saved["config"].get("population"), ... (a write, `overrides["seed"] = 1`, is not a read).
KEY = re.compile(r"""(?:\[|\.get\(|\.pop\()\s*["']([a-z0-9-]+)["'](?!\]\s*=[^=])""")
HOLDS_CONFIG = re.compile(r"""(?:\b(?:cfg|config|run_config|run_cfg|rc|conf|stage|st|overrides|saved|merged|kept)"""
                          r"""|\[["']config["']\])$""")
OUTSIDE = ("config", "tools", "testing")  # the config package itself, the tools wing, the testing namespace
# What is left reads a stored record, not the run: checkpoint.migrate renames an old checkpoint's task, and
# `simulate --resume` takes the federation's size from the checkpoint's config. Lower it; never raise it.
MAX_STRING_READS = 2


def string_reads(text: str) -> list[str]:
    return [m.group(1) for line in text.splitlines() for m in KEY.finditer(line)
            if m.group(1) in SCHEMA and HOLDS_CONFIG.search(line[:m.start()])]


def test_runtime_reads_the_config_by_attribute_not_by_string():
    counts = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.split("/")[0] not in OUTSIDE and (reads := string_reads(path.read_text())):
            counts[rel] = reads
    total = sum(map(len, counts.values()))
    assert total <= MAX_STRING_READS, (
        f"{total} string reads of run-config keys outside fl_dplora/config/ (at most {MAX_STRING_READS}): read "
        f"the typed field instead (cfg.train.local_steps); per file: {counts}")


def test_the_ratchet_sees_string_reads():
    assert string_reads('x = cfg["local-steps"] + self.cfg.get(\'dp-mode\', 0) + int(stage["batch-size"])') == [
        "local-steps", "dp-mode", "batch-size"]
    assert string_reads('n = saved["config"].get("population") or 0') == ["population"]
    assert string_reads('overrides["seed"] = 1; row["loss"]; SCHEMA["delta"]; cfg["not-a-key"]') == []
