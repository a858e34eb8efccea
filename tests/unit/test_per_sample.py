"""Per-example LoRA gradients (the heart of DP-SGD): exact, for SUM reduction, with padding.

`LoRAGradSampler` computes every example's gradient from two hooks per LoRA factor. If it were
off (a wrong reduction, padding leaking into the sum, a missed module, GPT-2's transposed Conv1D),
clipping would bound the wrong quantity and the DP guarantee would silently not hold. These tests
compare it with the definition: one autograd call per example.
"""

from __future__ import annotations

import pytest
import torch

from fl_dplora import models
from fl_dplora.config import resolve
from fl_dplora.data import collate, encode_all, load_task
from fl_dplora.model_loading import load_tokenizer
from fl_dplora.models import adapter_parameters, get_peft_model
from fl_dplora.privacy.per_sample import LoRAGradSampler
from fl_dplora.train import per_example_loss

LLAMA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head"  # lm_head: answer-only head path
GPT2_TARGETS = "c_attn,c_proj,c_fc,lm_head"
MODELS = {"llama": ("tiny-random-llama", LLAMA_TARGETS), "gpt2": ("tiny-random-gpt2", GPT2_TARGETS)}
REL_TOL = 1e-5


@pytest.fixture
def fresh_model_cache():
    """These tests turn the process-wide PEFT model to float64 and randomise B: never leak that."""
    models.forget_cached_model()
    yield
    models.forget_cached_model()


def build(which: str):
    """(model in float64 eval mode, its LoRA modules' weights in sampler order, sampler, batch examples)."""
    name, targets = MODELS[which]
    cfg = resolve({"model": name, "lora-targets": targets, "lora-rank": 4, "lora-variant": "lora", "lora-layers": 0})
    model = get_peft_model(cfg).double().eval()  # eval: GPT-2's dropout would differ between the two paths
    named = {k: p for k, p in adapter_parameters(model, cfg).items() if p.requires_grad}
    for t in targets.split(","):
        assert any(f".{t}.lora_A" in k for k in named) and any(f".{t}.lora_B" in k for k in named), t
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for k, p in named.items():
            if "lora_B" in k:  # B = 0 at init would make every A-gradient zero: nothing to compare
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    sampler = LoRAGradSampler(model, list(named.values()))
    params = [m.weight for m in sampler.modules]
    assert {id(p) for p in params} == {id(p) for p in named.values()}  # every trainable tensor is covered

    tok = load_tokenizer(name)
    enc = sorted(encode_all(tok, load_task("general-instruct", 42).train[:30], 96), key=lambda e: len(e.input_ids))
    pick = [enc[i] for i in (0, 6, 12, 18, 24, 29)]
    lengths = [len(e.input_ids) for e in pick]
    answers = [sum(lab != -100 for lab in e.labels) for e in pick]
    assert len(set(lengths)) >= 4 and len(set(answers)) >= 3, (lengths, answers)  # real padding in the batch
    return model, params, sampler, pick, tok.pad_token_id


def loop_gradients(model, params, examples, pad_id) -> list[list[torch.Tensor]]:
    """The definition: one autograd call per example, each in a batch of one (no padding at all)."""
    out = []
    for e in examples:
        loss = per_example_loss(model, collate([e], pad_id)).sum()
        out.append([g.detach() for g in torch.autograd.grad(loss, params)])
    return out


def max_rel_error(per_example: list[torch.Tensor], loop: list[list[torch.Tensor]]) -> float:
    worst = 0.0
    for j, pe in enumerate(per_example):
        assert pe.shape == (len(loop), *loop[0][j].shape)
        for i, ref in enumerate(loop):
            ref_norm = float(ref[j].norm())
            assert ref_norm > 0, f"tensor {j} got a zero gradient from example {i}: the comparison would be vacuous"
            worst = max(worst, float((pe[i] - ref[j]).norm()) / ref_norm)
    return worst


@pytest.mark.parametrize("which", MODELS)
def test_per_example_gradients_match_autograd_loop(which, fresh_model_cache):
    model, params, sampler, examples, pad_id = build(which)
    batch = collate(examples, pad_id)
    assert (batch["attention_mask"] == 0).any()  # right padding is present
    loop = loop_gradients(model, params, examples, pad_id)

    with sampler:
        per_example_loss(model, batch).sum().backward()
        per_example = sampler.per_example()
        # the batch gradient autograd accumulated is the sum of the per-example ones
        for p, pe in zip(params, per_example):
            assert torch.allclose(p.grad, pe.sum(0), rtol=REL_TOL, atol=0)
        err = max_rel_error(per_example, loop)
        print(f"{which}: max relative error of per-example gradients {err:.2e} over {len(params)} tensors")
        assert err <= REL_TOL

        # clipped sum: sum_i g_i * min(1, C / ||g_i||), with the norm joint over all LoRA tensors
        norms = torch.stack([torch.sqrt(sum((g.double() ** 2).sum() for g in gs)) for gs in loop])
        c = float(norms.median())
        factors = torch.clamp(c / norms, max=1.0)
        assert (factors < 1).any() and (factors == 1).any()  # both branches of min(1, C/norm) exercised
        expected = [sum(f * gs[j] for f, gs in zip(factors, loop)) for j in range(len(params))]
        clipped, got_norms = sampler.clipped_sum(c)
    assert torch.allclose(got_norms, norms, rtol=REL_TOL, atol=0)
    for got, exp in zip(clipped, expected):
        assert float((got - exp).norm() / exp.norm()) <= REL_TOL


def test_mean_reduction_would_rescale_per_example_gradients(fresh_model_cache):
    """Opacus issue 820's trap: the hooks are exact for a SUM-reduced loss; a MEAN-reduced loss
    silently scales every per-example gradient by 1/B (so clipping would bound the wrong thing)."""
    model, params, sampler, examples, pad_id = build("llama")
    b = len(examples)
    loop = loop_gradients(model, params, examples, pad_id)
    with sampler:
        per_example_loss(model, collate(examples, pad_id)).sum().backward()
        summed = sampler.per_example()
        sampler.clear()
        for p in params:
            p.grad = None
        per_example_loss(model, collate(examples, pad_id)).mean().backward()
        meaned = sampler.per_example()
    assert max_rel_error(summed, loop) <= REL_TOL
    # the same exactness check catches the mismatch ...
    assert max_rel_error(meaned, loop) == pytest.approx(1 - 1 / b, rel=1e-6)
    # ... which is exactly a 1/B rescaling
    assert max_rel_error([m * b for m in meaned], loop) <= REL_TOL
