"""`fl-dplora bench secagg`: what secure aggregation costs one round, bytes and time, nothing else.

    fl-dplora bench secagg [--quick] [--json FILE] [--num-clients 5] [--rank 8] [--variants lora,ffa]

For each adapter variant (LoRA: A and B travel; FFA: only B, A is frozen), one aggregation round
with N in-process nodes (fl_dplora/testing/inprocess_grid.py's InProcessGrid: every message deflated and inflated
through Flower 1.42's wire format, server and clients in this one process), two ways:

- plain: the server sends the train instruction (global adapter + run config) to every node, each
  replies its update as a float32 ArrayRecord plus metrics, the server reads and sums them;
- secure: strategies/secagg.py's `secure_sum` (Flower's SecAgg+ workflow, four stages) with the
  nodes running the real client mod (clients/secagg_mod.py), each handing `fitres_reply` its update
  rounded onto the plan's grid (privacy/secagg_quantization.py).

The clients do not train: each node replies a fixed random float32 update of L2 norm 1 (clipped),
prepared before the timing, so the numbers isolate the protocol (serialization, keys, masks, shares,
unmasking), not the local step. Bytes are counted as the strategy counts them (transport.wire_bytes
of every message body, both directions) and reported per client and round. Every round checks that
the unmasked sum equals the plain sum of the clipped updates within survivors x grid step (and the
sum of the rounded updates within float32 rounding): a broken protocol stops the bench.

Adapter shapes come from the model's config (for smollm2-135m: read from the GGUF's metadata) on a
weightless meta-device model wrapped by PEFT the way models.get_peft_model wraps it: no weights load.
The shapes and the round itself (fixed updates, one round each way, the sum checks) are in
secagg_round.py; this module times the rounds and reports them.

Timing as in common.py: `--warmup` untimed rounds per variant, then `--reps` rounds interleaved
round-robin; medians of wall and process-CPU seconds and the secure/plain ratios of the medians.
JSON: median_seconds {VARIANT-plain|secure: s}, ratio {"V-secure/V-plain": wall}, ratio_cpu,
bytes_per_client {name: {up, down}}, ratio_bytes_up / ratio_bytes_down, stages (secure bytes per
SecAgg+ stage), check (the sum checks), setup, environment.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from typing import Any

from fl_dplora.config import RunConfig
from fl_dplora.tools.bench.common import (
    QUICK_MODEL,
    Variant,
    busy_note,
    common_arguments,
    environment,
    format_table,
    median,
    ratios,
    setup_torch,
    time_interleaved,
    write_result,
)
from fl_dplora.tools.bench.secagg_round import SecAggSetup, Shapes, adapter_shapes

NAME = "secagg"


# ------------------------------------------------------------------ the section
def run_section(shape_sets: Mapping[str, Shapes], num_clients: int, reps: int, warmup: int, *, clip: float = 1.0,
                seed: int = 0, threshold: int = 0, shares: int = 0, config: RunConfig | None = None,
                verbose: bool = True) -> dict[str, Any]:
    """Both ways for every shape set ({"lora-r8": shapes, ...}); the result dict of the JSON (without
    environment/setup). Raises RuntimeError if any round's sum check fails."""
    import logging

    import flwr.common  # noqa: F401 - Flower sets its logger's level when first imported: before we do

    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.WARNING)  # the workflow logs every stage of every round at INFO
    try:
        return _run_section(shape_sets, num_clients, reps, warmup, clip=clip, seed=seed, threshold=threshold,
                            shares=shares, config=config, verbose=verbose)
    finally:
        flwr_log.setLevel(level)


