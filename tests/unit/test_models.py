"""Base models (fl_dplora.model_loading), the LoRA wrapper and the process cache (fl_dplora.models)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from fl_dplora import model_loading
from fl_dplora.config import ConfigError, RunConfig
from fl_dplora.model_loading import check_model_name, load_base_model, load_tokenizer
from fl_dplora.models import adapter_parameters, full_model_stats, get_peft_model, reset_adapter
from harness import tiny_config

LLAMA = {"model": "tiny-random-llama"}
GPT2 = {"model": "tiny-random-gpt2", "lora_targets": "c_attn"}


def _ids(name: str) -> torch.Tensor:
    tok = load_tokenizer(name)
    return torch.tensor([tok("The market rallied after strong earnings.").input_ids])


def _snapshot(params) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in params.items()}


def test_tiny_llama_builds_with_lora_on_q_and_v_and_starts_as_the_base_model():
    cfg = tiny_config(**LLAMA)
    model = get_peft_model(cfg)
    params = adapter_parameters(model, cfg)
    assert len(params) == 2 * 2 * 2  # layers x {q_proj, v_proj} x {A, B}
    shapes = {k.split("self_attn.")[1]: tuple(p.shape) for k, p in params.items() if ".layers.0." in k}
    assert shapes == {"q_proj.lora_A.weight": (8, 64), "q_proj.lora_B.weight": (64, 8),
                      "v_proj.lora_A.weight": (8, 64), "v_proj.lora_B.weight": (32, 8)}
    assert sum(p.numel() for p in params.values()) == 3584
    for k, p in params.items():
        assert p.requires_grad
        assert (p.abs().sum() == 0) == ("lora_B" in k)  # B = 0, A random: the adapter starts as a no-op
    frozen = [n for n, p in model.named_parameters() if "lora_" not in n]
    assert frozen and not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    n_full, full_bytes = full_model_stats(model)
    assert n_full == sum(p.numel() for p in load_base_model("tiny-random-llama", seed=cfg.train.seed).parameters())
    assert full_bytes == 4 * n_full
    base = load_base_model("tiny-random-llama", seed=cfg.train.seed)
    with torch.no_grad():
        assert torch.equal(model(input_ids=_ids(cfg.model.name)).logits, base(input_ids=_ids(cfg.model.name)).logits)


def test_tiny_gpt2_builds_with_lora_on_c_attn_and_the_adapter_is_live():
    cfg = tiny_config(**GPT2)
    model = get_peft_model(cfg)
    params = adapter_parameters(model, cfg)
    assert sorted(k.split(".h.")[1] for k in params) == [
        "0.attn.c_attn.lora_A.weight", "0.attn.c_attn.lora_B.weight",
        "1.attn.c_attn.lora_A.weight", "1.attn.c_attn.lora_B.weight",
    ]
    assert model.get_base_model().config.model_type == "gpt2"
    assert model.get_base_model().config.eos_token_id == load_tokenizer(cfg.model.name).eos_token_id
    ids = _ids(cfg.model.name)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        saved = _snapshot(params)
        for k, p in params.items():
            if "lora_B" in k:
                p.normal_(0, 0.5)
        after = model(input_ids=ids).logits
        for k, p in params.items():
            p.copy_(saved[k])
    assert before.shape == after.shape == (1, ids.shape[1], len(load_tokenizer(cfg.model.name)))
    assert not torch.allclose(before, after)  # B != 0 changes the output: LoRA sits in the forward pass


def test_ffa_freezes_a_and_sends_only_b():
    lora_cfg = tiny_config(**LLAMA)
    lora_a = {k: v for k, v in _snapshot(adapter_parameters(get_peft_model(lora_cfg), lora_cfg)).items() if "lora_A" in k}
    cfg = tiny_config(**LLAMA, lora_variant="ffa")
    model = get_peft_model(cfg)
    sent = adapter_parameters(model, cfg)
    assert len(sent) == 4 and all("lora_B" in k for k in sent)
    for name, p in model.named_parameters():
        if "lora_A" in name:
            assert not p.requires_grad
        elif "lora_B" in name:
            assert p.requires_grad
    # A is the seed-shared init, identical on every party (and to the plain-LoRA init).
    a_now = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_A" in n}
    assert a_now.keys() == lora_a.keys()
    assert all(torch.equal(a_now[k], lora_a[k]) for k in lora_a)


def test_adapter_parameters_are_the_live_lora_tensors_under_the_saved_adapter_keys(tmp_path):
    cfg = tiny_config(**LLAMA)
    model = get_peft_model(cfg)
    params = adapter_parameters(model, cfg)
    assert all("lora_" in k and ".default" not in k for k in params)
    model.save_pretrained(str(tmp_path))
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert set(saved) == set(params)
    assert all(torch.equal(saved[k], p.detach()) for k, p in params.items())
    live = dict(model.named_parameters())
    assert all(any(p is q for q in live.values()) for p in params.values())


def test_cache_returns_the_same_object_for_the_same_config():
    cfg = tiny_config(**LLAMA)
    first = get_peft_model(cfg)
    assert get_peft_model(RunConfig.from_record(cfg.to_record())) is first  # an equal config, another object
    assert get_peft_model(tiny_config(**LLAMA, num_server_rounds=7, dp_mode="sample")) is first  # non-LoRA keys


def test_new_rank_rewraps_the_loaded_base_instead_of_reloading(monkeypatch):
    cfg8 = tiny_config(**LLAMA)
    m8 = get_peft_model(cfg8)
    a8 = {k: v for k, v in _snapshot(adapter_parameters(m8, cfg8)).items() if "lora_A" in k}
    embed = m8.get_base_model().get_input_embeddings().weight

    def no_reload(*args, **kwargs):
        raise AssertionError("the base model was loaded again")

    monkeypatch.setattr(model_loading, "load_base_model", no_reload)
    cfg4 = tiny_config(**LLAMA, lora_rank=4)
    m4 = get_peft_model(cfg4)
    assert m4 is not m8
    assert m4.get_base_model().get_input_embeddings().weight is embed
    p4 = adapter_parameters(m4, cfg4)
    assert len(p4) == 8 and all(p.shape[0] == 4 or p.shape[1] == 4 for p in p4.values())
    assert sum(1 for n, _ in m4.named_modules() if n.endswith("lora_A.default")) == 4  # no stale adapters
    back = get_peft_model(cfg8)
    assert back.get_base_model().get_input_embeddings().weight is embed
    p8 = adapter_parameters(back, cfg8)
    assert all(torch.equal(p8[k], a8[k]) for k in a8)  # the LoRA init is a function of the seed only


def test_reset_adapter_restores_the_seed_init_of_the_cached_model():
    cfg = tiny_config(**LLAMA)
    model = get_peft_model(cfg)
    reset_adapter(model)
    init = _snapshot(adapter_parameters(model, cfg))
    with torch.no_grad():
        for p in adapter_parameters(model, cfg).values():
            p.add_(1.0)  # what a finished run leaves behind
    assert get_peft_model(cfg) is model
    reset_adapter(model)
    now = adapter_parameters(model, cfg)
    assert all(torch.equal(now[k], init[k]) for k in init)
    assert all(now[k].abs().sum() == 0 for k in init if "lora_B" in k)
    with pytest.raises(ValueError):
        reset_adapter(load_base_model("tiny-random-llama"))


def test_same_seed_gives_identical_base_and_lora_init_on_every_party():
    a = load_base_model("tiny-random-llama", seed=42).state_dict()
    b = load_base_model("tiny-random-llama", seed=42).state_dict()
    c = load_base_model("tiny-random-llama", seed=43).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], c["model.layers.0.self_attn.q_proj.weight"])
    cfg = tiny_config(**LLAMA)
    first = _snapshot(adapter_parameters(get_peft_model(cfg), cfg))
    get_peft_model(tiny_config(**GPT2))  # another base: the next llama build is a fresh load
    again = _snapshot(adapter_parameters(get_peft_model(cfg), cfg))
    assert all(torch.equal(first[k], again[k]) for k in first)
    other = _snapshot(adapter_parameters(get_peft_model(tiny_config(**LLAMA, seed=7)), tiny_config(**LLAMA, seed=7)))
    assert not torch.equal(other[next(k for k in first if "lora_A" in k)], first[next(k for k in first if "lora_A" in k)])


def test_lora_targets_missing_from_the_model_is_a_config_error():
    with pytest.raises(ConfigError, match="lora-targets: c_attn not in model tiny-random-llama"):
        get_peft_model(tiny_config(model="tiny-random-llama", lora_targets="q_proj,c_attn"))
    cfg = tiny_config(**LLAMA)  # and the cache recovers
    assert len(adapter_parameters(get_peft_model(cfg), cfg)) == 8


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-gpt2", "smollm2-135m", "HuggingFaceTB/SmolLM2-135M"])
def test_check_model_name_accepts_aliases_and_hub_ids(name):
    check_model_name(name)


def test_check_model_name_errors(tmp_path):
    cases = {
        "tiny-random-lama": "model: unknown alias 'tiny-random-lama'",
        "llama": "model: unknown alias",
        str(tmp_path / "missing.gguf"): "model: GGUF file not found",
        str(tmp_path / "no" / "such" / "dir"): "model: no such file or directory",
        "./not-here": "model: no such file or directory",
        "org/name/extra": "model: no such file or directory",
        str(tmp_path): "has no config.json",
    }
    for name, message in cases.items():
        with pytest.raises(ConfigError, match=message.replace(".", r"\.")) as info:
            check_model_name(name)
        assert len(str(info.value).splitlines()) == 1
