"""Run-config schema: every key of `[tool.flwr.app.config]` with its type, default, allowed values and
help (SCHEMA, shipped with the package), and the key sets the rest of the project names.

`fl_dplora.config.parse` validates against it; `fl_dplora.config.run_config` is the typed object built from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # fl_dplora/


class ConfigError(ValueError):
    """Bad user input. The message is one line per problem and is shown without a traceback."""


ConfigError.__module__ = "fl_dplora.config"  # tracebacks and the console filter name it where users import it

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
