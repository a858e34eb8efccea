"""`fl-dplora bench throughput`: examples/s and tokens/s of one local step (dp-mode none and sample),
and the peak RSS of a real ClientApp process (client_rss.py) over two train rounds."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

from fl_dplora.tools.bench.common import (
    apply_quick_step_defaults,
    busy_note,
    common_arguments,
    environment,
    format_table,
    lora_arguments,
    median,
    quiet_transformers,
    ratios,
    setup_torch,
    time_interleaved,
    write_result,
)
from fl_dplora.tools.bench.local_step import fixed_batch, step_variants

NAME = "throughput"


def client_peak_rss(overrides: dict[str, Any], num_partitions: int, threads: int = 0, timeout: float = 600) -> dict[str, Any]:
    """Run the real ClientApp (two train rounds) in a fresh process; its memory in KiB.

    peak_rss_process_kb: the whole process (includes loading the model); peak_rss_roundN_kb: the
    high-water mark during round N alone (reset through /proc/self/clear_refs before the round).
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "FL_DPLORA_PROGRESS": "0"}
    overrides = {**overrides, "label-head": False}  # the LoRA client's memory (the head's statistics come from a server)
    proc = subprocess.run([sys.executable, "-m", "fl_dplora.tools.bench.client_rss", json.dumps(overrides), str(num_partitions),
                           str(threads)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RSS-JSON "):
            return json.loads(line[len("RSS-JSON "):])
    sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
    raise RuntimeError(f"bench throughput: the client process failed (exit {proc.returncode})")


def main(args: argparse.Namespace) -> int:
    setup_torch(args)
    quiet_transformers()
    from fl_dplora.config import resolve

    apply_quick_step_defaults(args)
    model_name = args.model or "smollm2-135m"
    batch, seq = args.batch_size or 16, args.seq_len or 96
    micro = min(batch, args.micro_batch_size or batch)
    reps, warmup = args.reps or 3, args.warmup if args.warmup is not None else 1
    overrides = {"model": model_name, "task": args.task, "lora-rank": args.rank, "lora-targets": args.targets,
                 "batch-size": batch, "micro-batch-size": micro, "max-seq-len": seq, "local-steps": 1,
                 "dp-mode": "none", "optimizer": "sgd", "label-head": False}  # a LoRA step is what is timed
    cfg = resolve(overrides)
    data, tok = fixed_batch(cfg, batch)
    tokens = sum(len(e.input_ids) for e in data)
    variants, info, restore, _ = step_variants(cfg, data, tok.pad_token_id)
    env = environment()
    print(f"throughput: {model_name}, LoRA r={args.rank} on {args.targets}, one local step of batch {batch} x "
          f"max-seq-len {seq} ({tokens} tokens) in micro-batches of {micro}; {env['torch_threads']} torch threads; warm-up {warmup}, {reps} reps")
    try:
        times = time_interleaved(variants, reps, warmup)
    finally:
        restore()
    med = {k: median(v) for k, v in times["wall"].items()}
    med_cpu = {k: median(v) for k, v in times["cpu"].items()}
    eps = {k: batch / v for k, v in med.items()}
    tps = {k: tokens / v for k, v in med.items()}
    print(format_table([[k, f"{med[k]:.3f}", f"{eps[k]:.2f}", f"{tps[k]:.0f}", f"{med_cpu[k]:.3f}"] for k in med],
                 ["dp-mode", "median s/step", "examples/s", "tokens/s", "median CPU s"]))
    busy_note(env)
    rss: dict[str, Any] = {}
    if not args.no_rss:
        for mode in (("sample",) if args.quick else ("none", "sample")):
            # the client's own configuration: its shard, Poisson batches for DP, model loaded in-process
            client_over = {**overrides, "dp-mode": mode, "noise-multiplier": 1.0, "max-train-samples": 40 * batch}
            rss[mode] = client_peak_rss(client_over, num_partitions=2, threads=int(args.threads or 0))
        print(format_table([[m, f"{r['rss_after_import_kb'] / 1024:.0f}", f"{r['rss_after_model_kb'] / 1024:.0f}",
                       f"{r['peak_rss_round1_kb'] / 1024:.0f}" if r["hwm_reset_round1"] else "-",
                       f"{r['peak_rss_round2_kb'] / 1024:.0f}" if r["hwm_reset_round2"] else "-",
                       f"{r['peak_rss_process_kb'] / 1024:.0f}"] for m, r in rss.items()],
                     ["client dp-mode", "RSS after import MiB", "after model MiB", "peak round 1 MiB",
                      "peak round 2 MiB", "peak process MiB"]))
    result = {
        "benchmark": "throughput", "median_seconds": med, "ratio": ratios(med, [("sample", "none")]),
        "median_cpu_seconds": med_cpu, "examples_per_second": eps, "tokens_per_second": tps,
        "samples_seconds": times["wall"],
        "peak_rss_mib": {m: r["peak_rss_process_kb"] / 1024 for m, r in rss.items()},
        "client_process": rss,
        "setup": {"model": model_name, "task": args.task, "lora_rank": args.rank, "lora_targets": args.targets,
                  "batch_size": batch, "micro_batch_size": micro, "max_seq_len": seq, "tokens": tokens,
                  "reps": reps, "warmup": warmup, **info},
        "environment": env,
    }
    return write_result(result, args)


def add_parser(bs) -> None:
    p = bs.add_parser(NAME, help="examples/s of a local step; peak RSS of a client process")
    common_arguments(p)
    lora_arguments(p, "batch size, the run's micro-batch (default: 16)", "max-seq-len (default: 96)")
    p.add_argument("--micro-batch-size", type=int, default=0, help="micro-batch; peak memory scales with it (default: the batch size)")
    p.add_argument("--no-rss", action="store_true", help="skip the client-process memory measurement")
    p.set_defaults(func=main)
