"""Secure aggregation (Flower's SecAgg+) with accounted client-level DP: the server sees only the sum.

In-process runs (tests/harness.py: the real ServerApp loop and ClientApp, Flower's own SecAgg+ mod and
workflow, every message through Flower's wire format) record what each client handed to SecAgg+ and
every message the server received, and compare.
"""

from __future__ import annotations

import json
import math

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting.rdp import RdpAccountant
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from harness import InProcessGrid, run_in_process, tiny_config
from opacus.accountants import RDPAccountant

from fl_dplora.config import ConfigError
from fl_dplora.privacy import modes
from fl_dplora.privacy.mechanisms import clip_to_norm
from fl_dplora.privacy.modes.secure import SecureAggregation
from fl_dplora.privacy.secagg_quantization import MODULUS, plan, refusal_probability, round_to_grid
from fl_dplora.strategies import secagg

SECURE = {"dp_mode": "client", "secure_aggregation": True, "population": 4, "num_server_rounds": 2,
          "target_epsilon": 8.0, "accountant": "rdp"}


def flat(update) -> np.ndarray:
    return np.concatenate([update[k].detach().double().numpy().ravel() for k in sorted(update)])


@pytest.fixture
def recorder(monkeypatch):
    """What each client's dp-mode handed on (in delivery order) and every unmasked sum."""
    rec = {"inputs": [], "outputs": [], "outcomes": []}

    def recording(original):
        def client_update(self, delta, sigma, generator):
            out = original(self, delta, sigma, generator)
            rec["inputs"].append({k: v.clone() for k, v in delta.items()})
            rec["outputs"].append({k: v.clone() for k, v in out.items()})
            return out
        return client_update

    # what a client-level mode sends in plaintext, and what the SecAgg+ wrapper hands the secure sum instead
    for cls in (modes.ClientDP, SecureAggregation):
        monkeypatch.setattr(cls, "client_update", recording(cls.client_update))
    secure_sum = secagg.secure_sum

    def recording_sum(*args, **kwargs):
        outcome = secure_sum(*args, **kwargs)
        rec["outcomes"].append(outcome)
        return outcome

    monkeypatch.setattr(secagg, "secure_sum", recording_sum)
    return rec


def received_arrays(reply) -> list[np.ndarray]:
    """Every array the server could read from a reply: array records, and ndarray bytes in config records."""
    found = [a.numpy() for rec in reply.content.array_records.values() for a in rec.values()]
    for record in reply.content.config_records.values():
        for value in record.values():
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, bytes):
                    try:
                        found.append(bytes_to_ndarray(item))
                    except Exception:  # noqa: BLE001 - keys and ciphertexts are not arrays
                        continue
    return found


def max_correlation(grid: InProcessGrid, client_updates: list[dict[str, torch.Tensor]]) -> tuple[float, int]:
    """The largest |correlation| between any array the server received and the same-shaped part of
    any client's update, and how many (array, update) pairs were compared."""
    worst, pairs = 0.0, 0
    for ex in grid.exchanges:
        if ex.reply is None or ex.reply.has_error():
            continue
        for arr in received_arrays(ex.reply):
            arr = np.asarray(arr, dtype=np.float64).ravel()
            for update in client_updates:
                for t in update.values():
                    v = t.double().numpy().ravel()
                    if v.size == arr.size and v.size >= 64 and arr.std() > 0 and v.std() > 0:
                        worst = max(worst, abs(float(np.corrcoef(arr, v)[0, 1])))
                        pairs += 1
    return worst, pairs


