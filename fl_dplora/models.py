"""The PEFT LoRA wrapper around the base model; one cached copy per worker process.

The base model is the expensive part (SmolLM2's GGUF de-quantizes in seconds; a 7B model in
minutes; model_loading.py loads it), so a process keeps exactly one wrapped model. A new LoRA config
unloads the adapters and re-wraps the same base weights instead of loading them again.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fl_dplora import model_loading
from fl_dplora.config import ConfigError, RunConfig
from fl_dplora.model_loading import TINY_ALIASES, device_for_training, tiny_config


def _base_key(cfg: RunConfig, device: torch.device) -> tuple:
    return (cfg.model.name, cfg.train.seed if cfg.model.name in TINY_ALIASES else None, cfg.model.dtype,
            cfg.model.quantization, cfg.model.revision, cfg.model.trust_remote_code, str(device))


def lora_key(cfg: RunConfig, device: torch.device | None = None) -> tuple:
    return (
        cfg.model.name, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout,
        tuple(cfg.lora.target_modules), cfg.lora.variant, cfg.lora.layers, cfg.train.seed,
        _base_key(cfg, device or device_for_training()), cfg.model.gradient_checkpointing,
    )


def _check_targets(model: nn.Module, cfg: RunConfig) -> None:
    present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in cfg.lora.target_modules if t not in present]
    if missing:
        raise ConfigError(
            f"lora-targets: {', '.join(missing)} not in model {cfg.model.name}; it has e.g. "
            + ", ".join(sorted(n for n in present if "proj" in n or "attn" in n or "fc" in n)[:8])
        )


def check_lora_targets(cfg: RunConfig) -> None:
    """lora-targets against the model's modules, built from its config on the meta device (no
    weights, a few seconds): a typo is refused before Ray or a model load. Where the config cannot
    be read here the check is left to get_peft_model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    name = cfg.model.name
    try:
        if name in ("smollm2-135m", "tiny-random-llama"):  # both LLaMA: the same module names
            config = tiny_config("tiny-random-llama", 32)
        elif name in TINY_ALIASES:
            config = tiny_config(name, 32)
        elif Path(os.path.expanduser(name)).suffix == ".gguf":
            path = Path(os.path.expanduser(name))
            config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        else:
            config = AutoConfig.from_pretrained(name, revision=cfg.model.revision or None,
                                                trust_remote_code=cfg.model.trust_remote_code)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    except Exception:  # noqa: BLE001 - an unreadable config is reported where the model loads
        return
    _check_targets(skeleton, cfg)


_CACHE: dict[str, Any] = {"base_id": None, "key": None, "peft": None, "init": None}


def forget_cached_model() -> None:
    """Empty the process-wide model cache: the next get_peft_model loads the base model afresh. For
    code (tests) that converts or trains the cached model and must not leak that into what runs next."""
    _CACHE.update(base_id=None, key=None, peft=None)


