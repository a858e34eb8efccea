"""Named, versioned experiments: `fl-dplora experiment NAME`.

A spec is a TOML file `experiments/NAME.toml` listing runs (run-config overrides on top of `config`,
optionally expanded by a `matrix` of values). Every run is a real `fl-dplora simulate` subprocess
(the same ClientApp/ServerApp as `flwr run .`); a `zero-shot` run is `fl-dplora evaluate` of the
base model. Each run's output dir is `results/runs/<hash>/`, where the hash covers the resolved run
config, the number of clients and the run kind, so a finished run is never repeated: a sweep can be
stopped and continued, and experiments that share a run (say ffa, eps 8, IID) share its result.

After the runs: `results/NAME/results.json` (one record per run, the numbers every table and plot
is made from), `results.md` and the PNG plots the spec asks for. A spec with `aggregate = ["seed"]`
also gets `cells` there: the runs that differ only in those keys, as mean and standard error.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl_dplora.privacy.modes import MODES
from fl_dplora.write_ahead import read_operator
from fl_dplora.config import (
    LEGACY_VALUES, NON_COMPUTING_KEYS, SCHEMA, SERVER_ONLY_KEYS, ConfigError, resolve, tfns_recipe_defaults,
)

CACHE_VERSION = 1  # bump when a code change makes earlier cached results incomparable
_SPEC_KEYS = {"name", "version", "description", "num-clients", "base", "config", "runs", "plots", "table", "notes",
              "aggregate"}
_RUN_KEYS = {"id", "series", "kind", "config", "matrix", "label"}
# what a spec's [config] sits on: the recipe its committed results were computed with (config.py)
SPEC_BASE = tfns_recipe_defaults()
_PLOT_KINDS = ("line", "rounds", "bar")


@dataclass
class RunSpec:
    id: str
    series: str
    kind: str  # "train" | "zero-shot"
    overrides: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    num_clients: int = 5

    @property
    def hash(self) -> str:
        keep = {k: v for k, v in sorted(self.config.items())  # only what the run computes
                if k not in SERVER_ONLY_KEYS | NON_COMPUTING_KEYS and LEGACY_VALUES.get(k, object()) != v
                and not (k == "population" and v in (0, self.num_clients))}  # = "clients" below
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
    here = Path(__file__).resolve().parent.parent / "experiments"
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
                cfg = resolve({"population": clients, **overrides}, base=SPEC_BASE)  # as `simulate --num-clients` declares it
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


# ----------------------------------------------------------------------------- running
def results_root() -> Path:
    return experiments_dir() / "results"


def run_dir(run: RunSpec) -> Path:
    return results_root() / "runs" / run.hash


def _done(run: RunSpec) -> bool:
    f = run_dir(run) / "summary.json"
    return f.is_file() and json.loads(f.read_text()).get("experiment_hash") == run.hash


def _command(run: RunSpec, out: Path) -> list[str]:
    cli = [sys.executable, "-m", "fl_dplora.cli"]
    # the spec's keys, and those where the recipe it sits on differs from today's defaults
    moved = {k: v for k, v in SPEC_BASE.items() if v != SCHEMA[k].default}
    rc = " ".join(f"{k}={_toml(v)}" for k, v in sorted({**moved, **run.overrides}.items()))
    if run.kind == "zero-shot":
        return [*cli, "evaluate", "--run-config", rc, "--output", str(out / "summary.json")]
    # the runner owns runs/<hash>/: a failed or stale attempt there is replaced
    return [*cli, "simulate", "--num-clients", str(run.num_clients), "--run-config", rc, "--output-dir", str(out),
            "--overwrite"]


def _toml(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (str, bool)) else repr(v)


def _select(exp: Experiment, only: list[str] | None) -> list[RunSpec]:
    selected = [r for r in exp.runs if not only or r.id in only]
    if only and len(selected) != len(set(only)):
        missing = sorted(set(only) - {r.id for r in selected})
        raise ConfigError(f"experiment {exp.name}: no run(s) {', '.join(missing)}; runs: {', '.join(r.id for r in exp.runs)}")
    return selected


def execute(exp: Experiment, *, only: list[str] | None = None, force: bool = False, dry_run: bool = False,
            train: bool = True, log=print) -> list[dict[str, Any]]:
    """Run what is not cached yet (one subprocess per run, a progress line each); return the records."""
    selected = _select(exp, only)
    for i, run in enumerate(selected, 1):
        head = f"[{exp.name} {i}/{len(selected)}] {run.id} ({run.hash})"
        if _done(run) and not force:
            log(f"{head}: cached, {_short(_record(run))}")
            continue
        if not train:
            log(f"{head}: not run yet")
            continue
        if dry_run:
            log(f"{head}: would run: {' '.join(_command(run, run_dir(run))[2:])}")
            continue
        log(f"{head}: running ...")
        seconds = _launch(run, run_dir(run), head)
        log(f"{head}: done in {seconds:.0f} s, {_short(_record(run))}")
    return [_record(r) for r in exp.runs if _done(r)]


def _launch(run: RunSpec, out: Path, head: str) -> float:
    """One run as a subprocess into `out` (summary.json stamped with the run hash); returns its wall time."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)
    t0 = time.time()
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    with open(out / "run.log", "w") as logf:
        proc = subprocess.run(_command(run, out), stdout=logf, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0 or not (out / "summary.json").is_file():
        tail = (out / "run.log").read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"{head} failed (exit {proc.returncode}): {tail[0]} (full log: {out / 'run.log'})")
    summary = json.loads((out / "summary.json").read_text())
    # The runner is the run's operator: its record keeps the byte totals of the operator log
    # (a run's released summary.json does not: they count the clients that took part).
    summary.update({k: v for k, v in read_operator(out)[1].items() if k in ("bytes_up_total", "bytes_down_total")})
    summary["experiment_hash"] = run.hash
    summary["experiment_wall_seconds"] = time.time() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary["experiment_wall_seconds"]


