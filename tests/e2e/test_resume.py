"""A run killed with SIGKILL and resumed ends exactly where the uninterrupted run ends.

The server (in-process harness: the real `run_server`, the real ClientApp) runs in a child
process that kills itself with SIGKILL at a chosen point, so nothing gets a chance to clean up:
- dp-mode=sample: right after checkpoint.save of round 2 (checkpoint-every=1);
- dp-mode=client: after round 3's metrics row was written but before round 3 is checkpointed
  (checkpoint-every=2), so metrics.jsonl holds a row that the checkpoint does not cover.
Then the same config resumes in this process with fresh clients (their context.state is gone,
as after a real restart) and must give, bitwise, the adapter and metrics rows of an uninterrupted
run with the same seed (secure-rng=false). fraction-train < 1, so client sampling (and in sample
mode the clients' privacy ledgers) must continue exactly. ε is write-ahead accounted: a round
begun after the checkpoint is charged again when it is rerun, so the client-mode run (killed
after round 3's replies) ends at the ε of 5 rounds, and so does a secure-rng run of either mode.

Also: a truncated or corrupt checkpoint and a resume with a different config are refused with
one line (through the CLI too) and leave the run directory untouched, byte for byte and mtime for
mtime; an intact copy passes the same CLI's up-front checks (positive control).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import RAY_IMPORTED
from safetensors.torch import load_file

from fl_dplora.config import ConfigError
from harness import REPO, InProcessGrid, run_in_process
from test_privacy_modes import independent_epsilon

from fl_dplora.write_ahead import read_operator

TESTS_DIR = Path(__file__).resolve().parents[1]  # tests/: conftest and harness for the child
NUM_CLIENTS = 3
ROUNDS = 4
# Fixed sigma and the RDP accountant keep accounting cheap; fraction-train < 1 so sampling matters.
COMMON = dict(num_server_rounds=ROUNDS, max_train_samples=36, batch_size=4, micro_batch_size=4, max_seq_len=32,
              local_steps=1, max_eval_samples=2, eval_every=2, secure_rng=False, accountant="rdp",
              noise_multiplier=1.0, target_epsilon=50.0, seed=7)
MODES = {
    # mode: (run config, how the child dies)
    "sample": (dict(COMMON, dp_mode="sample", fraction_train=0.67, checkpoint_every=1), "after-save-2"),
    "client": (dict(COMMON, dp_mode="client", fraction_train=0.5, checkpoint_every=2), "after-row-3"),
}
TIMING = ("seconds", "client_seconds")  # the only fields of an operator row allowed to differ

CHILD = r"""
import json, os, signal, sys
sys.path.insert(0, sys.argv[1])
import conftest  # offline Hugging Face, as in the tests
from harness import run_in_process
from fl_dplora import checkpoint
from fl_dplora.server import outputs

out_dir, how, overrides = sys.argv[2], sys.argv[3], json.loads(sys.argv[4])

def die():
    sys.stdout.flush(); sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)

if how == "after-save-2":
    real_save = checkpoint.save
    def save(out, state):
        real_save(out, state)
        if state["round"] == 2:
            die()
    checkpoint.save = save
elif how == "after-row-3":
    real_round = outputs.RunWriter.round
    def round_(self, row):
        real_round(self, row)
        if row["round"] == 3:
            die()
    outputs.RunWriter.round = round_
run_in_process(int(sys.argv[5]), output_dir=out_dir, **overrides)
print("NOT KILLED")
"""


def start_killed(out_dir: Path, how: str, overrides: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(TESTS_DIR), str(out_dir), how, json.dumps(overrides), str(NUM_CLIENTS)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO),
    )


def rows(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def adapter(out_dir: Path):
    return load_file(str(out_dir / "adapter" / "adapter_model.safetensors"))


def snapshot(d: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under d: (bytes, mtime_ns)."""
    return {str(p.relative_to(d)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.rglob("*")) if p.is_file()}


