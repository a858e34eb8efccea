"""What a run releases holds only DP outputs and public configuration (issue 15).

- Client-level modes (client with central or local noise, paper): neighbouring runs differ by one
  client, so the released noise variance must not depend on how many clients replied (4 vs 5 of a
  population of 5); the divisor is the public q x population.
- Local noise is added after the client's clipping and the server does not re-clip: the signal of
  an update survives (the old server-side clip after noise shrank it ~1/(σ√d)); a reply whose norm
  no honest client can produce is dropped.
- metrics.jsonl and summary.json carry no participation count, byte count or timing; those go to
  operator.jsonl, from which a reviewer can recompute every client's ε independently.
- No dp-mode string branches outside the privacy/modes/ package and config/parse.py.
"""

from __future__ import annotations

import json
import math
import re
import stat
import sys
from pathlib import Path

import dp_accounting
import pytest
import torch
from dp_accounting.pld import PLDAccountant

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: harness
from harness import InProcessGrid, read_metrics, run_in_process  # noqa: E402

from fl_dplora.config import resolve  # noqa: E402
from fl_dplora.privacy.modes import MODES, for_config  # noqa: E402
from fl_dplora.write_ahead import read_operator  # noqa: E402

POPULATION = 5
DIM = 40_000
CLIENT_LEVEL = [("client", "central"), ("client", "local"), ("paper", "central")]


def _mode(name: str, noise: str, sigma: float = 1.3, **extra):
    return for_config(resolve({"dp-mode": name, "client-noise": noise, "noise-multiplier": sigma, "max-grad-norm": 0.5,
                               "population": POPULATION, "fraction-train": 1.0, "lora-variant": "lora", "label-head": False,
                               **extra}))


