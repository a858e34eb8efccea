"""The fast paths give the same numbers as the slow ones, and the benchmarks run.

- answer-only logits: the LM head runs only where the next token is an answer token; the loss must
  equal cross-entropy over the full logits (shifted by one, prompt and padding ignored), for a
  LLaMA-style and a GPT-2-style model (different decoder prefix, Conv1D LoRA layers);
- transfer dtype: float32 travels exactly; bfloat16 / float16 are exactly a cast to that dtype
  (so within its precision) and take about half the bytes on the wire;
- `fl-dplora bench NAME --quick` writes JSON with `median_seconds` (and `ratio`). No timing is
  asserted anywhere: the numbers depend on the machine.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from fl_dplora.config import resolve
from fl_dplora.data import collate, encode_all, load_task
from fl_dplora.model_loading import load_tokenizer
from fl_dplora.models import adapter_parameters, get_peft_model
from fl_dplora.frozen_prefix import decoder_and_head
from fl_dplora.train import per_example_loss
from fl_dplora.transport import from_array_record, to_array_record, wire_bytes


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine they stall."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ answer-only logits
def _full_logits_loss(model, batch) -> torch.Tensor:
    """The reference: every position's logits, next-token CE on labels != -100, mean per example."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shift_logits, shift_labels = logits[:, :-1].float(), batch["labels"][:, 1:]
    token_loss = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=-100, reduction="none")
    mask = (shift_labels != -100).float()
    return (token_loss * mask).sum(1) / mask.sum(1).clamp(min=1)


@pytest.mark.parametrize("model_name,targets", [("tiny-random-llama", "q_proj,v_proj"), ("tiny-random-gpt2", "c_attn")])
def test_answer_only_logits_match_full_logits_loss(model_name, targets):
    cfg = resolve({"model": model_name, "lora-targets": targets, "lora-rank": 4})
    model = get_peft_model(cfg)
    assert decoder_and_head(model)[1] is not None, "the fast path must be taken, not the full-logits fallback"
    params = adapter_parameters(model, cfg)
    saved = {k: p.detach().clone() for k, p in params.items()}
    g = torch.Generator().manual_seed(3)
    try:
        with torch.no_grad():  # non-zero B: the adapter must change the logits for the check to mean much
            for p in params.values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        tok = load_tokenizer(cfg.model.name)
        task = load_task(cfg.data.task, cfg.train.seed)
        # Unequal lengths (the longest truncated to 96, the others shorter): padding must be ignored too.
        by_length = sorted(task.train[:200], key=lambda e: len(e.prompt))
        examples = by_length[:3] + by_length[-2:]
        batch = collate(encode_all(tok, examples, 96), tok.pad_token_id)
        assert (batch["attention_mask"] == 0).any(), "the batch should contain padding"

        fast = per_example_loss(model, batch)
        fast_grads = torch.autograd.grad(fast.sum(), [p for p in params.values() if p.requires_grad])
        full = _full_logits_loss(model, batch)
        full_grads = torch.autograd.grad(full.sum(), [p for p in params.values() if p.requires_grad])
    finally:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(saved[k])
    assert fast.shape == (len(examples),)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    for a, b in zip(fast_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ transfer dtype
def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "base_model.model.layers.0.q_proj.lora_A.weight": torch.randn(8, 64, generator=g) * 0.05,
        "base_model.model.layers.0.q_proj.lora_B.weight": torch.randn(64, 8, generator=g) * 1e-3,
        "base_model.model.layers.0.v_proj.lora_B.weight": torch.randn(32, 8, generator=g) * 10.0,
    }


def test_float32_transfer_roundtrip_is_exact():
    src = _tensors()
    back = from_array_record(to_array_record(src, "float32"), "float32")
    assert set(back) == set(src)
    for k in src:
        assert back[k].dtype == torch.float32
        assert torch.equal(back[k], src[k])