def _run_section(shape_sets, num_clients, reps, warmup, *, clip, seed, threshold, shares, config, verbose):
    setups = {name: SecAggSetup(name, shapes, num_clients, clip=clip, seed=seed, threshold=threshold,
                                shares=shares, config=config) for name, shapes in shape_sets.items()}
    stages, checks = {}, {}
    for name, s in setups.items():  # an untimed round each way: bytes per stage, the sum checks
        plain = s.plain_round(s.new_grid())
        s.check_plain(plain)
        outcome = s.secure_round(s.new_grid())
        checks[name] = s.check_secure(outcome)
        stages[name] = {st: {"up_per_client": r["up"] / num_clients, "down_per_client": r["down"] / num_clients,
                             "messages": r["messages"]} for st, r in outcome.stages.items()}

    samples: dict[str, dict[str, list[int]]] = {}  # variant -> {"up": [...], "down": [...]} per timed round
    variants = []
    for name, s in setups.items():
        for path in ("plain", "secure"):
            vname, state = f"{name}-{path}", {}
            samples[vname] = {"up": [], "down": []}

            def prepare(s=s, state=state):
                state["grid"] = s.new_grid()

            def run(s=s, state=state, path=path):
                state["out"] = s.plain_round(state["grid"]) if path == "plain" else s.secure_round(state["grid"])

            def finish(s=s, state=state, path=path, vname=vname):
                out = state.pop("out")
                state.pop("grid")
                if path == "plain":
                    s.check_plain(out)
                    up, down = out["bytes_up"], out["bytes_down"]
                else:
                    checks[s.name] = s.check_secure(out)
                    up, down = out.bytes_up, out.bytes_down
                samples[vname]["up"].append(up)
                samples[vname]["down"].append(down)

            variants.append(Variant(vname, run, prepare, finish))
    if verbose:
        print(f"timing: warm-up {warmup}, {reps} interleaved reps of {len(variants)} variants", flush=True)
    times = time_interleaved(variants, reps, warmup)
    med = {k: median(v) for k, v in times["wall"].items()}
    med_cpu = {k: median(v) for k, v in times["cpu"].items()}
    per_client = {k: {"up": median(v["up"]) / num_clients, "down": median(v["down"]) / num_clients}
                  for k, v in samples.items()}
    pairs = [(f"{n}-secure", f"{n}-plain") for n in setups]
    ratio_up = {f"{a}/{b}": per_client[a]["up"] / per_client[b]["up"] for a, b in pairs}
    ratio_down = {f"{a}/{b}": per_client[a]["down"] / per_client[b]["down"] for a, b in pairs}
    return {
        "benchmark": "secagg", "median_seconds": med, "ratio": ratios(med, pairs),
        "median_cpu_seconds": med_cpu, "ratio_cpu": ratios(med_cpu, pairs),
        "bytes_per_client": per_client, "ratio_bytes_up": ratio_up, "ratio_bytes_down": ratio_down,
        "stages": stages, "check": checks, "samples_seconds": times["wall"], "samples_cpu_seconds": times["cpu"],
        "adapters": {n: {"values": s.dim, "tensors": len(s.keys), "threshold": s.threshold,
                         **{k: v for k, v in s.plan.describe().items() if k != "secagg_saturation_bound"}}
                     for n, s in setups.items()},
        "reps": reps, "warmup": warmup, "num_clients": num_clients,
    }


def print_report(res: dict[str, Any]) -> None:
    n = res["num_clients"]
    med, cpu, pc = res["median_seconds"], res["median_cpu_seconds"], res["bytes_per_client"]
    rows = []
    for name, info in res["adapters"].items():
        p, s = f"{name}-plain", f"{name}-secure"
        for v, path in ((p, "plain"), (s, "secure")):
            rows.append([name, path, info["values"], f"{pc[v]['up']:,.0f}", f"{pc[v]['down']:,.0f}",
                         f"{med[v]:.3f}", f"{cpu[v]:.3f}", f"{min(res['samples_seconds'][v]):.3f}",
                         f"{max(res['samples_seconds'][v]):.3f}"])
        key = f"{s}/{p}"
        rows.append([name, "secure/plain", "", f"{res['ratio_bytes_up'][key]:.2f}x", f"{res['ratio_bytes_down'][key]:.2f}x",
                     f"{res['ratio'].get(key, float('nan')):.2f}x", f"{res['ratio_cpu'].get(key, float('nan')):.2f}x", "", ""])
    print(format_table(rows, ["adapter", "path", "values", "up B/client", "down B/client", "round s (median)",
                        "CPU s (median)", "min s", "max s"]))
    names = list(res["adapters"])
    order = list(dict.fromkeys(st for name in names for st in res["stages"][name]))
    print(f"\nsecure bytes per client by SecAgg+ stage (N = {n}):")
    cols = [(nm, d) for nm in names for d in ("up", "down")]
    print(format_table([[st, *[f"{res['stages'][nm].get(st, {}).get(f'{d}_per_client', 0):,.0f}" for nm, d in cols]]
                  for st in order], ["stage", *[f"{nm} {d}" for nm, d in cols]]))
    for name, c in res["check"].items():
        print(f"check {name}: unmasked sum vs plain sum of the clipped updates: max |diff| {c['max_abs_diff_vs_plain']:.3g} "
              f"<= survivors x step = {c['survivors']} x {c['step']:.3g} = {c['bound']:.3g} ({c['diff_in_steps']:.2f} steps); "
              f"vs the rounded updates {c['max_abs_diff_vs_rounded']:.3g} (largest |sum| {c['max_abs_sum']:.3g}): passed")


