"""scripts/gpu_smoke.py without a GPU: the commands it would run, the no-CUDA exit, the report."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fl_dplora.cli import build_parser
from fl_dplora.config import parse_overrides, resolve

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_smoke.py"


@pytest.fixture(scope="module")
def smoke():
    spec = importlib.util.spec_from_file_location("gpu_smoke", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_smoke"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("gpu_smoke", None)


def _run(args, env=None, timeout=120):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=REPO)


def _simulate_commands(stdout: str) -> list[list[str]]:
    return [shlex.split(line) for line in stdout.splitlines()
            if not line.startswith("#") and " simulate " in line]


def _flags(argv: list[str]) -> dict[str, str]:
    return dict(zip(argv[2::2], argv[3::2]))


def test_dry_run_prints_three_valid_simulate_commands(tmp_path):
    proc = _run(["--dry-run", "--output", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr
    cmds = _simulate_commands(proc.stdout)
    assert len(cmds) == 3
    parser = build_parser()
    seen = {}
    for argv in cmds:
        assert Path(argv[0]).name == "fl-dplora" and argv[1] == "simulate"
        parser.parse_args(argv[1:])  # every option exists (argparse exits on an unknown one)
        flags = _flags(argv)
        name = Path(flags["--output-dir"]).name
        assert Path(flags["--output-dir"]).parent == tmp_path.resolve()
        cfg = resolve(parse_overrides(flags["--run-config"]))  # a renamed or retyped key fails here
        assert (cfg.federation.num_server_rounds, cfg.train.local_steps, cfg.data.max_train_samples) == (2, 4, 400)
        assert cfg.output.checkpoint_every == 0 and cfg.privacy.dp_mode == "sample"
        assert cfg.train.head_rounds == 0  # both rounds train LoRA on the GPU, not only the label head
        seen[name] = (flags, cfg)
    assert set(seen) == {"bf16", "4bit", "shared-gpu"}
    flags, cfg = seen["bf16"]
    assert (flags["--num-clients"], flags["--num-gpus"], cfg.model.dtype, cfg.model.quantization) == ("2", "1", "bfloat16", "none")
    assert cfg.model.name == "smollm2-135m"
    flags, cfg = seen["4bit"]
    assert (flags["--num-clients"], flags["--num-gpus"], cfg.model.dtype, cfg.model.quantization) == ("2", "1", "bfloat16", "4bit")
    assert cfg.model.name.endswith("smollm2-135m-hf")  # a GGUF cannot be quantized: the converted folder
    flags, cfg = seen["shared-gpu"]
    assert (flags["--num-clients"], flags["--num-gpus"], cfg.model.quantization) == ("4", "0.25", "none")
    assert float(flags["--num-gpus"]) * int(flags["--num-clients"]) == 1.0
    assert "--convert-gguf" in proc.stdout and str(tmp_path.resolve() / "summary.json") in proc.stdout
    assert not (tmp_path / "summary.json").exists()  # nothing ran


def test_dry_run_only_and_bad_only(tmp_path):
    proc = _run(["--dry-run", "--only", "shared-gpu", "--output", str(tmp_path)])
    cmds = _simulate_commands(proc.stdout)
    assert proc.returncode == 0 and len(cmds) == 1 and _flags(cmds[0])["--num-gpus"] == "0.25"
    proc = _run(["--dry-run", "--only", "bf16,fp8"])
    assert proc.returncode == 2 and "fp8" in proc.stderr


def test_wrapper_runs_from_any_directory(tmp_path):
    if not (REPO / ".venv" / "bin" / "python").is_file():
        pytest.skip("no .venv in the repository")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_smoke.sh"), "--dry-run", "--output", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(_simulate_commands(proc.stdout)) == 3


def test_without_cuda_exits_2_with_one_line(tmp_path):
    proc = _run(["--output", str(tmp_path)], env={"CUDA_VISIBLE_DEVICES": ""}, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "gpu_smoke: no CUDA GPU visible to torch; nothing to check (use --dry-run to see the commands)"]
    assert proc.stdout == ""
    assert not any(tmp_path.iterdir())


# --- the parts, with fake results -----------------------------------------------------------------

def _summary(loss=0.61, eps=7.96, target=8.0, **cfg):
    config = {"target-epsilon": target, "local-steps": 4, "batch-size": 32, "label-head": True, "head-rounds": 0,
              "head-local-steps": 16, "head-batch-size": 0, "max-train-samples": 400, "population": 2,
              "dtype": "bfloat16", "quantization": "none", **cfg}
    return {"rounds": 2, "final_eval": {"loss": loss, "accuracy": 0.7}, "privacy": {"epsilon": eps}, "config": config}


def test_judge(smoke):
    assert smoke.judge(0, _summary()) == (True, "")
    assert smoke.judge(0, _summary(eps=8.0)) == (True, "")
    assert smoke.judge(1, _summary())[1] == "exit code 1"
    assert smoke.judge(None, None, 300)[1] == "timed out after 300 s"
    assert smoke.judge(0, None)[1] == "no summary.json"
    assert "not finite" in smoke.judge(0, _summary(loss=float("nan")))[1]
    assert "not finite" in smoke.judge(0, _summary(loss=None))[1]
    assert "> target" in smoke.judge(0, _summary(eps=8.2))[1]
    assert not smoke.judge(0, _summary(eps=None))[0]


def test_expected_examples(smoke):
    cfg = _summary()["config"]
    assert smoke.expected_examples(cfg, [2, 2]) == 2 * 2 * 4 * 32
    assert smoke.expected_examples(cfg, [2, 1]) == 3 * 4 * 32  # a dropped client does no work
    lpft = {**cfg, "head-rounds": 1, "head-batch-size": 8}
    assert smoke.expected_examples(lpft, [2, 2]) == 2 * 16 * 8 + 2 * 4 * 32
    whole_shard = {**cfg, "head-rounds": 1}  # head-batch-size 0 = the shard, ~400 / 2
    assert smoke.expected_examples(whole_shard, [2, 2]) == 2 * 16 * 200 + 2 * 4 * 32
    assert smoke.expected_examples({**whole_shard, "max-train-samples": 0}, [2, 2]) is None


def test_gpu_poller_reports_peak_and_delta(smoke):
    values = iter([1000, 1500, 4200, 3000] + [2000] * 1000)
    poller = smoke.GpuPoller(lambda: next(values), interval=0.01).start()
    time.sleep(0.2)
    assert poller.stop() == {"gpu_mib_before": 1000, "peak_gpu_mib": 4200, "peak_gpu_delta_mib": 3200}
    assert smoke.GpuPoller(lambda: None, interval=0.01).start().stop() == {
        "gpu_mib_before": None, "peak_gpu_mib": None, "peak_gpu_delta_mib": None}


def test_format_line_and_summary(smoke, tmp_path):
    passed = {"name": "bf16", "status": "pass", "wall_seconds": 81.23, "peak_gpu_mib": 5120.0,
              "peak_gpu_delta_mib": 4600.0, "examples_per_s": 12.6, "eval_loss": 0.6123, "epsilon": 7.958,
              "target_epsilon": 8.0, "log": "gpu-smoke/bf16.log"}
    skipped = {"name": "4bit", "status": "skip", "reason": "bitsandbytes not importable (ModuleNotFoundError: x)"}
    failed = {"name": "shared-gpu", "status": "fail", "wall_seconds": 12.0, "peak_gpu_mib": None,
              "reason": "exit code 1: CUDA out of memory", "log": "gpu-smoke/shared-gpu.log"}
    assert smoke.format_line(passed) == ("bf16        PASS  wall 81.2 s  peak GPU 5120 MiB (+4600)  12.6 examples/s  "
                                         "eval loss 0.6123  epsilon 7.958/8")
    assert smoke.format_line(skipped) == "4bit        SKIP  bitsandbytes not importable (ModuleNotFoundError: x)"
    line = smoke.format_line(failed)
    assert line.startswith("shared-gpu  FAIL  wall 12.0 s  peak GPU n/a")
    assert "exit code 1: CUDA out of memory (log: gpu-smoke/shared-gpu.log)" in line
    doc = smoke.write_summary(tmp_path / "out" / "summary.json", [passed, skipped, failed], {"torch": "x"})
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == doc
    assert (doc["ok"], doc["passed"], doc["skipped"], doc["failed"]) == (False, ["bf16"], ["4bit"], ["shared-gpu"])
    assert smoke.write_summary(tmp_path / "s.json", [passed, skipped], {})["ok"] is True


FAKE_SIMULATE = r"""
import json, sys
from pathlib import Path
out = Path(sys.argv[1]); out.mkdir(parents=True)
cfg = {"target-epsilon": 8.0, "local-steps": 4, "batch-size": 32, "label-head": True, "head-rounds": 0,
       "population": 4, "dtype": "auto", "quantization": "none"}
