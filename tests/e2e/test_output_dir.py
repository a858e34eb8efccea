"""A new run never silently reuses a folder that holds a run (issue 28 defect 3).

Refused in one line with "use --resume DIR or --overwrite", exit non-zero, nothing touched: by
`fl-dplora simulate` before Ray starts, and by the ServerApp itself (`run_server`, what `flwr run`
reaches). `--overwrite` (run-config `overwrite = true`) deletes the earlier run's files first, and only
those; a resume into its own folder is unaffected (tests/e2e/test_resume.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import RAY_IMPORTED
from harness import REPO, run_in_process

from fl_dplora.config import ConfigError, resolve
from fl_dplora.run_dir import REFUSAL, RUN_FILES, check_output_dir, claim_output_dir, run_files

TINY_RUN = ("model=tiny-random-llama task=fin-sentiment label-head=false head-rounds=0 lora-layers=0 lora-targets=q_proj,v_proj "
            "lora-variant=lora num-server-rounds=1 local-steps=1 batch-size=8 micro-batch-size=4 "
            "max-train-samples=40 max-eval-samples=8 max-seq-len=48 dp-mode=none checkpoint-every=1")


def fake_run(folder: Path, interrupted: bool = False) -> Path:
    """What a finished (or, interrupted: killed after its round-1 checkpoint) run leaves behind."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text('{"round": 1, "eval_loss": 1.5}\n')
    (folder / "rounds.wal").write_text('{"event": "begin", "attempt": "x", "round": 2, "asked": ["1"]}\n')
    (folder / "operator.jsonl").write_text('{"round": 1}\n')
    (folder / "checkpoint.json").write_text('{"round": 1}')
    (folder / "checkpoint.pt").write_bytes(b"old checkpoint")
    (folder / "adapters" / "round-1").mkdir(parents=True, exist_ok=True)
    (folder / "adapters" / "round-1" / "adapter_model.safetensors").write_bytes(b"old")
    if not interrupted:
        (folder / "summary.json").write_text('{"rounds": 7, "old": true}')
        (folder / "adapter").mkdir(exist_ok=True)
        (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"old")
    (folder / "notes.txt").write_text("the user's own file")
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _cfg(out: Path, **extra) -> dict:
    return resolve({"output-dir": str(out), **extra})


# ----------------------------------------------------------------------------- the rule
@pytest.mark.parametrize("interrupted", [False, True], ids=["finished", "interrupted"])
def test_a_folder_holding_a_run_is_refused_in_one_line_and_left_alone(tmp_path, interrupted):
    out = fake_run(tmp_path / "run", interrupted)
    before = snapshot(out)
    for check in (check_output_dir, claim_output_dir):
        with pytest.raises(ConfigError) as exc:
            check(_cfg(out))
        msg = str(exc.value)
        assert "\n" not in msg and REFUSAL in msg and str(out) in msg and "checkpoint.pt" in msg
        assert snapshot(out) == before
    # a single file of a run is enough (an interrupted run killed before its first checkpoint)
    for name in ("rounds.wal", "metrics.jsonl", "summary.json", "checkpoint.json"):
        one = tmp_path / f"only-{name}"
        one.mkdir()
        (one / name).write_text("{}")
        with pytest.raises(ConfigError, match=re.escape(REFUSAL)):
            check_output_dir(_cfg(one))


def test_a_new_empty_or_foreign_folder_is_fine(tmp_path):
    assert check_output_dir(_cfg(tmp_path / "new")) == tmp_path / "new"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    assert claim_output_dir(_cfg(tmp_path / "mine", overwrite=True)) == tmp_path / "mine"
    assert (tmp_path / "mine" / "notes.txt").read_text() == "x"


def test_overwrite_deletes_the_earlier_runs_files_and_only_those(tmp_path):
    out = fake_run(tmp_path / "run")
    (out / "summary.json.tmp").write_text("half")
    assert check_output_dir(_cfg(out, overwrite=True)) == out and len(snapshot(out)) == 10  # the check deletes nothing
    claim_output_dir(_cfg(out, overwrite=True))
    assert run_files(out) == [] and snapshot(out) == {"notes.txt": b"the user's own file"}
    assert set(RUN_FILES) >= {"summary.json", "metrics.jsonl", "checkpoint.pt", "rounds.wal", "adapter"}


def test_resume_is_not_refused_and_resume_with_overwrite_is(tmp_path):
    out = fake_run(tmp_path / "run", interrupted=True)
    before = snapshot(out)
    assert claim_output_dir(_cfg(out, resume=True)) == out
    with pytest.raises(ConfigError, match="^overwrite: resume=true continues .* give one$"):
        claim_output_dir(_cfg(out, resume=True, overwrite=True))
    assert snapshot(out) == before


