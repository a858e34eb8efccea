#!/usr/bin/env python3
"""How `fl-dplora simulate` scales with the number of virtual clients.

    .venv/bin/python experiments/bench_scale.py [--clients 10 100 1000] [--sampled 10] [--rounds 2]
                                                [--json FILE] [--max-ratio 1.2] [--run-config "k=v ..."]

For each client count N it runs the real command line, one subprocess per setting:

    fl-dplora simulate --num-clients N --num-cpus 1 --run-config "... fraction-train=<sampled/N>"

so that the same number of clients (default 10) trains in every round, whatever N is. The tiny
random model and small settings keep one setting to about a minute on 2 CPU cores.

Measured per setting:
- peak memory of the whole process tree (the simulate driver, which holds the ServerApp, the
  in-memory SuperLink state and every virtual node's Context; the Ray GCS, raylet and helper
  processes; the ClientApp actors), polled every --interval seconds with psutil (or /proc):
  the sum of RSS (counts pages shared between processes more than once), the sum of PSS (shared
  pages split between their users: the fairer total) and the driver's own RSS;
- the number of processes and of Ray actor processes at the peak;
- seconds per round, from the run's metrics.jsonl (round 1 includes the actors' cold start).

It prints a table, writes --json FILE, and exits with status 1 if the peak tree RSS at the
largest N is more than --max-ratio times the one at the smallest N.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BIN = Path(sys.executable).parent
FL_DPLORA = BIN / "fl-dplora"
SMALL = ("model=tiny-random-llama local-steps=2 batch-size=8 micro-batch-size=4 "
         "max-eval-samples=32 max-seq-len=64")

try:
    import psutil
except ImportError:  # pragma: no cover - psutil comes with ray, but keep a /proc fallback
    psutil = None


# ----------------------------------------------------------------------------- memory sampling
def _proc_tree_linux(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _status_kib(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cmd(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def sample_tree(root: int) -> dict[str, int]:
    """RSS sum, PSS sum (bytes), driver RSS, process count and Ray actor count of root's tree."""
    rss = pss = root_rss = n = actors = 0
    if psutil is not None:
        try:
            top = psutil.Process(root)
            procs = [top, *top.children(recursive=True)]
        except psutil.NoSuchProcess:
            return {}
        for p in procs:
            try:
                mem = p.memory_full_info()
                title = " ".join(p.cmdline()[:1])
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            rss += mem.rss
            pss += getattr(mem, "pss", 0)
            n += 1
            actors += title.startswith("ray::") and "Actor" in title
            if p.pid == root:
                root_rss = mem.rss
    else:
        for pid in _proc_tree_linux(root):
            r = _status_kib(pid, "VmRSS") * 1024
            if not r:
                continue
            rss += r
            pss += _pss_kib(pid) * 1024
            n += 1
            title = _cmd(pid)
            actors += title.startswith("ray::") and "Actor" in title
            if pid == root:
                root_rss = r
    return {"rss": rss, "pss": pss, "driver_rss": root_rss, "procs": n, "actors": actors}


class PeakMonitor(threading.Thread):
    def __init__(self, pid: int, interval: float):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = {"rss": 0, "pss": 0, "driver_rss": 0, "procs": 0, "actors": 0}
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            s = sample_tree(self.pid)
            if s:
                self.samples += 1
                for k, v in s.items():
                    self.peak[k] = max(self.peak[k], v)
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)


# ----------------------------------------------------------------------------- one setting
def run_setting(num_clients: int, sampled: int, rounds: int, extra: str, out_root: Path, interval: float,
                timeout: float, num_cpus: float) -> dict:
    fraction = min(1.0, sampled / num_clients)
    out = out_root / f"clients-{num_clients}"
    run_config = f"{SMALL} num-server-rounds={rounds} fraction-train={fraction!r} {extra}".strip()
    cmd = [str(FL_DPLORA), "simulate", "--num-clients", str(num_clients), "--num-cpus", str(num_cpus),
           "--run-config", run_config, "--output-dir", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}
    log_path = out_root / f"clients-{num_clients}.log"
    t0 = time.perf_counter()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
        mon = PeakMonitor(proc.pid, interval)
        mon.start()
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc.pid)
            code = proc.wait()
        finally:
            mon.stop()
    wall = time.perf_counter() - t0
    result = {"clients": num_clients, "fraction_train": fraction, "exit_code": code, "wall_seconds": wall,
              "peak_rss_bytes": mon.peak["rss"], "peak_pss_bytes": mon.peak["pss"],
              "peak_driver_rss_bytes": mon.peak["driver_rss"], "peak_processes": mon.peak["procs"],
              "peak_ray_actors": mon.peak["actors"], "memory_samples": mon.samples, "log": str(log_path),
              "output_dir": str(out), "command": cmd}
    from fl_dplora.write_ahead import read_operator

    rows = read_operator(out)[0]  # per-round counts and timings: the operator log
    result["rounds"] = [{"round": r["round"], "seconds": r["seconds"], "sampled": r.get("sampled"),
                         "num_clients": r["accepted"]} for r in rows]
    secs = [r["seconds"] for r in rows]
    result["seconds_per_round"] = sum(secs) / len(secs) if secs else None
    result["seconds_per_round_after_first"] = sum(secs[1:]) / len(secs[1:]) if len(secs) > 1 else None
    if code != 0 or len(rows) != rounds:
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        result["error"] = "\n".join(tail)
    return result


