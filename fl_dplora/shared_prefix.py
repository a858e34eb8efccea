"""Tokens every example shares are computed once when the frozen-prefix cache is built.

A classification task renders every example as chat header + instruction + text: on TFNS with
SmolLM2 the first 25 of ~58 prompt tokens are the same for all tweets. Under causal attention those
positions' states never depend on what follows, so `compute_prefix` runs them once (keeping their
keys/values) and each batch runs only its own tokens on top: ~40 % fewer tokens through blocks
0..L-N-1, the part of a run that costs most (docs/prefix-cache.md, docs/performance.md).

Not every architecture continues a cache the way a full forward computes (sliding windows, caches
that ignore the attention mask): the first batch is computed both ways and the shortcut is used
only if they agree to float rounding; otherwise the build silently takes the full path.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)
MIN_SHARED_TOKENS = 4  # below this, the extra cache bookkeeping costs more than it saves
TOLERANCE = 1e-3  # max |shared - full| relative to the states' scale: float rounding, not a bug


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix all sequences share, leaving each at least one own token."""
    if not sequences:
        return 0
    shortest = min(len(s) for s in sequences)
    first = sequences[0]
    n = 0
    while n < shortest - 1 and all(s[n] == first[n] for s in sequences):
        n += 1
    return n


def _cache_kwarg(decoder: nn.Module) -> str:
    # transformers >= 5.24 names it `cache` (`past_key_values` deprecated); earlier releases the latter
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


class SharedPrefix:
    """The shared tokens' states entering blocks[start] and their keys/values in blocks 0..start-1.

    `run(capture, ids, mask)` = what `capture` would return for the full batch, computing only the
    batch's own tokens. `capture(input_ids, attention_mask, **decoder_kwargs)` runs the decoder up to
    blocks[start] and returns the state entering it.
    """

    def __init__(self, decoder: nn.Module, capture: Callable[..., torch.Tensor], ids: Sequence[int], device):
        from transformers import DynamicCache

        self.length = len(ids)
        self.kwarg = _cache_kwarg(decoder)
        self.cache = DynamicCache(config=decoder.config)
        prompt = torch.tensor([list(ids)], device=device)
        self.state = capture(prompt, torch.ones_like(prompt), **{self.kwarg: self.cache}, use_cache=True)[0]

    def run(self, capture, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        rows, n = input_ids.shape[0], self.length
        past = copy.deepcopy(self.cache)  # a forward appends to the cache: each batch gets its own
        past.batch_repeat_interleave(rows)
        own = capture(input_ids[:, n:], attention_mask, **{self.kwarg: past}, use_cache=True)
        return torch.cat([self.state.to(own.dtype).expand(rows, -1, -1), own], dim=1)


def build(decoder: nn.Module, capture, encoded_ids: Sequence[Sequence[int]], device,
          first_batch: tuple[torch.Tensor, torch.Tensor]) -> SharedPrefix | None:
    """A SharedPrefix for these examples, or None (too few shared tokens, or an architecture whose
    cached continuation does not reproduce the full forward on `first_batch`)."""
    n = common_prefix_length(encoded_ids)
    if n < MIN_SHARED_TOKENS:
        return None
    try:
        shared = SharedPrefix(decoder, capture, encoded_ids[0][:n], device)
        ids, mask = first_batch
        full = capture(ids, mask)
        fast = shared.run(capture, ids, mask)
    except Exception as exc:  # noqa: BLE001 - an architecture without a continuable cache: full path
        log.info("prefix cache: shared-token shortcut unavailable (%s: %s); full forward", type(exc).__name__, exc)
        return None
    real = mask.bool()
    scale = full[real].abs().max().clamp(min=1.0)
    err = float(((fast - full).abs()[real]).max() / scale) if fast.shape == full.shape else float("inf")
    if err > TOLERANCE:
        log.info("prefix cache: shared-token shortcut differs from the full forward (%.2e); full forward", err)
        return None
    return shared
