"""`fl-dplora bench prefix-cache`: what the frozen-prefix cache (frozen_prefix.py) buys a DP client.

    fl-dplora bench prefix-cache [--quick] [--json FILE] [--layers 2,4,8] [--batch-size 32] [--no-rss]

Three measurements in one run (timing as in common.py: warm-up, interleaved repetitions, medians):

1. step: one DP-SGD step (dp-mode sample, sigma 1.0, Poisson rate q = batch-size / shard, so the
   expected batch is --batch-size) at lora-layers N for each N in --layers: `cached-nN` (examples
   carry their prefix states; only the top N blocks run) vs `full-nN` (every block). Both draw the
   same Poisson batch (same sampling seed), so full/cached of the seconds is cached/full of examples/s.
   A forward of one micro-batch both ways checks the losses agree (max_abs_loss_diff).
2. build: `compute_prefix` at the first N over --build-examples examples vs a plain no-grad forward of
   the base model (adapters off) over the same examples in the same batches: `forward` (logits at
   every position, as model(...) returns them) and `decoder` (all blocks + final norm, no head);
   `build-nN-unshared` is the build without running the examples' shared tokens once (shared_prefix.py).
   `build-nN-int8` is the same build with `frozen-dtype = int8` (frozen_int8.py); next to it the
   fp32 and int8 GEMM peaks measured in the same run (1024^3 matmul / torch._int_mm, best of 5), each
   build's model FLOP/s (Linear layers + attention scores of the tokens it runs, padding excluded) as
   a fraction of them, and how far the int8 features are from the fp32 ones: cosine (per example)
   and max |difference| of the states entering block N and of the final hidden state at each
   example's first answer position (what the answer logits and the label head read); and of the
   final state when every block runs int8 (head-only rounds, LoRA at init: frozen_prefix.int8_top).
   `--build-only` times just the fp32 and int8 builds (no steps, no forward baselines, no RSS).
3. memory: peak RSS of the real ClientApp in a fresh process (throughput.client_peak_rss: two DP rounds)
   whose shard is --cache-examples examples, prefix-cache memory vs off, next to the cache's own
   size (prompt+answer tokens x hidden x 4 bytes).

JSON: median_seconds {variant: s}, ratio {"a/b": median a / median b}, examples_per_second,
speedup {nN: cached/full examples/s}, peak_rss_mib {memory, off} (whole process), peak_round_rss_mib
(training rounds only), held_rss_mib (after round 1), cache_payload_mib, int8 {build_rate_ratio,
tokens_per_second, model_gflops, peak_gflops, fraction_of_peak, final_features, prefix_states, ...},
setup, environment.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from fl_dplora.config import RunConfig
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
from fl_dplora.tools.bench.local_step import timed_local_step
from fl_dplora.tools.bench.throughput import client_peak_rss

NAME = "prefix-cache"
ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
BUILD_BATCH = 16  # compute_prefix's default batch; the forward baselines use the same batches


def _model(cfg: RunConfig):
    """The process's PEFT model for cfg and its prefix start (switching lora-layers re-wraps the same base)."""
    from fl_dplora.config import ConfigError
    from fl_dplora.frozen_prefix import decoder_blocks, prefix_start
    from fl_dplora.models import get_peft_model

    model = get_peft_model(cfg)
    start = prefix_start(model)
    if start == 0:
        found = decoder_blocks(model)
        depth = len(found[2]) if found else "?"
        raise ConfigError(f"bench prefix-cache: lora-layers {cfg.lora.layers} leaves no frozen prefix "
                          f"in {cfg.model.name} ({depth} blocks); use --layers below the depth")
    return model, start


