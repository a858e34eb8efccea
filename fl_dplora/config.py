"""Run config: defaults (SCHEMA, shipped with the package), parsing, and up-front validation.

Every knob is a kebab-case key of `[tool.flwr.app.config]`. `resolve()` merges overrides into the
defaults, type- and range-checks every key and rejects unknown keys, so a typo costs one readable
line instead of a model load.
"""

from __future__ import annotations

import difflib
import math
import os
import shlex
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent


class ConfigError(ValueError):
    """Bad user input. The message is one line per problem and is shown without a traceback."""


@dataclass(frozen=True)
class Key:
    type: type
    default: Any
    choices: tuple[str, ...] | None = None
    min: float | None = None  # inclusive
    max: float | None = None  # inclusive
    min_exclusive: bool = False
    help: str = ""


TASKS = ("fin-sentiment", "medical-qa", "general-instruct", "data-to-text", "fin-sentiment-v1")
DP_MODES = ("none", "sample", "client", "paper")

# Where the server writes and how it waits: they stay on the server (clients, other organisations'
# machines, get the rest of the run config) and do not change what a run computes.
SERVER_ONLY_KEYS = frozenset({"output-dir", "resume", "overwrite", "checkpoint-every", "round-timeout", "save-every", "server-device",
                              "report-to"})

# Keys added after results were recorded, at the value that computes what runs did before the key
# existed: an experiment's cache hash leaves them out at that value, so older results stay matched.
# prefix-cache changes where the frozen blocks run, never what a run computes (exact to float rounding).
LEGACY_VALUES: dict[str, Any] = {"system-prompt": "auto", "loss": "answer-tokens", "label-head": False,
                                 "head-rounds": 0, "head-local-steps": 16, "head-batch-size": 0,
                                 "head-learning-rate": 0.2, "fraction-evaluate": 0.0,
                                 "revision": "", "trust-remote-code": False, "dtype": "auto",
                                 "quantization": "none", "gradient-checkpointing": False,
                                 "secure-aggregation": False, "secagg-shares": 0, "secagg-threshold": 0, "secagg-dropout-rate": 0.0,
                                 "max-new-tokens": 64, "report-to": "none", "frozen-dtype": "float32",
                                 "max-test-samples": 0}
NON_COMPUTING_KEYS = frozenset({"prefix-cache"})