def main(args: argparse.Namespace) -> int:
    setup_torch(args)
    from fl_dplora.config import resolve

    model_name = args.model or (QUICK_MODEL if args.quick else "smollm2-135m")
    n = args.num_clients or (3 if args.quick else 5)
    reps = args.reps or (3 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else 1
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or any(v not in ("lora", "ffa") for v in variants):
        raise SystemExit("bench secagg: --variants takes lora and/or ffa")
    env = environment()
    shapes, info = adapter_shapes(model_name, args.rank, args.targets, args.layers)
    sets = {f"{v}-r{args.rank}": shapes[v] for v in variants}
    # the instruction's config: the run config such a secure round sends (dp-mode client, central noise)
    cfg = resolve({"model": model_name, "lora-rank": args.rank, "lora-targets": args.targets, "lora-layers": args.layers,
                   "lora-variant": variants[0], "dp-mode": "client", "secure-aggregation": True, "population": n,
                   "fraction-train": 1.0, "max-grad-norm": args.clip})
    print(f"secagg: one aggregation round, plain vs SecAgg+, {n} in-process clients (server and clients in this "
          "process, every message through Flower's wire format)")
    print("NO TRAINING: each client replies a fixed random float32 update of L2 norm 1 (clipped); the numbers "
          "isolate what secure aggregation costs (serialization, keys, masks, shares, unmasking)")
    print(f"shapes: {model_name}, config from {info['config_source']} (hidden {info['hidden_size']}, "
          f"{info['num_layers']} layers, {info['num_attention_heads']} heads / {info['num_key_value_heads']} kv heads); "
          f"LoRA r={args.rank} on {args.targets}, {info['adapted_layers']} layers; "
          + "; ".join(f"{k}: {sum(math.prod(s) for s in v.values()):,} values in {len(v)} tensors" for k, v in sets.items()))
    res = run_section(sets, n, reps, warmup, clip=args.clip, seed=args.seed, threshold=args.threshold,
                      shares=args.shares, config=cfg)
    a = next(iter(res["adapters"].values()))
    print(f"SecAgg+ grid: clip range {a['secagg_clipping_range']:g}, {a['secagg_quantization_range']} levels, "
          f"modulus 2^{int(math.log2(a['secagg_modulus']))}, step {a['secagg_step']:.3g}; threshold {a['threshold']} of {n}, "
          f"shares: {args.shares or 'all'}; {env['torch_threads']} torch threads")
    print_report(res)
    busy_note(env)
    res["setup"] = {"model": model_name, "shapes_from": info, "lora_rank": args.rank, "lora_targets": args.targets,
                    "lora_layers": args.layers, "num_clients": n, "clip_norm": args.clip, "seed": args.seed,
                    "threshold": res["adapters"][next(iter(sets))]["threshold"], "shares": args.shares or "all",
                    "reps": reps, "warmup": warmup, "training": "none: stub clients reply a fixed update",
                    "median_seconds_is": "one round's wall time: server + in-process clients, wire (de)serialization"}
    res["environment"] = env
    return write_result(res, args)


def add_parser(bs) -> None:
    p = bs.add_parser(NAME, help="one round's bytes per client and wall time, plain vs SecAgg+ (LoRA, FFA; no training)")
    common_arguments(p)
    p.add_argument("--num-clients", type=int, default=0, help="clients in the round (default: 5; 3 with --quick)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--targets", default="q_proj,v_proj", help="run-config lora-targets")
    p.add_argument("--layers", type=int, default=0, help="adapt the last N blocks (0 = all)")
    p.add_argument("--variants", default="lora,ffa", help="lora (A and B travel) and/or ffa (only B)")
    p.add_argument("--clip", type=float, default=1.0, help="L2 norm of every client's update")
    p.add_argument("--threshold", type=int, default=0,
                   help="SecAgg+ reconstruction threshold (0: max(2, ceil(2N/3)), as a run)")
    p.add_argument("--shares", type=int, default=0, help="secagg-shares (0: every node holds a share of every other)")
    p.add_argument("--seed", type=int, default=0, help="masks and updates")
    p.set_defaults(func=main)