def test_no_message_the_server_receives_holds_a_client_update(recorder):
    grid = InProcessGrid(4, seed=42)
    run_in_process(4, grid=grid, secure_rng=False, **SECURE)
    assert len(recorder["outputs"]) == 8 and len(recorder["outcomes"]) == 2
    worst, pairs = max_correlation(grid, recorder["outputs"])
    keys = len(recorder["outputs"][0])
    assert pairs >= 2 * 4 * keys * 4, pairs  # every masked array of every reply was compared with every update
    assert worst < 0.25, worst  # masked vectors are uniform mod 2^32: |corr| ~ 1/sqrt(size)
    # the stage-2 replies carry the masked vector and nothing array-like in the clear
    stage2 = [ex for ex in grid.exchanges if "arrays" in ex.instruction.content.array_records]  # (the mod pops the stage key)
    assert len(stage2) == 8 and all(not any(len(r) for r in ex.reply.content.array_records.values()) for ex in stage2)
    # ... while the unmasked sum is the sum of what the clients handed on (exact: values on the grid),
    # and within survivors x step of the sum of their clipped updates
    mode = modes.for_config(tiny_config(**SECURE))
    for rnd, outcome in enumerate(recorder["outcomes"]):
        outs, ins = recorder["outputs"][4 * rnd: 4 * rnd + 4], recorder["inputs"][4 * rnd: 4 * rnd + 4]
        assert sorted(outcome.survivors) == sorted(grid.contexts)
        total = flat(outcome.total)
        np.testing.assert_allclose(total, sum(flat(o) for o in outs), rtol=0, atol=1e-5)
        step = mode.secagg.plan(total.size, 1.0).step
        clipped = sum(flat(dict(zip(sorted(d), clip_to_norm([d[k] for k in sorted(d)], 1.0)[0]))) for d in ins)
        assert np.abs(total - clipped).max() <= 4 * step + 1e-6
        assert np.abs(clipped).max() > 1000 * step  # the comparison is not trivially small


def test_the_same_check_finds_plaintext_updates_without_secure_aggregation(recorder):
    """Negative control: with plain client-level DP every reply *is* the clipped update."""
    grid = InProcessGrid(4, seed=42)
    run_in_process(4, grid=grid, secure_rng=False, **{**SECURE, "secure_aggregation": False})
    worst, _ = max_correlation(grid, recorder["outputs"])
    assert worst > 0.999


def _drop_at_masked_vectors(victims: set[int]):
    def before(node_id, msg):
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if node_id in victims and configs is not None and configs.get(Key.STAGE) == Stage.COLLECT_MASKED_VECTORS:
            raise RuntimeError("node lost after sharing its keys")
    return before


def test_dropout_after_key_sharing_yields_the_survivors_sum_with_full_noise(recorder, tmp_path):
    grid = InProcessGrid(4, seed=42)
    victim = sorted(grid.contexts)[0]
    grid.before = _drop_at_masked_vectors({victim})
    cfg = {**SECURE, "client_noise": "distributed", "num_server_rounds": 1}
    summary, out = run_in_process(4, grid=grid, secure_rng=False, output_dir=tmp_path, **cfg)
    [outcome] = recorder["outcomes"]
    assert sorted(outcome.survivors) == sorted(set(grid.contexts) - {victim})
    assert len(recorder["outputs"]) == 3  # the victim never trained
    total = flat(outcome.total)
    np.testing.assert_allclose(total, sum(flat(o) for o in recorder["outputs"]), rtol=0, atol=1e-5)
    # the noise the three survivors put in: variance 3 x (σC')²/threshold = (σC')² (threshold 3 of 4)
    mode = modes.for_config(tiny_config(**cfg))
    assert mode.secagg.threshold() == 3
    sigma = summary["privacy"]["noise_multiplier"]
    grid_plan = mode.secagg.plan(total.size, sigma)
    signal = sum(flat(dict(zip(sorted(d), clip_to_norm([d[k] for k in sorted(d)], 1.0)[0]))) for d in recorder["inputs"])
    noise_var = float(np.var(total - signal))
    full = (sigma * grid_plan.sensitivity) ** 2
    assert 0.85 * full < noise_var < 1.15 * full, (noise_var, full)
    operator = [json.loads(line) for line in (out / "operator.jsonl").read_text().splitlines()]
    [row] = [r for r in operator if r.get("round") == 1 and "accepted" in r]
    assert row["accepted"] == 3 and any("node lost" in d for d in row["dropped"])


