"""What every benchmark shares: timing (warm-up, interleaved repetitions, medians), the environment
block and the JSON file, tables, torch set-up, and the command-line flags most benchmarks take."""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

QUICK_MODEL = "tiny-random-llama"


# ------------------------------------------------------------------ shared helpers
class Variant:
    """A named thing to time: `prepare()` (untimed) then `run()` (timed) then `finish()` (untimed)."""

    def __init__(self, name: str, run: Callable[[], Any], prepare: Callable[[], Any] | None = None,
                 finish: Callable[[], Any] | None = None):
        self.name, self.run, self.prepare, self.finish = name, run, prepare, finish


def time_interleaved(variants: list[Variant], reps: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    """{"wall": {name: [s...]}, "cpu": {name: [s...]}} over `reps` interleaved repetitions."""

    def once(v: Variant) -> tuple[float, float]:
        if v.prepare:
            v.prepare()
        gc.collect()
        c0, t0 = time.process_time(), time.perf_counter()
        v.run()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if v.finish:
            v.finish()
        return wall, cpu

    for _ in range(warmup):
        for v in variants:
            once(v)
    wall: dict[str, list[float]] = {v.name: [] for v in variants}
    cpu: dict[str, list[float]] = {v.name: [] for v in variants}
    for r in range(reps):
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:
            w, c = once(v)
            wall[v.name].append(w)
            cpu[v.name].append(c)
    return {"wall": wall, "cpu": cpu}


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def ratios(medians: dict[str, float], pairs: list[tuple[str, str]]) -> dict[str, float]:
    return {f"{a}/{b}": medians[a] / medians[b] for a, b in pairs if a in medians and b in medians and medians[b] > 0}


def environment() -> dict[str, Any]:
    import torch

    from fl_dplora.server.outputs import software_environment

    return {**software_environment(), "torch_threads": torch.get_num_threads(), "loadavg_start": list(os.getloadavg())}


def write_result(result: dict[str, Any], args: argparse.Namespace) -> int:
    result["environment"]["loadavg_end"] = list(os.getloadavg())
    result["argv"] = list(sys.argv)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {path}")
    return 0


def busy_note(env: dict[str, Any]) -> None:
    load = max(env["loadavg_start"][0], os.getloadavg()[0])
    if load > (env["cpu_count"] or 1):
        print(f"note: load average {load:.1f} on {env['cpu_count']} CPUs: other processes compete for the CPU, "
              "wall times include waiting; the CPU-time ratios are the steadier ones")
        if env["torch_threads"] > 1:
            print("note: with several torch threads on a busy machine each parallel op waits for descheduled "
                  "sibling threads (CPU time counts their spinning too); --threads 1 measures the code, not the contention")


def format_table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def setup_torch(args: argparse.Namespace) -> None:
    import warnings

    os.environ.setdefault("TQDM_DISABLE", "1")  # model-loading progress bars (read when tqdm is imported)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    warnings.filterwarnings("ignore")  # transformers/peft deprecation chatter; numbers matter here
    if getattr(args, "quick", False) and not getattr(args, "threads", 0):
        args.threads = 1  # a tiny model gains nothing from threads, and they stall on a busy machine
    if getattr(args, "threads", 0):
        torch.set_num_threads(int(args.threads))


def quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - only cosmetics
        pass


def apply_quick_step_defaults(args: argparse.Namespace) -> None:
    """--quick for the step benchmarks: the tiny model, short sequences, few repetitions."""
    if args.quick:
        args.model = args.model or QUICK_MODEL
        args.reps, args.warmup = args.reps or 3, args.warmup if args.warmup is not None else 1
        args.batch_size, args.seq_len = args.batch_size or 4, args.seq_len or 32


# ------------------------------------------------------------------ flags
def common_arguments(p: argparse.ArgumentParser, timed: bool = True) -> None:
    """--quick, --json, --model; with `timed`, also --reps, --warmup, --threads."""
    p.add_argument("--quick", action="store_true", help="tiny random model, small sizes: a smoke run")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--model", default=None, help="base model (default: smollm2-135m; tiny-random-llama with --quick)")
    if timed:
        p.add_argument("--reps", type=int, default=0, help="timed repetitions per variant")
        p.add_argument("--warmup", type=int, default=None, help="untimed runs per variant first")
        p.add_argument("--threads", type=int, default=0, help="torch threads (0 = as torch chooses)")


def lora_arguments(p: argparse.ArgumentParser, batch_help: str, seq_help: str) -> None:
    """--task, --rank, --targets, --batch-size, --seq-len: the LoRA step a benchmark times."""
    p.add_argument("--task", default="fin-sentiment", help="run-config task")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--targets", default="q_proj,v_proj", help="run-config lora-targets")
    p.add_argument("--batch-size", type=int, default=0, help=batch_help)
    p.add_argument("--seq-len", type=int, default=0, help=seq_help)
