"""One DP-SGD step is exactly the subsampled Gaussian mechanism the accountant composes.

- the update is -lr * (sum of per-example clipped gradients over the Poisson-sampled batch) / (q*n):
  clipping per example (not per micro-batch), SUM reduction, division by the *expected* batch size;
- the noise is N(0, (sigma*C)^2) added once per step, i.e. std sigma*C/(q*n) on the gradient;
- the noise source: the OS CSPRNG is standard normal and not reproducible; the seeded path is;
- dp-mode client (DP-FedAvg on the server): each update clipped to C, sum noised with sigma*C,
  divided by the expected number of clients q*N.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from fl_dplora import models
from fl_dplora.config import resolve
from fl_dplora.data import collate, encode_all, load_task
from fl_dplora.model_loading import load_tokenizer
from fl_dplora.models import adapter_parameters, get_peft_model
from fl_dplora.privacy.mechanisms import gaussian_like, make_generator, secure_standard_normal
from fl_dplora.train import DPSGD, local_train, per_example_loss

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: harness

N_EXAMPLES, BATCH, MICRO, LR = 12, 4, 2, 0.5
Q = BATCH / N_EXAMPLES


@pytest.fixture(scope="module")
def setup():
    """A float64 tiny LLaMA with every LoRA target, random B, and 12 examples of different lengths."""
    models.forget_cached_model()
    cfg = resolve({
        "model": "tiny-random-llama", "lora-targets": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        "lora-rank": 8, "local-steps": 1, "batch-size": BATCH, "micro-batch-size": MICRO,
        "optimizer": "sgd", "momentum": 0.0, "learning-rate": LR, "lr-schedule": "constant",
    })
    model = get_peft_model(cfg).double()
    named = {k: p for k, p in adapter_parameters(model, cfg).items() if p.requires_grad}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for k, p in named.items():
            if "lora_B" in k:  # B = 0 would give A zero gradients
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    params = list(named.values())
    init = [p.detach().clone() for p in params]
    tok = load_tokenizer(cfg.model.name)
    data = encode_all(tok, load_task("general-instruct", 42).train[:N_EXAMPLES], 64)
    assert len({len(e.input_ids) for e in data}) > 3
    yield cfg, model, params, init, data, tok.pad_token_id
    models.forget_cached_model()


def sampling_seed_with_batch() -> tuple[int, list[int]]:
    """A seed whose Poisson batch spans several micro-batches and differs in size from q*n."""
    for seed in range(100):
        idx = (torch.rand(N_EXAMPLES, generator=torch.Generator().manual_seed(seed)) < Q).nonzero().flatten().tolist()
        if len(idx) > MICRO and len(idx) != BATCH:
            return seed, idx
    raise AssertionError("no suitable seed")


def one_step(setup, dp: DPSGD, sampling_seed: int) -> list[torch.Tensor]:
    """Reset the adapter, run local_train for one step; return the parameter update."""
    cfg, model, params, init, data, pad_id = setup
    with torch.no_grad():
        for p, p0 in zip(params, init):
            p.copy_(p0)
    opt = torch.optim.SGD(params, lr=LR, momentum=0.0)
    stats = local_train(model, params, data, cfg, optimizer=opt, dp=dp,
                        sampling_generator=torch.Generator().manual_seed(sampling_seed), pad_id=pad_id)
    assert stats.steps == 1 and stats.sample_rate == pytest.approx(Q)
    return [(p.detach() - p0) for p, p0 in zip(params, init)]


def test_dp_step_is_clipped_sum_over_expected_batch(setup):
    cfg, model, params, init, data, pad_id = setup
    seed, idx = sampling_seed_with_batch()
    with torch.no_grad():
        for p, p0 in zip(params, init):
            p.copy_(p0)
    model.eval()
    grads = []
    for i in idx:  # the definition: one autograd call per sampled example
        loss = per_example_loss(model, collate([data[i]], pad_id)).sum()
        grads.append([g.detach() for g in torch.autograd.grad(loss, params)])
    norms = torch.stack([torch.sqrt(sum((g ** 2).sum() for g in gs)) for gs in grads])
    c = float(norms.median())
    factors = torch.clamp(c / norms, max=1.0)
    assert (factors < 1).any() and (factors == 1).any()
    expected = [-LR * sum(f * gs[j] for f, gs in zip(factors, grads)) / (Q * N_EXAMPLES) for j in range(len(params))]

    update = one_step(setup, DPSGD(0.0, c, torch.Generator().manual_seed(1)), seed)
    worst = max(float((u - e).norm() / e.norm()) for u, e in zip(update, expected))
    print(f"batch {idx} (q*n={Q * N_EXAMPLES:g}), C={c:.4g}: max relative error of the update {worst:.2e}")
    assert worst <= 1e-5
    # dividing by the actual batch size instead of q*n would be data-dependent (and off by this much)
    assert abs(len(idx) / (Q * N_EXAMPLES) - 1) > 0.1


def test_dp_step_noise_std_is_sigma_c_over_qn(setup):
    """Same batch, sigma=0 vs sigma>0: the difference is the noise alone, read off the parameters."""
    seed, _ = sampling_seed_with_batch()
    sigma, c = 1.3, 0.7
    clean = one_step(setup, DPSGD(0.0, c, None), seed)
    noisy = one_step(setup, DPSGD(sigma, c, make_generator(7, 0, 1, 2)), seed)
    noise = torch.cat([(n - k).flatten() for n, k in zip(noisy, clean)]) / -LR  # the noise on the gradient
    expected_std = sigma * c / (Q * N_EXAMPLES)
    ratio = float(noise.std()) / expected_std
    print(f"end-to-end noise std / (sigma*C/(q*n)) = {ratio:.4f} over {noise.numel()} values")
    # added once per step (per micro-batch would be sqrt(#micro-batches) = sqrt(2..) larger)
    assert ratio == pytest.approx(1.0, abs=0.05)
    assert abs(float(noise.mean())) < 5 * expected_std / math.sqrt(noise.numel())

    # seeded research runs are reproducible; the default CSPRNG path is not
    again = one_step(setup, DPSGD(sigma, c, make_generator(7, 0, 1, 2)), seed)
    assert all(torch.equal(a, b) for a, b in zip(noisy, again))
    secure1 = one_step(setup, DPSGD(sigma, c, None), seed)
    secure2 = one_step(setup, DPSGD(sigma, c, None), seed)
    assert not any(torch.equal(a, b) for a, b in zip(secure1, secure2))


@pytest.mark.parametrize("seeded", [True, False], ids=["seeded", "csprng"])
def test_gaussian_like_std(seeded):
    std = 0.37
    t = torch.zeros(400_000, dtype=torch.float32)
    z = gaussian_like(t, std, make_generator(3, 1) if seeded else None)
    assert z.shape == t.shape and z.dtype == t.dtype
    ratio = float(z.double().std()) / std
    print(f"gaussian_like ({'seeded' if seeded else 'csprng'}): std ratio {ratio:.4f}")
    assert ratio == pytest.approx(1.0, abs=0.02)
    assert abs(float(z.double().mean())) < 5 * std / math.sqrt(t.numel())
    assert torch.equal(gaussian_like(t, 0.0, None), torch.zeros_like(t))


def test_secure_standard_normal_is_standard_normal():
    n = 200_001  # odd: Box-Muller makes pairs
    z = secure_standard_normal(n)
    assert z.shape == (n,) and z.dtype == torch.float64 and torch.isfinite(z).all()
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert abs(float(z.std()) - 1) < 5 / math.sqrt(2 * n)
    stats = pytest.importorskip("scipy.stats")
    ks = stats.kstest(z.numpy(), "norm")
    print(f"secure_standard_normal: mean {float(z.mean()):.4f} std {float(z.std()):.4f} KS p={ks.pvalue:.3g}")
    assert ks.pvalue > 1e-4
    # tails are where a bad uniform (e.g. only 32 random bits, or a sign bug) shows
    assert float((z.abs() > 3).double().mean()) == pytest.approx(2 * stats.norm.sf(3), rel=0.2)


def test_noise_sources_reproducible_only_when_seeded():
    t = torch.zeros(1000)
    a = gaussian_like(t, 1.0, make_generator(42, 3, 1))
    b = gaussian_like(t, 1.0, make_generator(42, 3, 1))
    assert torch.equal(a, b)
    assert not torch.equal(a, gaussian_like(t, 1.0, make_generator(42, 3, 2)))  # distinct streams per use
    assert make_generator(None, 3, 1) is None
    # the CSPRNG path ignores torch's global seed: same seed, different noise
    torch.manual_seed(0)
    c = gaussian_like(t, 1.0, None)
    torch.manual_seed(0)
    d = gaussian_like(t, 1.0, None)
    assert not torch.equal(c, d)
    assert not torch.equal(secure_standard_normal(1000), secure_standard_normal(1000))


# ---------------------------------------------------------------- dp-mode client: the server's mechanism
def _server_round(update_norm: float, sigma: float, c: float, seed: int = 42, num_nodes: int = 4, q: float = 0.5,
                  dim: int = 20_000):
    """One round of DPLoRAFedAvg (dp-mode client) against fake clients that all send the same update."""
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
    from harness import InProcessGrid

    from fl_dplora.strategies.dp_lora import DPLoRAFedAvg
    from fl_dplora.transport import to_array_record

    update = torch.zeros(dim)
    update[:100] = update_norm / 10.0  # norm = update_norm

    def client(msg, context):
        content = RecordDict({"arrays": to_array_record({"w": update}), "metrics": MetricRecord({"num-examples": 5})})
        return Message(content, reply_to=msg)

    cfg = resolve({"dp-mode": "client", "fraction-train": q, "max-grad-norm": c, "noise-multiplier": sigma,
                   "secure-rng": False, "min-available": 1, "seed": seed, "population": num_nodes})
    grid = InProcessGrid(num_nodes, client=client)
    strategy = DPLoRAFedAvg(cfg, {"w": torch.zeros(dim)}, server_sigma=sigma)
    messages = list(strategy.configure_train(1, strategy.global_record(), ConfigRecord({"x": 1}), grid))
    replies = grid.send_and_receive(messages)
    strategy.aggregate_train(1, replies)
    return strategy.global_weights["w"], len(replies), update, q * num_nodes


def test_client_mode_server_clips_each_update_and_divides_by_expected_clients():
    c = 0.5
    for seed in range(42, 62):  # a Poisson draw with some clients, but not exactly the expected q*N of them
        new, m, update, expected_m = _server_round(update_norm=40.0, sigma=0.0, c=c, seed=seed)
        if m and m != expected_m:
            break
    assert m > 0 and m != expected_m  # so dividing by the actual count would be caught
    clipped = update * (c / float(update.norm()))
    assert torch.allclose(new, m * clipped / expected_m, rtol=1e-5, atol=1e-7)


def test_client_mode_server_noise_std_is_sigma_c_over_expected_clients():
    sigma, c = 1.1, 0.5
    new, m, _, expected_m = _server_round(update_norm=0.0, sigma=sigma, c=c)
    ratio = float(new.double().std()) / (sigma * c / expected_m)
    print(f"client-mode server noise std ratio {ratio:.4f} ({m} clients replied)")
    assert ratio == pytest.approx(1.0, abs=0.05)