def test_released_noise_is_at_least_full_whatever_survived():
    """Distributed noise: the server tops the survivors' shares up to the population's variance, so the
    released sum carries >= (σC')² and its variance does not depend on how many survived."""
    cfg = tiny_config(**{**SECURE, "client_noise": "distributed", "population": 5, "secagg_threshold": 3})
    mode = modes.for_config(cfg)
    dim, sigma = 200_000, 1.3
    full = (sigma * mode.secagg.plan(dim, sigma).sensitivity) ** 2
    gen = torch.Generator().manual_seed(0)
    for survivors in (3, 4, 5):
        share = mode.secagg.plan(dim, sigma).noise_std_per_client ** 2 * survivors  # what the survivors sent
        total = {"x": torch.randn(dim, generator=gen, dtype=torch.float64).float() * math.sqrt(share)}
        released = mode.secagg.aggregate(total, survivors, sigma, dim, gen)["x"] * mode.divisor
        var = float(released.double().var())
        assert var == pytest.approx(full * 5 / 3, rel=0.02)
        assert var >= full
    assert mode.secagg.aggregate(None, 0, sigma, dim, gen) is None


def test_too_few_survivors_are_not_unmasked(recorder, tmp_path):
    grid = InProcessGrid(4, seed=42)
    grid.before = _drop_at_masked_vectors(set(sorted(grid.contexts)[:2]))
    summary, out = run_in_process(4, grid=grid, secure_rng=False, output_dir=tmp_path,
                                  **{**SECURE, "client_noise": "distributed", "num_server_rounds": 1})
    [outcome] = recorder["outcomes"]
    assert outcome.total is None and "not unmasked" in outcome.reason
    # no unmask request ever went out: nobody revealed a share that would open the two survivors' sum
    assert not any(Key.ACTIVE_NODE_ID_LIST in ex.instruction.content.config_records.get(RECORD_KEY_CONFIGS, {})
                   for ex in grid.exchanges)
    operator = [json.loads(line) for line in (out / "operator.jsonl").read_text().splitlines()]
    assert [r["accepted"] for r in operator if r.get("round") == 1 and "accepted" in r] == [0]
    assert summary["privacy"]["steps"] == 1  # the round was charged although nothing was released


@pytest.mark.parametrize("noise", ["central", "distributed"])
def test_epsilon_matches_dp_accounting(noise, tmp_path):
    summary, _ = run_in_process(4, secure_rng=False, output_dir=tmp_path, **{**SECURE, "client_noise": noise})
    privacy = summary["privacy"]
    sigma, rounds = privacy["accountant_noise_multiplier"], privacy["steps"]
    assert rounds == 2 and privacy["sample_rate"] == 1.0
    google = RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)
    google.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(1.0, dp_accounting.GaussianDpEvent(sigma)), rounds))
    assert privacy["epsilon"] == pytest.approx(google.get_epsilon(1e-5), rel=0.01)
    assert privacy["epsilon"] <= 8.0
    sa = privacy["secure_aggregation"]
    assert sa["threshold"] == 3 and sa["secagg_wraparound_bound"] == 0.0 and sa["delta_extra"] < 1e-7
    if noise == "distributed":  # against the server too: it unmasks only a sum carrying >= σC', but it
        # knows who took part (a client's data is replaced, moving its update by 2C': multiplier σ/2)
        server = RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)
        server.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(sigma / 2), rounds))
        assert privacy["epsilon_against_server"] == pytest.approx(server.get_epsilon(1e-5), rel=0.01)
        assert privacy["epsilon_against_server"] > privacy["epsilon"]
        assert sa["secagg_saturation_bound"] <= 1e-12
    else:
        assert "epsilon_against_server" not in privacy and sa["secagg_saturation_bound"] == 0.0


