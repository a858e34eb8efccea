"""RunConfig: the run config as a frozen, typed object in sections, built and validated once.

    cfg = RunConfig.from_run_config(context.run_config)   # = fl_dplora.config.resolve(...)
    cfg.train.local_steps, cfg.privacy.max_grad_norm, cfg.lora.rank
    cfg.to_record()                                         # the flat kebab-case dict: Flower's wire, JSON, hashes

Every SCHEMA key is exactly one field of one section (the field's metadata names its key). It is read by
attribute only: no mapping view, so a string read of a key (`cfg["local-steps"]`) is a TypeError and
outside fl_dplora/config/ a test (tests/tools/test_layout.py) finds any. Frozen with plain-value fields,
it is hashable and two configs are equal when every value is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fl_dplora.config.parse import resolve_values
from fl_dplora.config.schema import SCHEMA, ConfigError


def key(name: str) -> Any:
    """A section field that holds the run-config key `name`."""
    return field(metadata={"key": name})


@dataclass(frozen=True)
class ModelConfig:
    name: str = key("model")
    revision: str = key("revision")
    trust_remote_code: bool = key("trust-remote-code")
    dtype: str = key("dtype")
    quantization: str = key("quantization")
    gradient_checkpointing: bool = key("gradient-checkpointing")
    frozen_dtype: str = key("frozen-dtype")
    prefix_cache: str = key("prefix-cache")
    server_device: str = key("server-device")


@dataclass(frozen=True)
class LoraConfig:
    rank: int = key("lora-rank")
    alpha: float = key("lora-alpha")
    dropout: float = key("lora-dropout")
    targets: str = key("lora-targets")
    variant: str = key("lora-variant")
    layers: int = key("lora-layers")

    @property
    def target_modules(self) -> list[str]:
        """`targets` split at commas, blanks dropped."""
        return [t.strip() for t in self.targets.split(",") if t.strip()]


@dataclass(frozen=True)
class DataConfig:
    task: str = key("task")
    partitioner: str = key("partitioner")
    dirichlet_alpha: float = key("dirichlet-alpha")
    max_train_samples: int = key("max-train-samples")
    max_eval_samples: int = key("max-eval-samples")
    max_test_samples: int = key("max-test-samples")
    max_seq_len: int = key("max-seq-len")
    system_prompt: str = key("system-prompt")
    max_new_tokens: int = key("max-new-tokens")


@dataclass(frozen=True)
class TrainConfig:
    local_steps: int = key("local-steps")
    batch_size: int = key("batch-size")
    micro_batch_size: int = key("micro-batch-size")
    learning_rate: float = key("learning-rate")
    optimizer: str = key("optimizer")
    momentum: float = key("momentum")
    lr_schedule: str = key("lr-schedule")
    loss: str = key("loss")
    seed: int = key("seed")
    label_head: bool = key("label-head")
    head_rounds: int = key("head-rounds")
    head_local_steps: int = key("head-local-steps")
    head_batch_size: int = key("head-batch-size")
    head_learning_rate: float = key("head-learning-rate")


@dataclass(frozen=True)
class PrivacyConfig:
    dp_mode: str = key("dp-mode")
    target_epsilon: float = key("target-epsilon")
    delta: float = key("delta")
    max_grad_norm: float = key("max-grad-norm")
    noise_multiplier: float = key("noise-multiplier")
    accountant: str = key("accountant")
    client_noise: str = key("client-noise")
    secure_rng: bool = key("secure-rng")


@dataclass(frozen=True)
class SecAggConfig:
    enabled: bool = key("secure-aggregation")
    shares: int = key("secagg-shares")
    threshold: int = key("secagg-threshold")
    dropout_rate: float = key("secagg-dropout-rate")


@dataclass(frozen=True)
class FederationConfig:
    num_server_rounds: int = key("num-server-rounds")
    fraction_train: float = key("fraction-train")
    fraction_evaluate: float = key("fraction-evaluate")
    min_available: int = key("min-available")
    round_timeout: float = key("round-timeout")
    population: int = key("population")
    transfer_dtype: str = key("transfer-dtype")
    eval_every: int = key("eval-every")


@dataclass(frozen=True)
class OutputConfig:
    output_dir: str = key("output-dir")
    resume: bool = key("resume")
    overwrite: bool = key("overwrite")
    checkpoint_every: int = key("checkpoint-every")
    save_every: int = key("save-every")
    report_to: str = key("report-to")


SECTIONS: dict[str, type] = {"model": ModelConfig, "lora": LoraConfig, "data": DataConfig, "train": TrainConfig,
                             "privacy": PrivacyConfig, "secagg": SecAggConfig, "federation": FederationConfig,
                             "output": OutputConfig}
# run-config key -> (section, field)
WHERE: dict[str, tuple[str, str]] = {f.metadata["key"]: (section, f.name)
                                     for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    lora: LoraConfig
    data: DataConfig
    train: TrainConfig
    privacy: PrivacyConfig
    secagg: SecAggConfig
    federation: FederationConfig
    output: OutputConfig

    # ------------------------------------------------------------------ building
    @classmethod
    def from_run_config(cls, overrides: Mapping[str, Any] | None = None,
                        base: Mapping[str, Any] | None = None) -> RunConfig:
        """Defaults <- base (e.g. Flower's context.run_config) <- overrides, validated. Raises ConfigError."""
        return cls.from_record(resolve_values(overrides, base=base))

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> RunConfig:
        """The object from a flat kebab-case dict that holds every key, already validated
        (`to_record()`'s output); a missing or unknown key is a ConfigError."""
        missing, unknown = [k for k in SCHEMA if k not in record], [k for k in record if k not in WHERE]
        if missing or unknown:
            raise ConfigError(f"run config: missing keys {missing}, unknown keys {unknown}")
        parts: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
        for name, value in record.items():
            section, attr = WHERE[name]
            parts[section][attr] = value
        return cls(**{section: SECTIONS[section](**values) for section, values in parts.items()})

    def with_values(self, overrides: Mapping[str, Any]) -> RunConfig:
        """A copy with some kebab-case keys changed, validated again."""
        return RunConfig.from_run_config(overrides, base=self.to_record())

    def to_record(self) -> dict[str, Any]:
        """The flat kebab-case dict, in SCHEMA order: Flower's ConfigRecord, JSON files, hashes."""
        return {name: getattr(getattr(self, WHERE[name][0]), WHERE[name][1]) for name in SCHEMA}
