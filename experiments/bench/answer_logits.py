"""Answer-only logits vs full-vocabulary logits: time of one forward+backward, same batch.

    python experiments/bench/answer_logits.py [--reps 7] [--threads 1] [--json FILE]
Interleaved repetitions after a warm-up; prints medians and the ratio full/answer-only.
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from fl_dplora.config import resolve
from fl_dplora.data import client_examples, collate, encode_all
from fl_dplora.model_loading import load_tokenizer
from fl_dplora.models import adapter_parameters, get_peft_model
from fl_dplora.train import per_example_loss


def full_logits_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = resolve({"model": args.model, "max-seq-len": 64})
    model = get_peft_model(cfg)
    tok = load_tokenizer(cfg.model.name)
    data = encode_all(tok, client_examples(cfg, 0, 5)[:8], 64)
    batch = collate(data, tok.pad_token_id)
    params = list(adapter_parameters(model, cfg).values())
    variants = {"answer_only": lambda: per_example_loss(model, batch).mean(), "full_logits": lambda: full_logits_loss(model, batch)}
    times = {k: [] for k in variants}
    for rep in range(args.reps + 1):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn().backward()
            dt = time.perf_counter() - t0
            for p in params:
                p.grad = None
            if rep:  # rep 0 is the warm-up
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["full_logits"] / med["answer_only"]
    print(f"median seconds: {med}  full/answer-only: {ratio:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"median_seconds": med, "ratio": {"full_logits/answer_only": ratio}, "reps": args.reps,
                       "threads": args.threads, "batch": 8, "max_seq_len": 64}, f, indent=2)


if __name__ == "__main__":
    main()
