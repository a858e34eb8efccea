#!/usr/bin/env python3
"""GPU smoke test: three short `fl-dplora simulate` runs that a GPU owner runs first.

    scripts/gpu_smoke.sh [--output DIR] [--only bf16,4bit,shared-gpu] [--timeout S] [--dry-run]

Checks (SmolLM2-135M, dp-mode sample, 2 rounds x 4 local steps, 400 training examples):
  bf16        2 clients, --num-gpus 1, dtype=bfloat16
  4bit        the same with quantization=4bit (NF4); skipped when bitsandbytes is not importable.
              transformers refuses to quantize a GGUF, so this check first converts the SmolLM2
              GGUF once to a local Hugging Face folder (CPU, ~270 MB) under
              $FL_DPLORA_CACHE/models (default ~/.cache/fl-dplora/models) and trains on that.
  shared-gpu  4 clients at --num-gpus 0.25 (four per GPU), dtype auto

Each check passes when the process exits 0, DIR/<check>/summary.json exists, the final eval loss
is finite and epsilon <= target-epsilon. Reported: wall seconds, peak GPU memory (nvidia-smi
polled every 0.5 s: the max, and the max minus the value before the check), examples/s.
One line per check on stdout, DIR/summary.json, each run's log in DIR/<check>.log.
Exit: 0 all passed or skipped, 1 a check failed, 2 no CUDA GPU (or bad arguments).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
NO_CUDA = "gpu_smoke: no CUDA GPU visible to torch; nothing to check (use --dry-run to see the commands)"
DEFAULT_TIMEOUT = 300

# Small on purpose: minutes on one GPU for all three. head-rounds=0 so that both rounds train the
# LoRA factors on the GPU (the default LP-FT schedule would train only the label head in rounds 1-4).
COMMON = ("num-server-rounds=2 local-steps=4 max-train-samples=400 "
          "max-eval-samples=64 checkpoint-every=0 head-rounds=0 dp-mode=sample")


@dataclass(frozen=True)
class Check:
    name: str
    num_clients: int
    num_gpus: float
    num_cpus: float
    extra: str  # run-config on top of COMMON
    what: str


CHECKS = (
    Check("bf16", 2, 1.0, 2.0, "dtype=bfloat16", "2 clients x 2 rounds, one GPU per client, bfloat16 base"),
    Check("4bit", 2, 1.0, 2.0, "dtype=bfloat16 quantization=4bit", "the same with a bitsandbytes NF4 base"),
    Check("shared-gpu", 4, 0.25, 1.0, "dtype=auto", "4 clients at --num-gpus 0.25 (four per GPU)"),
)
CHECK_NAMES = tuple(c.name for c in CHECKS)


def cache_dir() -> Path:
    return Path(os.environ.get("FL_DPLORA_CACHE", Path.home() / ".cache" / "fl-dplora"))


def converted_model_dir() -> Path:
    """Where the 4bit check's SmolLM2 lives as a plain HF folder (transformers cannot quantize a GGUF)."""
    return cache_dir() / "models" / "smollm2-135m-hf"


def fl_dplora_bin() -> str:
    here = Path(sys.executable).parent / "fl-dplora"
    return str(here) if here.is_file() else (shutil.which("fl-dplora") or "fl-dplora")


def run_config(check: Check) -> str:
    model = converted_model_dir() if check.name == "4bit" else "smollm2-135m"
    return f"{shlex.quote(f'model={model}')} {COMMON} {check.extra}"


def command(check: Check, out_dir: Path) -> list[str]:
    return [fl_dplora_bin(), "simulate", "--num-clients", str(check.num_clients),
            "--num-gpus", f"{check.num_gpus:g}", "--num-cpus", f"{check.num_cpus:g}",
            "--output-dir", str(out_dir / check.name), "--run-config", run_config(check),
            "--overwrite"]  # a rerun of the smoke test replaces its own runs (default folder gpu-smoke/)


def convert_command() -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--convert-gguf", str(converted_model_dir())]


# --- GPU memory ----------------------------------------------------------------------------------

def nvidia_smi_used_mib() -> float | None:
    """memory.used summed over the GPUs this process may use (CUDA_VISIBLE_DEVICES, else all); None
    without nvidia-smi."""
    cmd = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible:
        cmd.insert(1, f"--id={visible}")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True).stdout
        return float(sum(float(v) for v in out.split()))
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


