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

NAME = "secagg"
Shapes = dict[str, tuple[int, ...]]
METRICS = {"partition-id": 0, "num-examples": 16}  # what a client-level DP reply carries (partition id set per node)


# ------------------------------------------------------------------ adapter shapes
def model_config(name: str):
    """(transformers config, where it came from) without loading any weights."""
    from pathlib import Path

    from transformers import AutoConfig

    from fl_dplora.model_loading import TINY_ALIASES, smollm2_gguf_path, tiny_config

    if name in TINY_ALIASES:  # the vocabulary size changes no adapter shape
        return tiny_config(name, 49152), f"{name}: models.tiny_config"
    path = smollm2_gguf_path() if name == "smollm2-135m" else Path(name).expanduser()
    if path.suffix == ".gguf":
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name), f"the metadata of {path.name}"
    return AutoConfig.from_pretrained(name), f"{name}/config.json"


def adapter_shapes(name: str, rank: int, targets: str, layers: int) -> tuple[dict[str, Shapes], dict[str, Any]]:
    """{"lora": shapes, "ffa": shapes} of the transmitted tensors, keyed like models.adapter_parameters
    (FFA: the lora_B tensors only), from a meta-device model wrapped by PEFT as get_peft_model does."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config, source = model_config(name)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config)
    n_layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    chosen = list(range(n_layers - layers, n_layers)) if n_layers and 0 < layers < n_layers else None
    wrapped = get_peft_model(base, LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=[t.strip() for t in targets.split(",") if t.strip()],
        layers_to_transform=chosen, bias="none", task_type="CAUSAL_LM",
        fan_in_fan_out=getattr(config, "model_type", "") == "gpt2"))
    lora = {n.replace(".default", ""): tuple(p.shape) for n, p in wrapped.named_parameters() if "lora_" in n}
    info = {"config_source": source, "hidden_size": getattr(config, "hidden_size", None), "num_layers": n_layers,
            "adapted_layers": len(chosen) if chosen else n_layers,
            "num_attention_heads": getattr(config, "num_attention_heads", None),
            "num_key_value_heads": getattr(config, "num_key_value_heads", None)}
    return {"lora": lora, "ffa": {k: s for k, s in lora.items() if "lora_A" not in k}}, info


# ------------------------------------------------------------------ one setup (LoRA or FFA)
class SecAggSetup:
    """One adapter's shapes, the N fixed updates, the plan and both instructions; `plain_round()`
    and `secure_round()` run one round on a fresh in-process grid made by `new_grid()`."""

    def __init__(self, name: str, shapes: Shapes, num_clients: int, *, clip: float = 1.0, seed: int = 0,
                 threshold: int = 0, shares: int = 0, config: Mapping[str, Any] | None = None) -> None:
        import torch
        from flwr.app import ConfigRecord, RecordDict

        from fl_dplora import protocol
        from fl_dplora.privacy.mechanisms import clip_to_norm
        from fl_dplora.privacy.secagg_quantization import plan, round_to_grid
        from fl_dplora.transport import to_array_record

        if num_clients < 2:
            raise ValueError("bench secagg: SecAgg+ needs at least 2 clients")
        self.name, self.shapes, self.n, self.seed = name, dict(sorted(shapes.items())), num_clients, seed
        self.keys = list(self.shapes)
        self.dim = sum(math.prod(s) for s in self.shapes.values())
        self.threshold = min(num_clients, threshold or max(2, math.ceil(2 * num_clients / 3)))  # the run's default
        self.shares = shares
        self.plan = plan(clip, self.dim, num_clients, rounds=1, noise_multiplier=0.0, min_survivors=self.threshold)
        g = torch.Generator().manual_seed(seed)
        # a clipped update: random direction, L2 norm 2 scaled to the clip norm (non-zero everywhere:
        # Flower stores identical arrays once, so zeros would understate the bytes)
        self.updates, self.rounded = [], []
        for _ in range(num_clients):
            raw = [torch.randn(self.shapes[k], generator=g) * (2 * clip / math.sqrt(self.dim)) for k in self.keys]
            clipped = dict(zip(self.keys, (t.float() for t in clip_to_norm(raw, clip)[0])))
            self.updates.append(clipped)
            self.rounded.append({k: round_to_grid(t, self.plan.step, g) for k, t in clipped.items()})
        glob = {k: torch.randn(self.shapes[k], generator=g) * 0.02 for k in self.keys}
        base = dict(config or {})

        def instruction(secure: bool) -> RecordDict:
            cfg = ConfigRecord({**base, protocol.SIGMA: 0.0, "secure-aggregation": secure})
            cfg[protocol.ROUND] = 1
            return RecordDict({"arrays": to_array_record(glob), "config": cfg})

        self.instruction = {False: instruction(False), True: instruction(True)}

    # -------------------------------------------------------------- nodes
    def client(self):
        """The nodes' ClientApp: the project's SecAgg+ mod around a train function that replies this
        node's fixed update (plain: float32 ArrayRecord; secure: its grid-rounded update, FitRes-shaped)."""
        from flwr.app import Message, MetricRecord, RecordDict
        from flwr.clientapp import ClientApp

        from fl_dplora.clients.secagg_mod import fitres_reply, secagg_when_asked
        from fl_dplora.transport import to_array_record

        app = ClientApp(mods=[secagg_when_asked])

        @app.train()
        def train(msg, context):
            part = int(context.node_config["partition-id"])
            metrics = {**METRICS, "partition-id": part}
            if bool(msg.content["config"].get("secure-aggregation", False)):
                return Message(fitres_reply(self.rounded[part], metrics), reply_to=msg)
            content = RecordDict({"arrays": to_array_record(self.updates[part]), "metrics": MetricRecord(metrics)})
            return Message(content, reply_to=msg)

        return app

    def new_grid(self):
        from fl_dplora.testing.inprocess_grid import InProcessGrid

        return InProcessGrid(self.n, client=self.client(), seed=self.seed)

    # -------------------------------------------------------------- one round each way
    def plain_round(self, grid) -> dict[str, Any]:
        """As DPLoRAFedAvg does it: one instruction per node, wire bytes counted, replies read and summed."""
        import torch
        from flwr.app import Message
        from flwr.common import MessageType

        from fl_dplora.transport import from_array_record, wire_bytes

        content = self.instruction[False]
        nodes = sorted(grid.get_node_ids())
        down = wire_bytes(content) * len(nodes)
        sent = [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=nid) for nid in nodes]
        total = {k: torch.zeros(s) for k, s in self.shapes.items()}
        up, replied = 0, 0
        for reply in grid.send_and_receive(sent, timeout=None):
            if reply.has_error():
                raise RuntimeError(f"bench secagg: plain round: client error {reply.error.reason}")
            up += wire_bytes(reply.content)
            update = from_array_record(reply.content["arrays"])
            for k in self.keys:
                total[k] += update[k]
            replied += 1
        return {"total": total, "replies": replied, "bytes_up": up, "bytes_down": down}

    def secure_round(self, grid) -> Any:
        from fl_dplora.strategies.secagg import secure_sum

        contents = {nid: self.instruction[True] for nid in sorted(grid.get_node_ids())}
        return secure_sum(grid, 1, contents, self.shapes, self.plan, self.threshold, self.shares, None)

    # -------------------------------------------------------------- checks
    def _flat(self, tensors: Mapping[str, Any]):
        import numpy as np

        return np.concatenate([tensors[k].detach().double().numpy().ravel() for k in self.keys])

    def _float32_tolerance(self) -> float:
        """What float32 summation of the N updates may round away: 2·N·eps·max_j Σ_i |u_ij|."""
        import numpy as np

        return 2 * self.n * float(np.finfo(np.float32).eps) * float(sum(np.abs(self._flat(u)) for u in self.updates).max())

    def check_plain(self, result: dict[str, Any]) -> float:
        import numpy as np

        if result["replies"] != self.n:
            raise RuntimeError(f"bench secagg: plain round: {result['replies']} of {self.n} replies")
        ref = sum(self._flat(u) for u in self.updates)
        diff = float(np.abs(self._flat(result["total"]) - ref).max())
        tol = self._float32_tolerance()
        if diff > tol:
            raise RuntimeError(f"bench secagg: plain sum off by {diff:.3g} > {tol:.3g}")
        return diff

    def check_secure(self, outcome) -> dict[str, Any]:
        """The unmasked sum vs the plain sum of the clipped updates (within survivors x step) and vs the
        sum of the rounded updates the clients handed on (within float32 rounding). Raises if not."""
        import numpy as np

        if outcome.total is None:
            raise RuntimeError(f"bench secagg: no unmasked sum: {outcome.reason or outcome.failures}")
        if len(outcome.survivors) != self.n:
            raise RuntimeError(f"bench secagg: {len(outcome.survivors)} of {self.n} survived: {outcome.failures}")
        total = self._flat(outcome.total)
        plain = sum(self._flat(u) for u in self.updates)
        rounded = sum(self._flat(u) for u in self.rounded)
        m, step = len(outcome.survivors), self.plan.step
        fp = self._float32_tolerance()
        diff_plain = float(np.abs(total - plain).max())
        diff_rounded = float(np.abs(total - rounded).max())
        ok = diff_plain <= m * step + fp and diff_rounded <= fp and float(np.abs(plain).max()) > 100 * m * step
        check = {"survivors": m, "step": step, "bound": m * step, "max_abs_diff_vs_plain": diff_plain,
                 "diff_in_steps": diff_plain / step, "max_abs_diff_vs_rounded": diff_rounded,
                 "float32_tolerance": fp, "max_abs_sum": float(np.abs(plain).max()), "passed": ok}
        if not ok:
            raise RuntimeError(f"bench secagg: {self.name}: the unmasked sum is wrong: {check}")
        return check


# ------------------------------------------------------------------ the section
def run_section(shape_sets: Mapping[str, Shapes], num_clients: int, reps: int, warmup: int, *, clip: float = 1.0,
                seed: int = 0, threshold: int = 0, shares: int = 0, config: Mapping[str, Any] | None = None,
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