def _step_pair(cfg: RunConfig, shard, pad_id: int, n: int):
    """`full-nN` and `cached-nN`: the same DP step on the same model, weights and Poisson batch.
    Returns (variants, info, restore, state); state["examples"] = examples in the last timed step."""
    import torch

    from fl_dplora.data import collate
    from fl_dplora.forward import per_example_loss
    from fl_dplora.frozen_prefix import attach_prefix
    from fl_dplora.models import adapter_parameters
    from fl_dplora.train import DPSGD

    model, start = _model(cfg)
    params = [p for p in adapter_parameters(model, cfg).values() if p.requires_grad]
    original = [p.detach().clone() for p in params]
    cached = attach_prefix(model, shard, "memory")  # untimed: a client builds it once, in its first round
    full = attach_prefix(model, shard, "off")
    device = params[0].device
    model.eval()
    with torch.no_grad():  # the cache changes the cost, never the numbers
        mb = range(min(len(shard), cfg.train.micro_batch_size))
        a, b = (per_example_loss(model, {k: v.to(device) for k, v in collate([d[i] for i in mb], pad_id).items()})
                for d in (full, cached))
        diff = float((a - b).abs().max())
    # Secure RNG for the noise (generator None), as the client does by default (secure-rng = true).
    dp = DPSGD(noise_multiplier=1.0, max_grad_norm=cfg.privacy.max_grad_norm, generator=None)
    state: dict[str, Any] = {}
    reset, step = timed_local_step(model, params, original, cfg, pad_id, state)
    variants = [Variant(f"full-n{n}", step(full, dp), reset), Variant(f"cached-n{n}", step(cached, dp), reset)]
    info = {"prefix_start": start, "trainable_params": sum(p.numel() for p in params), "max_abs_loss_diff": diff}
    return variants, info, reset, state


def _build_variants(cfg: RunConfig, data, pad_id: int, n: int, build_only: bool = False):
    """`build-nN` (compute_prefix) and `build-nN-int8` vs `forward` and `decoder` (no grad, adapters
    off), same batches. Returns (variants, prefix start, hidden size, model)."""
    import torch

    from fl_dplora.data import collate
    from fl_dplora.frozen_prefix import compute_prefix, decoder_and_head

    model, start = _model(cfg)
    decoder = decoder_and_head(model)[1]
    device = next(iter(model.parameters())).device
    order = sorted(range(len(data)), key=lambda i: len(data[i].input_ids))  # compute_prefix's batching

    def plain(module) -> Callable[[], None]:
        def run() -> None:
            model.eval()
            with torch.no_grad(), model.disable_adapter():
                for s in range(0, len(order), BUILD_BATCH):
                    batch = collate([data[i] for i in order[s : s + BUILD_BATCH]], pad_id)
                    module(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        return run

    build = Variant(f"build-n{n}", lambda: compute_prefix(model, data, start, batch_size=BUILD_BATCH, dtype="float32"))
    int8 = Variant(f"build-n{n}-int8", lambda: compute_prefix(model, data, start, batch_size=BUILD_BATCH, dtype="int8"))
    if build_only:
        return [build, int8], start, int(model.config.hidden_size), model
    unshared = Variant(f"build-n{n}-unshared",
                       lambda: compute_prefix(model, data, start, batch_size=BUILD_BATCH, share_tokens=False, dtype="float32"))
    return ([build, int8, unshared, Variant("forward", plain(model)), Variant("decoder", plain(decoder))], start,
            int(model.config.hidden_size), model)


def gemm_peaks(size: int = 1024, reps: int = 5) -> dict[str, float]:
    """GFLOP/s of a size^3 float32 matmul and of torch._int_mm on int8 (the int8 path's kernel), best of reps."""
    import torch

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, size, generator=g), torch.randn(size, size, generator=g)
    ai = torch.randint(-127, 128, (size, size), dtype=torch.int8, generator=g)
    bi = torch.randint(-127, 128, (size, size), dtype=torch.int8, generator=g)

    def best(fn) -> float:  # a peak: the fastest repetition, not the median
        return min(time_interleaved([Variant("gemm", fn)], reps, warmup=1)["wall"]["gemm"])

    flop = 2.0 * size**3
    return {"float32": flop / best(lambda: a @ b) / 1e9, "int8": flop / best(lambda: torch._int_mm(ai, bi)) / 1e9}