@dataclass
class Runs:
    killed: Path  # the directory the SIGKILLed child left (the bitwise test resumes it in place)
    pristine: Path  # a copy of it as the child left it
    baseline: dict  # summary of the uninterrupted run
    base_dir: Path
    base_grid: InProcessGrid


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Runs]:
    """For each mode: the killed child's directory and the uninterrupted run. The children run
    while this process computes the uninterrupted runs (the children mostly load libraries).

    The killed and the uninterrupted run directories have paths of the same length: the
    broadcast config carries output-dir, so bytes_down depends on it.
    """
    killed = {mode: tmp_path_factory.mktemp(f"k-{mode}") / "run" for mode in MODES}
    children = {mode: start_killed(killed[mode], MODES[mode][1], MODES[mode][0]) for mode in MODES}
    try:
        base = {}
        for mode, (overrides, _) in MODES.items():
            grid = InProcessGrid(NUM_CLIENTS, seed=int(overrides["seed"]))
            base_dir = tmp_path_factory.mktemp(f"b-{mode}") / "run"
            assert len(str(base_dir)) == len(str(killed[mode]))
            summary, _ = run_in_process(NUM_CLIENTS, output_dir=base_dir, grid=grid, **overrides)
            base[mode] = (summary, base_dir, grid)
        out = {}
        for mode, child in children.items():
            stdout, stderr = child.communicate(timeout=300)
            assert child.returncode == -signal.SIGKILL, (child.returncode, stdout[-2000:], stderr[-4000:])
            assert "NOT KILLED" not in stdout
            d = killed[mode]
            assert json.loads((d / "checkpoint.json").read_text())["round"] == 2
            assert not (d / "summary.json").exists()
            expect_rows = [1, 2] if MODES[mode][1] == "after-save-2" else [1, 2, 3]
            assert [row["round"] for row in rows(d)] == expect_rows
            pristine = copy_of(d, tmp_path_factory.mktemp(f"pristine-{mode}") / "run")
            out[mode] = Runs(d, pristine, *base[mode])
        return out
    finally:
        for child in children.values():
            if child.poll() is None:
                child.kill()
                child.wait()


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("mode", list(MODES))
def test_sigkill_then_resume_is_bitwise_identical_to_uninterrupted_run(mode, runs):
    overrides, _ = MODES[mode]
    run = runs[mode]
    resumed_dir, baseline, base_dir, base_grid = run.killed, run.baseline, run.base_dir, run.base_grid
    resumed, _ = run_in_process(NUM_CLIENTS, output_dir=resumed_dir, resume=True, **overrides)

    # The run is only a good test if sampling mattered: some round must have left a client out.
    per_round = {}
    for ex in base_grid.exchanges:
        per_round.setdefault(int(ex.instruction.content["config"]["server-round"]), set()).add(ex.node_id)
    assert any(len(per_round.get(r, ())) < NUM_CLIENTS for r in range(1, ROUNDS + 1)), per_round
    if mode == "sample":
        # The hard case for the clients' ledgers (their context.state died with the server): a client
        # that trained before the kill, sat out round 3 and comes back in round 4 must continue its
        # ledger, not start a fresh one (seed 7 gives this case; a change of seed must keep it).
        assert any(n in per_round[1] | per_round[2] and n not in per_round[3] and n in per_round[4]
                   for n in base_grid.contexts), per_round

    a, b = adapter(resumed_dir), adapter(base_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].numpy().tobytes() == b[k].numpy().tobytes(), f"{k} differs"
    if mode == "sample":  # killed right after a checkpoint: nothing begun after it, nothing extra to charge
        assert resumed["privacy"]["epsilon"] == baseline["privacy"]["epsilon"]  # exact, not approx
        assert resumed["privacy"]["per_client"] == baseline["privacy"]["per_client"]
    else:  # round 3 began (and its replies arrived) before the kill, then ran again: 5 rounds charged
        sigma, q = resumed["privacy"]["accountant_noise_multiplier"], overrides["fraction_train"]
        assert resumed["privacy"]["steps"] == ROUNDS + 1 and baseline["privacy"]["steps"] == ROUNDS
        assert resumed["privacy"]["epsilon"] == pytest.approx(independent_epsilon([(sigma, q, ROUNDS + 1)], 1e-5, "rdp"), rel=1e-3)
        assert resumed["privacy"]["epsilon"] > baseline["privacy"]["epsilon"]
    assert resumed["privacy"]["epsilon"] > 0
    assert resumed["rounds"] == baseline["rounds"] == ROUNDS
    (op_got, total_got), (op_want, total_want) = read_operator(resumed_dir), read_operator(base_dir)
    assert total_got["bytes_up_total"] == total_want["bytes_up_total"]
    if mode == "client":
        assert total_got["bytes_down_total"] == total_want["bytes_down_total"]

    got, want = rows(resumed_dir), rows(base_dir)
    assert [r["round"] for r in got] == list(range(1, ROUNDS + 1))  # exactly 4 rows: no duplicate, no gap
    for g, w in zip(got, want):
        skip = ("epsilon",) if mode == "client" and g["round"] >= 3 else ()  # charged twice from round 3 on
        assert {k: v for k, v in g.items() if k not in skip} == {k: v for k, v in w.items() if k not in skip}
    op_got = [r for r in op_got if r["round"] > 2 or mode == "sample"]  # the killed attempt's rows stay in the log
    for g in op_got:
        w = next(r for r in op_want if r["round"] == g["round"])
        # After a resume in sample mode the broadcast also carries the clients' saved ledgers down.
        ledgers_sent = mode == "sample" and g["round"] > 2
        skip = TIMING + (("bytes_down",) if ledgers_sent else ())
        assert {k: v for k, v in g.items() if k not in skip} == {k: v for k, v in w.items() if k not in skip}
        assert g["bytes_down"] > w["bytes_down"] if ledgers_sent else g["bytes_down"] == w["bytes_down"]
    assert json.loads((resumed_dir / "checkpoint.json").read_text())["round"] == ROUNDS