class GpuPoller:
    """Polls `query` every `interval` s in a background thread; `before` is read at start()."""

    def __init__(self, query: Callable[[], float | None] = nvidia_smi_used_mib, interval: float = 0.5):
        self.query, self.interval = query, interval
        self.before: float | None = None
        self.peak: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        value = self.query()
        if value is not None:
            self.peak = value if self.peak is None else max(self.peak, value)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> GpuPoller:
        self.before = self.query()
        self.peak = self.before
        self._thread.start()
        return self

    def stop(self) -> dict[str, float | None]:
        self._stop.set()
        self._thread.join()
        self._sample()
        delta = self.peak - self.before if self.peak is not None and self.before is not None else None
        return {"gpu_mib_before": self.before, "peak_gpu_mib": self.peak, "peak_gpu_delta_mib": delta}


# --- judging a finished run ---------------------------------------------------------------------

def operator_rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "operator.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "event" not in r and "round" in r]


def expected_examples(cfg: dict[str, Any], clients_per_round: Sequence[int]) -> float | None:
    """Rounds x clients x local-steps x batch-size, from the run's config. Under DP sampling each
    step draws a Poisson batch whose *expected* size is batch-size, so this is the expected number of
    training examples, an approximation (the actual draws are not reported). A head-only round
    (label-head, round <= head-rounds) counts head-local-steps x head-batch-size (0 = the shard,
    estimated as max-train-samples / clients); None when that cannot be estimated."""
    total = 0.0
    population = max(int(cfg.get("population") or 0), 1)
    for rnd, clients in enumerate(clients_per_round, start=1):
        if cfg.get("label-head") and rnd <= int(cfg.get("head-rounds", 0)):
            steps = int(cfg["head-local-steps"])
            batch = int(cfg["head-batch-size"]) or (int(cfg.get("max-train-samples") or 0) / population)
            if not batch:
                return None
        else:
            steps, batch = int(cfg["local-steps"]), int(cfg["batch-size"])
        total += clients * steps * batch
    return total


def judge(exit_code: int | None, summary: dict[str, Any] | None, timeout: float | None = None) -> tuple[bool, str]:
    """(passed, reason): exit 0, summary.json present, finite eval loss, epsilon <= target."""
    if exit_code is None:
        return False, f"timed out after {timeout:g} s" if timeout else "timed out"
    if exit_code != 0:
        return False, f"exit code {exit_code}"
    if summary is None:
        return False, "no summary.json"
    loss = (summary.get("final_eval") or {}).get("loss")
    if not isinstance(loss, (int, float)) or not math.isfinite(loss):
        return False, f"eval loss not finite: {loss!r}"
    eps = (summary.get("privacy") or {}).get("epsilon")
    target = (summary.get("config") or {}).get("target-epsilon")
    if not isinstance(eps, (int, float)) or not isinstance(target, (int, float)):
        return False, f"no epsilon/target-epsilon in summary.json ({eps!r}/{target!r})"
    if not eps <= target * (1 + 1e-9):
        return False, f"epsilon {eps:.4f} > target {target:g}"
    return True, ""