def _kill_tree(pid: int) -> None:
    pids = [pid]
    if psutil is not None:
        try:
            pids += [p.pid for p in psutil.Process(pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return
    else:
        pids = _proc_tree_linux(pid)
    for p in reversed(pids):
        try:
            os.kill(p, 9)
        except OSError:
            pass


# ----------------------------------------------------------------------------- report
def mib(b: int) -> str:
    return f"{b / 2**20:,.0f}"


def table(results: list[dict]) -> str:
    head = ("clients", "sampled/rnd", "peak RSS tree MiB", "peak PSS tree MiB", "driver RSS MiB", "procs",
            "actors", "s/round", "round 1 s", "later rounds s", "wall s")
    rows = []
    for r in results:
        sampled = r["rounds"][0]["sampled"] if r["rounds"] else None
        fmt = lambda x: "-" if x is None else f"{x:.1f}"
        rows.append((f"{r['clients']:,}", str(sampled if sampled is not None else "-"), mib(r["peak_rss_bytes"]),
                     mib(r["peak_pss_bytes"]), mib(r["peak_driver_rss_bytes"]), str(r["peak_processes"]),
                     str(r["peak_ray_actors"]), fmt(r["seconds_per_round"]),
                     fmt(r["rounds"][0]["seconds"] if r["rounds"] else None), fmt(r["seconds_per_round_after_first"]),
                     f"{r['wall_seconds']:.0f}"))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--sampled", type=int, default=10, help="clients that train per round (sets fraction-train)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per virtual client (Ray actor)")
    p.add_argument("--run-config", default="", help="extra overrides, e.g. dp-mode=none")
    p.add_argument("--out-dir", default=None, help="run outputs and logs (default: a new temporary folder)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--interval", type=float, default=0.5, help="memory polling interval, seconds")
    p.add_argument("--timeout", type=float, default=900, help="per setting, seconds")
    p.add_argument("--max-ratio", type=float, default=1.2, help="allowed peak-RSS ratio largest/smallest N")
    args = p.parse_args(argv)
    if not FL_DPLORA.is_file():
        print(f"bench_scale: {FL_DPLORA} not found (pip install -e . in this venv)", file=sys.stderr)
        return 2
    out_root = Path(args.out_dir or tempfile.mkdtemp(prefix="fl-dplora-bench-scale-")).resolve()
    out_root.mkdir(parents=True, exist_ok=True)
    print(f"bench_scale: outputs and logs in {out_root}; memory via {'psutil' if psutil else '/proc'}", flush=True)

    results = []
    for n in args.clients:
        r = run_setting(n, args.sampled, args.rounds, args.run_config, out_root, args.interval, args.timeout,
                        args.num_cpus)
        results.append(r)
        status = "ok" if "error" not in r else f"FAILED (exit {r['exit_code']})"
        print(f"  {n:>6} clients: {status}, peak tree RSS {mib(r['peak_rss_bytes'])} MiB, "
              f"s/round {r['seconds_per_round']}, wall {r['wall_seconds']:.0f} s", flush=True)
        if "error" in r:
            print(r["error"], file=sys.stderr)

    print()
    print(table(results))
    ok = [r for r in results if "error" not in r]
    verdict = None
    if len(ok) >= 2:
        small, large = min(ok, key=lambda r: r["clients"]), max(ok, key=lambda r: r["clients"])
        ratio = large["peak_rss_bytes"] / max(1, small["peak_rss_bytes"])
        ratio_pss = large["peak_pss_bytes"] / max(1, small["peak_pss_bytes"])
        verdict = {"small": small["clients"], "large": large["clients"], "rss_ratio": ratio, "pss_ratio": ratio_pss,
                   "max_ratio": args.max_ratio, "pass": ratio <= args.max_ratio}
        print(f"\npeak tree RSS {large['clients']:,} vs {small['clients']:,} clients: {ratio:.3f}x "
              f"(PSS {ratio_pss:.3f}x); limit {args.max_ratio}x: {'PASS' if verdict['pass'] else 'FAIL'}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "settings": {"sampled_per_round": args.sampled, "rounds": args.rounds, "num_cpus": args.num_cpus,
                         "run_config": f"{SMALL} {args.run_config}".strip()},
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
            "results": results, "verdict": verdict}, indent=2))
        print(f"wrote {args.json}")
    failed = len(ok) < len(results)
    return 1 if failed or (verdict is not None and not verdict["pass"]) else 0


if __name__ == "__main__":
    sys.exit(main())
