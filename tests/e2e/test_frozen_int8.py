"""`frozen-dtype = "int8"` (frozen_int8.py): the frozen prefix with int8 weights and per-token int8
activations.

What must hold: the int8 features stay close to the float32 ones; an example's int8 state depends on
that example alone (not on its batch, its padding or the shared-token shortcut: DP-SGD's per-example
clipping relies on it); prefix-cache off computes what the cache computes; the server and the
clients both compute the prefix in the run's frozen dtype; the key runs end to end through
`fl-dplora simulate`.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import replace

import pytest
import torch
from harness import run_in_process
from test_prefix_cache import build, examples, isolated, pad_id  # noqa: F401 - fixture re-used

from fl_dplora import frozen_prefix
from fl_dplora.config import ConfigError, resolve
from fl_dplora.data import collate
from fl_dplora.forward import per_example_loss
from fl_dplora.frozen_prefix import attach_prefix, compute_prefix, frozen_dtype, prefix_start, set_frozen_dtype
from fl_dplora.frozen_int8 import Int8Linear, int8_copy
from fl_dplora.label_head import first_answer_states
from fl_dplora.models import reset_adapter

TINY = ("llama", "gpt2")


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


# ------------------------------------------------------------------ the layer
def test_int8_linear_is_close_to_the_float_layer_and_each_row_is_its_own():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(64, 96)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(96, 64, generator=g))
    q = Int8Linear(lin)
    x = torch.randn(3, 7, 64, generator=g)
    x[0, 0] *= 50  # one token with a large scale: per-tensor scaling would coarsen every other row
    with torch.no_grad():
        ref, out = lin(x), q(x)
        assert out.shape == ref.shape and out.dtype == torch.float32
        assert (_cos(out.flatten(0, 1), ref.flatten(0, 1)) > 0.9995).all()
        # a row's result is the same whatever else is in the batch (int32 accumulation is exact)
        alone = torch.stack([q(x[i, j][None])[0] for i in range(3) for j in range(7)]).view_as(out)
        assert torch.equal(alone, out)


class _Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        for name, out in (("q_proj", 48), ("k_proj", 16), ("v_proj", 16), ("o_proj", 32)):
            setattr(self, name, torch.nn.Linear(32, out, bias=name == "k_proj"))
            with torch.no_grad():
                getattr(self, name).weight.copy_(torch.randn(out, 32, generator=g))

    def forward(self, x):
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x), self.o_proj(x)], dim=-1)


def test_layers_reading_one_input_run_as_one_matmul_with_the_same_numbers(monkeypatch):
    from fl_dplora import frozen_int8

    module = _Attention()
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2))
    fused = int8_copy(module)
    assert fused.q_proj.fused is fused.k_proj.fused is fused.v_proj.fused is not fused.o_proj.fused
    monkeypatch.setattr(frozen_int8, "FUSED_GROUPS", ())
    alone = int8_copy(module)
    assert alone.q_proj.fused is not alone.k_proj.fused
    with torch.no_grad():
        assert torch.equal(fused(x), alone(x))
        assert float(_cos(fused(x).flatten(), module(x).flatten())) > 0.999


def test_smoothing_factors_are_powers_of_two_and_keep_the_products():
    from fl_dplora.frozen_int8 import FusedLinears, smoothing

    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(32, 24, bias=False)
    x = torch.randn(40, 32, generator=g)
    x[:, 5] *= 40  # an outlier channel, as LLM activations have
    s = smoothing(x.abs().amax(0), [lin.weight.detach()], 0.5)
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)
    torch.testing.assert_close((x / s) @ (lin.weight.detach() * s).t(), lin(x).detach(), atol=1e-4, rtol=1e-4)
    plain, smooth = FusedLinears([lin]), FusedLinears([lin], x.abs().amax(0))
    with torch.no_grad():
        ref = lin(x)
        err = {name: float((f.output(x, 0) - ref).norm() / ref.norm()) for name, f in (("plain", plain), ("smooth", smooth))}
    assert err["smooth"] < err["plain"], err  # the outlier channel no longer sets every token's int8 step


@pytest.mark.parametrize("which", TINY)
def test_calibration_reads_fixed_public_tokens_only(which):
    from fl_dplora.frozen_int8 import calibrate

    _, model, _ = build(which)
    decoder, _, blocks = frozen_prefix.decoder_blocks(model)
    first, again = calibrate(decoder, blocks, 1), calibrate(decoder, blocks, 1)
    assert first and set(first) == set(again)
    assert all(torch.equal(first[m], again[m]) and (first[m] > 0).all() for m in first)
    assert all(any(m is x for x in blocks[0].modules()) for m in first)  # only the prefix's layers


@pytest.mark.parametrize("which", TINY)
def test_int8_copy_swaps_every_linear_and_shares_the_other_tensors(which):
    _, model, _ = build(which)
    block = frozen_prefix.decoder_blocks(model)[2][0]
    twin = int8_copy(block)
    assert not any(isinstance(m, torch.nn.Linear) for m in twin.modules())
    assert sum(isinstance(m, Int8Linear) for m in twin.modules()) >= 4
    originals = {id(t) for t in block.parameters()}
    assert {id(t) for t in twin.parameters()} <= originals  # norms etc. are the original tensors, not copies


# ------------------------------------------------------------------ the features
@pytest.mark.parametrize("which", TINY)
def test_int8_features_are_close_to_float32(which):
    """Cosine >= 0.99 on the tiny random models (hidden size 64: their random weights have no
    outlier channels, so per-token int8 loses little; SmolLM2's numbers are in docs/performance.md)."""
    _, model, _ = build(which)
    start = prefix_start(model)
    enc = examples(10)
    states = {d: compute_prefix(model, enc, start, dtype=d) for d in ("float32", "int8")}
    for a, b in zip(states["float32"], states["int8"]):
        assert not torch.equal(a, b)  # int8 did run
        assert float(_cos(a.flatten(), b.flatten())) >= 0.99
    final = {d: first_answer_states(model, [replace(e, prefix=s, prefix_start=start) for e, s in zip(enc, states[d])],
                                    pad_id()) for d in states}
    assert (_cos(final["float32"], final["int8"]) >= 0.99).all()


@pytest.mark.parametrize("which", TINY)
def test_an_examples_int8_state_does_not_depend_on_its_batch(which):
    """Alone, batched with others (padding) or through the shared-token shortcut: the same state up to
    float rounding. With one activation scale per tensor it would move with its batch companions."""
    _, model, _ = build(which)
    start = prefix_start(model)
    enc = examples(10)
    batched = compute_prefix(model, enc, start, batch_size=16, dtype="int8")
    alone = [compute_prefix(model, [e], start, batch_size=1, share_tokens=False, dtype="int8")[0] for e in enc]
    shuffled = compute_prefix(model, enc[::-1][:5] + examples(5, offset=300), start, batch_size=4, dtype="int8")
    for a, b in [*zip(batched, alone), *zip(batched[::-1][:5], shuffled[:5])]:
        _same_up_to_rounding(a, b)


def _same_up_to_rounding(a: torch.Tensor, b: torch.Tensor) -> None:
    """Float rounding in attention can, rarely, move an activation across an int8 rounding boundary:
    one element one step off. A scale shared with the batch would move every element of the state."""
    diff, scale = (a - b).abs(), a.abs().max()
    assert float(diff.mean()) <= 1e-5 * float(scale), float(diff.mean() / scale)
    assert float(diff.max()) <= 2e-2 * float(scale), float(diff.max() / scale)


@pytest.mark.parametrize("which", TINY)
def test_prefix_cache_off_computes_what_the_int8_cache_computes(which):
    _, model, _ = build(which)
    set_frozen_dtype(model, "int8")
    enc = examples(6)
    with torch.no_grad():
        cached = per_example_loss(model, collate(attach_prefix(model, enc, "memory"), pad_id()))
        off = per_example_loss(model, collate(attach_prefix(model, enc, "off"), pad_id()))
        set_frozen_dtype(model, "float32")
        fp32 = per_example_loss(model, collate(attach_prefix(model, enc, "off"), pad_id()))
    torch.testing.assert_close(off, cached, atol=1e-4, rtol=1e-4)
    assert not torch.equal(off, fp32)  # the off path did run the prefix in int8


def test_int8_and_float32_states_are_cached_apart(monkeypatch):
    _, model, _ = build("llama")
    enc = examples(4)
    calls: list[str] = []
    original = frozen_prefix.compute_prefix
    monkeypatch.setattr(frozen_prefix, "compute_prefix", lambda *a, **k: calls.append(k["dtype"]) or original(*a, **k))
    for dtype in ("float32", "int8", "float32", "int8"):
        set_frozen_dtype(model, dtype)
        attach_prefix(model, enc, "memory")
    assert calls == ["float32", "int8"]


# ------------------------------------------------------------------ the run config
def test_frozen_dtype_key_and_its_checks():
    assert resolve().model.frozen_dtype == "float32"
    assert resolve({"frozen-dtype": "int8"}).model.frozen_dtype == "int8"
    with pytest.raises(ConfigError, match=r"^frozen-dtype: unknown value 'int4'"):
        resolve({"frozen-dtype": "int4"})
    with pytest.raises(ConfigError, match=r"^frozen-dtype: int8 runs the frozen blocks below the LoRA layers"):
        resolve({"frozen-dtype": "int8", "lora-layers": 0})


def test_get_peft_model_sets_the_runs_frozen_dtype():
    from fl_dplora.models import get_peft_model

    cfg = resolve({"model": "tiny-random-llama", "lora-layers": 1})
    assert frozen_dtype(get_peft_model(cfg.with_values({"frozen-dtype": "int8"}))) == "int8"
    assert frozen_dtype(get_peft_model(cfg)) == "float32"  # the same cached model follows the config


@pytest.mark.slow
def test_server_and_clients_compute_the_prefix_in_the_runs_frozen_dtype(tmp_path, monkeypatch):
    """In-process run (real ServerApp loop and ClientApp code): every prefix build, on the server (its
    evaluation features) and on the clients (their training cache), runs in int8."""
    seen: list[tuple[str, str]] = []
    original = frozen_prefix.compute_prefix

    def spy(model, encoded, start, *args, **kwargs):
        files = [f.filename for f in inspect.stack(0)[1:12]]
        side = "client" if any("clients" in f for f in files) else "server" if any("fl_dplora/server/" in f or "evaluate" in f
                                                                                  for f in files) else "?"
        seen.append((side, kwargs.get("dtype") or frozen_dtype(model)))
        return original(model, encoded, start, *args, **kwargs)

    monkeypatch.setattr(frozen_prefix, "compute_prefix", spy)
    summary, _ = run_in_process(2, output_dir=tmp_path / "run", **{
        "model": "tiny-random-llama", "task": "fin-sentiment", "lora-layers": 1, "frozen-dtype": "int8",
        "prefix-cache": "memory", "num-server-rounds": 1, "dp-mode": "sample", "label-head": False})
    assert summary["rounds"] == 1 and summary["config"]["frozen-dtype"] == "int8"
    assert {side for side, _ in seen} >= {"client", "server"}, seen
    assert {dtype for _, dtype in seen} == {"int8"}, seen


@pytest.mark.slow
def test_frozen_dtype_int8_runs_end_to_end_through_simulate(cli, tmp_path):
    out = tmp_path / "int8"
    res = cli(["simulate", "--num-clients", "2", "--num-cpus", "1", "--output-dir", str(out), "--run-config",
               "model=tiny-random-llama task=fin-sentiment label-head=false frozen-dtype=int8 lora-layers=1 "
               "dp-mode=sample num-server-rounds=1 local-steps=1 batch-size=8 micro-batch-size=4 "
               "max-train-samples=40 max-eval-samples=8 max-seq-len=48"], timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 1 and summary["config"]["frozen-dtype"] == "int8"
    assert torch.isfinite(torch.tensor(summary["final_eval"]["loss"])) and summary["privacy"]["epsilon"] > 0


# ------------------------------------------------------------------ the rotated residual stream
@pytest.mark.parametrize("keep", [(), (3, 17)])
def testrotated_weights_compute_the_same_block_in_float(keep):
    """QuaRot's folding is exact in float: a LLaMA block whose readers are W diag(gain) R, writers R^T W and
    norms without gains maps x R to block(x) R (what the int8 copy quantizes is the same function), also
    with channels the rotation leaves out (`keep`)."""
    import copy

    from fl_dplora.frozen_int8 import rotated_weights, rotatable, rotation

    _, model, _ = build("llama")
    block = frozen_prefix.decoder_blocks(model)[2][0]
    assert rotatable(block)
    rot = rotation(block.self_attn.q_proj.in_features, keep=keep)
    torch.testing.assert_close(rot.t() @ rot, torch.eye(rot.shape[0], dtype=torch.float64), atol=1e-12, rtol=0)
    twin = copy.deepcopy(block)
    with torch.no_grad():
        for name, w in rotated_weights(block, rot).items():
            twin.get_submodule(name).weight.copy_(w)
        twin.input_layernorm.weight.fill_(1.0)
        twin.post_attention_layernorm.weight.fill_(1.0)
    decoder = frozen_prefix.decoder_blocks(model)[0]
    x = torch.randn(2, 7, rot.shape[0], generator=torch.Generator().manual_seed(4))
    pos = torch.arange(7)[None].expand(2, 7)
    emb = decoder.rotary_emb(x, pos)
    with torch.no_grad():
        ref = block(x, position_embeddings=emb, position_ids=pos)
        out = twin(x @ rot.float(), position_embeddings=emb, position_ids=pos) @ rot.t().float()
    ref, out = (t[0] if isinstance(t, tuple) else t for t in (ref, out))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("which", TINY)
def test_llama_prefixes_run_rotated_and_others_smoothed(which):
    """LLaMA-style prefixes: the int8 copies read the rotated stream (norms without gains, no smoothing on
    q/k/v and gate/up, smoothing kept on o_proj and, folded into up_proj, down_proj); GPT-2 (LayerNorm):
    smoothing only."""
    from fl_dplora import frozen_int8

    _, model, _ = build(which)
    decoder, _, blocks = frozen_prefix.decoder_blocks(model)
    start = prefix_start(model)
    copies = frozen_int8.int8_blocks(decoder, blocks, start, "test")
    if which == "gpt2":
        assert not any(frozen_int8.rotatable(b) for b in blocks)
        assert all(m.fused.inv_smooth is not None for c in copies for m in c.modules() if isinstance(m, Int8Linear))
        return
    for c in copies:
        assert isinstance(c.input_layernorm, frozen_int8.UnitRMSNorm)
        assert isinstance(c.post_attention_layernorm, frozen_int8.UnitRMSNorm)
        assert c.self_attn.q_proj.fused.inv_smooth is None and c.mlp.gate_proj.fused.inv_smooth is None
        assert c.self_attn.o_proj.fused.inv_smooth is not None  # smoothed at run time
        assert c.mlp.down_proj.fused.inv_smooth is None  # smoothed by up_proj's rows
    assert copies[0]._forward_pre_hooks and copies[-1]._forward_hooks  # the stream is rotated in and out
    assert not any(b._forward_pre_hooks or b._forward_hooks for b in blocks)  # the model itself is untouched


def test_rotation_beats_smoothing_alone_on_outlier_channels(monkeypatch):
    """With outlier channels in the residual stream (massive activations, as SmolLM2 has) the rotated
    int8 prefix is closer to float32 than smoothing alone: the rule the default takes."""
    from fl_dplora import frozen_int8

    _, model, _ = build("llama")
    decoder, _, _ = frozen_prefix.decoder_blocks(model)
    with torch.no_grad():
        decoder.get_input_embeddings().weight[:, 3] *= 60
        decoder.get_input_embeddings().weight[:, 17] *= 30
    start = prefix_start(model)
    enc = examples(10)
    ref = compute_prefix(model, enc, start, dtype="float32")
    err = {}
    for rotate in (False, True):
        monkeypatch.setattr(frozen_int8, "ROTATE", rotate)
        states = compute_prefix(model, enc, start, dtype="int8")
        err[rotate] = float(torch.cat([1 - _cos(a, b) for a, b in zip(ref, states)]).mean())
    assert err[True] < err[False], err


def test_rotation_carries_the_kept_channels_unchanged_in_its_last_columns():
    from fl_dplora.frozen_int8 import rotation

    rot = rotation(12, keep=[3, 7])
    torch.testing.assert_close(rot.t() @ rot, torch.eye(12, dtype=torch.float64), atol=1e-12, rtol=0)
    x = torch.randn(5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert torch.equal((x @ rot)[:, 10:], x[:, [3, 7]])
    assert not (x @ rot)[:, :10].isclose(x[:, [i for i in range(12) if i not in (3, 7)]]).all()  # the others rotate
    assert torch.equal(rotation(12, keep=[]), rotation(12))


def test_a_float_tail_keeps_the_last_input_columns_out_of_the_int8_products():
    """FusedLinears(float_tail=k): the last k input columns (the stream's massive channels in a rotated
    copy) are multiplied in float32 and do not set the token's int8 step."""
    from fl_dplora.frozen_int8 import FusedLinears

    g = torch.Generator().manual_seed(7)
    lin = torch.nn.Linear(32, 24, bias=False)
    x = torch.randn(40, 32, generator=g)
    x[:, -2:] = 30 + torch.randn(40, 2, generator=g)  # in every token, as SmolLM2's massive channels
    plain, tail = FusedLinears([lin]), FusedLinears([lin], float_tail=2)
    assert tail.weight_t.shape == (32, 24) and not tail.weight_t[30:].any() and tail.tail_weight.shape == (2, 24)
    only_tail = torch.cat([torch.zeros(40, 30), x[:, -2:]], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(tail.output(only_tail, 0), lin(only_tail), atol=1e-5, rtol=1e-5)  # float products
        ref = lin(x)
        err = {name: float((f.output(x, 0) - ref).norm() / ref.norm()) for name, f in (("plain", plain), ("tail", tail))}
    assert err["tail"] < err["plain"] / 4, err


def test_two_int8_terms_shrink_the_error_and_keep_each_row_its_own():
    """TWO_TERMS: x ~ s (q + r / 254), r the rounding residue in int8: the activation error shrinks ~250x;
    the second term's scale is the token's own too, so a row's numbers do not depend on its batch."""
    from fl_dplora.frozen_int8 import FusedLinears, quantize_rows

    g = torch.Generator().manual_seed(6)
    lin = torch.nn.Linear(96, 32, bias=False)
    x = torch.randn(20, 96, generator=g) ** 3  # heavy-tailed, as down_proj's SiLU-gated inputs
    q, s, r = quantize_rows(x, residue=True)
    assert torch.equal(q, quantize_rows(x)[0])
    assert ((x - s * (q + r / 254.0)).abs() <= s / 508 * 1.001 + 1e-7).all()
    one, two = FusedLinears([lin]), FusedLinears([lin], terms=2)
    assert torch.equal(one.weight_t, two.weight_t)
    ref = x @ (one.weight_t.float() * one.weight_scale)  # the int8 weights' exact products: the activations' error
    with torch.no_grad():
        err = {name: float((f.output(x, 0) - ref).norm() / ref.norm()) for name, f in (("one", one), ("two", two))}
        assert torch.equal(torch.cat([two.output(x[i : i + 1], 0) for i in range(len(x))]), two.output(x, 0))
    assert err["two"] < err["one"] / 50, err


def test_massive_channels_stay_out_of_the_rotation_and_the_int8_products(monkeypatch):
    """Channels that carry much of every token's energy (SmolLM2's massive activations): the rotation leaves
    the MASSIVE_CHANNELS with the most energy at calibration unrotated, the readers multiply them in float32,
    and the int8 prefix is closer to float32 than with them rotated into the int8 products."""
    from fl_dplora import frozen_int8

    _, model, _ = build("llama")
    decoder, _, blocks = frozen_prefix.decoder_blocks(model)
    with torch.no_grad():
        emb = decoder.get_input_embeddings().weight
        emb[:, 3] += 40 * emb.std()
        emb[:, 17] -= 25 * emb.std()
    start = prefix_start(model)
    kept: list[list[int]] = []
    original = frozen_int8.rotation
    monkeypatch.setattr(frozen_int8, "rotation", lambda n, seed=0, keep=(): kept.append(list(keep)) or original(n, seed, keep))
    enc = examples(10)

    def features(dtype: str) -> torch.Tensor:  # the final features (first answer position), as the bench measures
        states = compute_prefix(model, enc, start, dtype=dtype)
        return first_answer_states(model, [replace(e, prefix=s, prefix_start=start) for e, s in zip(enc, states)], pad_id())

    ref, err = features("float32"), {}
    for k in (0, 2):
        monkeypatch.setattr(frozen_int8, "MASSIVE_CHANNELS", k)
        err[k] = float((1 - _cos(ref, features("int8"))).mean())
    assert kept == [[], [3, 17]]
    copies = frozen_int8.int8_blocks(decoder, blocks, start, frozen_prefix.prefix_fingerprint(model, start))
    hidden = blocks[0].self_attn.q_proj.in_features
    for c in copies:
        for fused in (c.self_attn.q_proj.fused, c.mlp.gate_proj.fused):
            assert fused.tail == 2 and fused.weight_t.shape[0] == hidden and not fused.weight_t[hidden - 2 :].any()
        assert c.self_attn.o_proj.fused.tail == 0 and c.mlp.down_proj.fused.terms == 2
    assert err[2] < err[0] / 2, err


# ------------------------------------------------------------------ every block int8 while only a head trains
@pytest.mark.parametrize("which", TINY)
def test_head_only_features_run_every_block_in_int8(which):
    """With every lora_B 0 (a head-only round's LoRA at init) the blocks that hold LoRA compute the frozen
    model's function: their final features come from int8 copies of their base layers, close to float32."""
    _, model, _ = build(which)
    reset_adapter(model)  # LoRA back at its init: every lora_B 0
    start, enc = prefix_start(model), examples(10)
    with_states = [replace(e, prefix=s, prefix_start=start) for e, s in zip(enc, compute_prefix(model, enc, start, dtype="int8"))]
    final = {}
    for dtype in ("float32", "int8"):
        set_frozen_dtype(model, dtype)
        final[dtype] = first_answer_states(model, with_states, pad_id())
    with torch.no_grad():
        top = frozen_prefix.int8_top(model, start)
    assert top is not None and len(top) == len(frozen_prefix.decoder_blocks(model)[2]) - start
    assert not any(isinstance(m, torch.nn.Linear) or "lora" in n for c in top for n, m in c.named_modules())
    assert not torch.equal(final["float32"], final["int8"])  # the top blocks did run int8
    assert (_cos(final["float32"], final["int8"]) >= 0.99).all()
    alone = [first_answer_states(model, [e], pad_id())[0] for e in with_states[:4]]
    for a, b in zip(alone, final["int8"][:4]):  # per-token scales: an example's features are its own
        _same_up_to_rounding(a, b)


def test_top_blocks_stay_float32_while_lora_trains_or_has_trained():
    _, model, _ = build("llama")
    set_frozen_dtype(model, "int8")
    start = prefix_start(model)
    with torch.no_grad():
        assert frozen_prefix.int8_top(model, start) is None  # B != 0: the adapter changes the output
    reset_adapter(model)  # LoRA back at its init: every lora_B 0
    assert frozen_prefix.int8_top(model, start) is None  # a gradient is wanted: LoRA trains through float32
    with torch.no_grad():
        assert frozen_prefix.int8_top(model, start) is not None
        set_frozen_dtype(model, "float32")
        assert frozen_prefix.int8_top(model, start) is None
    # the first step of a LoRA round (B = 0) still reaches B: its loss runs the float32 top with LoRA
    set_frozen_dtype(model, "int8")
    enc = attach_prefix(model, examples(4), "memory")
    per_example_loss(model, collate(enc, pad_id())).sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads) and any(bool(g.any()) for g in grads)


def test_an_adapter_is_idle_only_as_plain_lora_with_every_b_zero():
    block = torch.nn.Module()
    block.lora_A = torch.nn.Parameter(torch.ones(2, 3))
    block.lora_B = torch.nn.Parameter(torch.zeros(3, 2))
    assert frozen_prefix.adapter_idle([block])
    with torch.no_grad():
        block.lora_B[1, 0] = 1e-30
    assert not frozen_prefix.adapter_idle([block])
    block.lora_B = torch.nn.Parameter(torch.zeros(3, 2))
    block.lora_magnitude_vector = torch.nn.Parameter(torch.ones(3))  # DoRA rescales the base layer even at B = 0
    assert not frozen_prefix.adapter_idle([block])


@pytest.mark.slow
def test_head_only_rounds_run_every_block_int8_on_server_and_clients(tmp_path, monkeypatch):
    """In-process run with the label head's head-only round: the clients' training features and the
    server's evaluation features both come from int8 copies of the top blocks."""
    from fl_dplora import frozen_int8

    seen: list[str] = []
    original = frozen_int8.int8_blocks

    def spy(decoder, blocks, start, fingerprint, first=0):
        if first:
            files = [f.filename for f in inspect.stack(0)[1:16]]
            seen.append("client" if any("clients" in f or "train.py" in f for f in files) else "server")
        return original(decoder, blocks, start, fingerprint, first)

    monkeypatch.setattr(frozen_int8, "int8_blocks", spy)
    summary, _ = run_in_process(2, output_dir=tmp_path / "run", **{
        "model": "tiny-random-llama", "task": "fin-sentiment", "lora-layers": 1, "frozen-dtype": "int8",
        "prefix-cache": "memory", "num-server-rounds": 1, "dp-mode": "sample", "label-head": True, "head-rounds": 1,
        "loss": "label-words"})
    assert summary["rounds"] == 1
    assert set(seen) == {"client", "server"}, seen