SCHEMA: dict[str, Key] = {
    "model": Key(str, "smollm2-135m", help="alias (smollm2-135m, tiny-random-llama, tiny-random-gpt2), HF id, local dir or .gguf"),
    "revision": Key(str, "", help="hub model: branch, tag or commit (empty = default branch)"),
    "trust-remote-code": Key(bool, False, help="hub model: run the repository's own Python code"),
    "dtype": Key(str, "auto", choices=("auto", "float32", "bfloat16", "float16"), help="frozen base; auto = bfloat16 on a GPU with it, else float32 (LoRA: float32)"),
    "quantization": Key(str, "none", choices=("none", "8bit", "4bit"), help="bitsandbytes base (4bit = NF4, QLoRA); needs CUDA"),
    "gradient-checkpointing": Key(bool, False, help="recompute blocks in backward: less memory, same gradients"),
    "server-device": Key(str, "auto", help="the server's evaluation model: auto, cpu, cuda, cuda:N"),
    "task": Key(str, "data-to-text", help="built-in task name, task card .toml, hub dataset id or data file"),
    "num-server-rounds": Key(int, 2, min=1, help="federated rounds"),
    "fraction-train": Key(float, 1.0, min=0.0, max=1.0, min_exclusive=True, help="fraction of clients per round (Poisson when dp-mode=client/paper)"),
    "fraction-evaluate": Key(float, 0.0, min=0.0, max=1.0, help="nodes that score the global adapter on their own eval-path (operator log only)"),
    "local-steps": Key(int, 12, min=1, help="optimizer steps per client per round"),
    "batch-size": Key(int, 64, min=1, help="(expected) logical batch size"),
    "micro-batch-size": Key(int, 32, min=1, help="examples per forward/backward; bounds memory, not the math"),
    "learning-rate": Key(float, 3e-2, min=0.0, min_exclusive=True, help="client optimizer learning rate"),
    "optimizer": Key(str, "adamw", choices=("sgd", "adamw"), help="client optimizer (fresh each round)"),
    "momentum": Key(float, 0.9, min=0.0, max=0.999, help="SGD momentum"),
    "lr-schedule": Key(str, "constant", choices=("constant", "cosine", "linear"), help="over all steps of the run"),
    "max-seq-len": Key(int, 128, min=8, help="tokens per example; long prompts lose their middle, never the answer"),
    "system-prompt": Key(str, "", help="auto = the chat template's own; empty = none; other text = that system turn"),
    "loss": Key(str, "answer-tokens", choices=("answer-tokens", "label-words"), help="label-words: softmax over label words (classification); answer-tokens: all answer tokens"),
    "prefix-cache": Key(str, "memory", choices=("off", "memory", "disk"), help="frozen blocks below lora-layers run once per example (disk: in ~/.cache/fl-dplora)"),
    "frozen-dtype": Key(str, "float32", choices=("float32", "int8"), help="int8: the frozen blocks below lora-layers run int8 weights x per-token int8 activations (CPU VNNI; docs/performance.md)"),
    "label-head": Key(bool, False, help="classification: a DP linear probe on the final hidden state"),
    "head-rounds": Key(int, 0, min=0, help="label-head: rounds 1..N train only the head (LP), later ones LoRA and head (FT)"),
    "head-local-steps": Key(int, 16, min=1, help="optimizer steps per client in a head-only round"),
    "head-batch-size": Key(int, 0, min=0, help="(expected) batch size in a head-only round; 0 = the whole shard (q = 1)"),
    "head-learning-rate": Key(float, 0.2, min=0.0, min_exclusive=True, help="learning rate of the label head (any round)"),
    "lora-rank": Key(int, 4, min=1, help="LoRA rank r"),
    "lora-alpha": Key(float, 16.0, min=0.0, min_exclusive=True, help="LoRA scale (update scaled by alpha/r)"),
    "lora-dropout": Key(float, 0.0, min=0.0, max=0.9, help="dropout on the LoRA input"),
    "lora-targets": Key(str, "q_proj,v_proj", help="comma-separated module names"),
    "lora-variant": Key(str, "lora", choices=("lora", "ffa"), help="ffa = FFA-LoRA: A frozen at a seed-shared init, only B trained and sent"),
    "lora-layers": Key(int, 2, min=0, help="adapt only the last N blocks (0 = all): fewer DP-noised values, shorter backward"),
    "dp-mode": Key(str, "sample", choices=DP_MODES, help="what is protected, see Privacy"),
    "target-epsilon": Key(float, 8.0, min=0.0, min_exclusive=True, help="epsilon budget for the whole run"),
    "delta": Key(float, 1e-5, min=0.0, max=1.0, min_exclusive=True, help="delta; must be < 1/records protected"),
    "max-grad-norm": Key(float, 1.0, min=0.0, min_exclusive=True, help="clipping bound C (per example, or per client update)"),
    "noise-multiplier": Key(float, 0.0, help="sigma; <= 0: calibrated from target-epsilon for the whole run"),
    "accountant": Key(str, "prv", choices=("rdp", "prv"), help="Opacus accountant; PRV is tighter"),
    "population": Key(int, 0, min=0, help="client/paper/SecAgg+: the declared number of clients (public)"),
    "client-noise": Key(str, "central", choices=("central", "local", "distributed"), help="client: noise on the server's sum, on each client, or shared over the secure sum"),
    "secure-aggregation": Key(bool, False, help="client/none: SecAgg+, the server unmasks only the sum"),
    "secagg-shares": Key(int, 0, min=0, help="SecAgg+ shares per client (0 = all sampled)"),
    "secagg-threshold": Key(int, 0, min=0, help="SecAgg+: fewest survivors a round is unmasked with (0 = 2/3 of expected)"),
    "secagg-dropout-rate": Key(float, 0.0, min=0.0, max=1.0, help="SecAgg+: declared dropout chance per round"),
    "partitioner": Key(str, "iid", choices=("iid", "dirichlet"), help="flwr-datasets partitioner"),
    "dirichlet-alpha": Key(float, 0.5, min=0.0, min_exclusive=True, help="label skew (smaller = more skewed)"),
    "max-train-samples": Key(int, 2000, min=0, help="cap on the training pool before partitioning (0 = all)"),
    "max-eval-samples": Key(int, 100, min=0, help="central eval examples (0 = all)"),
    "max-test-samples": Key(int, 0, min=0, help="test part (data-to-text, fin-sentiment) scored once at the end: the first N (0 = all)"),
    "max-new-tokens": Key(int, 48, min=1, help="generation: greedy tokens per input (BLEU, ROUGE-L)"),
    "eval-every": Key(int, 0, min=0, help="central evaluation every N rounds (0 = only at the end)"),
    "transfer-dtype": Key(str, "float32", choices=("float32", "bfloat16", "float16"), help="adapter dtype on the wire (after noise)"),
    "min-available": Key(int, 1, min=1, help="fewest good replies needed to aggregate a round"),
    "round-timeout": Key(float, 3600.0, min=1.0, help="seconds to wait for replies"),
    "seed": Key(int, 42, help="data partition, LoRA init, reproducible runs"),
    "secure-rng": Key(bool, True, help="DP sampling/noise from OS entropy; false = from seed (reproducible, not private)"),
    "checkpoint-every": Key(int, 1, min=0, help="a resumable checkpoint every N rounds (0 = never)"),
    "save-every": Key(int, 0, min=0, help="also save adapters/round-<N>/ every N rounds (0 = only adapter/)"),
    "report-to": Key(str, "none", choices=("none", "tensorboard", "wandb", "mlflow"), help="log round metrics and epsilon there too"),
    "resume": Key(bool, False, help="continue the interrupted run in output-dir"),
    "overwrite": Key(bool, False, help="replace a run in output-dir"),
    "output-dir": Key(str, "", help="empty = ~/fl-dplora/runs/<timestamp>"),
}


