"""`fl-dplora bench round-overhead`: a real `fl-dplora simulate` in a subprocess; per round (2 and
later), its wall time against the sum of the clients' own compute time (dp-mode none: only then do
clients report it), read from the run's operator log."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fl_dplora.tools.bench.common import (
    QUICK_MODEL,
    common_arguments,
    environment,
    format_table,
    median,
    write_result,
)

NAME = "round-overhead"


def main(args: argparse.Namespace) -> int:
    from fl_dplora.config import ConfigError

    if args.quick:
        args.model = args.model or QUICK_MODEL
        args.num_clients = args.num_clients or 2
        args.rounds = args.rounds or 3
        args.threads = args.threads or 1
    model_name = args.model or "smollm2-135m"
    clients, rounds = args.num_clients or 3, args.rounds or 3
    if rounds < 2:
        raise ConfigError("bench round-overhead: --rounds must be >= 2 (round 1 is the warm-up)")
    small = "batch-size=4 micro-batch-size=4 max-seq-len=32 max-train-samples=64" if args.quick else \
        "batch-size=8 micro-batch-size=8 max-seq-len=64 max-train-samples=600"
    run_config = (f"model={model_name} num-server-rounds={rounds} local-steps={args.local_steps} {small} "
                  f"dp-mode={args.dp_mode} noise-multiplier=1.0 eval-every=0 max-eval-samples=8 label-head=false "
                  f"fraction-train=1.0 {args.run_config}").strip()
    out_dir = Path(args.output_dir) if args.output_dir else Path(tempfile.mkdtemp(prefix="fl-dplora-bench-round-"))
    num_cpus = args.num_cpus if args.num_cpus else float(os.cpu_count() or 1)
    cmd = [sys.executable, "-m", "fl_dplora.cli", "simulate", "--num-clients", str(clients),
           "--num-cpus", str(num_cpus), "--output-dir", str(out_dir), "--run-config", run_config]
    if args.overwrite:  # a folder holding a run is refused otherwise (fl_dplora/run_dir.py)
        cmd.append("--overwrite")
    sub_env = {**os.environ, "FL_DPLORA_PROGRESS": "0", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    if args.threads:  # torch reads these at start-up in every process of the run (Ray workers inherit them)
        sub_env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    env = environment()
    env["subprocess_threads"] = args.threads or "default"
    print(f"round-overhead: {' '.join(cmd[2:])}" + (f"  (OMP_NUM_THREADS={args.threads})" if args.threads else ""))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=sub_env)
    total_wall = time.perf_counter() - t0
    from fl_dplora.write_ahead import read_operator

    rows = read_operator(out_dir)[0]  # per-round timings: the operator log (dp-mode none: clients report compute time)
    if proc.returncode != 0 or not rows:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise RuntimeError(f"bench round-overhead: the simulation failed (exit {proc.returncode})")
    layout = measured_layout(proc.stdout + proc.stderr)
    later = [r for r in rows if int(r["round"]) >= 2]
    table = [[r["round"], r["accepted"], f"{r['seconds']:.3f}", f"{r['client_seconds']:.3f}",
              f"{r['seconds'] / r['client_seconds']:.3f}" if r["client_seconds"] else "-",
              f"{r['seconds'] - r['client_seconds']:.3f}"] for r in rows]
    print(format_table(table, ["round", "clients", "wall s", "client compute s", "wall/compute", "wall-compute s"]))
    wall, comp = [float(r["seconds"]) for r in later], [float(r["client_seconds"]) for r in later]
    med = {"round_wall": median(wall), "client_compute": median(comp),
           "overhead": median([w - c for w, c in zip(wall, comp)])}
    ratio = {"round_wall/client_compute": med["round_wall"] / med["client_compute"] if med["client_compute"] else float("nan"),
             "sum_round_wall/sum_client_compute": sum(wall) / sum(comp) if sum(comp) else float("nan")}
    mid = [r for r in later if int(r["round"]) < rounds]  # rounds without the final central evaluation
    if mid and sum(float(r["client_seconds"]) for r in mid):
        ratio["no_eval_rounds"] = sum(float(r["seconds"]) for r in mid) / sum(float(r["client_seconds"]) for r in mid)
    per_round = [float(r["seconds"]) / float(r["client_seconds"]) for r in later if r["client_seconds"]]
    print(f"rounds >= 2: median round wall {med['round_wall']:.3f} s, median sum of client compute "
          f"{med['client_compute']:.3f} s, ratio {ratio['round_wall/client_compute']:.3f} "
          f"(sum/sum {ratio['sum_round_wall/sum_client_compute']:.3f}"
          + (f"; rounds 2..{rounds - 1} without the final evaluation {ratio['no_eval_rounds']:.3f}" if "no_eval_rounds" in ratio else "")
          + f"); median overhead {med['overhead']:.3f} s per round; whole simulate process {total_wall:.1f} s")
    print("client compute = the clients' own compute-seconds (train handler start to reply), summed over "
          f"the round's clients; clients run {'one at a time' if num_cpus >= (os.cpu_count() or 1) else 'concurrently'} "
          f"({num_cpus:g} CPUs each of {os.cpu_count()}); the last round also evaluates centrally (8 examples)")
    print(describe_layout(layout))
    result = {
        "benchmark": "round-overhead", "median_seconds": med, "ratio": ratio,
        "per_round_ratio": per_round, "rounds": rows, "simulate_process_seconds": total_wall,
        "thread_layout": layout,
        "setup": {"model": model_name, "num_clients": clients, "rounds": rounds, "num_cpus_per_client": num_cpus,
                  "run_config": run_config, "command": cmd[2:], "output_dir": str(out_dir)},
        "environment": env,
    }
    return write_result(result, args)


def measured_layout(text: str) -> dict:
    """The layout the child run's processes logged (fl_dplora/thread_layout.py): the server's line and
    one line per client process (a Ray actor serves many virtual clients; the operator's log, not a release)."""
    from fl_dplora.thread_layout import parse_layout_lines

    rows = parse_layout_lines(text)
    return {"server": next((r for r in rows if r.get("role") == "server"), None),
            "clients": [r for r in rows if r.get("role") == "client"],
            "oversubscribed": "thread layout oversubscribed" in text}


def describe_layout(layout: dict) -> str:
    def one(r: dict | None) -> str:
        if not r:
            return "not logged"
        return (f"{r['torch_threads']} torch threads (OMP_NUM_THREADS={r['OMP_NUM_THREADS']}), "
                f"{r['concurrent']} at once, {r['affinity_cpus']} CPUs")

    clients = layout["clients"]
    kinds = sorted({one(r) for r in clients}) or ["not logged"]
    return (f"thread layout (measured in the run's processes): server {one(layout['server'])}; "
            f"{len(clients)} client process(es): {'; '.join(kinds)}"
            + ("; OVERSUBSCRIBED (see the run's warning)" if layout["oversubscribed"] else ""))


def add_parser(bs) -> None:
    p = bs.add_parser(NAME, help="simulated round wall time / clients' compute time")
    common_arguments(p, timed=False)
    p.add_argument("--num-clients", type=int, default=0, help="virtual clients (default: 3; 2 with --quick)")
    p.add_argument("--rounds", type=int, default=0, help="rounds; rounds >= 2 are measured (default: 3)")
    p.add_argument("--local-steps", type=int, default=1, help="run-config local-steps")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for the run's processes (0 = inherit)")
    p.add_argument("--dp-mode", default="none", help="none: only then do clients report their compute time (a DP reply carries no timing)")
    p.add_argument("--num-cpus", type=float, default=0.0, help="CPUs per virtual client (default: all, clients one at a time)")
    p.add_argument("--run-config", default="", help="extra run-config overrides")
    p.add_argument("--output-dir", default=None, help="the simulation's output dir (default: a temp dir)")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --output-dir")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds the simulation may take")
    p.set_defaults(func=main)
