"""No work without a cause (issue 30): a round that changed no decoder weight reuses the last round's
answer states, so the server's evaluation of a head-only round is the heads' matmul; any change below
the heads (a LoRA tensor, a frozen weight, in place) recomputes them, and the numbers are those of a
fresh evaluation."""

from __future__ import annotations

import pytest
import torch

from fl_dplora import forward, frozen_prefix, label_head, models
from fl_dplora.config import resolve
from fl_dplora.data import load_task
from fl_dplora.evaluate import evaluate
from fl_dplora.forward import label_token_ids
from fl_dplora.model_loading import load_tokenizer
from fl_dplora.models import get_peft_model


@pytest.fixture(autouse=True)
def fresh_model(monkeypatch, tmp_path):
    monkeypatch.setenv("FL_DPLORA_CACHE", str(tmp_path / "cache"))
    models.forget_cached_model()
    frozen_prefix.clear_memory_cache()
    yield
    frozen_prefix.clear_memory_cache()
    models.forget_cached_model()


def _setup():
    cfg = resolve({"model": "tiny-random-llama", "lora-targets": "q_proj,v_proj", "lora-rank": 4, "lora-layers": 1,
                   "lora-variant": "lora", "loss": "label-words", "label-head": True})
    model = get_peft_model(cfg).eval()
    tok = load_tokenizer(cfg.model.name)
    task = load_task("fin-sentiment")
    ids = label_token_ids(tok, task.label_words)
    head = label_head.install(model, ids.tolist(), *label_head.neutral_stats(int(model.config.hidden_size)))
    with torch.no_grad():
        head.proj.weight.copy_(torch.randn(head.proj.weight.shape, generator=torch.Generator().manual_seed(3)))
    return model, tok, task, task.eval[:20], head


def _score(model, tok, task, examples, keep=True):
    return evaluate(model, tok, task, examples, 64, system_prompt="", prefix_cache="memory", keep_states=keep)


def _counting(monkeypatch) -> list[int]:
    calls = []
    real = forward.final_hidden

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(forward, "final_hidden", counted)
    return calls


def test_a_round_without_changed_weights_reuses_the_states_and_scores_the_same(monkeypatch):
    model, tok, task, examples, head = _setup()
    first = _score(model, tok, task, examples)
    calls = _counting(monkeypatch)
    again = _score(model, tok, task, examples)
    assert calls == [] and again == first  # no decoder pass, the same numbers
    with torch.no_grad():  # a head-only round: the head moved, nothing below it
        head.proj.weight.mul_(-1.0)
    moved = _score(model, tok, task, examples)
    assert calls == [] and moved["loss"] != first["loss"]
    assert moved == _score(model, tok, task, examples, keep=False)  # what a fresh evaluation computes
    assert calls  # (that one ran the decoder)


@pytest.mark.parametrize("which", ["lora_B", "frozen"])
def test_any_change_below_the_heads_recomputes(monkeypatch, which):
    model, tok, task, examples, _ = _setup()
    before = _score(model, tok, task, examples)
    name, param = next((n, p) for n, p in model.named_parameters()
                       if (which in n if which == "lora_B" else ("layers.0." in n and "mlp.up_proj" in n)))
    with torch.no_grad():  # in place: same tensor object, same storage
        param.add_(0.5 * torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
    calls = _counting(monkeypatch)
    after = _score(model, tok, task, examples)
    assert calls, f"{name} changed but the states were reused"
    assert after["loss"] != before["loss"]
    assert after == _score(model, tok, task, examples, keep=False)


def test_the_fingerprint_rehashes_only_the_tensors_that_changed(monkeypatch):
    """A LoRA round must not rehash the frozen model (~0.7 s per client and round on SmolLM2)."""
    model, *_ = _setup()
    blocks = frozen_prefix.decoder_blocks(model)[2]
    start = len(blocks)
    first = frozen_prefix.prefix_fingerprint(model, start)
    hashed = []
    real = frozen_prefix.hashlib.blake2b

    def counting(data=b"", **kwargs):
        hashed.append(len(data))
        return real(data, **kwargs)

    monkeypatch.setattr(frozen_prefix.hashlib, "blake2b", counting)
    lora = next(p for n, p in model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        lora.add_(1.0)
    second = frozen_prefix.prefix_fingerprint(model, start)
    assert second != first
    assert [n for n in hashed if n] == [lora.numel() * lora.element_size()]  # only the changed tensor's bytes


def test_a_head_only_step_indexes_the_shards_rows_instead_of_collating(monkeypatch):
    """~70 ms of collate per whole-shard step (1,900 tweets) x 16 steps x 5 clients was most of a head round."""
    import fl_dplora.train as train
    from fl_dplora.data import encode_all
    from fl_dplora.train import DPSGD, local_train, make_optimizer

    model, tok, task, _, head = _setup()
    cfg = resolve({"model": "tiny-random-llama", "local-steps": 2, "batch-size": 8, "micro-batch-size": 8,
                   "head-learning-rate": 0.1, "optimizer": "adamw"})
    enc = encode_all(tok, task.train[:16], 64, "")
    ids = label_token_ids(tok, task.label_words)
    init = head.proj.weight.detach().clone()

    def run():
        with torch.no_grad():
            head.proj.weight.copy_(init)
        params = [head.proj.weight]
        local_train(model, params, enc, cfg, optimizer=make_optimizer(params, cfg.train, head_params=params),
                    dp=DPSGD(1.0, 0.5, torch.Generator().manual_seed(1)),
                    sampling_generator=torch.Generator().manual_seed(5), pad_id=tok.pad_token_id, label_token_ids=ids)
        return head.proj.weight.detach().clone()

    with monkeypatch.context() as m:
        m.setattr(train, "collate", lambda *a, **k: pytest.fail("a head-only step collated its examples"))
        fast = run()
    with monkeypatch.context() as m:  # the collated path (an answer that is not a label word takes it)
        m.setattr(train, "_head_rows", lambda data, ids: None)
        collated = run()
    assert (fast - init).abs().max() > 1e-3
    assert torch.equal(fast, collated)  # the same numbers, bit for bit