def prefix_flop(model, data, start: int) -> tuple[float, int, int]:
    """(model FLOP of one build, tokens it runs, tokens of the examples): Linear layers of blocks[:start]
    (2 x in x out per token) plus attention scores and values (4 x position x hidden per token and
    block), over the tokens the build runs: the shared tokens once, then each example's own (no padding)."""
    from fl_dplora import shared_prefix
    from fl_dplora.frozen_prefix import decoder_blocks
    from fl_dplora.int8_matmul import linear_weight

    blocks = decoder_blocks(model)[2]
    per_token = sum(2 * w.numel() for b in list(blocks)[:start] for m in b.modules()
                    if (w := linear_weight(m)) is not None)
    hidden = int(model.config.hidden_size)
    ids = [e.input_ids for e in data]
    shared = shared_prefix.common_prefix_length(ids)
    shared = shared if shared >= shared_prefix.MIN_SHARED_TOKENS else 0
    positions = list(range(shared)) + [p for seq in ids for p in range(shared, len(seq))]
    flop = len(positions) * per_token + sum(4.0 * (p + 1) * hidden * start for p in positions)
    return float(flop), len(positions), sum(len(x) for x in ids)


def _cosines(a, b):
    import torch

    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def int8_features(model, data, start: int, pad_id: int) -> dict[str, Any]:
    """How far the int8 prefix moves the features: the states entering blocks[start] (each example's
    [T, H] flattened) and the final hidden state at its first answer position, fp32 vs int8."""
    from dataclasses import replace

    import torch

    from fl_dplora.frozen_prefix import adapter_idle, compute_prefix, decoder_blocks, frozen_dtype, set_frozen_dtype
    from fl_dplora.label_head import first_answer_states

    states = {d: compute_prefix(model, data, start, batch_size=BUILD_BATCH, dtype=d) for d in ("float32", "int8")}
    attached = {d: [replace(e, prefix=s, prefix_start=start) for e, s in zip(data, states[d])] for d in states}
    final = {d: first_answer_states(model, attached[d], pad_id) for d in states}
    # head-only rounds (every lora_B 0): the blocks above the prefix run int8 too (frozen_prefix.int8_top)
    was = frozen_dtype(model)
    set_frozen_dtype(model, "int8")
    try:
        whole = (first_answer_states(model, attached["int8"], pad_id)
                 if adapter_idle(decoder_blocks(model)[2][start:]) else None)
    finally:
        set_frozen_dtype(model, was)
    flat = {d: [s.flatten() for s in states[d]] for d in states}
    prefix_cos = torch.stack([_cosines(a, b) for a, b in zip(flat["float32"], flat["int8"])])
    final_cos = _cosines(final["float32"], final["int8"])

    def block(cos, a, b) -> dict[str, float]:
        return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
                "max_abs_diff": float((a - b).abs().max()), "max_abs_float32": float(a.abs().max())}

    out = {"examples": len(data), "final_features": block(final_cos, final["float32"], final["int8"]),
           "prefix_states": block(prefix_cos, torch.cat(flat["float32"]), torch.cat(flat["int8"]))}
    if whole is not None:
        out["final_features_all_int8"] = block(_cosines(final["float32"], whole), final["float32"], whole)
    return out


def _cache_payload_mib(cfg: RunConfig, hidden: int) -> float:
    """Bytes of the states the client caches for its shard (float32, one per token), in MiB."""
    from fl_dplora.data import client_examples, encode_all
    from fl_dplora.model_loading import load_tokenizer

    enc = encode_all(load_tokenizer(cfg.model.name), client_examples(cfg, 0, 1), cfg.data.max_seq_len, cfg.data.system_prompt)
    return sum(len(e.input_ids) for e in enc) * hidden * 4 / 2**20


