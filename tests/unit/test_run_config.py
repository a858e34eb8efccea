"""RunConfig (fl_dplora/config/run_config.py): every SCHEMA key is one typed field of one section, the
object is frozen and hashable, it round-trips through the flat kebab-case record, and it is read by attribute
only (`cfg.train.local_steps`; tests/tools/test_layout.py finds string reads of keys anywhere in the package)."""

from __future__ import annotations

import dataclasses
import json
import typing

import pytest

from fl_dplora.config import SCHEMA, SECTIONS, WHERE, ConfigError, RunConfig, defaults, resolve
from fl_dplora.config import run_config as run_config_module


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
        assert getattr(getattr(cfg, section), attr) == record[name]
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


def test_no_mapping_view_hashable_and_equal_by_value():
    """Read by attribute only (issue 29): a string read is a TypeError, a RunConfig is no dict, and
    equal configs hash alike (a cache may key on one)."""
    cfg = resolve({"lora-rank": 8})
    with pytest.raises(TypeError):
        cfg["lora-rank"]  # noqa: B018
    with pytest.raises(TypeError):
        dict(cfg)  # type: ignore[call-overload]
    assert not hasattr(cfg, "get") and not hasattr(RunConfig, "of")
    assert cfg != cfg.to_record()
    same = RunConfig.from_record(cfg.to_record())
    assert same == cfg and hash(same) == hash(cfg) and len({cfg, same}) == 1
    assert cfg.with_values({"lora-rank": 4}) != cfg


def test_validation_happens_in_from_run_config_with_one_line_errors():
    with pytest.raises(ConfigError, match=r"^lora-rnak: unknown run-config key \(did you mean 'lora-rank'\?\)$"):
        RunConfig.from_run_config({"lora-rnak": 4})
    with pytest.raises(ConfigError, match="missing keys"):
        RunConfig.from_record({"seed": 1})


def test_the_python_api_takes_a_runconfig_and_resolve_output_dir_a_path():
    from fl_dplora.cli.run import as_overrides
    from fl_dplora.config import resolve_output_dir

    cfg = resolve({"seed": 3, "output-dir": "/tmp/x"})
    assert as_overrides(cfg) == cfg.to_record() and as_overrides({"seed": 3}) == {"seed": 3}
    assert str(resolve_output_dir(cfg.output.output_dir)) == "/tmp/x"
    with pytest.raises(TypeError, match="give the output-dir path"):
        resolve_output_dir(cfg.to_record())  # type: ignore[arg-type]  # the old signature's argument
