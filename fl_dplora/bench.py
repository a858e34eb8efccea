"""`fl-dplora bench NAME`: performance measurements, variants side by side in one process.

    fl-dplora bench dp-overhead    [--quick] [--json FILE]   DP-SGD step vs plain step (vs Opacus)
    fl-dplora bench round-overhead [--quick] [--json FILE]   round wall time / client compute time
    fl-dplora bench comm           [--quick] [--json FILE]   bytes per client per round on the wire
    fl-dplora bench throughput     [--quick] [--json FILE]   examples/s of a local step, client peak RSS
    fl-dplora bench prefix-cache   [--quick] [--json FILE]   DP step with/without the frozen-prefix cache
                                                             (bench_cache.py), its build rate, client RSS
    fl-dplora bench secagg         [--quick] [--json FILE]   one round's upload/download bytes and time,
                                                             plain vs SecAgg+, LoRA and FFA (bench_secagg.py)

Timing method (dp-overhead, throughput): every variant runs `--warmup` times, then `--reps`
repetitions interleaved round-robin (the starting variant rotates each repetition), so a load spike
on a shared machine hits all variants alike. We report the median wall time (and the median process
CPU time, which a busy neighbour disturbs less) and the ratios of the medians.

The JSON (`--json FILE`) always has `median_seconds` {variant: seconds}; ratio benchmarks also have
`ratio` {"a/b": value}. `--quick` swaps in the tiny random model and small sizes: a smoke run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
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


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _ratios(medians: dict[str, float], pairs: list[tuple[str, str]]) -> dict[str, float]:
    return {f"{a}/{b}": medians[a] / medians[b] for a, b in pairs if a in medians and b in medians and medians[b] > 0}


def _environment() -> dict[str, Any]:
    import torch

    return {
        "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "loadavg_start": list(os.getloadavg()),
    }


def _finish(result: dict[str, Any], args: argparse.Namespace) -> int:
    result["environment"]["loadavg_end"] = list(os.getloadavg())
    result["argv"] = list(sys.argv)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {path}")
    return 0


def _busy_note(env: dict[str, Any]) -> None:
    load = max(env["loadavg_start"][0], os.getloadavg()[0])
    if load > (env["cpu_count"] or 1):
        print(f"note: load average {load:.1f} on {env['cpu_count']} CPUs: other processes compete for the CPU, "
              "wall times include waiting; the CPU-time ratios are the steadier ones")
        if env["torch_threads"] > 1:
            print("note: with several torch threads on a busy machine each parallel op waits for descheduled "
                  "sibling threads (CPU time counts their spinning too); --threads 1 measures the code, not the contention")


def _table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _setup_torch(args: argparse.Namespace) -> None:
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


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - only cosmetics
        pass


def _fixed_batch(cfg: dict[str, Any], n: int):
    """The first `n` training examples of the task, tokenized: the one batch every variant sees."""
    from fl_dplora.data import encode_all, load_task
    from fl_dplora.models import load_tokenizer

    task = load_task(cfg["task"], int(cfg["seed"]))
    tok = load_tokenizer(cfg["model"])
    return encode_all(tok, task.train[:n], int(cfg["max-seq-len"])), tok


# ------------------------------------------------------------------ dp-overhead
def timed_local_step(model, params, start, cfg: dict[str, Any], pad_id: int, state: dict[str, Any]):
    """(reset, step) for timing one local_train call: `reset()` puts `params` back to `start` with a
    fresh optimizer (untimed, before every repetition); `step(data, dp)` is the timed call, with the
    same Poisson draw every time; state["examples"] = examples it processed."""
    import torch

    from fl_dplora.train import local_train, make_optimizer

    def reset() -> None:  # same weights, fresh optimizer before every timed step
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
                p.grad = None
        state["opt"] = make_optimizer(params, cfg)

    def step(data, dp) -> Callable[[], None]:
        def run() -> None:
            stats = local_train(model, params, data, cfg, optimizer=state["opt"], dp=dp,
                                sampling_generator=torch.Generator().manual_seed(1), pad_id=pad_id)
            state["examples"] = stats.examples
        return run

    return reset, step


def _step_variants(cfg: dict[str, Any], data, pad_id: int, with_opacus: bool) -> tuple[list[Variant], dict[str, Any], Callable[[], None]]:
    """Local-step variants on the same model, parameters, batch and optimizer settings.

    Fixed sampling: the shard is exactly `batch-size` examples, so the DP step's Poisson rate is
    q = batch-size / n = 1 and it takes every example: the DP and the plain step process the same
    examples in the same micro-batches of the same padded shapes. (With a real shard the Poisson batch size
    varies around batch-size; per-example time would then be the fair unit.)
    """
    import torch

    from fl_dplora.models import adapter_parameters, get_peft_model
    from fl_dplora.train import DPSGD

    model = get_peft_model(cfg)
    params = [p for p in adapter_parameters(model, cfg).values() if p.requires_grad]
    original = [p.detach().clone() for p in params]
    start = [p.detach().clone() for p in params]
    # Non-zero B so that every LoRA factor has a non-trivial gradient (B = 0 at init zeroes A's).
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in start:
            if not p.abs().sum():
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    state: dict[str, Any] = {}
    reset, step = timed_local_step(model, params, start, cfg, pad_id, state)
    # Secure RNG for the noise (generator None), as the client does by default (secure-rng = true).
    dp = DPSGD(noise_multiplier=1.0, max_grad_norm=float(cfg["max-grad-norm"]), generator=None)
    variants = [Variant("none", step(data, None), reset), Variant("sample", step(data, dp), reset)]
    info: dict[str, Any] = {"trainable_params": sum(p.numel() for p in params)}
    if with_opacus:
        try:
            variants.append(_opacus_variant(model, params, data, cfg, pad_id, dp, reset, state))
        except Exception as exc:  # Opacus is a reference only; report why it is missing
            info["opacus_error"] = f"{type(exc).__name__}: {exc}"

    def restore() -> None:  # the PEFT model is cached per process: leave it as we found it
        with torch.no_grad():
            for p, s in zip(params, original):
                p.copy_(s)
                p.grad = None

    return variants, info, restore


def _opacus_variant(model, params, data, cfg, pad_id, dp, reset, state) -> Variant:
    """The same DP-SGD step with Opacus's GradSampleModule hooks (loss_reduction="sum") for the
    per-example gradients instead of ours: same loss, same clipping (joint L2 over all factors),
    same noise and scaling. The module is wrapped before and unwrapped after each timed step
    (Opacus's full backward hooks would otherwise slow the other variants down)."""
    import torch
    from opacus import GradSampleModule

    from fl_dplora.data import collate
    from fl_dplora.privacy.mechanisms import gaussian_like
    from fl_dplora.train import per_example_loss

    n, micro = len(data), int(cfg["micro-batch-size"])
    q = min(1.0, int(cfg["batch-size"]) / n)

    def prepare():
        reset()
        state["gsm"] = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True)

    def finish():
        state.pop("gsm")._close()

    def run():
        model.train()
        opt = state["opt"]
        mask = torch.rand(n, generator=torch.Generator().manual_seed(1)) < q
        idx = mask.nonzero().flatten().tolist()
        sums = [torch.zeros_like(p) for p in params]
        for start in range(0, len(idx), micro):
            batch = collate([data[i] for i in idx[start : start + micro]], pad_id)
            per_example_loss(model, batch).sum().backward()
            grads = [p.grad_sample for p in params]
            sq = torch.zeros(grads[0].shape[0], dtype=torch.float64)
            for gs in grads:
                sq += gs.double().pow(2).flatten(1).sum(1)
            factor = (dp.max_grad_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0).to(grads[0].dtype)
            for s, gs in zip(sums, grads):
                s += torch.einsum("b,b...->...", factor, gs)
            for p in params:
                p.grad, p.grad_sample = None, None
        for s, p in zip(sums, params):
            p.grad = (s + gaussian_like(s, dp.noise_multiplier * dp.max_grad_norm, None)) / (q * n)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.eval()
        state["examples"] = len(idx)

    return Variant("opacus", run, prepare, finish)


