"""Run-config parsing and validation: `--run-config` text, presets and config files, each value
type- and range-checked, unknown keys named with a did-you-mean, and the checks across keys.

`resolve_values()` gives the validated flat dict; `fl_dplora.config.resolve()` wraps it in a RunConfig.
"""

from __future__ import annotations

import difflib
import math
import os
import shlex
import time
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fl_dplora.config.schema import PACKAGE_DIR, SCHEMA, ConfigError, Key, defaults



# The defaults before the DP-LoRA data-to-text job became the default (2026-12): the TFNS label-head
# recipe (the fin-sentiment preset) with per-round evaluation. Experiment specs resolve on top of it,
# so a spec that leaves a key out still computes, and hashes, what its committed results did (on the
# earlier TFNS protocol, fin-sentiment-v1, which had no test part).
def tfns_recipe_defaults() -> dict[str, Any]:
    return {**defaults(), **load_preset("fin-sentiment"), "max-new-tokens": 64, "eval-every": 1,
            "task": "fin-sentiment-v1"}



def parse_overrides(text: str | list[str] | tuple[str, ...] | None) -> dict[str, Any]:
    """Parse `--run-config` the way Flower does: "k=v k2=v2" (TOML values, bare strings allowed) or
    the path of a TOML file of key = value. A list (the option given more than once) merges in
    order, later wins."""
    if isinstance(text, (list, tuple)):
        merged: dict[str, Any] = {}
        for item in text:
            merged.update(parse_overrides(item))
        return merged
    out: dict[str, Any] = {}
    if not text:
        return out
    if _is_config_file(text):
        return load_config_file(text.strip(), "run-config")
    for item in shlex.split(text):
        if "=" not in item:
            hint = " (a TOML file goes in a --run-config of its own)" if item.endswith(".toml") else ""
            raise ConfigError(f"run-config: '{item}' is not of the form key=value{hint}")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = raw
    return out


# ---------------------------------------------------------------- presets and run-config files
# A preset is a flat TOML file of run-config keys shipped in fl_dplora/presets/; its first comment
# line is its one-line description (`fl-dplora config --presets`).
PRESETS_DIR = PACKAGE_DIR / "presets"


def _is_config_file(text: str) -> bool:
    # as Flower's parse_config_args, a value ending in .toml is a file; "task=/x/card.toml" stays a pair
    return text.strip().endswith(".toml") and "=" not in text


def _flatten(raw: Mapping[str, Any], parent: str = "") -> dict[str, Any]:
    """Flower's flatten_dict: a [table] becomes dotted keys, which resolve then names as unknown."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = f"{parent}.{key}" if parent else key
        out.update(_flatten(value, name) if isinstance(value, dict) else {name: value})
    return out


def _unknown_key(key: str) -> str:
    close = [k for k in SCHEMA if k.replace("-", "") == key.replace("-", "").replace("_", "")]
    close = close or difflib.get_close_matches(key, SCHEMA, n=1, cutoff=0.6)  # typos: lora-rnak
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{key}: unknown run-config key{hint}"


def load_config_file(path: str | Path, kind: str) -> dict[str, Any]:
    """A TOML file of run-config keys (a preset or a --run-config file). Every unknown key or bad
    value is one line naming the file, so a broken file is caught even where a later source would
    override the value."""
    path = Path(os.path.expanduser(str(path)))
    try:
        with path.open("rb") as f:
            values = _flatten(tomllib.load(f))
    except OSError as exc:
        raise ConfigError(f"{kind}: cannot read {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{kind}: {path} is not valid TOML: {exc}") from None
    problems = []
    for key, value in values.items():
        problem = _unknown_key(key) if key not in SCHEMA else _coerce(key, SCHEMA[key], value)[1]
        if problem:
            problems.append(f"{problem} [in {kind} {path}]")
    if problems:
        raise ConfigError("\n".join(problems))
    return values


def available_presets() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PRESETS_DIR.glob("*.toml"))}


def preset_description(path: Path) -> str:
    """The first line of the file's leading comment."""
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            break
        if line.strip("# \t"):
            return line.strip("# \t")
    return ""


def load_preset(name_or_file: str) -> dict[str, Any]:
    """A packaged preset by NAME, or any NAME.toml file; its keys sit between the defaults and --run-config."""
    if name_or_file.strip().endswith(".toml"):
        return load_config_file(name_or_file.strip(), "preset")
    presets = available_presets()
    if name_or_file not in presets:
        raise ConfigError(f"preset: unknown preset {name_or_file!r}; available: "
                          f"{', '.join(presets) or 'none'} (or the path of a .toml file)")
    return load_config_file(presets[name_or_file], "preset")


def _coerce(name: str, spec: Key, value: Any) -> tuple[Any, str | None]:
    if spec.type is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        if not isinstance(value, bool):
            return value, f"{name}: expected true or false, got {value!r}"
        return value, None
    if spec.type is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = float(value)
    elif spec.type is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    elif spec.type is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, spec.type) or isinstance(value, bool):
        return value, f"{name}: expected {spec.type.__name__}, got {value!r}"
    if spec.type is int and not -(2**63) <= value < 2**63:  # Flower ships ints as int64; torch seeds too
        return value, f"{name}: must fit in a signed 64-bit integer, got {value!r}"
    if spec.type is float and not math.isfinite(value) and name != "target-epsilon":
        return value, f"{name}: must be finite, got {value!r}"
    if spec.choices and value not in spec.choices:
        return value, f"{name}: unknown value {value!r}; choose one of {', '.join(spec.choices)}"
    if spec.min is not None and (value < spec.min or (spec.min_exclusive and value == spec.min)):
        op = ">" if spec.min_exclusive else ">="
        return value, f"{name}: must be {op} {spec.min:g}, got {value!r}"
    if spec.max is not None and value > spec.max:
        return value, f"{name}: must be <= {spec.max:g}, got {value!r}"
    return value, None


