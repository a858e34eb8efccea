"""Run config: defaults (SCHEMA, shipped with the package), parsing, up-front validation, and the
typed RunConfig built from them.

Every knob is a kebab-case key of `[tool.flwr.app.config]`. `resolve()` merges overrides into the
defaults, type- and range-checks every key and rejects unknown keys, so a typo costs one readable
line instead of a model load; it returns a RunConfig (frozen, in sections: `cfg.train.local_steps`).

- `schema.py`: SCHEMA (type, default, allowed values, help of every key), the key sets, ConfigError
- `parse.py`: `--run-config` text, presets and config files, coercion, the checks across keys
- `run_config.py`: RunConfig and its sections, `from_run_config`, `to_record`/`from_record`
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fl_dplora.config.parse import (PRESETS_DIR, available_presets, load_config_file, load_preset,
                                    parse_overrides, preset_description, resolve_output_dir, resolve_values,
                                    tfns_recipe_defaults)
from fl_dplora.config.run_config import (SECTIONS, WHERE, DataConfig, FederationConfig, LoraConfig, ModelConfig,
                                         OutputConfig, PrivacyConfig, RunConfig, SecAggConfig, TrainConfig)
from fl_dplora.config.schema import (DP_MODES, PACKAGE_DIR, SCHEMA, SERVER_ONLY_KEYS, TASKS, ConfigError, Key,
                                     allowed_values, defaults, describe_keys)


def resolve(overrides: Mapping[str, Any] | None = None, base: Mapping[str, Any] | None = None) -> RunConfig:
    """Defaults <- base (e.g. Flower's context.run_config) <- overrides, validated. Raises ConfigError."""
    return RunConfig.from_run_config(overrides, base=base)


__all__ = [
    "DP_MODES", "PACKAGE_DIR", "PRESETS_DIR", "SCHEMA", "SECTIONS",
    "SERVER_ONLY_KEYS", "TASKS", "WHERE", "ConfigError", "DataConfig", "FederationConfig", "Key", "LoraConfig",
    "ModelConfig", "OutputConfig", "PrivacyConfig", "RunConfig", "SecAggConfig", "TrainConfig", "allowed_values",
    "available_presets", "defaults", "describe_keys", "load_config_file", "load_preset",
    "parse_overrides", "preset_description", "resolve", "resolve_output_dir", "resolve_values",
    "tfns_recipe_defaults",
]