def _profile_steps(variants: list[Variant], steps: int, top: int, out_dir: str | None) -> dict[str, list[dict]]:
    """torch.profiler over `steps` runs of each variant: the top ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    report: dict[str, list[dict]] = {}
    for v in variants:
        if v.prepare:
            v.prepare()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            for _ in range(steps):
                v.run()
                if v.prepare and v.name != "opacus":
                    v.prepare()
        if v.finish:
            v.finish()
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events) or 1
        rows = [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
                 "share": e.self_cpu_time_total / total, "calls_per_step": e.count / steps} for e in events[:top]]
        report[v.name] = rows
        print(f"\nprofile {v.name}: {total / 1e3 / steps:.1f} ms self CPU per step (all threads); top {top} ops")
        print(_table([[r["op"][:48], f"{r['self_ms_per_step']:.1f}", f"{100 * r['share']:.1f}%", f"{r['calls_per_step']:.0f}"]
                      for r in rows], ["op", "ms/step", "share", "calls"]))
        if out_dir:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(Path(out_dir) / f"dp-overhead-{v.name}.trace.json"))
    return report


def _apply_quick_step_defaults(args: argparse.Namespace) -> None:
    """--quick for the step benchmarks: the tiny model, short sequences, few repetitions."""
    if args.quick:
        args.model = args.model or QUICK_MODEL
        args.reps, args.warmup = args.reps or 3, args.warmup if args.warmup is not None else 1
        args.batch_size, args.seq_len = args.batch_size or 4, args.seq_len or 32


def cmd_dp_overhead(args: argparse.Namespace) -> int:
    _setup_torch(args)
    _quiet_transformers()
    from fl_dplora.config import resolve

    _apply_quick_step_defaults(args)
    model_name = args.model or "smollm2-135m"
    batch, seq = args.batch_size or 8, args.seq_len or 64
    reps, warmup = args.reps or 5, args.warmup if args.warmup is not None else 1
    cfg = resolve({
        "model": model_name, "task": args.task, "lora-rank": args.rank, "lora-targets": args.targets,
        "lora-variant": "lora", "batch-size": batch, "micro-batch-size": batch, "max-seq-len": seq,
        "local-steps": 1, "dp-mode": "none", "optimizer": "sgd", "max-grad-norm": 1.0,
    })
    data, tok = _fixed_batch(cfg, batch)
    tokens = sum(len(e.input_ids) for e in data)
    variants, info, restore = _step_variants(cfg, data, tok.pad_token_id, with_opacus=not args.no_opacus)
    env = _environment()
    print(f"dp-overhead: {model_name}, LoRA r={args.rank} on {args.targets}, batch {batch} x max-seq-len {seq} "
          f"({tokens} tokens), {args.task}; {info['trainable_params']} trainable values; "
          f"{env['torch_threads']} torch threads; warm-up {warmup}, {reps} interleaved reps")
    print("fixed sampling: shard = the batch, so the DP step's Poisson rate q = batch/n = 1 takes all "
          f"{batch} examples: every variant processes the same examples with the same padded shape")
    if "opacus_error" in info:
        print(f"opacus variant skipped: {info['opacus_error']}")
    try:
        times = time_interleaved(variants, reps, warmup)
        med = {k: _median(v) for k, v in times["wall"].items()}
        med_cpu = {k: _median(v) for k, v in times["cpu"].items()}
        pairs = [("sample", "none"), ("opacus", "none"), ("sample", "opacus")]
        ratio, ratio_cpu = _ratios(med, pairs), _ratios(med_cpu, pairs)
        print(_table([[k, f"{med[k]:.4f}", f"{1e3 * med[k] / batch:.2f}", f"{med_cpu[k]:.4f}",
                       f"{min(times['wall'][k]):.4f}", f"{max(times['wall'][k]):.4f}"] for k in med],
                     ["variant", "median s", "ms/example", "median CPU s", "min s", "max s"]))
        for key in ratio:
            print(f"ratio {key}: {ratio[key]:.3f} (wall)  {ratio_cpu.get(key, float('nan')):.3f} (CPU)")
        _busy_note(env)
        result = {
            "benchmark": "dp-overhead", "median_seconds": med, "ratio": ratio,
            "median_cpu_seconds": med_cpu, "ratio_cpu": ratio_cpu,
            "seconds_per_example": {k: v / batch for k, v in med.items()},
            "samples_seconds": times["wall"], "samples_cpu_seconds": times["cpu"],
            "setup": {"model": model_name, "task": args.task, "lora_rank": args.rank, "lora_targets": args.targets,
                      "batch_size": batch, "max_seq_len": seq, "tokens": tokens, "local_steps": 1,
                      "noise_multiplier": 1.0, "max_grad_norm": 1.0, "reps": reps, "warmup": warmup,
                      "sampling": "fixed: shard of exactly batch-size examples, Poisson q = 1", **info},
            "environment": env,
        }
        if args.profile:
            result["profile"] = _profile_steps(variants, args.profile, 15, args.profile_dir)
    finally:
        restore()
    return _finish(result, args)


# ------------------------------------------------------------------ round-overhead
def cmd_round_overhead(args: argparse.Namespace) -> int:
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
    env = _environment()
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
    later = [r for r in rows if int(r["round"]) >= 2]
    table = [[r["round"], r["accepted"], f"{r['seconds']:.3f}", f"{r['client_seconds']:.3f}",
              f"{r['seconds'] / r['client_seconds']:.3f}" if r["client_seconds"] else "-",
              f"{r['seconds'] - r['client_seconds']:.3f}"] for r in rows]
    print(_table(table, ["round", "clients", "wall s", "client compute s", "wall/compute", "wall-compute s"]))
    wall, comp = [float(r["seconds"]) for r in later], [float(r["client_seconds"]) for r in later]
    med = {"round_wall": _median(wall), "client_compute": _median(comp),
           "overhead": _median([w - c for w, c in zip(wall, comp)])}
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
    result = {
        "benchmark": "round-overhead", "median_seconds": med, "ratio": ratio,
        "per_round_ratio": per_round, "rounds": rows, "simulate_process_seconds": total_wall,
        "setup": {"model": model_name, "num_clients": clients, "rounds": rounds, "num_cpus_per_client": num_cpus,
                  "run_config": run_config, "command": cmd[2:], "output_dir": str(out_dir)},
        "environment": env,
    }
    return _finish(result, args)


# ------------------------------------------------------------------ comm
def _messages(cfg: dict[str, Any], params: dict[str, Any], dtype: str, seed: int):
    """(down, up, delta) RecordDicts built as the strategy and the client build them, from random
    non-zero tensors (Flower stores identical arrays once: an all-zero B would understate the bytes)."""
    import torch
    from flwr.app import ConfigRecord, RecordDict

    from fl_dplora import protocol
    from fl_dplora.transport import to_array_record

    g = torch.Generator().manual_seed(seed)
    glob = {k: torch.randn(p.shape, generator=g) * 0.02 for k, p in params.items()}
    delta = {k: torch.randn(p.shape, generator=g) * 1e-3 for k, p in params.items()}
    config = ConfigRecord({**cfg, protocol.SIGMA: 0.0})
    config[protocol.ROUND] = 2
    down = RecordDict({"arrays": to_array_record(glob, dtype), "config": config})
    return down, _upload(delta, dtype), delta


def _upload(delta: dict[str, Any], dtype: str):
    """The client's reply content: the update in the transfer dtype and its metrics (dp-mode sample)."""
    from flwr.app import MetricRecord, RecordDict

    from fl_dplora.transport import to_array_record

    metrics = {"partition-id": 0, "epsilon": 1.2345, "sigma": 0.9876, "sample-rate": 0.0123,
               "steps-total": 20, "num-examples": 640, "ledger-sigmas": [0.9876], "ledger-rates": [0.0123],
               "ledger-steps": [20]}  # what a dp-mode sample reply holds (no timing)
    return RecordDict({"arrays": to_array_record(delta, dtype), "metrics": MetricRecord(metrics)})


