"""Peak memory of one DP-SGD step on SmolLM2 at batch 32, with and without gradient checkpointing.

    ../shared/tools/heavy .venv/bin/python experiments/bench/checkpoint_memory.py [--reps 3] [--json OUT]

Every measurement is a fresh process (the allocator keeps what it once took, so only a process's
first step shows that step's peak): load SmolLM2 with LoRA r=8 on q_proj,v_proj of all 30 blocks
(lora-layers = 0, no prefix cache: every block's activations are kept for the backward pass, which
is what checkpointing trades for recomputation), encode the batch, then one DP step of 32 examples
(one micro-batch of 32, 96 tokens). A thread samples the process RSS every 5 ms; the step's peak is
the highest sample minus the RSS just before the step. `--reps` processes per variant, alternating
off/on; printed side by side: median peak MiB and median step seconds, and the ratios (on / off).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def one_variant(ckpt: bool, reps: int) -> dict:
    import psutil
    import torch

    sys.path.insert(0, str(ROOT))
    from fl_dplora.config import resolve
    from fl_dplora.data import encode_all, load_task
    from fl_dplora.model_loading import load_tokenizer
    from fl_dplora.models import get_peft_model
    from fl_dplora.train import DPSGD, local_train, make_optimizer

    cfg = resolve({"model": "smollm2-135m", "lora-layers": 0, "lora-targets": "q_proj,v_proj", "lora-variant": "lora",
                   "prefix-cache": "off", "label-head": False, "head-rounds": 0, "loss": "label-words",
                   "gradient-checkpointing": ckpt, "batch-size": 32, "micro-batch-size": 32, "local-steps": 1,
                   "max-seq-len": 96, "optimizer": "adamw", "learning-rate": 2e-3})
    model = get_peft_model(cfg)
    tok = load_tokenizer(cfg.model.name)
    data = encode_all(tok, load_task("fin-sentiment").train[:32], 96, cfg.data.system_prompt)
    params = [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
    from fl_dplora.forward import label_token_ids

    ids = label_token_ids(tok, load_task("fin-sentiment").label_words)
    proc = psutil.Process()
    peaks, seconds = [], []
    for rep in range(1, reps + 1):  # the caller asks for one step per process
        opt = make_optimizer(params, cfg.train)
        before = proc.memory_info().rss
        high = [before]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                high[0] = max(high[0], proc.memory_info().rss)
                time.sleep(0.005)

        watcher = threading.Thread(target=sample, daemon=True)
        watcher.start()
        t0 = time.perf_counter()
        # q = 1: the whole 32-example shard in the step, so every variant trains on the same batch
        local_train(model, params, data, cfg, optimizer=opt, dp=DPSGD(1.0, 1.0, torch.Generator().manual_seed(rep)),
                    sampling_generator=torch.Generator().manual_seed(0), pad_id=tok.pad_token_id, label_token_ids=ids)
        elapsed = time.perf_counter() - t0
        done.set()
        watcher.join()
        if rep:
            peaks.append((high[0] - before) / 2**20)
            seconds.append(elapsed)
    return {"gradient_checkpointing": ckpt, "peak_mib": peaks, "seconds": seconds,
            "peak_mib_median": statistics.median(peaks), "seconds_median": statistics.median(seconds)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default="")
    ap.add_argument("--variant", choices=("on", "off"), help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(one_variant(args.variant == "on", args.reps)))
        return 0
    results: dict[str, dict] = {"off": {"peak_mib": [], "seconds": []}, "on": {"peak_mib": [], "seconds": []}}
    for _ in range(args.reps):
        for variant in ("off", "on"):
            out = subprocess.run([sys.executable, __file__, "--variant", variant, "--reps", "1"],
                                 capture_output=True, text=True, check=True)
            one = json.loads(out.stdout.strip().splitlines()[-1])
            results[variant]["peak_mib"] += one["peak_mib"]
            results[variant]["seconds"] += one["seconds"]
    for r in results.values():
        r["peak_mib_median"], r["seconds_median"] = statistics.median(r["peak_mib"]), statistics.median(r["seconds"])
    off, on = results["off"], results["on"]
    print(f"DP step, SmolLM2-135M, batch 32 x 96 tokens, LoRA q,v on all 30 blocks, {args.reps} reps (medians):")
    print(f"  gradient-checkpointing off: peak +{off['peak_mib_median']:.0f} MiB, {off['seconds_median']:.2f} s")
    print(f"  gradient-checkpointing on:  peak +{on['peak_mib_median']:.0f} MiB, {on['seconds_median']:.2f} s")
    print(f"  ratio on/off: memory {on['peak_mib_median'] / off['peak_mib_median']:.2f}x, "
          f"time {on['seconds_median'] / off['seconds_median']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