def _released_noise(mode, replies: int, seed: int) -> torch.Tensor:
    """The released step when `replies` clients send a zero update (so the release is pure noise)."""
    gen = torch.Generator().manual_seed(seed)
    keys = {"x.lora_A.weight": torch.zeros(DIM // 2), "x.lora_B.weight": torch.zeros(DIM // 2)}
    sigma = mode.noise_multipliers()[0]
    updates = [mode.accept(mode.client_update(dict(keys), sigma, gen)) for _ in range(replies)]
    out = mode.aggregate(updates, [1.0] * replies, keys, 1, sigma, gen)
    return torch.cat([out[k] for k in keys]).double()


@pytest.mark.parametrize("name,noise", CLIENT_LEVEL)
def test_released_noise_variance_does_not_reveal_how_many_clients_replied(name, noise):
    mode = _mode(name, noise)
    sigma, c = mode.noise_multipliers()[0], mode.max_grad_norm
    var4 = float(_released_noise(mode, 4, 1).var())
    var5 = float(_released_noise(mode, 5, 2).var())
    # one draw of sigma*C on the sum (central), or sigma*C from each of the 5 (local, topped up), / (q * population)
    per_value = (sigma * c) ** 2 * (POPULATION if mode.placement.server_sees_noised_updates else 1) / POPULATION ** 2
    # 40,000 values: the sample variance's relative SE is sqrt(2/40000) = 0.7 %; 4 % is > 5 SE
    assert var4 == pytest.approx(per_value, rel=0.04)
    assert var5 == pytest.approx(per_value, rel=0.04)
    assert var4 / var5 == pytest.approx(1.0, rel=0.05)


def test_the_variance_check_would_catch_a_mean_over_the_replies():
    """Positive control: dividing by m (the old paper mode) separates 4 from 5 replies."""
    mode = _mode("paper", "central")
    sigma, c = mode.noise_multipliers()[0], mode.max_grad_norm
    var = {}
    for m in (4, 5):
        gen = torch.Generator().manual_seed(m)
        noisy = [torch.randn(DIM, generator=gen, dtype=torch.float64) * sigma * c for _ in range(m)]
        var[m] = float((sum(noisy) / m).var())
    assert var[4] / var[5] == pytest.approx(5 / 4, rel=0.05)  # far outside the 5 % the test above allows


@pytest.mark.parametrize("name", ["client", "paper"])
def test_local_noise_does_not_shrink_the_clipped_update(name):
    mode = _mode(name, "local", sigma=0.1)
    sigma = mode.noise_multipliers()[0]
    signal = {"x.lora_A.weight": torch.full((DIM // 2,), 1.0), "x.lora_B.weight": torch.full((DIM // 2,), 1.0)}
    gen = torch.Generator().manual_seed(3)
    updates = [mode.accept(mode.client_update(dict(signal), sigma, gen)) for _ in range(POPULATION)]
    assert all(mode.reject_reason(u, sigma) == "" for u in updates)  # honest replies pass the norm screen
    out = mode.aggregate(updates, [1.0] * POPULATION, {k: torch.zeros_like(v) for k, v in signal.items()}, 1, sigma, gen)
    # clipped by hand (max-grad-norm 0.5): client clips the whole update, paper each of A and B to 0.5
    parts = [[k for k in signal]] if name == "client" else [[k] for k in signal]
    clipped = {k: signal[k] * min(1.0, 0.5 / float(torch.cat([signal[j] for j in p]).norm())) for p in parts for k in p}
    direction = torch.cat([clipped[k] for k in signal])
    got = float(torch.cat([out[k] for k in signal]) @ direction / direction.norm() ** 2)
    # the mean of 5 clipped updates is the clipped update: projection 1 (old: ~1 / (sigma sqrt(d)) ~ 0.05)
    assert got == pytest.approx(1.0, abs=0.1)
    # and with no noise, local and central aggregation give the same step
    quiet_local, quiet_central = _mode(name, "local", sigma=1e-12), _mode("client", "central", sigma=1e-12)
    if name == "client":
        a = quiet_local.aggregate([quiet_local.client_update(dict(signal), 0.0, None)] * 5, [1.0] * 5,
                                  {k: torch.zeros_like(v) for k, v in signal.items()}, 1, 0.0, None)
        b = quiet_central.aggregate([quiet_central.accept(dict(signal))] * 5, [1.0] * 5,
                                    {k: torch.zeros_like(v) for k, v in signal.items()}, 1, 0.0, None)
        for k in signal:
            torch.testing.assert_close(a[k], b[k])


def test_a_reply_that_skipped_its_clipping_is_dropped_under_local_noise():
    mode = _mode("client", "local", sigma=1.0)
    big = {"w.lora_B.weight": torch.full((1000,), 10.0)}  # norm 316 >> C + sigma C (sqrt(1000) + 10) = 21
    assert "more than clipping plus noise allow" in mode.reject_reason(big, 1.0)


def test_local_noise_epsilon_against_the_server_matches_dp_accounting():
    """Against the server each update is a Gaussian mechanism on its own: replace-one adjacency moves
    a clipped update by 2C, no amplification (the server knows who was sampled)."""
    for name, variant, sens in (("client", "lora", 1.0), ("paper", "lora", math.sqrt(2.0)), ("paper", "ffa", 1.0)):
        mode = _mode(name, "local", sigma=2.0, **{"lora-variant": variant, "accountant": "prv", "delta": 1e-5})
        applied, accounted = mode.noise_multipliers()
        assert accounted == pytest.approx(applied / sens)
        acc = PLDAccountant(value_discretization_interval=1e-3)
        acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(applied / (2 * sens)), 6))
        assert mode.epsilon_against_server([accounted] * 6) == pytest.approx(acc.get_epsilon(1e-5), rel=0.02)


def test_client_level_modes_need_a_declared_population():
    from fl_dplora.config import ConfigError

    with pytest.raises(ConfigError, match="population"):
        resolve({"dp-mode": "client", "noise-multiplier": 1.0})
    resolve({"dp-mode": "sample"})  # example-level DP does not divide by it


# ------------------------------------------------------------------ what the files hold
RELEASED_ROW_KEYS = {"round", "eval_loss", "eval_accuracy", "eval_macro_f1", "eval_majority_rate", "epsilon", "delta"}
FAST = dict(max_train_samples=40, batch_size=4, micro_batch_size=4, max_seq_len=32, local_steps=1, num_server_rounds=2,
            max_eval_samples=4, eval_every=1, secure_rng=False, noise_multiplier=1.0, target_epsilon=100.0,
            accountant="rdp", delta=1e-5)


def _run(tmp_path, mode: str, offline: int, **extra):
    grid = InProcessGrid(POPULATION, seed=3)
    grid.offline = set(list(grid.contexts)[:offline])
    summary, out = run_in_process(POPULATION, output_dir=tmp_path / f"{mode}-{offline}", grid=grid, dp_mode=mode,
                                  **{**FAST, **extra})
    return summary, out


def _public(summary: dict) -> dict:
    """The summary less its DP outputs (the adapter's evaluations: the dev part's and the test part's) and its config."""
    return {k: v for k, v in summary.items() if k not in ("final_eval", "test_eval", "config")}


@pytest.mark.parametrize("mode,extra", [("client", {}), ("client", {"client-noise": "local"}), ("sample", {})])
def test_released_files_do_not_depend_on_the_client_count(mode, extra, tmp_path):
    s5, out5 = _run(tmp_path, mode, 0, **extra)
    s4, out4 = _run(tmp_path / "b", mode, 1, **extra)
    for out in (out4, out5):
        for row in read_metrics(out):
            assert set(row) == RELEASED_ROW_KEYS, sorted(set(row) - RELEASED_ROW_KEYS)
    text = json.dumps(_public(s5))
    for leak in ("bytes_", "wall_seconds", "sampled", "num_clients", "client_seconds", "dropped", "accepted"):
        assert leak not in text
    if mode != "sample":  # example-level: per-client (q, sigma) are public with the shard sizes; the count of clients is not DP there
        assert _public(s4) == _public(s5)
    assert [r["epsilon"] for r in read_metrics(out4)] == [r["epsilon"] for r in read_metrics(out5)] or mode == "sample"
    # the operator's log has what was left out
    rows4, total4 = read_operator(out4)
    rows5, total5 = read_operator(out5)
    assert [r["accepted"] for r in rows5] == [POPULATION] * 2 and [r["accepted"] for r in rows4] == [POPULATION - 1] * 2
    assert total5["bytes_up_total"] > total4["bytes_up_total"] > 0 and total5["wall_seconds"] > 0


def test_operator_log_lets_a_reviewer_recompute_every_clients_epsilon(tmp_path):
    from test_privacy_modes import independent_epsilon

    summary, out = _run(tmp_path, "sample", 0)
    _, total = read_operator(out)
    # and names the software and CPU the numbers came from (a bit-for-bit rerun needs them alike)
    env = total["environment"]
    assert env["torch"] == torch.__version__
    assert env["flwr"] and env["opacus"] and env["cpu"] and env["cpu_count"] >= 1
    ledgers = total["client_ledgers"]
    assert len(ledgers) == POPULATION
    for key, ledger in ledgers.items():
        events = list(zip(ledger["sigmas"], ledger["rates"], ledger["steps"]))
        eps = independent_epsilon(events, 1e-5, "rdp")
        assert summary["privacy"]["per_client"][key]["epsilon"] == pytest.approx(eps, rel=0.02)


def test_dp_replies_carry_no_timing(tmp_path):
    grid = InProcessGrid(2, seed=1)
    run_in_process(2, output_dir=tmp_path / "r", grid=grid, dp_mode="sample", **FAST)
    for ex in grid.exchanges:
        assert "compute-seconds" not in dict(ex.reply.content["metrics"])


def test_checkpoint_is_owner_only_and_secure_runs_keep_no_sampling_state(tmp_path):
    from fl_dplora import checkpoint

    _, out = run_in_process(2, output_dir=tmp_path / "r", dp_mode="client", checkpoint_every=1,
                            **{**FAST, "secure_rng": True})
    for name in ("checkpoint.pt", "checkpoint.json", "rounds.wal", "operator.jsonl"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600, name
    assert checkpoint.load(out)["strategy"]["rng"] is None
    _, seeded = run_in_process(2, output_dir=tmp_path / "s", dp_mode="client", checkpoint_every=1, **FAST)
    assert checkpoint.load(seeded)["strategy"]["rng"] is not None  # positive control: seeded runs replay exactly


def test_no_dp_mode_string_branches_outside_the_modes_module():
    root = Path(__file__).resolve().parents[2] / "fl_dplora"
    # a comparison of something named *mode* (cfg["dp-mode"], dp_mode, mode) with a mode's name
    branch = re.compile(r"""mode["'\]\)]*\s*(==|!=|\bin\b)\s*\(?\s*["'](none|sample|client|paper)["']""")
    modes = root / "privacy" / "modes"  # one module per mode: each may name its own
    allowed = {root / "config" / "parse.py"}  # its checks across keys
    hits = [f"{p.relative_to(root)}:{i}: {line.strip()}" for p in root.rglob("*.py")
            if p not in allowed and p.parent != modes
            for i, line in enumerate(p.read_text().splitlines(), 1) if branch.search(line)]
    assert hits == [], hits
    assert set(MODES) == {"none", "sample", "client", "paper"}
    assert branch.search('if cfg["dp-mode"] == "sample":') and branch.search('if dp_mode in ("client", "paper"):')


def test_write_ahead_log_lists_every_attempt_after_the_checkpoint(tmp_path):
    from fl_dplora.write_ahead import WriteAhead

    wal = WriteAhead(tmp_path, fresh=True)
    a2 = wal.begin(2, ["0", "1"])
    wal.replied(a2, 2, {"0": {"sigmas": [1.0], "rates": [0.5], "steps": [2]}})
    a3 = wal.begin(3, ["0", "1"])
    wal.replied(a3, 3, {"0": {"sigmas": [1.0], "rates": [0.5], "steps": [3]}})
    again = wal.begin(3, ["1"])  # the rerun of round 3 after a resume, killed before its replies
    with open(wal.path, "a") as f:
        f.write('{"event": "ledgers", "attempt": "cut-by-the-cra')  # a line the crash cut: ignored
    got = wal.unaccounted(2)
    assert [(a.id, a.round, a.asked) for a in got] == [(a3, 3, ["0", "1"]), (again, 3, ["1"])]
    assert got[0].ledgers == {"0": {"sigmas": [1.0], "rates": [0.5], "steps": [3]}} and got[1].ledgers is None
    assert [a.id for a in wal.unaccounted(0)] == [a2, a3, again]
    assert stat.S_IMODE(wal.path.stat().st_mode) == 0o600
    assert WriteAhead(tmp_path, fresh=True).unaccounted(0) == []  # a fresh run starts a fresh log