def defaults() -> dict[str, Any]:
    """The default run config: SCHEMA's defaults, shipped with the package (a wheel runs the same
    recipe as the source tree). pyproject's `[tool.flwr.app.config]`, which `flwr run .` reads, is
    checked equal to it key by key (tests/e2e/test_presets.py)."""
    return {k: v.default for k, v in SCHEMA.items()}


# The defaults before the DP-LoRA data-to-text job became the default (2026-12): the TFNS label-head
# recipe (the fin-sentiment preset) with per-round evaluation. Experiment specs resolve on top of it,
# so a spec that leaves a key out still computes, and hashes, what its committed results did (on the
# earlier TFNS protocol, fin-sentiment-v1, which had no test part).
def tfns_recipe_defaults() -> dict[str, Any]:
    return {**defaults(), **load_preset("fin-sentiment"), "max-new-tokens": 64, "eval-every": 1,
            "task": "fin-sentiment-v1"}


def allowed_values(spec: Key) -> str:
    if spec.choices:
        return " / ".join(spec.choices)
    if spec.type is bool:
        return "true / false"
    parts = []
    if spec.min is not None:
        parts.append(f"{'>' if spec.min_exclusive else '>='} {spec.min:g}")
    if spec.max is not None:
        parts.append(f"<= {spec.max:g}")
    return ", ".join(parts) or {int: "integer", float: "number"}.get(spec.type, "text")


def describe_keys(markdown: bool = False) -> str:
    """Every run-config key with its default, allowed values and help."""
    defaults_ = defaults()
    show = lambda v: str(v).lower() if isinstance(v, bool) else (f'"{v}"' if isinstance(v, str) else f"{v:g}" if isinstance(v, float) else str(v))
    if markdown:
        rows = ["| key | default | allowed | what it does |", "|---|---|---|---|"]
        rows += [f"| `{k}` | `{show(defaults_[k])}` | {allowed_values(spec)} | {spec.help.replace('|', '/')} |"
                 for k, spec in SCHEMA.items()]
        return "\n".join(rows)
    width, dwidth = max(map(len, SCHEMA)), min(16, max(len(show(defaults_[k])) for k in SCHEMA))
    return "\n".join(f"{k:<{width}}  {show(defaults_[k]):<{dwidth}}  [{allowed_values(spec)}]  {spec.help}"
                     for k, spec in SCHEMA.items())


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


def resolve(overrides: Mapping[str, Any] | None = None, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Defaults <- base (e.g. Flower's context.run_config) <- overrides, validated. Raises ConfigError."""
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


def lora_targets(cfg: Mapping[str, Any]) -> list[str]:
    return [t.strip() for t in str(cfg["lora-targets"]).split(",") if t.strip()]


def resolve_output_dir(cfg: Mapping[str, Any]) -> Path:
    """Where a run writes. Relative paths resolve against the current directory of the process."""
    raw = str(cfg.get("output-dir", "") or "")
    if not raw:
        return Path.home() / "fl-dplora" / "runs" / time.strftime("%Y%m%d-%H%M%S")
    return Path(os.path.expanduser(raw)).resolve()
