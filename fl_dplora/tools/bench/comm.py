"""`fl-dplora bench comm`: bytes per client per round on the wire (Flower's serialization of the
messages the strategy and the client build), LoRA and FFA, per rank and transfer dtype, against the
full model's fp32 bytes; the client-side serialization time."""

from __future__ import annotations

import argparse
import time
from typing import Any

from fl_dplora.config import RunConfig
from fl_dplora.tools.bench.common import (
    QUICK_MODEL,
    common_arguments,
    environment,
    format_table,
    median,
    quiet_transformers,
    setup_torch,
    write_result,
)

NAME = "comm"


def messages(cfg: RunConfig, params: dict[str, Any], dtype: str, seed: int):
    """(down, up, delta) RecordDicts built as the strategy and the client build them, from random
    non-zero tensors (Flower stores identical arrays once: an all-zero B would understate the bytes)."""
    import torch
    from flwr.app import ConfigRecord, RecordDict

    from fl_dplora import protocol
    from fl_dplora.transport import to_array_record

    g = torch.Generator().manual_seed(seed)
    glob = {k: torch.randn(p.shape, generator=g) * 0.02 for k, p in params.items()}
    delta = {k: torch.randn(p.shape, generator=g) * 1e-3 for k, p in params.items()}
    config = ConfigRecord({**cfg.to_record(), protocol.SIGMA: 0.0})
    config[protocol.ROUND] = 2
    down = RecordDict({"arrays": to_array_record(glob, dtype), "config": config})
    return down, upload(delta, dtype), delta


def upload(delta: dict[str, Any], dtype: str):
    """The client's reply content: the update in the transfer dtype and its metrics (dp-mode sample)."""
    from flwr.app import MetricRecord, RecordDict

    from fl_dplora.transport import to_array_record

    metrics = {"partition-id": 0, "epsilon": 1.2345, "sigma": 0.9876, "sample-rate": 0.0123,
               "steps-total": 20, "num-examples": 640, "ledger-sigmas": [0.9876], "ledger-rates": [0.0123],
               "ledger-steps": [20]}  # what a dp-mode sample reply holds (no timing)
    return RecordDict({"arrays": to_array_record(delta, dtype), "metrics": MetricRecord(metrics)})


def main(args: argparse.Namespace) -> int:
    setup_torch(args)
    quiet_transformers()
    from fl_dplora.config import resolve
    from fl_dplora.models import adapter_parameters, full_model_stats, get_peft_model
    from fl_dplora.transport import to_array_record, wire_bytes

    model_name = args.model or (QUICK_MODEL if args.quick else "smollm2-135m")
    ranks = [int(r) for r in args.ranks.split(",")]
    dtypes = args.dtypes.split(",")
    reps = args.reps or (3 if args.quick else 5)
    env = environment()
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
                down, up, delta = messages(cfg, params, dtype, seed=rank)
                b_down, b_up = wire_bytes(down), wire_bytes(up)
                times = []
                for _ in range(reps):  # client side: tensors -> ArrayRecord -> Flower's wire objects
                    t0 = time.perf_counter()
                    wire_bytes(upload(delta, dtype))
                    times.append(time.perf_counter() - t0)
                name = f"{variant}-r{rank}-{dtype}"
                med[name] = median(times)
                ratio[f"{name} up/full"] = b_up / full_bytes
                detail[name] = {"variant": variant, "rank": rank, "dtype": dtype, "values": values,
                                "tensors": len(params), "bytes_up": b_up, "bytes_down": b_down,
                                "payload_bytes": values * (4 if dtype == "float32" else 2),
                                "up_fraction_of_full": b_up / full_bytes, "down_fraction_of_full": b_down / full_bytes}
                rows.append([name, values, b_up, b_down, f"{100 * b_up / full_bytes:.4f}%",
                             f"{100 * b_down / full_bytes:.4f}%", f"{1e3 * med[name]:.2f}"])
    print(f"comm: {model_name}, LoRA on {args.targets}; full model {full_params:,} params = {full_bytes:,} bytes fp32; "
          "bytes per client per round as Flower serializes the message (wire_bytes)")
    print(format_table(rows, ["variant", "values", "up B", "down B", "up/full", "down/full", "serialize ms"]))
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
    return write_result(result, args)


def add_parser(bs) -> None:
    p = bs.add_parser(NAME, help="bytes per client per round on the wire vs the full model")
    common_arguments(p, timed=False)
    p.add_argument("--reps", type=int, default=0, help="timed serializations per size (0 = a few)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = as torch chooses)")
    p.add_argument("--ranks", default="4,8,16,64", help="LoRA ranks to size")
    p.add_argument("--dtypes", default="float32,bfloat16,float16", help="transfer dtypes to size")
    p.add_argument("--targets", default="q_proj,v_proj", help="run-config lora-targets")
    p.add_argument("--full-wire", action="store_true", help="also serialize the whole fp32 base model once")
    p.set_defaults(func=main)