def main(args: argparse.Namespace) -> int:
    setup_torch(args)
    quiet_transformers()
    from fl_dplora import frozen_int8
    from fl_dplora.config import resolve
    from fl_dplora.data import encode_all, load_task
    from fl_dplora.frozen_prefix import clear_memory_cache, compute_prefix
    from fl_dplora.int8_matmul import matmul_path
    from fl_dplora.model_loading import load_tokenizer

    apply_quick_step_defaults(args)  # --quick: tiny model, batch 4, max-seq-len 32, 3 reps
    model_name = args.model or "smollm2-135m"
    layers = [int(x) for x in (args.layers or ("1" if args.quick else "2,4,8")).split(",")]
    batch, seq = args.batch_size or 32, args.seq_len or 96
    shard_n = args.shard or 4 * batch
    build_n = args.build_examples or (16 if args.quick else 256)
    cache_n = args.cache_examples or (64 if args.quick else 2000)
    reps, warmup = args.reps or 3, args.warmup if args.warmup is not None else 1
    base = {"model": model_name, "task": args.task, "lora-rank": args.rank, "lora-targets": args.targets,
            "batch-size": batch, "micro-batch-size": batch, "max-seq-len": seq, "local-steps": 1,
            "dp-mode": "sample", "noise-multiplier": 1.0, "optimizer": "sgd", "system-prompt": args.system_prompt,
            **({"lora-variant": args.variant} if args.variant else {})}
    cfg = resolve(base)
    tok = load_tokenizer(model_name)
    examples = load_task(cfg.data.task, cfg.train.seed).train[: max(shard_n, build_n)]
    data = encode_all(tok, examples, seq, cfg.data.system_prompt)
    env = environment()
    print(f"prefix-cache: {model_name}, LoRA r={args.rank} ({cfg.lora.variant}) on {args.targets}, {args.task}, "
          f"system-prompt {args.system_prompt!r}, max-seq-len {seq}; DP step: sigma 1.0, expected batch {batch} "
          f"(q = {batch}/{shard_n}); {env['torch_threads']} torch threads; warm-up {warmup}, {reps} interleaved reps")
    med, med_cpu, samples, ratio, info = {}, {}, {}, {}, {}
    eps: dict[str, float] = {}
    try:
        for n in ([] if args.build_only else layers):
            variants, info[f"n{n}"], restore, state = _step_pair(resolve({**base, "lora-layers": n}), data[:shard_n], tok.pad_token_id, n)
            try:
                times = time_interleaved(variants, reps, warmup)
            finally:
                restore()
            info[f"n{n}"]["examples_per_step"] = state["examples"]  # fixed sampling seed: every step the same draw
            for v in variants:
                med[v.name], med_cpu[v.name] = median(times["wall"][v.name]), median(times["cpu"][v.name])
                samples[v.name] = times["wall"][v.name]
                eps[v.name] = info[f"n{n}"]["examples_per_step"] / med[v.name]
            ratio.update(ratios(med, [(f"full-n{n}", f"cached-n{n}")]))
        n = layers[0]
        build_vars, start, hidden, build_model = _build_variants(resolve({**base, "lora-layers": n}), data[:build_n],
                                                                 tok.pad_token_id, n, args.build_only)
        t0 = time.perf_counter()
        compute_prefix(build_model, data[:1], start, dtype="int8")  # the int8 copies are made once per process
        quantize_s = time.perf_counter() - t0
        times = time_interleaved(build_vars, reps, warmup)
        for v in build_vars:
            med[v.name], med_cpu[v.name] = median(times["wall"][v.name]), median(times["cpu"][v.name])
            samples[v.name], eps[v.name] = times["wall"][v.name], build_n / med[v.name]
        pairs = [(f"build-n{n}", f"build-n{n}-int8")]
        if not args.build_only:
            pairs += [("forward", f"build-n{n}"), ("decoder", f"build-n{n}"), (f"build-n{n}-unshared", f"build-n{n}")]
        ratio.update(ratios(med, pairs))
        peaks = gemm_peaks(256 if args.quick else 1024)
        flop, run_tokens, tokens = prefix_flop(build_model, data[:build_n], start)
        int8 = int8_features(build_model, data[:build_n], start, tok.pad_token_id)
    finally:
        clear_memory_cache()
    gflops = {d: flop / med[f"build-n{n}{sfx}"] / 1e9 for d, sfx in (("float32", ""), ("int8", "-int8"))}
    int8.update({
        "build_rate_ratio": ratio[f"build-n{n}/build-n{n}-int8"], "quantize_seconds": quantize_s,
        "tokens": tokens, "tokens_run": run_tokens, "model_gflop": flop / 1e9,
        "tokens_per_second": {d: tokens / med[f"build-n{n}{sfx}"] for d, sfx in (("float32", ""), ("int8", "-int8"))},
        "model_gflops": gflops, "peak_gflops": peaks,
        "fraction_of_peak": {"float32": gflops["float32"] / peaks["float32"], "int8": gflops["int8"] / peaks["int8"],
                             "int8_of_float32_peak": gflops["int8"] / peaks["float32"]},
        "kernel": f"{matmul_path()}: int8 weights per output channel x int8 activations per token; "
                  f"{frozen_int8.MASSIVE_CHANNELS} massive stream channels in float32, "
                  f"two int8 terms in {', '.join(frozen_int8.TWO_TERMS) or 'no layer'}"})
    steps_run = [] if args.build_only else layers
    speedup = {f"n{n}": ratio.get(f"full-n{n}/cached-n{n}", float("nan")) for n in steps_run}
    n = layers[0]
    if steps_run:
        print(format_table([[f"{n}", f"{info[f'n{n}']['prefix_start']}", f"{info[f'n{n}']['examples_per_step']}",
                   f"{eps[f'full-n{n}']:.2f}", f"{eps[f'cached-n{n}']:.2f}", f"{speedup[f'n{n}']:.2f}x",
                   f"{med_cpu[f'full-n{n}'] / med_cpu[f'cached-n{n}']:.2f}x", f"{info[f'n{n}']['max_abs_loss_diff']:.1e}"]
                  for n in steps_run],
                 ["lora-layers N", "cached from block", "examples/step", "full ex/s", "cached ex/s",
                  "cached/full", "(CPU)", "max |loss diff|"]))
    print(f"\ncache build at N={n} (blocks 0..{start - 1}) vs plain no-grad forwards, {build_n} examples in batches of {BUILD_BATCH}")
    print(format_table([[v.name, f"{med[v.name]:.3f}", f"{eps[v.name]:.1f}", f"{med[v.name] / med[f'build-n{n}']:.2f}"]
                  for v in build_vars], ["variant", "median s", "examples/s", "s / build s"]))
    _print_int8(int8, n, start)
    busy_note(env)
    rss: dict[str, Any] = {}
    payload = None
    if not args.no_rss and not args.build_only:
        over = {**base, "lora-layers": n, "max-train-samples": cache_n}
        payload = _cache_payload_mib(resolve(over), hidden)
        for mode in ("memory", "off"):  # one client process each: its shard is the whole capped pool
            rss[mode] = client_peak_rss({**over, "prefix-cache": mode}, num_partitions=1,
                                        threads=int(args.threads or 0), timeout=args.timeout)
        mib = lambda kb: f"{kb / 1024:.0f}"  # noqa: E731
        print(f"\nclient process, shard of {cache_n} examples, lora-layers {n}: the cache holds "
              f"{payload:.1f} MiB of states (tokens x {hidden} x 4 B)")
        print(format_table([[m, mib(r["rss_after_model_kb"]), mib(r["rss_before_round2_kb"]),
                       mib(r["peak_rss_round1_kb"]) if r["hwm_reset_round1"] else "-",
                       mib(r["peak_rss_round2_kb"]) if r["hwm_reset_round2"] else "-", mib(r["peak_rss_process_kb"])]
                      for m, r in rss.items()],
                     ["prefix-cache", "RSS after model MiB", "held after round 1 MiB", "peak round 1 MiB",
                      "peak round 2 MiB", "peak process MiB"]))
    result = {
        "benchmark": "prefix-cache", "median_seconds": med, "ratio": ratio, "median_cpu_seconds": med_cpu,
        "examples_per_second": eps, "speedup": speedup, "samples_seconds": samples, "steps": info,
        "peak_rss_mib": {m: r["peak_rss_process_kb"] / 1024 for m, r in rss.items()},
        # the rounds alone (model loading excluded: SmolLM2's GGUF de-quantization can set the process peak)
        "peak_round_rss_mib": {m: max(r["peak_rss_round1_kb"], r["peak_rss_round2_kb"]) / 1024
                               for m, r in rss.items() if r["hwm_reset_round1"] and r["hwm_reset_round2"]},
        "held_rss_mib": {m: r["rss_before_round2_kb"] / 1024 for m, r in rss.items()},
        "cache_payload_mib": payload, "client_process": rss, "int8": int8,
        "setup": {"model": model_name, "task": args.task, "lora_rank": args.rank, "lora_targets": args.targets,
                  "lora_variant": cfg.lora.variant, "layers": layers, "batch_size": batch, "shard": shard_n,
                  "max_seq_len": seq, "system_prompt": args.system_prompt, "noise_multiplier": 1.0,
                  "build_examples": build_n, "build_layers": n, "cache_examples": cache_n, "reps": reps, "warmup": warmup,
                  "build_only": bool(args.build_only)},
        "environment": env,
    }
    return write_result(result, args)


