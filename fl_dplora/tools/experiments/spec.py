"""Experiment specs: `experiments/NAME.toml` parsed and validated (every run's config resolved), and
each run's cache key (RunSpec.hash: the resolved run config, the number of clients, the run kind)."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl_dplora.checkpoint import ADDED_KEYS
from fl_dplora.config import SCHEMA, SERVER_ONLY_KEYS, ConfigError, RunConfig, resolve, tfns_recipe_defaults

CACHE_VERSION = 1  # bump when a code change makes earlier cached results incomparable
# Keys that change where a run computes, never what (prefix-cache: exact to float rounding): out of the hash.
NON_COMPUTING_KEYS = frozenset({"prefix-cache"})
# A key added to the run config after results were recorded is out of the hash at the value that computes
# what runs did before it existed (checkpoint.ADDED_KEYS, the same table an old checkpoint is migrated with).
LEGACY_VALUES = ADDED_KEYS
_SPEC_KEYS = {"name", "version", "description", "num-clients", "base", "config", "runs", "plots", "table", "notes",
              "aggregate"}
_RUN_KEYS = {"id", "series", "kind", "config", "matrix", "label"}
# what a spec's [config] sits on: the recipe its committed results were computed with (config.py)
SPEC_BASE = tfns_recipe_defaults()
_PLOT_KINDS = ("line", "rounds", "bar")
# A task's name in the cache key: the earlier TFNS protocol was called fin-sentiment when its results
# were computed (they stay matched), and the task now called fin-sentiment (dev/test split) must never
# hit one of them.
_TASK_IN_HASH = {"fin-sentiment-v1": "fin-sentiment", "fin-sentiment": "fin-sentiment/dev-test-split"}


def _in_hash(name: str, value: Any) -> Any:
    """A run-config value as the cache key holds it (a task under the name its results were computed with)."""
    return _TASK_IN_HASH.get(value, value) if name == "task" else value


@dataclass
class RunSpec:
    id: str
    series: str
    kind: str  # "train" | "zero-shot"
    overrides: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)  # the resolved run config as its flat record
    num_clients: int = 5

    @property
    def run_config(self) -> RunConfig:
        """`config` as the typed RunConfig (run.run_config.train.seed)."""
        return RunConfig.from_record(self.config)

    @property
    def hash(self) -> str:
        keep = {k: _in_hash(k, v) for k, v in sorted(self.config.items())  # only what the run computes
                if k not in SERVER_ONLY_KEYS | NON_COMPUTING_KEYS and LEGACY_VALUES.get(k, object()) != v
                and not (k == "population" and v in (0, self.num_clients))}  # = "clients" below
        # audit-canaries left the run config (issue 29; the audit's canaries travel in node configs): every
        # run an experiment trained had it empty, which its hash keeps, so every cached result stays matched
        keep["audit-canaries"] = ""
        blob = json.dumps({"v": CACHE_VERSION, "kind": self.kind, "clients": self.num_clients, "config": keep},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass
class Experiment:
    name: str
    version: int
    description: str
    runs: list[RunSpec]
    plots: list[dict[str, Any]]
    table: list[str]
    notes: str
    path: Path
    aggregate: list[str] = field(default_factory=list)  # record names (seed, lora_rank): runs differing only there = one cell


def experiments_dir() -> Path:
    """`experiments/` of the checkout (FL_DPLORA_EXPERIMENTS overrides, e.g. for tests)."""
    env = os.environ.get("FL_DPLORA_EXPERIMENTS")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[3] / "experiments"  # fl_dplora/tools/experiments/spec.py
    return here if here.is_dir() else Path.cwd() / "experiments"


def available(directory: Path | None = None) -> list[str]:
    d = directory or experiments_dir()
    return sorted(p.stem for p in d.glob("*.toml") if not p.stem.startswith("_"))  # _*.toml: shared bases


def load_spec(name_or_path: str, directory: Path | None = None) -> Experiment:
    """Parse and fully validate a spec (every run's config resolved) before anything runs."""
    d = directory or experiments_dir()
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = d / f"{name_or_path}.toml"
    if not path.is_file():
        names = ", ".join(available(d)) or "none"
        raise ConfigError(f"experiment {name_or_path!r}: no {path} (available: {names})")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    unknown = sorted(set(raw) - _SPEC_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_SPEC_KEYS))}")
    clients = int(raw.get("num-clients", 5))
    common: dict[str, Any] = {}
    if "base" in raw:  # a shared run config (e.g. _base.toml) under this spec's own [config]
        base_path = path.parent / raw["base"]
        try:
            common = dict(tomllib.loads(base_path.read_text()).get("config", {}))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: base {raw['base']!r}: {exc}") from None
    common.update(raw.get("config", {}))
    runs: list[RunSpec] = []
    for i, entry in enumerate(raw.get("runs", [])):
        bad = sorted(set(entry) - _RUN_KEYS)
        if bad:
            raise ConfigError(f"{path}: runs[{i}]: unknown key(s) {', '.join(bad)}; allowed: {', '.join(sorted(_RUN_KEYS))}")
        if "id" not in entry:
            raise ConfigError(f"{path}: runs[{i}] has no id")
        kind = entry.get("kind", "train")
        if kind not in ("train", "zero-shot"):
            raise ConfigError(f"{path}: runs[{i}]: kind must be train or zero-shot, got {kind!r}")
        matrix = entry.get("matrix", {})
        keys = list(matrix)
        for combo in itertools.product(*(matrix[k] if isinstance(matrix[k], list) else [matrix[k]] for k in keys)):
            values = dict(zip(keys, combo))
            fmt = {k.replace("-", "_"): v for k, v in values.items()}
            try:
                run_id = entry["id"].format(**fmt)
                series = entry.get("series", entry["id"]).format(**fmt)
            except KeyError as exc:
                raise ConfigError(f"{path}: runs[{i}]: id/series names {exc} which is not a matrix key") from None
            overrides = {**common, **entry.get("config", {}), **values}
            try:
                cfg = resolve({"population": clients, **overrides}, base=SPEC_BASE).to_record()  # as `simulate --num-clients` declares it
            except ConfigError as exc:
                raise ConfigError(f"{path}: run {run_id}: {exc}") from None
            runs.append(RunSpec(run_id, series, kind, overrides, cfg, clients))
    ids = [r.id for r in runs]
    dup = sorted({x for x in ids if ids.count(x) > 1})
    if dup:
        raise ConfigError(f"{path}: duplicate run id(s) {', '.join(dup)}")
    if not runs:
        raise ConfigError(f"{path}: no runs")
    aggregate = raw.get("aggregate", [])
    if isinstance(aggregate, str):
        aggregate = [aggregate]
    if not isinstance(aggregate, list) or not all(isinstance(k, str) for k in aggregate):
        raise ConfigError(f"{path}: aggregate must be a list of run-config keys, e.g. [\"seed\"]")
    bad = sorted(k for k in aggregate if k.replace("_", "-") not in SCHEMA)
    if bad:
        raise ConfigError(f"{path}: aggregate: {', '.join(bad)} is not a run-config key")
    plots = list(raw.get("plots", []))
    for p in plots:
        if p.get("kind", "line") not in _PLOT_KINDS or "file" not in p:
            raise ConfigError(f"{path}: each plot needs file and kind in {', '.join(_PLOT_KINDS)}: {p}")
    return Experiment(raw.get("name", path.stem), int(raw.get("version", 1)), raw.get("description", ""), runs,
                      plots, list(raw.get("table", [])), raw.get("notes", ""), path,
                      list(dict.fromkeys(k.replace("-", "_") for k in aggregate)))



def results_root() -> Path:
    return experiments_dir() / "results"