def test_sampling_rate_event_and_refusal_probability():
    """With client sampling the round's event is (σ, q, 1) and a round with fewer than the threshold
    sampled is refused with the binomial probability the privacy block adds to δ."""
    cfg = tiny_config(**{**SECURE, "population": 60, "fraction_train": 0.5, "secagg_threshold": 10})
    mode = modes.for_config(cfg)
    assert mode.round_event(1.1) == (1.1, 0.5, 1)
    p = refusal_probability(60, 0.5, 10)
    exact = sum(math.comb(59, k) * 0.5**59 for k in range(10))
    assert p == pytest.approx(exact, rel=1e-12) and p < 1e-5
    assert mode.secagg.delta_extra(1.1, 1000, 8.0) == pytest.approx((1 + math.exp(8.0)) * 2 * p, rel=1e-9)


def test_run_refused_when_sampling_would_often_fall_below_the_threshold(tmp_path):
    with pytest.raises(ConfigError, match="secure-aggregation: a round is refused when fewer than 2 clients"):
        run_in_process(4, output_dir=tmp_path, **{**SECURE, "fraction_train": 0.5})


@pytest.mark.parametrize("overrides, message", [
    ({"client_noise": "distributed", "secure_aggregation": False}, "client-noise: distributed needs"),
    ({"dp_mode": "sample"}, "secure-aggregation: for dp-mode client or none"),
    ({"client_noise": "local"}, "secure-aggregation: with client-noise central or distributed"),
    ({"population": 1}, "secure-aggregation: set population"),
    ({"secagg_threshold": 5}, "secagg-threshold: 5 is more than the population 4"),
    ({"secagg_shares": 3, "secagg_threshold": 3}, "secagg-threshold: 3 must be < secagg-shares 3"),
])
def test_bad_secure_aggregation_config_is_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        tiny_config(**{**SECURE, **overrides})
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_no_dp_secure_aggregation_is_the_mean_of_clipped_updates(recorder, monkeypatch):
    outputs = []
    original = SecureAggregation.client_update  # dp-mode none hands SecAgg+ its update through the wrapper

    def client_update(self, delta, sigma, generator):
        out = original(self, delta, sigma, generator)
        outputs.append(out)
        return out

    monkeypatch.setattr(SecureAggregation, "client_update", client_update)
    summary, _ = run_in_process(3, secure_rng=False, **{**SECURE, "dp_mode": "none", "num_server_rounds": 1,
                                                         "population": 3})
    [outcome] = recorder["outcomes"]
    np.testing.assert_allclose(flat(outcome.total), sum(flat(o) for o in outputs), atol=1e-5)
    assert all(np.linalg.norm(flat(o)) <= 1.0 + 1e-3 for o in outputs)  # clipped to max-grad-norm first
    assert summary["privacy"]["epsilon"] is None and summary["privacy"]["secure_aggregation"]["threshold"] == 2


# ----------------------------------------------------------------------------- the grid itself
def test_flower_quantization_is_exact_on_the_grid():
    grid_plan = plan(1.0, 5000, 5, 10)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5000, generator=gen) * 0.01
    on_grid = round_to_grid(x, grid_plan.step, gen)
    assert torch.all(torch.remainder(on_grid.double(), grid_plan.step) == 0)
    assert float((on_grid - x).abs().max()) < grid_plan.step
    q = quantize([on_grid.numpy()], grid_plan.clipping_range, grid_plan.quantization_range)[0]
    back = dequantize([q], grid_plan.clipping_range, grid_plan.quantization_range)[0]
    np.testing.assert_array_equal(back, on_grid.numpy().astype(np.float64))  # Flower's rounding changed nothing
    # unbiased: the mean of many roundings is the value
    many = torch.stack([round_to_grid(x[:50], grid_plan.step, gen) for _ in range(4000)]).double().mean(0)
    assert float((many - x[:50].double()).abs().max()) < 0.1 * grid_plan.step


def test_no_wraparound_at_the_most_clients_the_plan_allows():
    for clients in (5, 1023, 1024, 5000):
        grid_plan = plan(1.0, 100, clients, 10)
        levels = grid_plan.quantization_range
        assert clients * levels < MODULUS
        # the largest possible sum (every client at +c) survives the modulus and decodes to clients x c
        top = np.int64(levels) * clients % grid_plan.modulus_range
        assert top * grid_plan.step - clients * grid_plan.clipping_range == pytest.approx(clients * grid_plan.clipping_range)
        if clients >= 1023:  # the plan took the most levels it could: twice as many would wrap to garbage
            assert np.int64(2 * levels) * clients % grid_plan.modulus_range != 2 * levels * clients