# The numbers a rerun must reproduce: final-eval metrics, privacy spent, bytes uploaded. Not bytes
# down: the server's instructions carry the run config, whose strings (a task file's path) may
# differ between machines without changing what the run computes.
_VERIFIED = (("final_eval", "accuracy"), ("final_eval", "macro_f1"), ("final_eval", "loss"),
             ("final_eval", "perplexity"), ("privacy", "epsilon"), ("privacy", "noise_multiplier"),
             ("bytes_up_total",))


def _verified_numbers(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The _VERIFIED values of a summary, keyed 'final_eval.accuracy' etc. (None where absent)."""
    out = {}
    for path in _VERIFIED:
        value: Any = summary
        for key in path:
            value = value.get(key) if isinstance(value, Mapping) else None
        out[".".join(path)] = value
    return out


def compare_summaries(cached: Mapping[str, Any], fresh: Mapping[str, Any], rel_tol: float = 1e-4) -> list[str]:
    """What differs between two summaries of the same run (empty when the rerun reproduced it)."""
    diffs = []
    new = _verified_numbers(fresh)
    for name, a in _verified_numbers(cached).items():
        b = new[name]
        same = (a == b) if not (isinstance(a, float) and isinstance(b, float)) else \
            math.isclose(a, b, rel_tol=rel_tol, abs_tol=1e-9) or (math.isnan(a) and math.isnan(b))
        if not same:
            diffs.append(f"{name} {a} -> {b}")
    return diffs


def verify(exp: Experiment, *, only: list[str] | None = None, scratch: Path, log=print) -> int:
    """Rerun finished runs into `scratch` (the cache is left alone) and compare with the cached numbers.

    Returns the number of runs whose rerun differs."""
    selected = _select(exp, only)
    checks = []
    for i, run in enumerate(selected, 1):
        head = f"[{exp.name} verify {i}/{len(selected)}] {run.id} ({run.hash})"
        if not _done(run):
            log(f"{head}: not run yet, nothing to verify")
            continue
        log(f"{head}: rerunning ...")
        seconds = _launch(run, scratch / run.hash, head)
        cached = json.loads((run_dir(run) / "summary.json").read_text())
        fresh = json.loads((scratch / run.hash / "summary.json").read_text())
        diffs = compare_summaries(cached, fresh)
        before, after = _verified_numbers(cached), _verified_numbers(fresh)
        checked = {k: v for k, v in before.items() if v is not None}
        checks.append({"id": run.id, "hash": run.hash, "reproduced": not diffs, "differences": diffs,
                       "checked": checked, "rerun": after, "bit_identical": before == after,
                       "rerun_wall_seconds": round(seconds, 1)})
        if diffs:
            log(f"{head}: DIFFERS after {seconds:.0f} s: {'; '.join(diffs)}")
        else:
            log(f"{head}: reproduced in {seconds:.0f} s: {', '.join(f'{k} {v}' for k, v in checked.items())}")
    if checks:  # committed evidence next to the results it vouches for
        out = results_root() / exp.name
        out.mkdir(parents=True, exist_ok=True)
        (out / "verify.json").write_text(json.dumps({
            "command": f"fl-dplora experiment {exp.name} --only {','.join(c['id'] for c in checks)} --verify",
            "date": time.strftime("%Y-%m-%d"), "runs": checks}, indent=2))
    return sum(not c["reproduced"] for c in checks)


def _short(rec: Mapping[str, Any]) -> str:
    parts = []
    if rec.get("accuracy") is not None:
        parts.append(f"acc {rec['accuracy']:.3f}")
    if rec.get("bleu") is not None:
        parts.append(f"bleu {rec['bleu']:.2f}")
    if rec.get("eval_loss") is not None:
        parts.append(f"loss {rec['eval_loss']:.3f}")
    if rec.get("epsilon") is not None:
        parts.append(f"eps {rec['epsilon']:.2f}")
    return ", ".join(parts)


def _record(run: RunSpec) -> dict[str, Any]:
    """The numbers of one finished run, flat, as results.json keeps them."""
    d = run_dir(run)
    s = json.loads((d / "summary.json").read_text())
    fe = s.get("final_eval", {})
    cfg = run.config
    rec: dict[str, Any] = {
        "id": run.id, "series": run.series, "kind": run.kind, "hash": run.hash, "overrides": run.overrides,
        "task": cfg["task"], "dp_mode": cfg["dp-mode"] if run.kind == "train" else None,
        "lora_variant": cfg["lora-variant"] if run.kind == "train" else None,
        "lora_rank": cfg["lora-rank"], "partitioner": cfg["partitioner"], "seed": cfg["seed"],
        "dirichlet_alpha": cfg["dirichlet-alpha"] if cfg["partitioner"] == "dirichlet" else None,
        "target_epsilon": cfg["target-epsilon"] if MODES[cfg["dp-mode"]].unit and run.kind == "train" else None,
        "accuracy": fe.get("accuracy"), "macro_f1": fe.get("macro_f1"), "eval_loss": fe.get("loss"),
        "perplexity": fe.get("perplexity"), "eval_examples": fe.get("num_examples"),
        "majority_rate": fe.get("majority_rate"),  # always answering the most frequent label (None: older runs)
        "bleu": fe.get("bleu"), "rouge_l": fe.get("rouge_l"),  # generation, on the dev part / eval set
        "wall_seconds": round(float(s.get("experiment_wall_seconds", s.get("wall_seconds", 0.0))), 1),
    }
    test = s.get("test_eval")  # data-to-text: the test part, scored once at the end of the run
    if test:
        rec.update({"test_bleu": test.get("bleu"), "test_bleu_se": test.get("bleu_se"), "test_rouge_l": test.get("rouge_l"),
                    "test_rouge_l_se": test.get("rouge_l_se"), "test_loss": test.get("loss"),
                    "test_inputs": test.get("num_inputs"), "test_samples": test.get("samples", []),
                    "test_generations": test.get("generations")})
    if run.kind == "train":
        priv = s["privacy"]
        rounds = int(s["rounds"])
        up, down = s["bytes_up_total"], s["bytes_down_total"]  # the runner's copy of the operator log's totals
        rec.update({
            "epsilon": priv.get("epsilon"), "delta": priv.get("delta") if MODES[cfg["dp-mode"]].unit else None,
            "noise_multiplier": priv.get("noise_multiplier"), "rounds": rounds,
            "num_clients": run.num_clients,
            "examples_processed": run.num_clients * rounds * cfg["local-steps"] * cfg["batch-size"],
            "trainable_params": s["trainable_params"], "bytes_up_total": up, "bytes_down_total": down,
            "bytes_up_per_client_round": up / max(1, rounds * run.num_clients),
            "pct_full_model": 100.0 * up / max(1, rounds * run.num_clients) / s["full_model_bytes"],
        })
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
        rec["per_round"] = [{"round": r["round"], "accuracy": r.get("eval_accuracy"), "macro_f1": r.get("eval_macro_f1"),
                             "eval_loss": r.get("eval_loss"), "epsilon": r.get("epsilon")} for r in rows]
    else:
        rec.update({"epsilon": None, "rounds": 0, "examples_processed": 0})
    return rec


# ----------------------------------------------------------------------------- reporting
_COLUMNS = {
    "id": ("run", "{}"), "series": ("variant", "{}"), "task": ("task", "{}"), "dp_mode": ("dp-mode", "{}"),
    "lora_variant": ("adapter", "{}"), "lora_rank": ("rank", "{}"), "partitioner": ("partition", "{}"),
    "dirichlet_alpha": ("alpha", "{}"), "target_epsilon": ("target eps", "{}"), "epsilon": ("eps spent", "{:.2f}"),
    "noise_multiplier": ("sigma", "{:.3f}"), "accuracy": ("accuracy", "{:.1%}"), "macro_f1": ("macro-F1", "{:.3f}"),
    "eval_loss": ("eval loss", "{:.3f}"), "perplexity": ("ppl", "{:.2f}"), "examples_processed": ("examples", "{:,}"),
    "trainable_params": ("trainable", "{:,}"), "bytes_up_per_client_round": ("bytes up/client/round", "{:,.0f}"),
    "bytes_up_total": ("bytes up total", "{:,}"), "pct_full_model": ("% of model", "{:.3f}%"),
    "wall_seconds": ("wall s", "{:.0f}"), "rounds": ("rounds", "{}"), "seed": ("seed", "{}"),
    "majority_rate": ("majority", "{:.1%}"), "bleu": ("dev BLEU", "{:.2f}"), "rouge_l": ("dev ROUGE-L", "{:.4f}"),
    "test_bleu": ("test BLEU", "{:.2f}"), "test_bleu_se": ("±SE (bootstrap)", "{:.2f}"),
    "test_rouge_l_se": ("±SE", "{:.4f}"), "test_rouge_l": ("test ROUGE-L", "{:.4f}"), "test_loss": ("test loss", "{:.3f}"),
}
DEFAULT_TABLE = ["id", "dp_mode", "target_epsilon", "epsilon", "accuracy", "macro_f1", "eval_loss", "wall_seconds"]


def _cell(rec: Mapping[str, Any], col: str) -> str:
    v = rec.get(col)
    if v is None:
        return "∞" if col in ("target_epsilon", "epsilon") and rec.get("kind") == "train" else "–"
    try:
        return _COLUMNS.get(col, (col, "{}"))[1].format(v)
    except (ValueError, TypeError):
        return str(v)


# ----------------------------------------------------------------------------- cells (spec key `aggregate`)
# What a cell reports as mean and standard error over its runs; what identifies it (kept where all its
# runs agree, None where they do not).
CELL_METRICS = ("accuracy", "macro_f1", "eval_loss", "perplexity", "epsilon", "noise_multiplier", "majority_rate",
                "bleu", "rouge_l", "test_bleu", "test_rouge_l", "test_loss")
_CELL_FIELDS = ("series", "kind", "task", "dp_mode", "lora_variant", "lora_rank", "partitioner", "dirichlet_alpha",
                "target_epsilon", "seed", "delta", "num_clients", "rounds", "eval_examples", "examples_processed",
                "trainable_params", "bytes_up_total", "bytes_up_per_client_round", "pct_full_model")
_WITH_N = ("accuracy", "macro_f1")  # rendered "mean ± SE (n)"


def mean_se(values: list[Any]) -> tuple[float | None, float | None]:
    """Mean and standard error (sample std / sqrt(n)) of the values that are not None; SE None for n < 2."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    return mean, (statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else None)


def _cell_key(rec: Mapping[str, Any], keys: list[str]) -> str:
    """What a run computes (as its hash sees it) less the aggregated keys, plus its series and kind."""
    try:
        cfg = resolve(rec.get("overrides", {}), base=SPEC_BASE)
    except ConfigError:  # a record of an older schema: its overrides as they are
        cfg = dict(rec.get("overrides", {}))
    drop = SERVER_ONLY_KEYS | NON_COMPUTING_KEYS | {"population"} | {k.replace("_", "-") for k in keys}
    keep = {k: v for k, v in sorted(cfg.items()) if k not in drop and LEGACY_VALUES.get(k, object()) != v}
    return json.dumps({"series": rec.get("series"), "kind": rec.get("kind"), "config": keep}, sort_keys=True, default=str)


def aggregate_cells(records: list[dict[str, Any]], keys: list[str],
                    metrics: tuple[str, ...] | list[str] = CELL_METRICS) -> list[dict[str, Any]]:
    """Group records that differ only in `keys` (e.g. ["seed"]) into cells, in first-run order.

    Each cell: its identifying fields, `n` (runs present), `ids`, the list of each aggregated key's values
    (`seed: [42, 1, 2]`) and `<metric>_mean` / `<metric>_se` for every metric."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        groups.setdefault(_cell_key(rec, keys), []).append(rec)
    cells = []
    for recs in groups.values():
        cell: dict[str, Any] = {}
        for f in _CELL_FIELDS:
            if f in keys:
                continue
            vals = [r.get(f) for r in recs]
            cell[f] = vals[0] if all(v == vals[0] for v in vals) else None
        cell["n"] = len(recs)
        cell["ids"] = [r["id"] for r in recs]
        for k in keys:
            cell[k] = [r.get(k) for r in recs]
        for m in metrics:
            cell[f"{m}_mean"], cell[f"{m}_se"] = mean_se([r.get(m) for r in recs])
        cells.append(cell)
    return cells


def cell_columns(exp: Experiment) -> list[str]:
    """Columns of the cells table: the spec table's identifying columns, the aggregated keys, its metrics."""
    cols = exp.table or DEFAULT_TABLE
    ident = [c for c in cols if c in _CELL_FIELDS and c not in exp.aggregate]
    if "series" not in ident:
        ident.insert(0, "series")
    metrics = [c for c in cols if c in CELL_METRICS]
    metrics += [m for m in _WITH_N if m not in metrics]
    return ident + list(exp.aggregate) + metrics


def _cell_stat(cell: Mapping[str, Any], col: str) -> str:
    if col in CELL_METRICS:
        mean, se = cell.get(f"{col}_mean"), cell.get(f"{col}_se")
        if mean is None:
            return "∞" if col == "epsilon" and cell.get("kind") == "train" else "–"
        fmt = _COLUMNS.get(col, (col, "{}"))[1]
        text = fmt.format(mean) + (f" ± {fmt.format(se)}" if se is not None else "")
        return text + (f" ({cell.get('n')})" if col in _WITH_N else "")
    if isinstance(cell.get(col), list):  # an aggregated key: its values
        return ", ".join(_cell({col: v}, col) for v in cell[col])
    return _cell(cell, col)


def cell_table(exp: Experiment, cells: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: one row per cell, metrics as mean ± standard error (accuracy, macro-F1: and n)."""
    cols = cell_columns(exp)
    lines = [f"Mean ± standard error (sample std / √n) over {', '.join(exp.aggregate)}; (n) = runs in the cell.", "",
             "| " + " | ".join(_COLUMNS.get(c, (c,))[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    return lines + ["| " + " | ".join(_cell_stat(c, col) for col in cols) + " |" for c in cells]


def markdown(exp: Experiment, records: list[dict[str, Any]], command: str) -> str:
    cols = exp.table or DEFAULT_TABLE
    wall = sum(r["wall_seconds"] for r in records)
    lines = [f"# {exp.name} (spec version {exp.version})", "", exp.description.strip(), "",
             f"Regenerate: `{command}` (runs cached by config hash; {len(records)} runs, {wall / 60:.0f} min of run time here).", ""]
    if exp.aggregate:
        lines += [*cell_table(exp, aggregate_cells(records, exp.aggregate)), "", "Every run:", ""]
    lines += ["| " + " | ".join(_COLUMNS.get(c, (c,))[0] for c in cols) + " |",
             "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r, c) for c in cols) + " |" for r in records]
    lines += _paired_bleu_tests(records)
    lines += _generated_texts(records)
    if exp.notes:
        lines += ["", exp.notes.strip()]
    for p in exp.plots:
        lines += ["", f"![{p.get('title', p['file'])}]({p['file']})"]
    return "\n".join(lines) + "\n"


def _paired_bleu_tests(records: list[dict[str, Any]]) -> list[str]:
    """Generation tasks: each trained run's test BLEU against the zero-shot base model and against the
    no-DP run of its seed, on the same test inputs (paired bootstrap, evaluate.paired_bleu_p_value)."""
    runs = [r for r in records if r.get("test_generations")]
    base = next((r for r in runs if r["kind"] == "zero-shot"), None)
    trained = [r for r in runs if r["kind"] == "train"]
    if not trained:
        return []
    from fl_dplora.data import load_task
    from fl_dplora.evaluate import paired_bleu_p_value

    refs = [list(e.references) for e in load_task(trained[0]["task"], 0).test]
    lines = ["", "## Paired tests on the test part (BLEU difference, paired bootstrap, 1,000 resamples)", "",
             "| run | test BLEU | vs zero-shot | p | vs no DP (same seed) | p |", "|---|---|---|---|---|---|"]
    for r in trained:
        cells = [r["id"], f"{r['test_bleu']:.2f}"]
        nodp = next((x for x in trained if x["target_epsilon"] is None and x["seed"] == r["seed"] and x is not r), None)
        for other in (base, nodp):
            if other is None or len(other["test_generations"]) != len(r["test_generations"]):
                cells += ["–", "–"]
                continue
            p = paired_bleu_p_value(other["test_generations"], r["test_generations"], refs)
            cells += [f"{r['test_bleu'] - other['test_bleu']:+.2f}", f"{p:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _generated_texts(records: list[dict[str, Any]]) -> list[str]:
    """Generation tasks: each run's texts for the same first test inputs (people judge generation by
    reading it), grouped by input."""
    runs = [r for r in records if r.get("test_samples")]
    if not runs:
        return []
    lines = ["", "## Generated texts (test part, the same first inputs in every run)"]
    for i, sample in enumerate(runs[0]["test_samples"]):
        lines += ["", f"**{sample['input'].splitlines()[-1]}**", "", f"- reference: {sample['references'][0]}"]
        lines += [f"- {r['id']}: {r['test_samples'][i]['generated'].strip() if i < len(r['test_samples']) else '–'}"
                  for r in runs]
    return lines


def _xvalue(rec: Mapping[str, Any], key: str) -> Any:
    if key in ("target_epsilon", "epsilon") and rec.get(key) is None:
        return math.inf
    return rec.get(key)


def plot(exp: Experiment, records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for spec in exp.plots:
        kind, y = spec.get("kind", "line"), spec.get("y", "accuracy")
        recs = [r for r in records if r["kind"] == "train" and (not spec.get("series") or r["series"] in spec["series"])]
        fig, ax = plt.subplots(figsize=(6.4, 5.0), dpi=120)
        if kind == "rounds":
            for r in recs:
                pts = [(p["round"], p[y]) for p in r.get("per_round", []) if p.get(y) is not None]
                ax.plot([x for x, _ in pts], [v for _, v in pts], marker="o", label=r["series"] if spec.get("by") == "series" else r["id"])
            ax.set_xlabel(spec.get("xlabel", "round"))
            ax.xaxis.get_major_locator().set_params(integer=True)
        else:
            x = spec.get("x", "target_epsilon")
            # (series, x, y, SE): a spec with `aggregate` plots cell means with SE bars, unless x is aggregated
            if exp.aggregate and x not in exp.aggregate:
                extra = tuple(dict.fromkeys(m for m in (y, x) if m not in CELL_METRICS and (m == y or m not in _CELL_FIELDS)))
                cells = aggregate_cells(recs, exp.aggregate, CELL_METRICS + extra)
                points = [(c["series"], _xvalue({**c, x: c.get(x, c.get(f"{x}_mean"))}, x), c.get(f"{y}_mean"),
                           c.get(f"{y}_se")) for c in cells]
                bars = True
            else:
                points = [(r["series"], _xvalue(r, x), r.get(y), None) for r in recs]
                bars = False
            values = [p[1] for p in points]
            if all(isinstance(v, (int, float)) for v in values):
                xs_all = sorted(set(values), reverse=bool(spec.get("reverse", x in ("target_epsilon", "epsilon"))))
            else:  # names: keep the spec's run order
                xs_all = list(dict.fromkeys(values))
            pos = {v: i for i, v in enumerate(xs_all)}
            categorical = spec.get("categorical", True)
            series = list(dict.fromkeys(p[0] for p in points))
            # side-by-side bars only where several series share an x; one bar per x stays centred
            shared = len({(p[0], p[1]) for p in points}) > len(xs_all)
            width = 0.8 / max(1, len(series)) if shared else 0.6
            for j, s in enumerate(series):
                pts = sorted(((a, b, e) for name, a, b, e in points if name == s and b is not None), key=lambda t: pos[t[0]])
                xs = [pos[a] if categorical else a for a, _, _ in pts]
                ys, errs = [b for _, b, _ in pts], [math.nan if e is None else e for _, _, e in pts]  # n = 1: no bar
                if kind == "bar":
                    offset = (j - (len(series) - 1) / 2) * width if shared else 0.0
                    ax.bar([v + offset for v in xs], ys, width, label=s, **({"yerr": errs, "capsize": 4} if bars else {}))
                elif bars:
                    ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=4, label=s)
                else:
                    ax.plot(xs, ys, marker="o", label=s)
            if categorical:
                ax.set_xticks(range(len(xs_all)), ["∞" if v == math.inf else f"{v:g}" if isinstance(v, float) else str(v) for v in xs_all],
                              rotation=20 if any(isinstance(v, str) and len(v) > 8 for v in xs_all) else 0)
            ax.set_xlabel(spec.get("xlabel", x))
            if spec.get("logy"):
                ax.set_yscale("log")
        for ref in spec.get("references", []):  # horizontal lines: zero-shot, majority class, ...
            val = next((r.get(y) for r in records if r["id"] == ref), None)
            if val is not None:
                ax.axhline(val, linestyle="--", color="grey", linewidth=1)
                ax.annotate(ref, (0.01, val), xycoords=("axes fraction", "data"), fontsize=8, color="grey", va="bottom")
        ax.set_ylabel(spec.get("ylabel", y))
        ax.set_title(spec.get("title", exp.name), fontsize=10)
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if labels:  # below the axes: never over the data
            fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=2, frameon=False)
        fig.tight_layout(rect=(0, 0.06 * ((len(labels) + 1) // 2) if labels else 0, 1, 1))
        path = out_dir / spec["file"]
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def report(exp: Experiment, records: list[dict[str, Any]], command: str) -> Path:
    out = results_root() / exp.name
    out.mkdir(parents=True, exist_ok=True)
    payload = {"experiment": exp.name, "version": exp.version, "description": exp.description, "command": command,
               "spec": str(exp.path.name), "complete": len(records) == len(exp.runs),
               "total_wall_seconds": round(sum(r["wall_seconds"] for r in records), 1)}
    if exp.aggregate:
        payload["aggregate"] = list(exp.aggregate)
        payload["cells"] = aggregate_cells(records, exp.aggregate)
    payload["runs"] = records
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "results.md").write_text(markdown(exp, records, command))
    plot(exp, records, out)
    return out
