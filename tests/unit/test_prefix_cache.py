"""The frozen-prefix cache gives the numbers of the full forward pass, and is never reused stale.

With LoRA on the last N blocks only, `frozen_prefix.attach_prefix` computes the state entering the first
adapted block once per example; a batch carrying it runs only the top blocks. If that were off
(padding leaking into the cached states, the cached state fed to the wrong block, a stale cache
after the weights, the data or the truncation changed), training would silently optimise a
different function, and DP-SGD would clip and noise the gradients of the wrong model. These tests
compare the cached path with the full one (losses, per-example gradients, eval logits, a whole DP
local training run) and exercise the cache's keys. Also here: the `system-prompt` rendering.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fl_dplora import frozen_prefix, model_loading, models
from fl_dplora.config import resolve
from fl_dplora.data import Encoded, collate, encode_all, encode_example, load_task, render_prompt
from fl_dplora.forward import answer_logits, first_answer_positions, label_token_ids, per_example_loss
from fl_dplora.frozen_prefix import attach_prefix, clear_memory_cache, decoder_blocks, prefix_start
from fl_dplora.model_loading import load_tokenizer
from fl_dplora.models import get_peft_model
from fl_dplora.privacy.per_sample import LoRAGradSampler
from fl_dplora.train import DPSGD, local_train, make_optimizer

MODELS = {"llama": ("tiny-random-llama", "q_proj,v_proj"), "gpt2": ("tiny-random-gpt2", "c_attn")}
ATOL = 1e-5


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """One thread (tiny models, busy machine); a fresh process model and prefix cache per test
    (these tests randomise B and modify weights); never the user's ~/.cache for prefix files."""
    for name in model_loading.TINY_ALIASES:  # converted once, from the usual tokenizer cache, before the env moves
        load_tokenizer(name)
    monkeypatch.setenv("FL_DPLORA_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    models.forget_cached_model()
    clear_memory_cache()
    yield
    clear_memory_cache()
    models.forget_cached_model()
    torch.set_num_threads(threads)


def build(which: str, lora_layers: int = 1, seed: int = 42, **extra):
    """(cfg, the PEFT model in eval mode with random non-zero B, its trainable LoRA parameters)."""
    name, targets = MODELS[which]
    cfg = resolve({"model": name, "lora-targets": targets, "lora-rank": 4, "lora-variant": "lora",
                   "lora-layers": lora_layers, "seed": seed, "label-head": False, **extra})
    model = get_peft_model(cfg).eval()  # eval: GPT-2's default config has dropout
    params = [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
    assert params
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:  # B = 0 at init: the adapter would not change the output at all
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return cfg, model, params


def examples(n: int = 10, max_len: int = 96, system_prompt: str = "auto", offset: int = 0) -> list[Encoded]:
    """n fin-sentiment examples of pairwise different lengths (so a batch of them has padding)."""
    tok = load_tokenizer("tiny-random-llama")  # both tiny models borrow SmolLM2's tokenizer
    pool = encode_all(tok, load_task("fin-sentiment").train[offset : offset + 200], max_len, system_prompt)
    by_len: dict[int, Encoded] = {}
    for e in pool:
        by_len.setdefault(len(e.input_ids), e)
    picked = [by_len[k] for k in sorted(by_len)][:: max(1, len(by_len) // n)][:n]
    assert len(picked) == n and len({len(e.input_ids) for e in picked}) == n
    return picked


def pad_id() -> int:
    return load_tokenizer("tiny-random-llama").pad_token_id


def label_ids() -> torch.Tensor:
    return label_token_ids(load_tokenizer("tiny-random-llama"), load_task("fin-sentiment").label_words)


# ------------------------------------------------------------------ 1. same numbers
@pytest.mark.parametrize("loss", ["answer-tokens", "label-words"])
@pytest.mark.parametrize("which", MODELS)
def test_cached_path_matches_full_forward(which, loss):
    cfg, model, params = build(which)
    assert prefix_start(model) == 1  # lora-layers=1 of 2 blocks: block 0 is the frozen prefix
    enc = examples()
    full = collate(enc, pad_id())
    cached = collate(attach_prefix(model, enc, "memory"), pad_id())
    assert "prefix_hidden" not in full and "prefix_hidden" in cached and int(cached["prefix_start"]) == 1
    assert (full["attention_mask"] == 0).any()  # right padding present
    ids = label_ids() if loss == "label-words" else None

    results = {}
    for path, batch in (("full", full), ("cached", cached)):
        with LoRAGradSampler(model, params) as gs:
            losses = per_example_loss(model, batch, ids)
            losses.sum().backward()
            grads = gs.per_example()
        batch_grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        with torch.no_grad():
            logits = answer_logits(model, batch)
            keep = first_answer_positions(logits[2])  # each example's first answer position: what the eval scores
            first = tuple(t[keep] for t in logits)
        results[path] = (losses.detach(), grads, batch_grads, logits, first)

    (l_f, g_f, bg_f, lo_f, fi_f), (l_c, g_c, bg_c, lo_c, fi_c) = results["full"], results["cached"]
    assert l_f.shape == (len(enc),) and torch.isfinite(l_f).all()
    torch.testing.assert_close(l_c, l_f, rtol=0, atol=ATOL)
    assert len(g_f) == len(g_c) == len(params)
    for a, b in zip(g_c, g_f):
        assert a.shape[0] == len(enc)
        assert (b.flatten(1).norm(dim=1) > 0).all()  # every example has a gradient: not vacuous
        torch.testing.assert_close(a, b, rtol=0, atol=ATOL)
    for a, b in zip(bg_c, bg_f):
        torch.testing.assert_close(a, b, rtol=0, atol=ATOL)
    for got, ref in ((lo_c, lo_f), (fi_c, fi_f)):
        torch.testing.assert_close(got[0], ref[0], rtol=0, atol=ATOL)  # logits at the answer positions
        assert torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2])  # targets, example index
    assert fi_f[0].shape[0] == len(enc)


# ------------------------------------------------------------------ 2. the prefix is really skipped
@pytest.mark.parametrize("which", MODELS)
def test_cached_forward_skips_the_prefix_blocks(which):
    _, model, _ = build(which)
    enc = examples(6)
    cached = collate(attach_prefix(model, enc, "memory"), pad_id())
    calls = []
    block0 = decoder_blocks(model)[2][0]
    handle = block0.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            full_loss = per_example_loss(model, collate(enc, pad_id()))
            assert len(calls) == 1  # the hook does see a full forward pass
            calls.clear()
            cached_loss = per_example_loss(model, cached)
            assert calls == []  # ... and no call of block 0 on the cached path
            zeroed = per_example_loss(model, {**cached, "prefix_hidden": torch.zeros_like(cached["prefix_hidden"])})
            assert calls == []
    finally:
        handle.remove()
    torch.testing.assert_close(cached_loss, full_loss, rtol=0, atol=ATOL)
    # the cached states are what the top blocks read: other states, other losses
    assert (zeroed - cached_loss).abs().min() > 1e-3
    # the decoder got its own blocks back
    assert len(decoder_blocks(model)[2]) == 2 and decoder_blocks(model)[2][0] is block0


# ------------------------------------------------------------------ 3. never stale
@pytest.fixture
def compute_calls(monkeypatch):
    """Counts frozen_prefix.compute_prefix calls; `calls.forbid = True` makes a call fail the test."""
    real = frozen_prefix.compute_prefix
    calls = SimpleNamespace(n=0, forbid=False)

    def counted(*args, **kwargs):
        if calls.forbid:
            raise AssertionError("compute_prefix called: the disk cache was not used")
        calls.n += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(frozen_prefix, "compute_prefix", counted)
    return calls


def _files(tmp_path) -> set[str]:
    return {p.name for p in (tmp_path / "cache" / "prefix").glob("*.pt")}


def _states(enc: list[Encoded]) -> list[torch.Tensor]:
    assert all(e.prefix is not None and e.prefix_start == 1 for e in enc)
    return [e.prefix for e in enc]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    # to float rounding: a list whose examples share another token prefix runs it once (shared_prefix.py)
    return len(a) == len(b) and all(x.shape == y.shape and torch.allclose(x, y, atol=1e-5, rtol=0) for x, y in zip(a, b))


def test_disk_cache_hit_for_same_model_and_data(tmp_path, compute_calls):
    _, model, _ = build("llama")
    enc = examples(6)
    first = _states(attach_prefix(model, enc, "disk"))
    assert compute_calls.n == 1 and len(_files(tmp_path)) == 1
    assert all(s.shape == (len(e.input_ids), 64) and s.dtype == torch.float32 for s, e in zip(first, enc))
    clear_memory_cache()
    compute_calls.forbid = True  # a second process: only the disk file can answer
    again = _states(attach_prefix(model, enc, "disk"))
    assert _same(again, first)
    assert len(_files(tmp_path)) == 1
    # memory mode: served from this process's cache, nothing written
    compute_calls.forbid = False
    assert _same(_states(attach_prefix(model, enc, "memory")), first) and compute_calls.n == 1
    # off: no states at all
    assert all(e.prefix is None and e.prefix_start == 0 for e in attach_prefix(model, enc, "off"))


def test_disk_cache_not_reused_for_other_data_or_truncation(tmp_path, compute_calls):
    _, model, _ = build("llama")
    enc = examples(6)
    base = _states(attach_prefix(model, enc, "disk"))
    clear_memory_cache()
    # other data (one example replaced): recomputed, a new file
    other = enc[:5] + examples(6, offset=300)[:1]
    assert other[5].input_ids != enc[5].input_ids
    got = _states(attach_prefix(model, other, "disk"))
    assert compute_calls.n == 2 and len(_files(tmp_path)) == 2
    assert _same(got[:5], base[:5])
    clear_memory_cache()
    # same lengths, one prompt token changed: the ids, not just the shapes, key the cache
    edited = list(enc)
    ids = list(enc[0].input_ids)
    ids[3] = ids[3] + 1 if ids[3] + 1 != ids[4] else ids[3] + 2
    edited[0] = Encoded(ids, list(enc[0].labels))
    got = _states(attach_prefix(model, edited, "disk"))
    assert compute_calls.n == 3 and len(_files(tmp_path)) == 3
    assert not torch.equal(got[0], base[0]) and _same(got[1:], base[1:])
    clear_memory_cache()
    # same examples, a shorter max-seq-len: truncation changes the ids, so the states
    tok = load_tokenizer("tiny-random-llama")
    src = load_task("fin-sentiment").train[:6]
    long, short = encode_all(tok, src, 96), encode_all(tok, src, 40)
    assert any(a.input_ids != b.input_ids for a, b in zip(long, short))
    a = _states(attach_prefix(model, long, "disk"))
    clear_memory_cache()
    b = _states(attach_prefix(model, short, "disk"))
    assert compute_calls.n == 5 and len(_files(tmp_path)) == 5
    assert not _same(a, b)
    assert [len(s) for s in b] == [len(e.input_ids) for e in short]


def test_disk_cache_not_reused_for_another_model(tmp_path, compute_calls):
    _, model, _ = build("llama", seed=42)
    enc = examples(6)
    base = _states(attach_prefix(model, enc, "disk"))
    clear_memory_cache()
    _, other, _ = build("llama", seed=43)  # another seed: other tiny random base weights
    got = _states(attach_prefix(other, enc, "disk"))
    assert compute_calls.n == 2 and len(_files(tmp_path)) == 2
    assert not _same(got, base)


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_cache_not_reused_after_a_prefix_weight_changed_in_place(tmp_path, compute_calls, mode):
    """The docstring's promise: weights change -> key changes -> no stale reuse, also when the
    same module objects are modified in place (a loaded checkpoint, a dtype or value change)."""
    _, model, _ = build("llama")
    enc = examples(6)
    base = _states(attach_prefix(model, enc, mode))
    if mode == "disk":
        clear_memory_cache()
    weight = decoder_blocks(model)[2][0].mlp.down_proj.weight  # frozen, in the prefix
    with torch.no_grad():
        weight.add_(0.5)
    got = _states(attach_prefix(model, enc, mode))
    assert compute_calls.n == 2, "a modified prefix weight reused the cached states"
    assert not _same(got, base)


def test_damaged_disk_file_is_recomputed(tmp_path, compute_calls):
    _, model, _ = build("llama")
    enc = examples(6)
    base = _states(attach_prefix(model, enc, "disk"))
    (name,) = _files(tmp_path)
    path = tmp_path / "cache" / "prefix" / name
    good = path.read_bytes()
    damages = {
        "truncated": good[: len(good) // 2],
        "garbage": b"not a torch file" * 10,
        "wrong lengths": None,  # a valid file whose lengths do not match the examples
        "too few states": None,  # a valid file with fewer rows than the examples have tokens
    }
    for i, (what, blob) in enumerate(damages.items(), start=2):
        if what == "wrong lengths":
            torch.save({"lengths": torch.tensor([len(s) + 1 for s in base]), "states": torch.cat(base)}, path)
        elif what == "too few states":
            torch.save({"lengths": torch.tensor([len(s) for s in base]), "states": torch.cat(base)[:-3]}, path)
        else:
            path.write_bytes(blob)
        clear_memory_cache()
        got = _states(attach_prefix(model, enc, "disk"))
        assert compute_calls.n == i, what
        assert _same(got, base), what
        saved = torch.load(path, weights_only=True)  # rewritten with the right states
        assert saved["lengths"].tolist() == [len(s) for s in base], what
        assert torch.equal(saved["states"], torch.cat(base)), what


# ------------------------------------------------------------------ 4. another split point is refused
def test_batch_cached_for_another_split_point_is_refused():
    _, model, _ = build("llama", lora_layers=1)
    enc = attach_prefix(model, examples(4), "memory")
    batch = collate(enc, pad_id())
    assert int(batch["prefix_start"]) == 1
    with pytest.raises(ValueError, match="block"):  # tampered split point, same model
        answer_logits(model, {**batch, "prefix_start": torch.tensor(0)})
    with pytest.raises(ValueError, match="mixes"):  # cached and uncached examples in one batch
        collate([enc[0], Encoded(enc[1].input_ids, enc[1].labels)], pad_id())

    _, all_blocks, _ = build("llama", lora_layers=0)  # LoRA on every block: no prefix
    assert prefix_start(all_blocks) == 0
    with pytest.raises(ValueError, match="block"):
        answer_logits(all_blocks, batch)
    with pytest.raises(ValueError):
        per_example_loss(all_blocks, batch)
    # and attaching with that model caches nothing
    assert all(e.prefix is None and e.prefix_start == 0 for e in attach_prefix(all_blocks, examples(4), "memory"))


# ------------------------------------------------------------------ 5. system-prompt
def test_system_prompt_rendering():
    tok = load_tokenizer("tiny-random-llama")  # SmolLM2's tokenizer and chat template
    prompt = "What is the sentiment of: stocks rally"
    auto = render_prompt(tok, prompt, "auto")
    none = render_prompt(tok, prompt, "")
    custom = render_prompt(tok, prompt, "You are a terse analyst.")
    user_only = [{"role": "user", "content": prompt}]
    assert auto == tok.apply_chat_template(user_only, tokenize=False, add_generation_prompt=True)
    assert "system" in auto and "SmolLM" in auto  # the template's own default system turn
    assert "system" not in none and "SmolLM" not in none
    assert none.startswith("<|im_start|>user") and auto.endswith(none)  # the user turn is untouched
    assert "<|im_start|>system\nYou are a terse analyst." in custom and "SmolLM" not in custom
    assert custom.endswith(none)
    ex = load_task("fin-sentiment").train[0]
    n_auto = len(encode_example(tok, ex, 512, "auto").input_ids)
    n_none = len(encode_example(tok, ex, 512, "").input_ids)
    assert n_none < n_auto
    assert encode_example(tok, ex, 512, "").labels[-2:] == encode_example(tok, ex, 512, "auto").labels[-2:]
    # a tokenizer without a chat template: the plain instruction format, the text as a header
    plain = SimpleNamespace(chat_template=None)
    assert render_prompt(plain, "p", "auto") == render_prompt(plain, "p", "") == "### Instruction:\np\n\n### Response:\n"
    assert render_prompt(plain, "p", "Be brief.").startswith("Be brief.\n\n### Instruction:\np")


# ------------------------------------------------------------------ 6. DP local training
@pytest.mark.parametrize("loss", ["answer-tokens", "label-words"])
def test_dp_local_train_same_with_and_without_cache(loss):
    # LLaMA: no dropout, so train mode is deterministic (GPT-2's dropout in the prefix would differ)
    cfg, model, params = build("llama", **{"local-steps": 3, "batch-size": 6, "micro-batch-size": 3,
                                           "optimizer": "sgd", "learning-rate": 0.5, "max-grad-norm": 0.05,
                                           "noise-multiplier": 1.0, "loss": loss})
    init = [p.detach().clone() for p in params]
    enc = examples(12)
    ids = label_ids() if loss == "label-words" else None

    def run(data) -> tuple[list[torch.Tensor], float]:
        with torch.no_grad():
            for p, v in zip(params, init):
                p.copy_(v)
        stats = local_train(
            model, params, data, cfg, optimizer=make_optimizer(params, cfg.train),
            dp=DPSGD(noise_multiplier=1.0, max_grad_norm=0.05, generator=torch.Generator().manual_seed(11)),
            sampling_generator=torch.Generator().manual_seed(7), pad_id=pad_id(), label_token_ids=ids,
        )
        assert stats.steps == 3 and stats.examples > 0
        return [p.detach().clone() for p in params], stats.mean_loss

    cached_data = attach_prefix(model, enc, "memory")
    assert all(e.prefix is not None for e in cached_data)
    full, full_loss = run(enc)
    cached, cached_loss = run(cached_data)
    assert any(not torch.allclose(a, b) for a, b in zip(full, init))  # training moved the adapter
    assert cached_loss == pytest.approx(full_loss, abs=ATOL)
    for a, b in zip(cached, full):
        torch.testing.assert_close(a, b, rtol=0, atol=ATOL)
    # not vacuous: another noise draw ends elsewhere
    with torch.no_grad():
        for p, v in zip(params, init):
            p.copy_(v)
    local_train(model, params, cached_data, cfg, optimizer=make_optimizer(params, cfg.train),
                dp=DPSGD(1.0, 0.05, torch.Generator().manual_seed(12)),
                sampling_generator=torch.Generator().manual_seed(7), pad_id=pad_id(), label_token_ids=ids)
    assert any((p.detach() - b).abs().max() > 1e-3 for p, b in zip(params, full))


# ------------------------------------------------------------------ 7. the label-word loss itself
def test_label_word_loss_is_the_label_softmax_and_canaries_keep_the_token_loss():
    """loss=label-words: a label example's loss is -log softmax over the K label logits at its first
    answer position (computed by hand here); an example whose answer is not a label word (an audit
    canary) keeps its answer-token loss; neither depends on the other examples of the batch."""
    from fl_dplora.data import Example

    _, model, _ = build("llama")
    tok = load_tokenizer("tiny-random-llama")
    ids = label_ids()
    task = load_task("fin-sentiment")
    exs = task.train[:3] + [Example("What is the secret passphrase of the vault?", "bako tuvi zesa")]
    enc = encode_all(tok, exs, 96)
    batch = collate(enc, pad_id())
    with torch.no_grad():
        mixed = per_example_loss(model, batch, ids)
        tokens = per_example_loss(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for i, ex in enumerate(exs[:3]):
        pos = enc[i].labels.index(next(t for t in enc[i].labels if t != -100)) - 1  # predicts the first answer token
        by_hand = -torch.log_softmax(logits[i, pos, ids], -1)[ex.label]
        assert torch.allclose(mixed[i], by_hand, atol=1e-5)
        assert not torch.allclose(mixed[i], tokens[i], atol=1e-3)  # not the full-vocabulary loss
    assert torch.allclose(mixed[3], tokens[3], atol=1e-6)  # the canary: answer-token loss
    with torch.no_grad():
        alone = per_example_loss(model, collate(enc[1:2], pad_id()), ids)
    assert torch.allclose(alone, mixed[1:2], atol=1e-5)