@pytest.mark.parametrize("dtype,wire_dtype,rel", [("bfloat16", "int16", 2.0**-8), ("float16", "float16", 2.0**-11)])
def test_half_precision_transfer_is_a_cast_within_its_precision(dtype, wire_dtype, rel):
    src = _tensors()
    record = to_array_record(src, dtype)
    assert {a.dtype for a in record.values()} == {wire_dtype}
    back = from_array_record(record, dtype)
    tdtype = getattr(torch, dtype)
    tiny = torch.finfo(tdtype).smallest_normal * torch.finfo(tdtype).eps  # subnormal spacing
    for k, x in src.items():
        y = back[k]
        assert y.dtype == torch.float32 and y.shape == x.shape
        assert torch.equal(y, x.to(tdtype).to(torch.float32))  # exactly round-to-nearest, nothing else
        assert ((y - x).abs() <= rel * x.abs() + tiny).all()
    with pytest.raises(ValueError):  # a record in another dtype is refused, not misread
        from_array_record(to_array_record(src, "float32"), dtype)
    from flwr.app import RecordDict

    big = {"lora_B.weight": torch.randn(576, 64)}  # large enough that the payload dominates the framing
    full = wire_bytes(RecordDict({"a": to_array_record(big, "float32")}))
    half = wire_bytes(RecordDict({"a": to_array_record(big, dtype)}))
    assert half < 0.55 * full


# ------------------------------------------------------------------ benchmarks run (smoke)
@pytest.fixture
def bench(tmp_path):
    from fl_dplora.cli import main

    def run(name: str, *extra: str) -> dict:
        out = tmp_path / f"{name}.json"
        assert main(["bench", name, "--quick", "--json", str(out), *extra]) == 0
        return json.loads(out.read_text())

    return run


def _positive_medians(result: dict, names: set[str]) -> None:
    med = result["median_seconds"]
    assert names <= set(med)
    assert all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in med.values())


def test_bench_dp_overhead_quick(bench):
    res = bench("dp-overhead", "--reps", "2", "--warmup", "1")
    _positive_medians(res, {"none", "sample", "opacus"})
    assert {"sample/none", "opacus/none"} <= set(res["ratio"])
    assert all(math.isfinite(v) and v > 0 for v in res["ratio"].values())


def test_bench_comm_quick(bench):
    res = bench("comm", "--ranks", "4,8", "--reps", "1")
    _positive_medians(res, {f"{v}-r{r}-{d}" for v in ("lora", "ffa") for r in (4, 8) for d in ("float32", "bfloat16", "float16")})
    assert res["ratio"]["ffa-r8-bfloat16 up/full"] < res["ratio"]["lora-r8-float32 up/full"]
    v = res["variants"]
    assert v["ffa-r8-float32"]["values"] < v["lora-r8-float32"]["values"]  # FFA sends B only
    assert v["lora-r8-bfloat16"]["bytes_up"] < 0.7 * v["lora-r8-float32"]["bytes_up"]
    assert res["check_ffa_bf16_le_0.10_percent"]["le_0.10_percent"] is True


def test_bench_throughput_quick(bench):
    res = bench("throughput", "--reps", "2", "--warmup", "1")
    _positive_medians(res, {"none", "sample"})
    assert res["examples_per_second"]["sample"] > 0
    assert res["peak_rss_mib"]["sample"] > 100  # a Python process with torch and a model loaded


@pytest.mark.slow
def test_bench_round_overhead_quick(bench, tmp_path):
    """A real `fl-dplora simulate` subprocess (Ray): tens of seconds, most of it Ray's start."""
    res = bench("round-overhead", "--rounds", "2", "--num-clients", "2", "--output-dir", str(tmp_path / "run"))
    _positive_medians(res, {"round_wall", "client_compute"})
    assert res["ratio"]["round_wall/client_compute"] > 0
    assert [r["round"] for r in res["rounds"]] == [1, 2]
    layout = res["thread_layout"]  # measured in the run's server and client processes (--quick: --threads 1)
    assert layout["server"]["torch_threads"] == 1 and layout["clients"], layout
    assert {r["torch_threads"] for r in layout["clients"]} == {1} and not layout["oversubscribed"]