def _print_int8(r: dict[str, Any], n: int, start: int) -> None:
    print(f"\nfrozen prefix (blocks 0..{start - 1}) float32 vs int8: {r['tokens']} tokens "
          f"({r['tokens_run']} run: shared tokens once), {r['model_gflop']:.1f} GFLOP per build; "
          f"GEMM peak here {r['peak_gflops']['float32']:.0f} GFLOP/s fp32, {r['peak_gflops']['int8']:.0f} GOP/s int8")
    rows = []
    for d, sfx in (("float32", ""), ("int8", "-int8")):
        rows.append([d, f"{r['tokens_per_second'][d]:.0f}", f"{r['model_gflops'][d]:.1f}",
                     f"{100 * r['fraction_of_peak'][d]:.0f} %"])
    print(format_table(rows, ["frozen-dtype", "tokens/s", "model GFLOP/s", "of its GEMM peak"]))
    f, p = r["final_features"], r["prefix_states"]
    print(f"int8 / float32 build rate: {r['build_rate_ratio']:.2f}x (int8 copies made in {r['quantize_seconds']:.2f} s, once; "
          f"{r['kernel']})")
    print(f"final features ({r['examples']} examples, first answer position): cosine mean {f['cosine_mean']:.5f} "
          f"min {f['cosine_min']:.5f}, max |diff| {f['max_abs_diff']:.3g} (max |fp32| {f['max_abs_float32']:.3g})")
    print(f"states entering block {start}: cosine mean {p['cosine_mean']:.5f} min {p['cosine_min']:.5f}, "
          f"max |diff| {p['max_abs_diff']:.3g} (max |fp32| {p['max_abs_float32']:.3g})")
    if "final_features_all_int8" in r:
        w = r["final_features_all_int8"]
        print(f"final features with every block int8 (head-only rounds: LoRA at init): cosine mean "
              f"{w['cosine_mean']:.5f} min {w['cosine_min']:.5f}, max |diff| {w['max_abs_diff']:.3g}")


