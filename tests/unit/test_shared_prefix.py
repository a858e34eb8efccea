"""Tokens all examples share are computed once in the prefix-cache build, with the same states.

If the shortcut were wrong (positions shifted, the cache's keys/values reused across batches, the
attention mask not covering the shared tokens), every cached state would be a different function of
the example than the model computes, and training would optimise the wrong model. The tests compare
each example's state with the state of that example computed alone by a plain forward (no batch, no
sharing), on tiny LLaMA and GPT-2 (absolute position embeddings), and check that the shortcut really
ran, or that a continuation that disagrees is refused.
"""

from __future__ import annotations

import pytest
import torch

from fl_dplora import frozen_prefix, shared_prefix
from fl_dplora.frozen_prefix import compute_prefix, decoder_blocks
from test_prefix_cache import build, examples, isolated  # noqa: F401 - fixture


class Grabbed(Exception):
    """Stops the plain forward once the state entering blocks[start] is taken."""


def alone(model, e, start: int) -> torch.Tensor:
    """The state entering blocks[start] for one example, by a plain unbatched forward."""
    decoder, _, blocks = decoder_blocks(model)
    got = {}

    def grab(module, args, kwargs):
        got["h"] = args[0] if args else kwargs["hidden_states"]
        raise Grabbed

    handle = blocks[start].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            decoder(input_ids=torch.tensor([e.input_ids]))
    except Grabbed:
        pass
    finally:
        handle.remove()
    return got["h"][0]


def test_common_prefix_length_leaves_every_sequence_a_token():
    assert shared_prefix.common_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3, 4, 9]]) == 3
    assert shared_prefix.common_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2  # not the whole of [1,2,3]
    assert shared_prefix.common_prefix_length([[7, 1], [8, 1]]) == 0
    assert shared_prefix.common_prefix_length([]) == 0


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_shared_tokens_run_once_and_give_each_examples_own_state(which, monkeypatch):
    _, model, _ = build(which, lora_layers=1)
    enc = examples(9)
    shared_len = shared_prefix.common_prefix_length([e.input_ids for e in enc])
    assert shared_len >= shared_prefix.MIN_SHARED_TOKENS  # the chat header + instruction
    runs = []
    real_run = shared_prefix.SharedPrefix.run
    monkeypatch.setattr(shared_prefix.SharedPrefix, "run",
                        lambda self, *a: runs.append(a[1].shape) or real_run(self, *a))
    start = len(decoder_blocks(model)[2]) - 1
    states = compute_prefix(model, enc, start, batch_size=4)
    assert len(runs) >= 3  # every batch (plus the first-batch check) took the shortcut
    for e, s in zip(enc, states):
        assert s.shape == (len(e.input_ids), s.shape[-1])
        torch.testing.assert_close(s, alone(model, e, start), atol=1e-5, rtol=0)


def test_a_continuation_that_disagrees_is_refused(monkeypatch):
    """An architecture whose cache does not continue the full forward (simulated: the shortcut's
    states are shifted) must fall back to the full forward, with the right states."""
    _, model, _ = build("llama", lora_layers=1)
    enc = examples(6)
    real_run = shared_prefix.SharedPrefix.run
    monkeypatch.setattr(shared_prefix.SharedPrefix, "run", lambda self, *a: real_run(self, *a) + 0.01)
    built = []
    real_build = shared_prefix.build
    monkeypatch.setattr(frozen_prefix.shared_prefix, "build", lambda *a: built.append(real_build(*a)) or built[-1])
    start = len(decoder_blocks(model)[2]) - 1
    states = compute_prefix(model, enc, start, batch_size=4)
    assert built == [None]
    for e, s in zip(enc, states):
        torch.testing.assert_close(s, alone(model, e, start), atol=1e-5, rtol=0)