@pytest.mark.parametrize("mode", ["sample", "client"])
def test_secure_run_killed_after_round_3_replies_runs_every_round_within_the_target(mode, tmp_path):
    """kill -9 mid-run with OS-entropy noise and σ calibrated for exactly R rounds (issue 27): the rerun
    of round 3 draws fresh noise, so both attempts were released (the first reached the server and
    metrics.jsonl) and are charged; after the resume σ for the rounds left is recalibrated from what
    was charged, so all R rounds run and the final ε lies between the uninterrupted plan's and the target."""
    from fl_dplora.privacy.accounting import calibrate_noise_multiplier, epsilon_for

    target = 8.0
    overrides = dict(COMMON, dp_mode=mode, fraction_train=1.0, checkpoint_every=2, secure_rng=True,
                     noise_multiplier=0.0, target_epsilon=target)
    out = tmp_path / "run"
    child = start_killed(out, "after-row-3", overrides)
    stdout, stderr = child.communicate(timeout=300)
    assert child.returncode == -signal.SIGKILL, (child.returncode, stdout[-2000:], stderr[-4000:])
    assert [r["round"] for r in rows(out)] == [1, 2, 3]  # round 3 was released before the kill
    resumed, _ = run_in_process(NUM_CLIENTS, output_dir=out, resume=True, **overrides)
    assert resumed["rounds"] == ROUNDS and [r["round"] for r in rows(out)] == [1, 2, 3, 4]  # no round lost
    p = resumed["privacy"]
    if mode == "client":
        assert p["steps"] == ROUNDS + 1  # the lost attempt is charged
        plan = epsilon_for(calibrate_noise_multiplier(target, 1e-5, 1.0, ROUNDS, "rdp"), 1.0, ROUNDS, 1e-5, "rdp")
        assert plan * (1 - 1e-6) <= p["epsilon"] <= target * (1 + 1e-6)
    else:
        assert len(p["per_client"]) == NUM_CLIENTS
        for key, c in p["per_client"].items():
            steps = ROUNDS * COMMON["local_steps"]
            assert c["steps"] == steps + COMMON["local_steps"], (key, c)
            q = c["sample_rate"]
            plan = epsilon_for(calibrate_noise_multiplier(target, 1e-5, q, steps, "rdp"), q, steps, 1e-5, "rdp")
            assert plan * (1 - 1e-6) <= c["epsilon"] <= target * (1 + 1e-6), (key, c, plan)
        assert p["epsilon"] == max(c["epsilon"] for c in p["per_client"].values())


def test_cli_resume_refuses_a_truncated_checkpoint_and_touches_nothing(runs, cli, tmp_path):
    run_dir = copy_of(runs["sample"].pristine, tmp_path / "run")
    ckpt = run_dir / "checkpoint.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    before = snapshot(run_dir)

    r = cli(["simulate", "--resume", str(run_dir)], timeout=180)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr + r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "truncated or corrupt" in lines[0] and "checkpoint.pt" in lines[0], lines[0]
    assert snapshot(run_dir) == before  # nothing overwritten, nothing added, nothing removed


def test_in_process_resume_refuses_a_corrupt_checkpoint(runs, tmp_path):
    run_dir = copy_of(runs["sample"].pristine, tmp_path / "run")
    ckpt = run_dir / "checkpoint.pt"
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    ckpt.write_bytes(bytes(data))
    before = snapshot(run_dir)
    overrides, _ = MODES["sample"]
    with pytest.raises(ConfigError, match="truncated or corrupt"):
        run_in_process(NUM_CLIENTS, output_dir=run_dir, resume=True, **overrides)
    assert snapshot(run_dir) == before


def test_resume_with_a_different_config_is_refused_naming_the_key(runs, cli, tmp_path):
    run_dir = copy_of(runs["sample"].pristine, tmp_path / "run")
    before = snapshot(run_dir)
    overrides, _ = MODES["sample"]
    with pytest.raises(ConfigError) as exc:
        run_in_process(NUM_CLIENTS, output_dir=run_dir, resume=True, **{**overrides, "learning_rate": 0.123})
    lines = str(exc.value).splitlines()
    assert len(lines) == 1 and lines[0].startswith("learning-rate:"), str(exc.value)
    assert snapshot(run_dir) == before

    # Through the CLI, the saved config is the run's config: a different value names the key.
    r = cli(["simulate", "--resume", str(run_dir), "--run-config", "learning-rate=0.123"], timeout=180)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr + r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "learning-rate" in lines[0], r.stderr
    assert snapshot(run_dir) == before


def test_cli_resume_of_a_good_checkpoint_passes_the_up_front_checks(runs, cli, no_ray, tmp_path):
    """Positive control for the refusals above: the same CLI on an intact copy of the directory
    accepts the saved config and gets as far as starting Ray (the stand-in `ray` exits with 97)."""
    run_dir = copy_of(runs["sample"].pristine, tmp_path / "run")
    r = cli(["simulate", "--resume", str(run_dir)], env=no_ray, timeout=180)
    assert r.returncode == RAY_IMPORTED, r.stderr[-3000:]