def cmd_comm(args: argparse.Namespace) -> int:
    _setup_torch(args)
    _quiet_transformers()
    from fl_dplora.config import resolve
    from fl_dplora.models import adapter_parameters, full_model_stats, get_peft_model
    from fl_dplora.transport import to_array_record, wire_bytes

    model_name = args.model or (QUICK_MODEL if args.quick else "smollm2-135m")
    ranks = [int(r) for r in args.ranks.split(",")]
    dtypes = args.dtypes.split(",")
    reps = args.reps or (3 if args.quick else 5)
    env = _environment()
    rows, med, ratio, detail = [], {}, {}, {}
    full_params = full_bytes = None
    for variant in ("lora", "ffa"):
        for rank in ranks:
            cfg = resolve({"model": model_name, "lora-rank": rank, "lora-targets": args.targets, "lora-variant": variant})
            model = get_peft_model(cfg)
            params = adapter_parameters(model, cfg)
            if full_params is None:
                full_params, full_bytes = full_model_stats(model)
            values = sum(p.numel() for p in params.values())
            for dtype in dtypes:
                down, up, delta = _messages(cfg, params, dtype, seed=rank)
                b_down, b_up = wire_bytes(down), wire_bytes(up)
                times = []
                for _ in range(reps):  # client side: tensors -> ArrayRecord -> Flower's wire objects
                    t0 = time.perf_counter()
                    wire_bytes(_upload(delta, dtype))
                    times.append(time.perf_counter() - t0)
                name = f"{variant}-r{rank}-{dtype}"
                med[name] = _median(times)
                ratio[f"{name} up/full"] = b_up / full_bytes
                detail[name] = {"variant": variant, "rank": rank, "dtype": dtype, "values": values,
                                "tensors": len(params), "bytes_up": b_up, "bytes_down": b_down,
                                "payload_bytes": values * (4 if dtype == "float32" else 2),
                                "up_fraction_of_full": b_up / full_bytes, "down_fraction_of_full": b_down / full_bytes}
                rows.append([name, values, b_up, b_down, f"{100 * b_up / full_bytes:.4f}%",
                             f"{100 * b_down / full_bytes:.4f}%", f"{1e3 * med[name]:.2f}"])
    print(f"comm: {model_name}, LoRA on {args.targets}; full model {full_params:,} params = {full_bytes:,} bytes fp32; "
          "bytes per client per round as Flower serializes the message (wire_bytes)")
    print(_table(rows, ["variant", "values", "up B", "down B", "up/full", "down/full", "serialize ms"]))
    full_wire = None
    if args.full_wire:  # the whole base model as an fp32 ArrayRecord: what full fine-tuning would ship
        import torch

        model = get_peft_model(resolve({"model": model_name, "lora-targets": args.targets}))
        sd = {k: v for k, v in model.get_base_model().state_dict().items() if "lora_" not in k and v.dtype == torch.float32}
        seen, unique = set(), {}
        for k, v in sd.items():  # tied weights once
            if v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                unique[k] = v
        from flwr.app import RecordDict

        full_wire = wire_bytes(RecordDict({"arrays": to_array_record(unique)}))
        print(f"full model as one fp32 ArrayRecord on the wire: {full_wire:,} bytes")
    check_name = f"ffa-r{8 if 8 in ranks else ranks[0]}-bfloat16"
    check = None
    if check_name in detail:
        frac = detail[check_name]["up_fraction_of_full"]
        check = {"variant": check_name, "up_fraction_of_full": frac, "le_0.10_percent": frac <= 0.001}
        print(f"check: {check_name} upload = {100 * frac:.4f}% of the full fp32 model bytes "
              f"({'<=' if frac <= 0.001 else '>'} 0.10%)")
    result = {
        "benchmark": "comm", "median_seconds": med, "ratio": ratio, "variants": detail,
        "full_model_params": full_params, "full_model_bytes": full_bytes, "full_model_wire_bytes": full_wire,
        "check_ffa_bf16_le_0.10_percent": check,
        "setup": {"model": model_name, "lora_targets": args.targets, "ranks": ranks, "dtypes": dtypes, "reps": reps,
                  "median_seconds_is": "client-side serialization of the upload (to_array_record + wire objects)"},
        "environment": env,
    }
    return _finish(result, args)


