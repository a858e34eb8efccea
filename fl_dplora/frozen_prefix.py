"""The frozen prefix below the adapter: where it starts, how it computes, its states cached once.

With LoRA only on the last N blocks, blocks 0..L-N-1 are frozen and compute the same hidden states
for an example every time it is seen. `attach_prefix` computes the states entering block L-N once
per example (no grad, eval mode) and keeps them (memory, or a disk cache keyed by the prefix
weights, the split point and the token ids); a batch that carries them runs only the top N blocks,
the final norm and the head at the answer positions (forward.py).

Why it costs no privacy: the cached state is a fixed function of one example and the public frozen
weights (computed in eval mode: a base model's own dropout, if it has any, no longer acts below the
adapter; SmolLM2/LLaMA have none). The loss of an example, and so its per-example gradient, is the same function of the
trainable LoRA values whether the bottom blocks ran now or before; clipping, noise, sampling and
the accountant see the same mechanism. With `frozen-dtype = "int8"` the prefix runs int8 Linear layers
(frozen_int8.py: per-token activation scales, so still a function of that one example), in the
cache build and, with prefix-cache off, in every forward alike. The cache is as private as the data it came from: it stays
on the node that holds that data (the server only caches its public evaluation set).

The model's anatomy (decoder, blocks, head) lives here too: the split point is read from it, and
forward.py builds on this module, never the other way round.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from fl_dplora import shared_prefix
from fl_dplora.data import Encoded, collate

log = logging.getLogger(__name__)
PREFIX_CACHE_MODES = ("off", "memory", "disk")
FROZEN_DTYPES = ("float32", "int8")  # run-config frozen-dtype: how the frozen prefix computes (frozen_int8.py)
FROZEN_DTYPE_ATTR = "fl_frozen_dtype"  # where get_peft_model records it on the model


def frozen_dtype(model: nn.Module) -> str:
    """How `model`'s frozen prefix computes: float32 (the weights' own dtype) or int8 (frozen_int8.py).
    Set from the run config by get_peft_model, so the clients' cache build and the server's
    evaluation features compute alike."""
    return getattr(model, FROZEN_DTYPE_ATTR, "float32")


def set_frozen_dtype(model: nn.Module, name: str) -> None:
    """Record it on the base model: a PEFT wrapper forwards the lookup there, and code holding the
    inner model sees the same value."""
    if name not in FROZEN_DTYPES:
        raise ValueError(f"frozen-dtype: unknown value {name!r}")
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    setattr(inner, FROZEN_DTYPE_ATTR, name)
    if inner is not model and FROZEN_DTYPE_ATTR in vars(model):
        delattr(model, FROZEN_DTYPE_ATTR)


# ------------------------------------------------------------------ model anatomy
def decoder_and_head(model: nn.Module):
    """(inner model, decoder, output head); decoder and head None where the model's own forward must run."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
    head = inner.get_output_embeddings()
    if decoder is None or head is None or getattr(inner.config, "final_logit_softcapping", None):
        return inner, None, None
    return inner, decoder, head


def decoder_blocks(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList] | None:
    """(decoder, attribute name, blocks): the decoder's ModuleList of its transformer blocks."""
    inner, decoder, _ = decoder_and_head(model)
    if decoder is None:
        return None
    depth = getattr(inner.config, "num_hidden_layers", None)
    for name, child in decoder.named_children():
        if isinstance(child, nn.ModuleList) and len(child) == depth:
            return decoder, name, child
    return None


def prefix_start(model: nn.Module) -> int:
    """Index of the first block holding LoRA factors: the blocks before it are a frozen prefix.

    LoRA on the output head is fine (it runs after every block). 0 (nothing to cache) when LoRA
    starts at block 0, sits before the blocks (embeddings), or the blocks cannot be found.
    """
    found = decoder_blocks(model)
    if found is None:
        return 0
    head = decoder_and_head(model)[2]
    after = {id(p) for n, p in head.named_parameters() if "lora_" in n} if head is not None else set()
    lora = {id(p) for n, p in model.named_parameters() if "lora_" in n}
    first, inside = None, set()
    for i, block in enumerate(found[2]):
        ids = {id(p) for n, p in block.named_parameters() if "lora_" in n}
        if ids and first is None:
            first = i
        inside |= ids
    return first if first is not None and inside and inside | after == lora else 0


# ------------------------------------------------------------------ the prefix cache
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_MEMORY: OrderedDict[str, list[torch.Tensor]] = OrderedDict()
_MEMORY_ENTRIES = 16