def test_saturation_bound_holds_for_noisy_shares():
    grid_plan = plan(1.0, 100_000, 4, 20, noise_multiplier=1.0, min_survivors=3)
    assert grid_plan.saturation_bound <= 1e-12
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(100_000, generator=gen)
    x = x / x.norm()  # a clipped update at the bound
    noisy = round_to_grid(x, grid_plan.step, gen) + round_to_grid(
        torch.randn(100_000, generator=gen, dtype=torch.float64) * grid_plan.noise_std_per_client, grid_plan.step, gen)
    assert float(noisy.abs().max()) < grid_plan.clipping_range
    central = plan(1.0, 100_000, 4, 20)
    assert central.saturation_bound == 0.0 and central.sensitivity < 1.0 + 1e-3


def test_ffa_and_label_head_rounds_sum_exactly_what_travels(recorder):
    """FFA: only B travels, so the unmasked sum is B's update; label-head rounds: the head alone, then
    LoRA and head together (the round's keys decide what SecAgg+ sums)."""
    cfg = {**SECURE, "population": 3, "lora_variant": "ffa", "label_head": True, "loss": "label-words",
           "head_rounds": 1, "num_server_rounds": 2, "client_noise": "distributed"}
    summary, _ = run_in_process(3, secure_rng=False, **cfg)
    head_round, lora_round = recorder["outcomes"]
    assert head_round.total and all("lora_" not in k for k in head_round.total)
    assert any("lora_B" in k for k in lora_round.total) and not any("lora_A" in k for k in lora_round.total)
    for outcome, outs in ((head_round, recorder["outputs"][:3]), (lora_round, recorder["outputs"][3:])):
        assert sorted(outcome.total) == sorted(outs[0])
        np.testing.assert_allclose(flat(outcome.total), sum(flat(o) for o in outs), atol=1e-5)
    assert summary["privacy"]["epsilon"] <= 8.0