def _tail_error(log: Path) -> str:
    """The last line of the log that names an error, for the one-line report."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    for ln in reversed(lines):
        if "error" in ln.lower() or "exception" in ln.lower():
            return ln[:200]
    return lines[-1][:200] if lines else ""


# --- report --------------------------------------------------------------------------------------

def format_line(r: dict[str, Any]) -> str:
    status = r["status"].upper()
    head = f"{r['name']:<11} {status:<5}"
    if r["status"] == "skip":
        return f"{head} {r.get('reason', '')}"
    parts = [f"wall {r['wall_seconds']:.1f} s"]
    if r.get("peak_gpu_mib") is not None:
        delta = r.get("peak_gpu_delta_mib")
        parts.append(f"peak GPU {r['peak_gpu_mib']:.0f} MiB" + (f" (+{delta:.0f})" if delta is not None else ""))
    else:
        parts.append("peak GPU n/a (no nvidia-smi)")
    if r.get("examples_per_s") is not None:
        parts.append(f"{r['examples_per_s']:.1f} examples/s")
    if r.get("eval_loss") is not None:
        parts.append(f"eval loss {r['eval_loss']:.4f}")
    if r.get("epsilon") is not None:
        parts.append(f"epsilon {r['epsilon']:.3f}/{r['target_epsilon']:g}")
    line = f"{head} " + "  ".join(parts)
    if r["status"] == "fail":
        line += f"  -- {r.get('reason', '')}" + (f" (log: {r['log']})" if r.get("log") else "")
    return line


def write_summary(path: Path, results: list[dict[str, Any]], env: dict[str, Any]) -> dict[str, Any]:
    doc = {
        "ok": not any(r["status"] == "fail" for r in results),
        "passed": [r["name"] for r in results if r["status"] == "pass"],
        "failed": [r["name"] for r in results if r["status"] == "fail"],
        "skipped": [r["name"] for r in results if r["status"] == "skip"],
        "environment": env,
        "checks": results,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)
    return doc


# --- running -------------------------------------------------------------------------------------

PROBE = r"""
import importlib, json, torch
out = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda}
if out["cuda_available"]:
    out["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    out["bf16_supported"] = torch.cuda.is_bf16_supported()
try:
    bnb = importlib.import_module("bitsandbytes")
    out["bitsandbytes"] = getattr(bnb, "__version__", "?")
except Exception as e:  # not installed, or installed without a usable CUDA build
    out["bitsandbytes"] = None
    out["bitsandbytes_error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
print(json.dumps(out))
"""


def probe() -> dict[str, Any]:
    """CUDA and bitsandbytes, asked in a child process so this one never holds GPU memory."""
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        return {"cuda_available": False, "probe_error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def kill_tree(pid: int, grace: float = 15.0) -> None:
    """SIGTERM the process and every descendant (collected first: Ray's raylet, GCS and workers),
    SIGKILL what is left after `grace` seconds."""
    try:
        import psutil
    except ImportError:
        try:
            os.killpg(pid, signal.SIGKILL)  # started with start_new_session: its own group
        except OSError:
            pass
        return
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


def convert_gguf(dest: Path) -> None:
    """SmolLM2's GGUF -> a plain HF folder (dequantized, bfloat16 safetensors + tokenizer), written
    aside and renamed. transformers marks a GGUF-loaded model as not serializable, so the weights go
    into a fresh model built from the same config."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    from fl_dplora.model_loading import load_tokenizer, smollm2_gguf_path

    gguf = smollm2_gguf_path()
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent))
    fresh.save_pretrained(str(tmp))
    load_tokenizer("smollm2-135m").save_pretrained(str(tmp))
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)