def prefix_fingerprint(model: nn.Module, start: int) -> str:
    """Hash of everything the prefix computation reads: architecture config and every parameter and
    buffer of the decoder outside blocks[start:]. Weights change -> key changes -> no stale reuse.
    The hash is recomputed whenever a cheap stamp of those tensors (storage, in-place version counter,
    dtype, device, shape) changes, so even an in-place edit of a frozen weight is seen."""
    decoder, name, blocks = decoder_blocks(model)
    top = tuple(f"{name}.{i}." for i in range(start, len(blocks)))
    tensors = sorted(((k, t) for k, t in list(decoder.named_parameters()) + list(decoder.named_buffers())
                      if not k.startswith(top)), key=lambda kv: kv[0])
    stamp = tuple((k, t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape)) for k, t in tensors)
    memo = _FINGERPRINTS.setdefault(blocks, {})
    if start in memo and memo[start][0] == stamp:
        return memo[start][1]
    # each tensor's digest is kept under its own stamp: a round that changes only the LoRA tensors
    # (or resets them in place) rehashes those, not the 135M frozen values (~0.7 s per client round)
    digests = memo.setdefault("tensors", {})
    inner = decoder_and_head(model)[0]
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{type(inner).__name__}:{start}:{inner.config.to_json_string(use_diff=False)}".encode())
    for (key, t), tensor_stamp in zip(tensors, stamp):
        if key not in digests or digests[key][0] != tensor_stamp:
            data = t.detach().to("cpu").contiguous()
            digest = hashlib.blake2b(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"", digest_size=20)
            digests[key] = (tensor_stamp, digest.hexdigest())
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}:{digests[key][1]}".encode())
    memo[start] = (stamp, h.hexdigest())
    return memo[start][1]


class _PrefixDone(Exception):
    """Raised by a hook to stop the forward pass once the prefix state is captured."""


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _capturing(decoder: nn.Module):
    """(pre-hook for blocks[start], capture): capture(input_ids, attention_mask, **decoder_kwargs) runs
    the decoder until the hook's block and returns the hidden state entering it."""
    captured: dict[str, torch.Tensor] = {}

    def grab(module, args, kwargs):
        captured["h"] = _hidden_arg(args, kwargs)
        raise _PrefixDone

    def capture(input_ids, attention_mask, **kwargs) -> torch.Tensor:
        try:
            decoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        except _PrefixDone:
            pass
        return captured.pop("h")

    return grab, capture


@contextmanager
def _prefix_in(model: nn.Module, start: int, dtype: str):
    """blocks[:start] compute in `dtype`: int8 swaps in their quantized copies (frozen_int8.py) for
    the duration; float32 leaves the model as it is."""
    if dtype == "float32":
        yield
        return
    if dtype != "int8":
        raise ValueError(f"frozen-dtype: unknown value {dtype!r}")
    from fl_dplora import frozen_int8

    decoder, name, blocks = decoder_blocks(model)
    copies = frozen_int8.int8_blocks(decoder, blocks, start, prefix_fingerprint(model, start))
    setattr(decoder, name, nn.ModuleList([*copies, *list(blocks)[start:]]))
    try:
        yield
    finally:
        setattr(decoder, name, blocks)
        frozen_int8.release(copies)


def adapter_idle(blocks: Sequence[nn.Module]) -> bool:
    """Every LoRA tensor in `blocks` is an A or B factor and every B is exactly 0: the adapter adds
    exactly nothing there (a head-only round's LoRA at its init). False for other variants (DoRA's
    magnitude rescales the base layer even with B = 0)."""
    named = [(n, p) for b in blocks for n, p in b.named_parameters() if "lora_" in n]
    return all(("lora_A" in n or "lora_B" in n) for n, _ in named) and not any(
        bool(p.detach().any()) for n, p in named if "lora_B" in n)


def int8_top(model: nn.Module, start: int) -> list[nn.Module] | None:
    """int8 copies of blocks[start:] (frozen_int8.int8_blocks, their base layers) when the top blocks
    are frozen too: frozen-dtype int8, no gradient wanted, and every lora_B 0 (they then compute the
    frozen model's function: "the whole frozen model where only a head trains"); else None (float32)."""
    if start <= 0 or frozen_dtype(model) != "int8" or torch.is_grad_enabled():
        return None
    decoder, _, blocks = decoder_blocks(model)
    if not adapter_idle(list(blocks)[start:]):
        return None
    from fl_dplora import frozen_int8

    return frozen_int8.int8_blocks(decoder, blocks, len(blocks), prefix_fingerprint(model, len(blocks)), first=start)


@contextmanager
def _capturing_prefix(model: nn.Module, start: int, dtype: str | None):
    """(decoder, capture) with capture(ids, mask) returning the state entering blocks[start]: eval mode
    (a deterministic function of the example: no dropout) and blocks[:start] in the frozen dtype for
    the duration; the model is left as it was."""
    decoder, _, blocks = decoder_blocks(model)
    grab, capture = _capturing(decoder)
    was_training = model.training
    model.eval()
    handle = blocks[start].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with _prefix_in(model, start, dtype or frozen_dtype(model)):
            yield decoder, capture
    finally:
        handle.remove()
        model.train(was_training)


@torch.no_grad()
def prefix_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int,
                  dtype: str | None = None) -> torch.Tensor:
    """The state entering blocks[start] for one batch [B, T, H] (no grad, eval mode), in the frozen dtype."""
    with _capturing_prefix(model, start, dtype) as (_, capture):
        return capture(input_ids, attention_mask)