def add_parser(bs) -> None:
    p = bs.add_parser(NAME, help="DP step examples/s with vs without the prefix cache; build rate; client RSS")
    common_arguments(p)
    lora_arguments(p, "expected (Poisson) batch (default: 32; 4 with --quick)", "max-seq-len (default: 96; 32 with --quick)")
    p.set_defaults(targets=ALL_LINEAR)  # lora-targets default here: all seven linear layers
    p.add_argument("--layers", default="", help="lora-layers values (default: 2,4,8; 1 with --quick)")
    p.add_argument("--shard", type=int, default=0, help="examples the DP step samples from (default: 4 x batch)")
    p.add_argument("--build-examples", type=int, default=0, help="examples the cache is built from; the shared-token check costs one batch, so few examples hide its gain (default: 256; 16 with --quick)")
    p.add_argument("--cache-examples", type=int, default=0, help="client shard for the RSS (default: 2000; 64 with --quick)")
    p.add_argument("--system-prompt", default="", help="run-config system-prompt (default: none)")
    p.add_argument("--variant", default=None, choices=("lora", "ffa"), help="lora-variant (default: the run config's)")
    p.add_argument("--no-rss", action="store_true", help="skip the client-process memory measurement")
    p.add_argument("--build-only", action="store_true",
                   help="only the float32 vs int8 prefix build (rates, GEMM peaks, feature differences)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per client process")
    p.set_defaults(func=main)