def ensure_converted(log: Path, timeout: float) -> str | None:
    """None when the 4bit check's model folder is ready, else why not."""
    dest = converted_model_dir()
    if (dest / "config.json").is_file() and (dest / "model.safetensors").is_file():
        return None
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the conversion runs on the CPU
    with log.open("w") as f:
        try:
            rc = subprocess.run(convert_command(), stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return f"converting the GGUF to {dest} timed out after {timeout:g} s"
    return None if rc == 0 else f"converting the GGUF to {dest} failed: {_tail_error(log)} (log: {log})"


def run_check(check: Check, out_dir: Path, timeout: float) -> dict[str, Any]:
    run_dir = out_dir / check.name
    log = out_dir / f"{check.name}.log"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a check's folder belongs to this script: start clean
    argv = command(check, out_dir)
    result: dict[str, Any] = {"name": check.name, "what": check.what, "command": shlex.join(argv),
                              "output_dir": str(run_dir), "log": str(log)}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    poller = GpuPoller(nvidia_smi_used_mib).start()
    start = time.monotonic()
    with log.open("w") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
        try:
            exit_code: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            proc.wait()
            exit_code = None
        except BaseException:
            kill_tree(proc.pid)
            raise
    wall = time.monotonic() - start
    result.update(poller.stop())
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    ok, reason = judge(exit_code, summary, timeout)
    if not ok and exit_code not in (None, 0):
        reason += f": {_tail_error(log)}"
    result.update(status="pass" if ok else "fail", reason=reason, exit_code=exit_code, wall_seconds=round(wall, 2))
    if summary:
        cfg = summary.get("config") or {}
        rows = operator_rows(run_dir)
        clients = [int(r.get("accepted") or 0) for r in rows] or [check.num_clients] * int(summary.get("rounds") or 0)
        examples = expected_examples(cfg, clients)
        result.update(
            eval_loss=summary["final_eval"].get("loss"), eval_accuracy=summary["final_eval"].get("accuracy"),
            epsilon=summary["privacy"].get("epsilon"), target_epsilon=cfg.get("target-epsilon"),
            dtype=cfg.get("dtype"), quantization=cfg.get("quantization"), rounds=summary.get("rounds"),
            clients_per_round=clients, expected_examples=examples,
            # expected DP batch (see expected_examples) over the whole process: Ray start and model
            # loads included, so this understates the training rate
            examples_per_s=round(examples / wall, 3) if examples is not None and wall > 0 else None,
            round_seconds=round(sum(float(r.get("seconds") or 0) for r in rows), 2) if rows else None,
        )
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_smoke", description=__doc__.splitlines()[0])
    p.add_argument("--output", default="gpu-smoke", help="folder for the runs, logs and summary.json (default gpu-smoke)")
    p.add_argument("--only", default=",".join(CHECK_NAMES), help=f"comma-separated subset of {','.join(CHECK_NAMES)}")
    p.add_argument("--dry-run", action="store_true", help="print the exact commands, run nothing (no GPU needed)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help=f"seconds per check (default {DEFAULT_TIMEOUT})")
    p.add_argument("--convert-gguf", metavar="DIR", help=argparse.SUPPRESS)  # internal: the 4bit check's model
    args = p.parse_args(argv)
    if args.convert_gguf:
        convert_gguf(Path(args.convert_gguf))
        return 0
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in CHECK_NAMES]
    if unknown or not wanted:
        p.error(f"--only: unknown check(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(CHECK_NAMES)}")
    checks = [c for c in CHECKS if c.name in wanted]
    out_dir = Path(args.output).expanduser().resolve()

    if args.dry_run:
        for check in checks:
            print(f"# {check.name}: {check.what}")
            if check.name == "4bit":
                print(f"# 4bit: skipped when bitsandbytes is not importable; first (once, CPU): "
                      f"CUDA_VISIBLE_DEVICES= {shlex.join(convert_command())}")
            print(shlex.join(command(check, out_dir)))
        print(f"# summary: {out_dir / 'summary.json'}")
        return 0

    env = probe()
    if not env.get("cuda_available"):
        print(NO_CUDA, file=sys.stderr)
        return 2
    env["nvidia_smi_mib_at_start"] = nvidia_smi_used_mib()
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"gpu_smoke: torch {env.get('torch')}, CUDA {env.get('cuda')}, {', '.join(env.get('devices') or [])}; "
          f"output {out_dir}", file=sys.stderr, flush=True)
    results = []
    for check in checks:
        skip = None
        if check.name == "4bit":
            if env.get("bitsandbytes") is None:
                skip = f"bitsandbytes not importable ({env.get('bitsandbytes_error', '?')})"
            else:
                print("gpu_smoke: 4bit: preparing the SmolLM2 folder (once)", file=sys.stderr, flush=True)
                started = time.monotonic()
                problem = ensure_converted(out_dir / "4bit-convert.log", args.timeout)
                prepare_seconds = round(time.monotonic() - started, 2)
                if problem:
                    result = {"name": check.name, "what": check.what, "status": "fail", "reason": problem,
                              "wall_seconds": prepare_seconds, "log": str(out_dir / "4bit-convert.log")}
                    results.append(result)
                    print(format_line(result), flush=True)
                    continue
        if skip:
            result = {"name": check.name, "what": check.what, "status": "skip", "reason": skip,
                      "command": shlex.join(command(check, out_dir))}
        else:
            print(f"gpu_smoke: {check.name}: running (log {out_dir / (check.name + '.log')})", file=sys.stderr, flush=True)
            result = run_check(check, out_dir, args.timeout)
            if check.name == "4bit":
                result["prepare_seconds"] = prepare_seconds  # the GGUF conversion, not in wall_seconds
        results.append(result)
        print(format_line(result), flush=True)
    doc = write_summary(out_dir / "summary.json", results, env)
    print(f"gpu_smoke: {len(doc['passed'])} passed, {len(doc['failed'])} failed, {len(doc['skipped'])} skipped; "
          f"{out_dir / 'summary.json'}", flush=True)
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