# ------------------------------------------------------------------ throughput
_RSS_SCRIPT = r"""
import json, os, resource, sys, time, warnings
warnings.filterwarnings("ignore")
def hwm_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
def rss_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
def reset_hwm():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
out = {"rss_start_kb": rss_kb()}
overrides = json.loads(sys.argv[1])
import torch
if int(sys.argv[3]) > 0:
    torch.set_num_threads(int(sys.argv[3]))
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity
from fl_dplora import protocol
from fl_dplora.clients.client_app import app
from fl_dplora.config import resolve
from fl_dplora.models import adapter_parameters, get_peft_model
from fl_dplora.transport import to_array_record
cfg = resolve(overrides)
out["rss_after_import_kb"] = rss_kb()
model = get_peft_model(cfg)
glob = {k: p.detach().clone() for k, p in adapter_parameters(model, cfg).items()}
out["rss_after_model_kb"] = rss_kb()
ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": int(sys.argv[2])},
              state=RecordDict(), run_config={})
for rnd in (1, 2):
    config = ConfigRecord({**cfg, protocol.SIGMA: 0.0})
    config[protocol.ROUND] = rnd
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID  # the server's side
    msg = Message(RecordDict({"arrays": to_array_record(glob, cfg["transfer-dtype"]), "config": config}),
                  dst_node_id=1, message_type="train")
    TaskIdentity.node_id = 1  # the client's side
    out[f"hwm_reset_round{rnd}"] = reset_hwm()
    out[f"rss_before_round{rnd}_kb"], out[f"hwm_after_reset_round{rnd}_kb"] = rss_kb(), hwm_kb()
    t0 = time.perf_counter()
    reply = app(msg, ctx)
    out[f"round{rnd}_seconds"] = time.perf_counter() - t0
    if reply.has_error():
        raise SystemExit("client error: " + reply.error.reason)
    out[f"peak_rss_round{rnd}_kb"] = hwm_kb()
    # a DP reply carries no timing (issue 15): the child times the handler itself (round{rnd}_seconds)
out["peak_rss_process_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("RSS-JSON " + json.dumps(out))
"""