@torch.no_grad()
def compute_prefix(model: nn.Module, encoded: Sequence[Encoded], start: int, batch_size: int = 16,
                   progress: bool = False, share_tokens: bool = True, dtype: str | None = None) -> list[torch.Tensor]:
    """The hidden state entering blocks[start] for each example, [T_i, H] float32 on the CPU.

    Examples are batched by length (little padding); padding never changes a real position's state
    (causal attention, right padding), so each state equals the unbatched one up to float rounding.
    Tokens all examples share are run once (shared_prefix.py), checked against the full forward.
    `dtype` (default: the model's frozen dtype, run-config frozen-dtype): float32 or int8.
    """
    from tqdm.auto import tqdm

    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    out: list[torch.Tensor | None] = [None] * len(encoded)
    with _capturing_prefix(model, start, dtype) as (decoder, capture):
        device = next(iter(decoder.parameters())).device
        shared = None
        for s in tqdm(range(0, len(order), batch_size), desc="prefix cache", unit="batch", leave=False,
                      disable=not progress):
            idx = order[s : s + batch_size]
            batch = collate([encoded[i] for i in idx], 0)
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            if s == 0 and share_tokens:  # tokens every example shares (chat header, instruction) run once: shared_prefix.py
                shared = shared_prefix.build(decoder, capture, [e.input_ids for e in encoded], device, (ids, mask))
            hidden = (shared.run(capture, ids, mask) if shared is not None else capture(ids, mask)).float().cpu()
            for j, i in enumerate(idx):
                out[i] = hidden[j, : len(encoded[i].input_ids)].clone()
    return out  # type: ignore[return-value]


def _cache_dir() -> Path:
    return Path(os.environ.get("FL_DPLORA_CACHE", Path.home() / ".cache" / "fl-dplora")) / "prefix"


def data_key(fingerprint: str, encoded: Sequence[Encoded]) -> str:
    """Key of `encoded`'s states: the prefix fingerprint and every token id (train.py keys its answer states with it too)."""
    h = hashlib.blake2b(fingerprint.encode(), digest_size=20)
    for e in encoded:
        h.update(len(e.input_ids).to_bytes(4, "little"))
        h.update(torch.tensor(e.input_ids, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


def features_key(model: nn.Module, encoded: Sequence[Encoded]) -> str | None:
    """Key of the decoder's final states of `encoded`: every decoder weight (LoRA included), the frozen
    dtype and every token id; None when the decoder's blocks cannot be found. A round that changed no
    weight below the heads (a head-only round) finds the states of the round before under it."""
    found = decoder_blocks(model)
    if not found:
        return None
    return f"{data_key(prefix_fingerprint(model, len(found[2])), encoded)}:{frozen_dtype(model)}"


def _load_disk(path: Path, encoded: Sequence[Encoded]) -> list[torch.Tensor] | None:
    try:
        saved = torch.load(path, weights_only=True)
        lengths = [len(e.input_ids) for e in encoded]
        if saved["lengths"].tolist() != lengths:
            return None
        return list(torch.split(saved["states"], lengths))
    except Exception:  # noqa: BLE001 - a damaged or foreign file is recomputed, never trusted
        return None


def _save_disk(path: Path, states: Sequence[torch.Tensor]) -> None:
    try:  # write aside, then rename: a concurrent reader never sees a half-written file
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        torch.save({"lengths": torch.tensor([len(s) for s in states]), "states": torch.cat(list(states))}, tmp)
        os.chmod(tmp, 0o600)  # derived from (possibly private) data: owner-only, like the data
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("prefix cache: cannot write %s (%s); continuing without the disk copy", path, exc)


def attach_prefix(model: nn.Module, encoded: Sequence[Encoded], mode: str, progress: bool = False,
                  ) -> list[Encoded]:
    """`encoded` with each example's cached prefix state attached (computed at most once per key).

    mode: off (full forward every time), memory (this process), disk (also ~/.cache/fl-dplora/prefix,
    or $FL_DPLORA_CACHE, shared by processes and runs). No-op when the model has no frozen prefix.
    """
    if mode not in PREFIX_CACHE_MODES:
        raise ValueError(f"prefix-cache: unknown mode {mode!r}")
    start = prefix_start(model) if mode != "off" and encoded else 0
    if start == 0:
        return [replace(e, prefix=None, prefix_start=0) for e in encoded]
    dtype = frozen_dtype(model)  # int8 states are other numbers: their own key (float32 keys as before)
    fingerprint = prefix_fingerprint(model, start)
    key = data_key(fingerprint if dtype == "float32" else f"{fingerprint}:{dtype}", encoded)
    states = _MEMORY.get(key)
    path = _cache_dir() / f"{key}.pt"
    if states is None and mode == "disk" and path.is_file():
        states = _load_disk(path, encoded)
    if states is None:
        states = compute_prefix(model, encoded, start, progress=progress, dtype=dtype)
        if mode == "disk":
            _save_disk(path, states)
    _MEMORY[key] = states
    _MEMORY.move_to_end(key)
    while len(_MEMORY) > _MEMORY_ENTRIES:
        _MEMORY.popitem(last=False)
    return [replace(e, prefix=s, prefix_start=start) for e, s in zip(encoded, states)]


def clear_memory_cache() -> None:
    _MEMORY.clear()