# ----------------------------------------------------------------------------- the ServerApp (flwr run)
def test_the_server_app_refuses_a_folder_holding_a_run_and_overwrite_replaces_it(tmp_path):
    """run_server is what the ServerApp's main runs under `flwr run` and `simulate` alike."""
    out = fake_run(tmp_path / "run", interrupted=True)
    before = snapshot(out)
    with pytest.raises(ConfigError) as exc:
        run_in_process(2, output_dir=out, num_server_rounds=1, local_steps=1, max_train_samples=40)
    assert REFUSAL in str(exc.value) and "\n" not in str(exc.value)
    assert snapshot(out) == before

    summary, _ = run_in_process(2, output_dir=out, overwrite=True, num_server_rounds=1, local_steps=1,
                                max_train_samples=40, checkpoint_every=1)
    assert summary["rounds"] == 1 and summary["config"]["overwrite"] is True
    assert not (out / "adapters").exists()  # the old run's round-1 adapter: gone, not mixed in
    assert json.loads((out / "checkpoint.json").read_text())["round"] == 1 and (out / "checkpoint.pt").read_bytes() != b"old checkpoint"
    assert [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert (out / "notes.txt").read_text() == "the user's own file"
    # and now the folder holds this run: a second start without --overwrite is refused again
    with pytest.raises(ConfigError, match=re.escape(REFUSAL)):
        run_in_process(2, output_dir=out, num_server_rounds=1)


# ----------------------------------------------------------------------------- the CLI
@pytest.mark.parametrize("command", ["simulate", "audit"])
def test_cli_refuses_before_ray_and_touches_nothing(cli, no_ray, tmp_path, command):
    out = tmp_path / "run"
    fake_run(out / "run" if command == "audit" else out)
    before = snapshot(out)
    r = cli([command, "--num-clients", "2", "--output-dir", str(out), "--run-config", TINY_RUN], env=no_ray, timeout=120)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and REFUSAL in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert snapshot(out) == before
    # --overwrite passes the up-front check and gets as far as starting Ray (the stand-in exits); what the
    # ServerApp deleted by then were the old run's files, never the user's own
    r = cli([command, "--num-clients", "2", "--output-dir", str(out), "--overwrite", "--run-config", TINY_RUN],
            env=no_ray, timeout=120)
    assert r.returncode == RAY_IMPORTED, r.stderr[-2000:]
    run = out / "run" if command == "audit" else out
    assert (run / "notes.txt").read_text() == "the user's own file"
    assert {k for k in snapshot(run)} <= {k.removeprefix("run/") for k in before}


def test_resume_and_overwrite_together_are_refused(cli, no_ray, tmp_path):
    out = fake_run(tmp_path / "run", interrupted=True)
    r = cli(["simulate", "--resume", str(out), "--overwrite"], env=no_ray, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and "give one" in r.stderr, r.stderr


def test_make_run_and_the_experiment_runner_replace_their_own_folders():
    """`make run` writes runs/default every time: twice in a row must work (README's commands read it)."""
    recipe = next(line for line in (REPO / "Makefile").read_text().splitlines() if "fl-dplora simulate" in line)
    assert "--output-dir $(OUT) --overwrite" in recipe
    from fl_dplora.tools.experiments import RunSpec, command

    spec = RunSpec("r", "s", "train", {"seed": 1}, resolve({"seed": 1}).to_record(), num_clients=2)
    cmd = command(spec, Path("/tmp/x"))
    assert cmd[cmd.index("--output-dir") + 1:] == ["/tmp/x", "--overwrite"]
    # overwrite is a server-side, non-computing key: cached experiment runs keep their hashes
    assert spec.hash == RunSpec("r", "s", "train", {"seed": 1}, resolve({"seed": 1, "overwrite": True}).to_record(), 2).hash


@pytest.mark.slow
def test_simulate_overwrite_replaces_an_earlier_run_end_to_end(cli, tmp_path):
    out = fake_run(tmp_path / "run")
    r = cli(["simulate", "--num-clients", "2", "--num-cpus", "1", "--output-dir", str(out), "--overwrite",
             "--run-config", TINY_RUN], timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 1 and "old" not in summary and summary["config"]["overwrite"] is True
    assert not (out / "adapters").exists() and (out / "adapter" / "adapter_model.safetensors").read_bytes() != b"old"
    assert (out / "notes.txt").read_text() == "the user's own file"
    # the run-config key does the same (what `flwr run . --run-config "overwrite=true"` sets) ...
    assert resolve({"overwrite": True}).output.overwrite is True
    # ... and without either, the folder (holding this run now) is refused
    r = cli(["simulate", "--num-clients", "2", "--output-dir", str(out), "--run-config", TINY_RUN], timeout=120)
    assert r.returncode == 2 and REFUSAL in r.stderr