def client_peak_rss(overrides: dict[str, Any], num_partitions: int, threads: int = 0, timeout: float = 600) -> dict[str, Any]:
    """Run the real ClientApp (two train rounds) in a fresh process; its memory in KiB.

    peak_rss_process_kb: the whole process (includes loading the model); peak_rss_roundN_kb: the
    high-water mark during round N alone (reset through /proc/self/clear_refs before the round).
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "FL_DPLORA_PROGRESS": "0"}
    overrides = {**overrides, "label-head": False}  # the LoRA client's memory (the head's statistics come from a server)
    proc = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, json.dumps(overrides), str(num_partitions), str(threads)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RSS-JSON "):
            return json.loads(line[len("RSS-JSON "):])
    sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
    raise RuntimeError(f"bench throughput: the client process failed (exit {proc.returncode})")


def cmd_throughput(args: argparse.Namespace) -> int:
    _setup_torch(args)
    _quiet_transformers()
    from fl_dplora.config import resolve

    _apply_quick_step_defaults(args)
    model_name = args.model or "smollm2-135m"
    batch, seq = args.batch_size or 16, args.seq_len or 96
    micro = min(batch, args.micro_batch_size or batch)
    reps, warmup = args.reps or 3, args.warmup if args.warmup is not None else 1
    overrides = {"model": model_name, "task": args.task, "lora-rank": args.rank, "lora-targets": args.targets,
                 "batch-size": batch, "micro-batch-size": micro, "max-seq-len": seq, "local-steps": 1,
                 "dp-mode": "none", "optimizer": "sgd", "label-head": False}  # a LoRA step is what is timed
    cfg = resolve(overrides)
    data, tok = _fixed_batch(cfg, batch)
    tokens = sum(len(e.input_ids) for e in data)
    variants, info, restore = _step_variants(cfg, data, tok.pad_token_id, with_opacus=False)
    env = _environment()
    print(f"throughput: {model_name}, LoRA r={args.rank} on {args.targets}, one local step of batch {batch} x "
          f"max-seq-len {seq} ({tokens} tokens) in micro-batches of {micro}; {env['torch_threads']} torch threads; warm-up {warmup}, {reps} reps")
    try:
        times = time_interleaved(variants, reps, warmup)
    finally:
        restore()
    med = {k: _median(v) for k, v in times["wall"].items()}
    med_cpu = {k: _median(v) for k, v in times["cpu"].items()}
    eps = {k: batch / v for k, v in med.items()}
    tps = {k: tokens / v for k, v in med.items()}
    print(_table([[k, f"{med[k]:.3f}", f"{eps[k]:.2f}", f"{tps[k]:.0f}", f"{med_cpu[k]:.3f}"] for k in med],
                 ["dp-mode", "median s/step", "examples/s", "tokens/s", "median CPU s"]))
    _busy_note(env)
    rss: dict[str, Any] = {}
    if not args.no_rss:
        for mode in (("sample",) if args.quick else ("none", "sample")):
            # the client's own configuration: its shard, Poisson batches for DP, model loaded in-process
            client_over = {**overrides, "dp-mode": mode, "noise-multiplier": 1.0, "max-train-samples": 40 * batch}
            rss[mode] = client_peak_rss(client_over, num_partitions=2, threads=int(args.threads or 0))
        print(_table([[m, f"{r['rss_after_import_kb'] / 1024:.0f}", f"{r['rss_after_model_kb'] / 1024:.0f}",
                       f"{r['peak_rss_round1_kb'] / 1024:.0f}" if r["hwm_reset_round1"] else "-",
                       f"{r['peak_rss_round2_kb'] / 1024:.0f}" if r["hwm_reset_round2"] else "-",
                       f"{r['peak_rss_process_kb'] / 1024:.0f}"] for m, r in rss.items()],
                     ["client dp-mode", "RSS after import MiB", "after model MiB", "peak round 1 MiB",
                      "peak round 2 MiB", "peak process MiB"]))
    result = {
        "benchmark": "throughput", "median_seconds": med, "ratio": _ratios(med, [("sample", "none")]),
        "median_cpu_seconds": med_cpu, "examples_per_second": eps, "tokens_per_second": tps,
        "samples_seconds": times["wall"],
        "peak_rss_mib": {m: r["peak_rss_process_kb"] / 1024 for m, r in rss.items()},
        "client_process": rss,
        "setup": {"model": model_name, "task": args.task, "lora_rank": args.rank, "lora_targets": args.targets,
                  "batch_size": batch, "micro_batch_size": micro, "max_seq_len": seq, "tokens": tokens,
                  "reps": reps, "warmup": warmup, **info},
        "environment": env,
    }
    return _finish(result, args)


# ------------------------------------------------------------------ command line
def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="performance benchmarks (dp-overhead, round-overhead, comm, throughput, prefix-cache, secagg)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bs = b.add_subparsers(dest="bench", required=True)

    def common(p: argparse.ArgumentParser, timed: bool = True) -> None:
        p.add_argument("--quick", action="store_true", help="tiny random model, small sizes: a smoke run")
        p.add_argument("--json", metavar="FILE", help="write the results as JSON")
        p.add_argument("--model", default=None, help="base model (default: smollm2-135m; tiny-random-llama with --quick)")
        if timed:
            p.add_argument("--reps", type=int, default=0, help="timed repetitions per variant")
            p.add_argument("--warmup", type=int, default=None, help="untimed runs per variant first")
            p.add_argument("--threads", type=int, default=0, help="torch threads (0 = as torch chooses)")

    def lora(p: argparse.ArgumentParser, batch_help: str, seq_help: str) -> None:
        p.add_argument("--task", default="fin-sentiment", help="run-config task")
        p.add_argument("--rank", type=int, default=8, help="LoRA rank")
        p.add_argument("--targets", default="q_proj,v_proj", help="run-config lora-targets")
        p.add_argument("--batch-size", type=int, default=0, help=batch_help)
        p.add_argument("--seq-len", type=int, default=0, help=seq_help)

    p = bs.add_parser("dp-overhead", help="local step time: dp-mode=sample vs none (and Opacus hooks)")
    common(p)
    lora(p, "batch size (default: 8)", "max-seq-len (default: 64)")
    p.add_argument("--no-opacus", action="store_true", help="skip the Opacus reference variant")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS", help="also profile STEPS steps per variant")
    p.add_argument("--profile-dir", default=None, help="write chrome traces of the profiled steps here")
    p.set_defaults(func=cmd_dp_overhead)

    p = bs.add_parser("round-overhead", help="simulated round wall time / clients' compute time")
    common(p, timed=False)
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
    p.set_defaults(func=cmd_round_overhead)

    p = bs.add_parser("comm", help="bytes per client per round on the wire vs the full model")
    common(p, timed=False)
    p.add_argument("--reps", type=int, default=0, help="timed serializations per size (0 = a few)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = as torch chooses)")
    p.add_argument("--ranks", default="4,8,16,64", help="LoRA ranks to size")
    p.add_argument("--dtypes", default="float32,bfloat16,float16", help="transfer dtypes to size")
    p.add_argument("--targets", default="q_proj,v_proj", help="run-config lora-targets")
    p.add_argument("--full-wire", action="store_true", help="also serialize the whole fp32 base model once")
    p.set_defaults(func=cmd_comm)

    p = bs.add_parser("throughput", help="examples/s of a local step; peak RSS of a client process")
    common(p)
    lora(p, "batch size, the run's micro-batch (default: 16)", "max-seq-len (default: 96)")
    p.add_argument("--micro-batch-size", type=int, default=0, help="micro-batch; peak memory scales with it (default: the batch size)")
    p.add_argument("--no-rss", action="store_true", help="skip the client-process memory measurement")
    p.set_defaults(func=cmd_throughput)

    from fl_dplora.bench_cache import add_arguments, cmd_prefix_cache  # here, not at the top: bench_cache imports this module

    p = bs.add_parser("prefix-cache", help="DP step examples/s with vs without the prefix cache; build rate; client RSS")
    common(p)
    lora(p, "expected (Poisson) batch (default: 32; 4 with --quick)", "max-seq-len (default: 96; 32 with --quick)")
    add_arguments(p)
    p.set_defaults(func=cmd_prefix_cache)

    from fl_dplora import bench_secagg  # imports this module too

    p = bs.add_parser("secagg", help="one round's bytes per client and wall time, plain vs SecAgg+ (LoRA, FFA; no training)")
    common(p)
    bench_secagg.add_arguments(p)
    p.set_defaults(func=bench_secagg.cmd_secagg)