def test_the_client_app_module_loads_without_torch():
    """On a SuperNode every message starts a fresh flwr-clientapp process: the SecAgg+ key, share and
    unmask stages (the mod alone) must not pay for importing torch and transformers."""
    import subprocess
    import sys

    code = ("import sys, fl_dplora.clients.client_app as c; assert c.app is not None; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# ------------------------------------------------------------- every cause of refusal (issue 27 defect 3)
def test_min_available_equal_to_the_population_is_refused_before_training(recorder, tmp_path):
    """population 5, fraction-train 1, min-available 5: the neighbour with 4 clients is refused every
    round (membership exposed). The planning counts it (delta_extra >= 1) and the run is refused in one
    line naming the keys, before any client trains."""
    cfg = tiny_config(**{**SECURE, "population": 5, "min_available": 5})
    mode = modes.for_config(cfg)
    assert mode.secagg.needed() == 5 and mode.secagg.refusal_probability() == 1.0
    assert mode.secagg.delta_extra(1.0, 1000, 8.0) >= 1.0
    grid = InProcessGrid(5, seed=42)
    with pytest.raises(ConfigError) as err:
        run_in_process(5, grid=grid, output_dir=tmp_path, **{**SECURE, "min_available": 5})
    msg = str(err.value)
    assert msg.startswith("secure-aggregation: a round is refused when fewer than 5 clients") and "\n" not in msg
    assert "min-available" in msg and "secagg-threshold" in msg and "refused every round" in msg
    assert not recorder["inputs"] and not grid.exchanges  # nobody trained, no message went out
    # one fewer is fine: the other 4 alone always reach 4
    assert modes.for_config(tiny_config(**{**SECURE, "population": 5, "min_available": 4})).secagg.delta_extra(1.0, 1000, 8.0) == 0


@pytest.mark.parametrize("population, q, threshold, min_available, dropout", [
    (5, 1.0, 4, 1, 0.01),  # threshold 4 of 5: one dropout among the other 4 refuses the neighbour
    (30, 0.5, 3, 6, 0.0),  # min-available above the threshold is what binds
    (30, 0.5, 6, 2, 0.1),  # the threshold binds, sampling and dropouts thin the others
])
def test_threshold_min_available_and_dropout_rate_are_counted(population, q, threshold, min_available, dropout):
    cfg = tiny_config(**{**SECURE, "population": population, "fraction_train": q, "secagg_threshold": threshold,
                         "min_available": min_available, "secagg_dropout_rate": dropout})
    mode = modes.for_config(cfg)
    needed, p = max(threshold, min_available), q * (1 - dropout)
    exact = sum(math.comb(population - 1, k) * p**k * (1 - p) ** (population - 1 - k) for k in range(needed))
    assert mode.secagg.needed() == needed
    assert mode.secagg.refusal_probability() == pytest.approx(exact, rel=1e-12) and exact > 0
    assert mode.secagg.delta_extra(1.1, 1000, 8.0) == pytest.approx((1 + math.exp(8.0)) * 2 * exact, rel=1e-9)
    sa = mode.secagg.describe(1000, 1.1, 8.0)
    assert sa["needed"] == needed and sa["dropout_rate"] == dropout and sa["refusal_probability_per_round"] == pytest.approx(exact)
    with pytest.raises(ConfigError, match=f"fewer than {needed} clients .* secagg-dropout-rate"):
        mode.secagg.check_delta(1.1, 1000)
    # without the declared dropouts (or the min-available) the first case plans no refusal at all
    if population == 5:
        assert modes.for_config(tiny_config(**{**SECURE, "population": 5, "secagg_threshold": 4})).secagg.refusal_probability() == 0


def test_dropout_rate_is_only_for_secure_aggregation():
    with pytest.raises(ConfigError, match="secagg-dropout-rate: only with secure-aggregation"):
        tiny_config(dp_mode="client", population=4, secagg_dropout_rate=0.1)
    with pytest.raises(ConfigError, match="secagg-dropout-rate"):
        tiny_config(**{**SECURE, "secagg_dropout_rate": 1.5})


@pytest.mark.parametrize("nodes, population", [(4, 5), (4, 3)])
def test_population_other_than_the_nodes_present_is_refused_before_training(recorder, tmp_path, nodes, population):
    """Too few nodes (population 5, 4 connected: every round would be planned for 5) or too many (the
    modulus and the noise top-up assume 3): refused in one line at start, no client trains."""
    grid = InProcessGrid(nodes, seed=42)
    with pytest.raises(ConfigError) as err:
        run_in_process(nodes, grid=grid, output_dir=tmp_path, **{**SECURE, "population": population, "round_timeout": 1.0})
    assert str(err.value).startswith(f"population: {nodes} nodes connected but population = {population}")
    assert "\n" not in str(err.value)
    assert not recorder["inputs"] and not grid.exchanges


def test_simulate_refuses_before_ray_starts(tmp_path):
    """`fl-dplora simulate`: a certain refusal (min-available = population) and a population other than
    --num-clients are refused in one line by the command, before Ray or a model starts."""
    from harness import run_cli

    base = "model=tiny-random-llama task=fin-sentiment dp-mode=client secure-aggregation=true max-train-samples=300"
    for extra, start in [("min-available=3", "secure-aggregation: a round is refused when fewer than 3 clients"),
                         ("population=4", "population: 4 declared but simulate starts 3 nodes"),
                         ("secagg-dropout-rate=0.2", "secure-aggregation: a round is refused when fewer than 2 clients")]:
        res = run_cli(["simulate", "--num-clients", "3", "--run-config", f"{base} {extra}",
                       "--output-dir", str(tmp_path / "out")], timeout=120)
        assert res.returncode != 0, res.stderr
        lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
        assert any(start in line for line in lines), res.stderr[-2000:]
        assert "ray" not in res.stderr.lower() and not (tmp_path / "out" / "metrics.jsonl").exists()