def get_peft_model(cfg: RunConfig, device: torch.device | None = None):
    """The process-wide PEFT model for this config (built once, reused across rounds and clients),
    on `device` (default: the device this process was given, see device_for_training).

    The LoRA init is drawn from `seed`, so the server and every client build the same initial
    A/B; with `lora-variant = ffa` A stays frozen at that init and is never transmitted. LoRA
    factors stay float32 whatever the base dtype (PEFT's autocast_adapter_dtype), so per-example
    gradients, clipping and noise are float32.
    """
    from peft import LoraConfig, get_peft_model as _wrap

    device = device or device_for_training()
    key = lora_key(cfg, device)
    if _CACHE["key"] == key:
        record_frozen_dtype(_CACHE["peft"], cfg)
        return _CACHE["peft"]
    base_id = _base_key(cfg, device)
    if _CACHE["peft"] is not None and _CACHE["base_id"] == base_id:
        base = _CACHE["peft"].unload()  # drop the old adapters, keep the loaded base weights
    else:
        _CACHE.update(peft=None, key=None)
        # through the module: a test that replaces model_loading.load_base_model sees every load
        base = model_loading.load_base_model(cfg.model.name, seed=cfg.train.seed, cfg=cfg, device=device)
    _CACHE.update(base_id=base_id, peft=None, key=None)

    targets = cfg.lora.target_modules
    _check_targets(base, cfg)
    num_layers = int(getattr(base.config, "num_hidden_layers", 0) or 0)
    last = cfg.lora.layers
    # "the last N blocks"; a model with N blocks or fewer is adapted everywhere
    layers = list(range(num_layers - last, num_layers)) if num_layers and 0 < last < num_layers else None
    lora_cfg = LoraConfig(
        layers_to_transform=layers,
        r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules=targets, bias="none", task_type="CAUSAL_LM",
        fan_in_fan_out=getattr(base.config, "model_type", "") == "gpt2",
    )
    if cfg.model.quantization != "none":
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        base.requires_grad_(False)
    # transformers >= 5.x names it activation checkpointing (the gradient_* names warn); older: gradient_*
    new_api = hasattr(base, "activation_checkpointing_enable")
    if cfg.model.gradient_checkpointing:
        # non-reentrant: the LoRA hooks see each factor's output gradient once (privacy/per_sample.py)
        if new_api:
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif getattr(base, "supports_gradient_checkpointing", False):
        # a reused base may have had it on for another config
        base.activation_checkpointing_disable() if new_api else base.gradient_checkpointing_disable()
    # Seed-shared init: A ~ kaiming-uniform from `seed` on every party; B = 0 as usual in LoRA.
    # The init is drawn on the CPU in float32, then moved: every device and dtype gets the same A.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed + 1)
        peft_model = _wrap(base, lora_cfg)
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float().to(device)
    if cfg.lora.variant == "ffa":
        for name, param in peft_model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    _CACHE.update(key=key, peft=peft_model,
                  init={n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n})
    record_frozen_dtype(peft_model, cfg)
    return peft_model


def record_frozen_dtype(model, cfg: RunConfig) -> None:
    """frozen-dtype on the model: every prefix computation of this process (clients' cache build,
    server's evaluation features) reads it there (frozen_prefix.frozen_dtype)."""
    from fl_dplora.frozen_prefix import set_frozen_dtype

    set_frozen_dtype(model, cfg.model.frozen_dtype)


def reset_adapter(peft_model) -> None:
    """Put the cached model's LoRA tensors back to their seed-shared init.

    The process keeps one model, so a second run in the same process (in-process tests,
    experiments) would otherwise start from whatever adapter the previous run left in it.
    """
    if _CACHE["peft"] is not peft_model:
        raise ValueError("reset_adapter: not the model get_peft_model() cached")
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if name in _CACHE["init"]:
                param.copy_(_CACHE["init"][name])


def adapter_parameters(peft_model, cfg: RunConfig) -> dict[str, nn.Parameter]:
    """The transmitted tensors by their PEFT adapter-state-dict key (what `adapter/` stores).

    `lora` sends A and B; `ffa` sends only B (A is seed-shared and frozen).
    """
    out = {}
    for name, param in peft_model.named_parameters():
        if "lora_" not in name:
            continue
        if cfg.lora.variant == "ffa" and "lora_A" in name:
            continue
        out[name.replace(".default", "")] = param
    from fl_dplora import label_head

    head = label_head.get(peft_model)
    if head is not None and cfg.train.label_head:
        out[label_head.HEAD_KEY] = head.proj.weight
    return out


def load_adapter_weights(params: Mapping[str, nn.Parameter], weights: Mapping[str, torch.Tensor]) -> None:
    """Copy `weights` into the adapter parameters `params` (every key of `params` must be in it)."""
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(weights[k])


def round_keys(cfg: RunConfig, server_round: int, params: Mapping[str, Any]) -> list[str]:
    """What travels in a round: the label head alone in a head-only round, else every adapter tensor."""
    from fl_dplora import label_head
    from fl_dplora.train import head_only_round

    if head_only_round(cfg, server_round):
        return [label_head.HEAD_KEY]
    return list(params)


def full_model_stats(peft_model) -> tuple[int, int]:
    """(parameter count, fp32 bytes) of the base model without adapters."""
    n = sum(p.numel() for name, p in peft_model.named_parameters() if "lora_" not in name and "fl_label_head" not in name)
    return n, n * 4

