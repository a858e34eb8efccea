"""End to end through the real console script: `fl-dplora simulate` (Flower simulation engine, Ray),
3 clients x 2 rounds on tiny-random-llama, once without DP and once with dp-mode=sample.

Both simulations start together in one module fixture (Ray's start-up is mostly waiting, so the
pair costs little more than one); every test below reads their output directories. While they
run, the same configuration runs through the in-process harness, to pin that the harness other
tests rely on computes what the real engine computes.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fl_dplora.write_ahead import read_operator
from fl_dplora.config import SCHEMA, RunConfig, parse_overrides
from fl_dplora.model_loading import load_base_model, load_tokenizer
from fl_dplora.models import adapter_parameters, get_peft_model, reset_adapter
from fl_dplora.privacy.accounting import PrivacyLedger
from harness import FL_DPLORA, REPO, run_cli, run_in_process

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # 30-85 s a test (or its module fixture) in CI

NUM_CLIENTS = 3
RUN_CONFIG = ("model=tiny-random-llama num-server-rounds=2 local-steps=2 batch-size=8 micro-batch-size=4 "
              "max-eval-samples=32 max-train-samples=300 max-seq-len=64 "
              "lora-variant=lora lora-layers=0 learning-rate=0.05 optimizer=sgd lora-targets=q_proj,v_proj "
              "loss=answer-tokens system-prompt=auto label-head=false head-rounds=0 task=fin-sentiment eval-every=1 lora-rank=8")  # plain LoRA, SGD: A and B both move
MODES = ("none", "sample")
TIMEOUT_S = 560

# released: DP outputs and the server's evaluation; counts, bytes and timings are the operator's
METRIC_KEYS = {"round", "eval_loss", "eval_accuracy", "eval_macro_f1", "eval_majority_rate", "epsilon", "delta"}
SUMMARY_KEYS = {"rounds", "final_eval", "trainable_params", "full_model_params", "full_model_bytes", "privacy", "config"}
OPERATOR_KEYS = {"round", "sampled", "accepted", "dropped", "bytes_up", "bytes_down", "seconds", "client_seconds"}
PRIVACY_KEYS = {"mode", "noise_multiplier", "max_grad_norm", "sample_rate", "steps", "accountant", "epsilon", "delta"}


@dataclass
class Sim:
    mode: str
    returncode: int
    stdout: str
    stderr: str
    out: Path
    wall_s: float

    @property
    def rows(self) -> list[dict]:
        return [json.loads(line) for line in (self.out / "metrics.jsonl").read_text().splitlines() if line.strip()]

    @property
    def summary(self) -> dict:
        return json.loads((self.out / "summary.json").read_text())

    @property
    def adapter(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.out / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def sims(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("e2e")
    procs = {}
    t0 = time.perf_counter()
    for mode in MODES:
        out = root / mode
        log_out, log_err = (root / f"{mode}.stdout").open("w"), (root / f"{mode}.stderr").open("w")
        cmd = [str(FL_DPLORA), "simulate", "--num-clients", str(NUM_CLIENTS), "--run-config",
               f"{RUN_CONFIG} dp-mode={mode}", "--output-dir", str(out), "--num-cpus", "1"]
        procs[mode] = (subprocess.Popen(cmd, stdout=log_out, stderr=log_err, cwd=str(REPO)), out, log_out, log_err)
    results: dict = {}
    try:
        # Meanwhile (Ray mostly waits while it starts), the same run through the in-process harness.
        try:
            out = root / "harness"
            overrides = {**parse_overrides(RUN_CONFIG), "dp-mode": "none"}
            results["harness"] = run_in_process(NUM_CLIENTS, output_dir=out, defaults={}, **overrides)
        except Exception as exc:  # noqa: BLE001 - reported by the test that needs it
            results["harness"] = exc
        for mode, (proc, out, log_out, log_err) in procs.items():
            try:
                proc.wait(timeout=max(1.0, TIMEOUT_S - (time.perf_counter() - t0)))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log_out.close()
            log_err.close()
            results[mode] = Sim(mode, proc.returncode, (root / f"{mode}.stdout").read_text(),
                                (root / f"{mode}.stderr").read_text(), out, time.perf_counter() - t0)
    finally:
        for proc, *_ in procs.values():
            if proc.poll() is None:
                proc.kill()
    return results


@pytest.fixture(params=MODES)
def sim(request, sims) -> Sim:
    s = sims[request.param]
    assert s.returncode == 0, f"fl-dplora simulate (dp-mode={s.mode}) exited {s.returncode}:\n{s.stderr[-4000:]}"
    return s


def _cfg(sim: Sim) -> dict:
    return sim.summary["config"]


# ----------------------------------------------------------------------------- the command
def test_simulate_exits_cleanly_and_prints_the_result(sim):
    assert "Traceback" not in sim.stderr
    last = sim.stdout.strip().splitlines()[-1]
    assert last.startswith("fl-dplora: 2 rounds, accuracy ") and str(sim.out) in last


def test_output_dir_holds_every_design_file(sim):
    for rel in ("metrics.jsonl", "summary.json", "adapter/adapter_model.safetensors", "adapter/adapter_config.json"):
        assert (sim.out / rel).is_file(), rel


# ----------------------------------------------------------------------------- metrics.jsonl
def test_metrics_has_one_row_per_round_with_every_design_key(sim):
    rows = sim.rows
    assert [r["round"] for r in rows] == [1, 2]
    ops = read_operator(sim.out)[0]
    assert [r["round"] for r in ops] == [1, 2]
    for r, op in zip(rows, ops):
        assert set(r) == METRIC_KEYS | ({"train_loss"} if sim.mode == "none" else set()), set(r) ^ METRIC_KEYS
        assert set(op) == OPERATOR_KEYS and op["accepted"] == op["sampled"] == NUM_CLIENTS
        assert math.isfinite(r["eval_loss"]) and r["eval_loss"] > 0
        assert 0.0 <= r["eval_accuracy"] <= 1.0
        assert isinstance(op["bytes_up"], int) and isinstance(op["bytes_down"], int)
        assert op["bytes_up"] > 0 and op["bytes_down"] > 0 and op["seconds"] > 0
        if sim.mode == "none":
            assert r["epsilon"] is None and r["delta"] is None
            assert math.isfinite(r["train_loss"]) and r["train_loss"] > 0
        else:  # a raw loss is not a DP output
            assert r["delta"] == 1e-5 and 0 < r["epsilon"] <= 8.0
    if sim.mode == "sample":
        assert rows[0]["epsilon"] < rows[1]["epsilon"]  # the ledger carried over between rounds


# ----------------------------------------------------------------------------- summary.json
def test_summary_has_every_design_key_and_agrees_with_the_rows(sim):
    s, rows = sim.summary, sim.rows
    assert SUMMARY_KEYS <= set(s), SUMMARY_KEYS - set(s)
    assert s["rounds"] == 2
    assert {"accuracy", "loss"} <= set(s["final_eval"])
    assert s["final_eval"]["loss"] == pytest.approx(rows[-1]["eval_loss"])
    assert s["final_eval"]["accuracy"] == pytest.approx(rows[-1]["eval_accuracy"])
    ops, total = read_operator(sim.out)
    assert total["bytes_up_total"] == sum(r["bytes_up"] for r in ops)
    assert total["bytes_down_total"] == sum(r["bytes_down"] for r in ops)
    assert s["trainable_params"] == 3584  # 2 layers x (q: 8x64 + 64x8, v: 8x64 + 32x8)
    n_base = sum(p.numel() for p in load_base_model("tiny-random-llama", seed=42).parameters())
    assert s["full_model_params"] == n_base and s["full_model_bytes"] == 4 * n_base
    assert 0 < total["wall_seconds"] < TIMEOUT_S
    assert PRIVACY_KEYS <= set(s["privacy"]), PRIVACY_KEYS - set(s["privacy"])


def test_summary_config_is_the_resolved_run_config(sim):
    cfg = _cfg(sim)
    assert set(cfg) == set(SCHEMA)
    for key, value in parse_overrides(f"{RUN_CONFIG} dp-mode={sim.mode}").items():
        assert cfg[key] == value, key
    assert cfg["output-dir"] == str(sim.out)
    assert cfg["lora-rank"] == 8 and cfg["task"] == "fin-sentiment"  # defaults filled in


def test_privacy_block(sim):
    p, rows = sim.summary["privacy"], sim.rows
    assert p["mode"] == sim.mode
    if sim.mode == "none":
        assert p["epsilon"] is None and p["noise_multiplier"] is None
        return
    cfg = _cfg(sim)
    q = cfg["batch-size"] / (300 // NUM_CLIENTS)
    assert p["accountant"] == "prv" and p["delta"] == 1e-5 and p["max_grad_norm"] == 1.0
    assert p["sample_rate"] == pytest.approx(q)
    assert p["steps"] == 2 * 2  # rounds x local-steps: the ledger persisted in the client's context.state
    assert p["noise_multiplier"] > 0
    assert p["epsilon"] == pytest.approx(rows[-1]["epsilon"])
    ledger = PrivacyLedger()
    ledger.step(p["noise_multiplier"], q, p["steps"])
    assert p["epsilon"] == pytest.approx(ledger.epsilon(1e-5, "prv"), rel=1e-6)
    assert 0.9 * 8.0 < p["epsilon"] <= 8.0  # sigma was calibrated to the target, not overshot


# ----------------------------------------------------------------------------- the adapter
def _initial_adapter(cfg: RunConfig) -> dict[str, torch.Tensor]:
    model = get_peft_model(cfg)
    reset_adapter(model)  # the seed-shared init every party starts from
    return {k: v.detach().clone() for k, v in adapter_parameters(model, cfg).items()}


def test_global_adapter_moved_away_from_the_initial_one(sim):
    init = _initial_adapter(RunConfig.from_record(_cfg(sim)))
    saved = sim.adapter
    assert set(saved) == set(init)
    for key, t in saved.items():
        assert torch.isfinite(t).all()
        if "lora_B" in key:
            assert init[key].abs().sum() == 0 and t.abs().sum() > 0, key  # B starts at 0 and was trained
    assert any(not torch.equal(saved[k], init[k]) for k in saved if "lora_A" in k)


def test_adapter_loads_with_peft_and_reproduces_the_in_memory_adapter(sim):
    from peft import PeftModel

    cfg = RunConfig.from_record(_cfg(sim))  # summary.json holds every key
    saved = sim.adapter
    loaded = PeftModel.from_pretrained(load_base_model("tiny-random-llama", seed=42), str(sim.out / "adapter"))
    loaded.eval()
    lora = {n.replace(".default", ""): p for n, p in loaded.named_parameters() if "lora_" in n}
    assert set(lora) == set(saved)
    assert all(torch.equal(lora[k].detach(), saved[k]) for k in saved)

    in_memory = get_peft_model(cfg)  # what the server held: the same base, the saved tensors
    params = adapter_parameters(in_memory, cfg)
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(saved[k])
    tok = load_tokenizer("tiny-random-llama")
    ids = torch.tensor([tok("$AAPL beats estimates, raises guidance").input_ids])
    with torch.no_grad():
        want = in_memory(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
        base = load_base_model("tiny-random-llama", seed=42)(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, base, atol=1e-5)  # the adapter is not a no-op


# ----------------------------------------------------------------------------- traffic
def test_bytes_up_per_client_is_the_lora_payload_and_far_below_the_model(sim):
    s = sim.summary
    payload = 4 * s["trainable_params"]
    num_tensors = len(sim.adapter)
    for r in read_operator(sim.out)[0]:  # bytes and counts: the operator log
        per_client = r["bytes_up"] / r["accepted"]
        # The LoRA values plus Flower's fixed framing (~0.5 KB per tensor; see test_client_reply for
        # the "within a few %" check at a size where the framing does not dominate).
        assert payload < per_client <= 1.02 * payload + 700 * num_tensors + 1024
        assert per_client < 0.01 * s["full_model_bytes"]
        assert r["bytes_down"] / r["accepted"] < 0.01 * s["full_model_bytes"]


# ----------------------------------------------------------------------------- harness fidelity
def test_in_process_harness_matches_the_ray_engine(sims):
    """The in-process driver (tests/harness.py) computes what the simulation engine computes."""
    ray_run = sims["none"]
    assert ray_run.returncode == 0, ray_run.stderr[-4000:]
    if isinstance(sims["harness"], Exception):
        raise sims["harness"]
    summary, out = sims["harness"]
    assert summary["config"] == {**ray_run.summary["config"], "output-dir": str(out)}
    mine = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    theirs = ray_run.adapter
    assert set(mine) == set(theirs)
    for k in mine:  # replies may arrive in another order: float sums differ in the last bits only
        assert torch.allclose(mine[k], theirs[k], atol=1e-6, rtol=1e-5), k
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == len(ray_run.rows) == 2
    for a, b in zip(rows, ray_run.rows):
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-5)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    for a, b in zip(read_operator(out)[0], read_operator(ray_run.out)[0]):
        assert a["bytes_up"] == b["bytes_up"]  # (bytes_down differs: the config carries the output dir)


# ----------------------------------------------------------------------------- secure aggregation
def test_secure_aggregation_through_the_ray_engine(tmp_path):
    """`fl-dplora simulate` with SecAgg+ (dp-mode=client, central noise): Flower's secaggplus_mod keeps
    each virtual client's protocol state in its context across the four stages of a round under the
    Ray engine; the population is the --num-clients the command declares."""
    out = tmp_path / "secure"
    res = run_cli(["simulate", "--num-clients", str(NUM_CLIENTS), "--run-config",
                   f"{RUN_CONFIG} dp-mode=client secure-aggregation=true secagg-dropout-rate=1e-13", "--output-dir", str(out),
                   "--num-cpus", "1"],
                  timeout=TIMEOUT_S)
    assert res.returncode == 0, f"fl-dplora simulate (secure) exited {res.returncode}:\n{res.stderr[-4000:]}"
    assert res.stdout.strip().splitlines()[-1].startswith("fl-dplora: 2 rounds, accuracy ")
    summary = json.loads((out / "summary.json").read_text())
    cfg, p = summary["config"], summary["privacy"]
    assert cfg["population"] == NUM_CLIENTS and cfg["client-noise"] == "central"
    assert p["mode"] == "client" and p["steps"] == 2 and 0 < p["epsilon"] <= cfg["target-epsilon"] + 1e-6
    assert p["secure_aggregation"]["threshold"] == 2  # automatic for 3 clients
    # a declared dropout rate is planned for: P(the other 2 fall short of 2) = 1 - (1 - 1e-13)^2 per round
    assert p["secure_aggregation"]["dropout_rate"] == 1e-13 and p["secure_aggregation"]["needed"] == 2
    assert p["secure_aggregation"]["refusal_probability_per_round"] == pytest.approx(2e-13, rel=1e-3)
    assert 0 < p["secure_aggregation"]["delta_extra"] < 0.01 * cfg["delta"]
    assert "epsilon_against_server" not in p  # central noise: the server adds it after unmasking
    ops = read_operator(out)[0]
    assert [(r["round"], r["sampled"], r["accepted"], r["dropped"]) for r in ops] == [
        (1, NUM_CLIENTS, NUM_CLIENTS, []), (2, NUM_CLIENTS, NUM_CLIENTS, [])]
    assert all(r["bytes_up"] > 0 for r in ops)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["round"] for r in rows] == [1, 2] and rows[-1]["epsilon"] == pytest.approx(p["epsilon"])
    init = _initial_adapter(RunConfig.from_record(cfg))  # the global adapter moved: the unmasked (noised) sum was applied
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert set(saved) == set(init)
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert all(saved[k].abs().sum() > 0 for k in saved if "lora_B" in k)
    assert any(not torch.equal(saved[k], init[k]) for k in saved if "lora_A" in k)