def resolve_values(overrides: Mapping[str, Any] | None = None, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Defaults <- base (e.g. Flower's context.run_config) <- overrides, validated: the flat kebab-case
    dict (`fl_dplora.config.resolve` wraps it in a RunConfig). Raises ConfigError."""
    cfg = defaults()
    problems: list[str] = []
    for source in (base or {}, overrides or {}):
        for key, value in source.items():
            if key not in SCHEMA:
                problems.append(_unknown_key(key))
                continue
            cfg[key] = value
    for key, spec in SCHEMA.items():
        cfg[key], problem = _coerce(key, spec, cfg[key])
        if problem:
            problems.append(problem)
    if not problems:
        problems += _cross_checks(cfg)
    if problems:
        raise ConfigError("\n".join(problems))
    return cfg


def _cross_checks(cfg: dict[str, Any]) -> list[str]:
    problems = []
    device = cfg["server-device"]
    if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:") and device[5:].isdigit()):
        problems.append(f"server-device: expected auto, cpu, cuda or cuda:N, got {device!r}")
    targets = [t for t in cfg["lora-targets"].split(",") if t.strip()]
    if not targets:
        problems.append("lora-targets: must name at least one module (e.g. q_proj,v_proj)")
    if cfg["micro-batch-size"] > cfg["batch-size"]:
        problems.append(
            f"micro-batch-size: {cfg['micro-batch-size']} is larger than batch-size {cfg['batch-size']}"
        )
    if cfg["dp-mode"] != "none" and cfg["noise-multiplier"] <= 0 and math.isinf(cfg["target-epsilon"]):
        problems.append("target-epsilon: must be finite when dp-mode is on and noise-multiplier <= 0")
    if cfg["label-head"] and cfg["loss"] != "label-words":
        problems.append("label-head: needs loss = label-words (the head scores the label words)")
    if cfg["dp-mode"] in ("client", "paper") and cfg["population"] < 1:
        problems.append(f"population: dp-mode {cfg['dp-mode']} divides each round's sum by fraction-train x population, "
                        "a public number: set it to the number of clients in the federation")
    if cfg["frozen-dtype"] == "int8" and cfg["lora-layers"] == 0:
        problems.append("frozen-dtype: int8 runs the frozen blocks below the LoRA layers; lora-layers = 0 adapts "
                        "every block, so none would (set lora-layers >= 1)")
    if cfg["frozen-dtype"] == "int8" and cfg["quantization"] != "none":
        problems.append(f"frozen-dtype: int8 quantizes a float base; quantization = {cfg['quantization']} already did")
    if cfg["label-head"] and cfg["dp-mode"] == "paper":
        problems.append("label-head: not with dp-mode = paper (its separate A/B clipping has no part for a head)")
    problems += _secagg_checks(cfg)
    if cfg["dp-mode"] != "none" and cfg["delta"] >= 0.1:
        problems.append(f"delta: {cfg['delta']:g} is far too large for DP (use << 1/number of records)")
    return problems


def _secagg_checks(cfg: dict[str, Any]) -> list[str]:
    if cfg["client-noise"] == "distributed" and not (cfg["secure-aggregation"] and cfg["dp-mode"] == "client"):
        return ["client-noise: distributed needs dp-mode = client and secure-aggregation = true "
                "(each share is too small to protect an update the server could see alone)"]
    if not cfg["secure-aggregation"]:
        return ["secagg-dropout-rate: only with secure-aggregation = true"] if cfg["secagg-dropout-rate"] > 0 else []
    if cfg["dp-mode"] not in ("client", "none"):
        return [f"secure-aggregation: for dp-mode client or none (dp-mode {cfg['dp-mode']} "
                "needs each client's update on the server)"]
    if cfg["dp-mode"] == "client" and cfg["client-noise"] == "local":
        return ["secure-aggregation: with client-noise central or distributed (local noise needs no secure sum)"]
    problems = []
    if cfg["population"] < 2:
        problems.append("secure-aggregation: set population (>= 2), the number of clients in the federation; "
                        "the SecAgg+ modulus must hold the sum of all of them")
    threshold, shares = cfg["secagg-threshold"], cfg["secagg-shares"]
    if threshold == 1:
        problems.append("secagg-threshold: must be >= 2 (0 = automatic)")
    if shares and shares < 3:
        problems.append("secagg-shares: must be >= 3 (0 = every sampled client)")
    if shares and threshold and threshold >= shares:
        problems.append(f"secagg-threshold: {threshold} must be < secagg-shares {shares}")
    if cfg["population"] >= 2 and threshold > cfg["population"]:
        problems.append(f"secagg-threshold: {threshold} is more than the population {cfg['population']}")
    return problems


def resolve_output_dir(output_dir: str | os.PathLike) -> Path:
    """Where a run writes (`cfg.output.output_dir`; empty: a new timestamped folder under ~/fl-dplora/runs).
    Relative paths resolve against the current directory of the process."""
    if not isinstance(output_dir, (str, os.PathLike)):  # the old signature took the whole config mapping
        raise TypeError(f"resolve_output_dir: give the output-dir path, not a {type(output_dir).__name__}")
    raw = os.fspath(output_dir)
    if not raw:
        return Path.home() / "fl-dplora" / "runs" / time.strftime("%Y%m%d-%H%M%S")
    return Path(os.path.expanduser(raw)).resolve()
