"""`fl-dplora bench dp-overhead`: one local step, DP-SGD (dp-mode sample) vs plain (dp-mode none),
and the same DP-SGD step with Opacus's GradSampleModule hooks as a reference.

Fixed sampling: the shard is exactly one batch, so the DP step's Poisson rate is 1 and every variant
processes the same examples with the same padded shapes. `--profile STEPS` adds torch.profiler's top
ops per variant (and chrome traces with `--profile-dir`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fl_dplora.tools.bench.common import (
    Variant,
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

NAME = "dp-overhead"


def opacus_variant(model, params, data, cfg, pad_id, dp, reset, state) -> Variant:
    """The same DP-SGD step with Opacus's GradSampleModule hooks (loss_reduction="sum") for the
    per-example gradients instead of ours: same loss, same clipping (joint L2 over all factors),
    same noise and scaling. The module is wrapped before and unwrapped after each timed step
    (Opacus's full backward hooks would otherwise slow the other variants down)."""
    import torch
    from opacus import GradSampleModule

    from fl_dplora.data import collate
    from fl_dplora.privacy.mechanisms import gaussian_like
    from fl_dplora.train import per_example_loss

    n, micro = len(data), cfg.train.micro_batch_size
    q = min(1.0, cfg.train.batch_size / n)

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


def profile_steps(variants: list[Variant], steps: int, top: int, out_dir: str | None) -> dict[str, list[dict]]:
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
        print(format_table([[r["op"][:48], f"{r['self_ms_per_step']:.1f}", f"{100 * r['share']:.1f}%", f"{r['calls_per_step']:.0f}"]
                      for r in rows], ["op", "ms/step", "share", "calls"]))
        if out_dir:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(Path(out_dir) / f"dp-overhead-{v.name}.trace.json"))
    return report



def main(args: argparse.Namespace) -> int:
    setup_torch(args)
    quiet_transformers()
    from fl_dplora.config import resolve

    apply_quick_step_defaults(args)
    model_name = args.model or "smollm2-135m"
    batch, seq = args.batch_size or 8, args.seq_len or 64
    reps, warmup = args.reps or 5, args.warmup if args.warmup is not None else 1
    cfg = resolve({
        "model": model_name, "task": args.task, "lora-rank": args.rank, "lora-targets": args.targets,
        "lora-variant": "lora", "batch-size": batch, "micro-batch-size": batch, "max-seq-len": seq,
        "local-steps": 1, "dp-mode": "none", "optimizer": "sgd", "max-grad-norm": 1.0,
    })
    data, tok = fixed_batch(cfg, batch)
    tokens = sum(len(e.input_ids) for e in data)
    variants, info, restore, local = step_variants(cfg, data, tok.pad_token_id)
    if not args.no_opacus:
        try:
            variants.append(opacus_variant(local.model, local.params, data, cfg, tok.pad_token_id, local.dp,
                                           local.reset, local.state))
        except Exception as exc:  # Opacus is a reference only; report why it is missing
            info["opacus_error"] = f"{type(exc).__name__}: {exc}"
    env = environment()
    print(f"dp-overhead: {model_name}, LoRA r={args.rank} on {args.targets}, batch {batch} x max-seq-len {seq} "
          f"({tokens} tokens), {args.task}; {info['trainable_params']} trainable values; "
          f"{env['torch_threads']} torch threads; warm-up {warmup}, {reps} interleaved reps")
    print("fixed sampling: shard = the batch, so the DP step's Poisson rate q = batch/n = 1 takes all "
          f"{batch} examples: every variant processes the same examples with the same padded shape")
    if "opacus_error" in info:
        print(f"opacus variant skipped: {info['opacus_error']}")
    try:
        times = time_interleaved(variants, reps, warmup)
        med = {k: median(v) for k, v in times["wall"].items()}
        med_cpu = {k: median(v) for k, v in times["cpu"].items()}
        pairs = [("sample", "none"), ("opacus", "none"), ("sample", "opacus")]
        ratio, ratio_cpu = ratios(med, pairs), ratios(med_cpu, pairs)
        print(format_table([[k, f"{med[k]:.4f}", f"{1e3 * med[k] / batch:.2f}", f"{med_cpu[k]:.4f}",
                       f"{min(times['wall'][k]):.4f}", f"{max(times['wall'][k]):.4f}"] for k in med],
                     ["variant", "median s", "ms/example", "median CPU s", "min s", "max s"]))
        for key in ratio:
            print(f"ratio {key}: {ratio[key]:.3f} (wall)  {ratio_cpu.get(key, float('nan')):.3f} (CPU)")
        busy_note(env)
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
            result["profile"] = profile_steps(variants, args.profile, 15, args.profile_dir)
    finally:
        restore()
    return write_result(result, args)


def add_parser(bs) -> None:
    p = bs.add_parser(NAME, help="local step time: dp-mode=sample vs none (and Opacus hooks)")
    common_arguments(p)
    lora_arguments(p, "batch size (default: 8)", "max-seq-len (default: 64)")
    p.add_argument("--no-opacus", action="store_true", help="skip the Opacus reference variant")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS", help="also profile STEPS steps per variant")
    p.add_argument("--profile-dir", default=None, help="write chrome traces of the profiled steps here")
    p.set_defaults(func=main)