(out / "summary.json").write_text(json.dumps({"rounds": 2, "final_eval": {"loss": 0.5, "accuracy": 0.7},
                                               "privacy": {"epsilon": 7.9}, "config": cfg}))
rows = [{"round": 1, "sampled": 4, "accepted": 4, "seconds": 3.0}, {"event": "resume"},
        {"round": 2, "sampled": 4, "accepted": 3, "seconds": 2.0}]
(out / "operator.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
print("fl-dplora: done")
"""

FAKE_HANG = r"""
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
open(sys.argv[2], "w").write(str(child.pid))
time.sleep(120)
"""


def test_run_check_with_a_fake_simulate(smoke, tmp_path, monkeypatch):
    check = next(c for c in smoke.CHECKS if c.name == "shared-gpu")
    monkeypatch.setattr(smoke, "command", lambda c, out: [sys.executable, "-c", FAKE_SIMULATE, str(out / c.name)])
    monkeypatch.setattr(smoke, "nvidia_smi_used_mib", lambda: 700.0)
    (tmp_path / "shared-gpu").mkdir()
    (tmp_path / "shared-gpu" / "stale").write_text("from an earlier run")
    r = smoke.run_check(check, tmp_path, timeout=60)
    assert r["status"] == "pass", r
    assert not (tmp_path / "shared-gpu" / "stale").exists()
    assert r["clients_per_round"] == [4, 3] and r["expected_examples"] == 7 * 4 * 32
    assert r["examples_per_s"] == pytest.approx(7 * 4 * 32 / r["wall_seconds"], rel=0.2)  # wall is rounded
    assert (r["round_seconds"], r["epsilon"], r["eval_loss"]) == (5.0, 7.9, 0.5)
    assert (r["peak_gpu_mib"], r["peak_gpu_delta_mib"]) == (700.0, 0.0)
    assert "fl-dplora: done" in Path(r["log"]).read_text()


def test_run_check_timeout_kills_the_process_tree(smoke, tmp_path, monkeypatch):
    pytest.importorskip("psutil")
    import psutil

    pid_file = tmp_path / "child.pid"
    check = smoke.CHECKS[0]
    monkeypatch.setattr(smoke, "command", lambda c, out: [sys.executable, "-c", FAKE_HANG, str(out), str(pid_file)])
    monkeypatch.setattr(smoke, "nvidia_smi_used_mib", lambda: None)
    start = time.monotonic()
    r = smoke.run_check(check, tmp_path, timeout=3)
    assert time.monotonic() - start < 30
    assert (r["status"], r["reason"], r["exit_code"]) == ("fail", "timed out after 3 s", None)
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if psutil.Process(child).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the child {child} of the timed-out check still runs")
