"""Does an adapter beat the base model when the label prior moves? (issue 16)

The default job is scored on 300 TFNS validation tweets that are 68 % "neutral": an adapter that
learns only that prior looks good there and fails on financial text where neutral is rare. This
check scores the base model and a run's adapter on a class-balanced set of TFNS validation tweets
that the server never evaluates on (the server's fixed subset is left out), with the prompt,
system prompt and truncation the run used. Text from outside this repository can be scored the same
way: `--csv FILE` with columns text,label (label words negative/neutral/positive or TFNS ids 0/1/2).

    python experiments/prior_shift_check.py RUN_DIR [--per-class 150] [--csv FILE] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--per-class", type=int, default=150)
    ap.add_argument("--csv", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from fl_dplora.config import resolve
    from fl_dplora import label_head
    from fl_dplora.data import eval_examples, head_stat_examples, load_local_file, load_task
    from fl_dplora.evaluate import evaluate
    from fl_dplora.model_loading import load_tokenizer
    from fl_dplora.models import adapter_parameters, get_peft_model, reset_adapter

    summary = json.loads((args.run_dir / "summary.json").read_text())
    cfg = resolve({k: v for k, v in summary["config"].items() if k != "audit-canaries"})
    task = load_task(cfg.data.task, cfg.train.seed)
    if args.csv:
        examples = load_local_file(str(args.csv), task)
        source = str(args.csv)
    else:
        # neither scored by the server nor read (unlabelled) for a label head's feature statistics: the
        # test part where the task has one (fin-sentiment), else the eval rows outside the server's use
        server = {(e.prompt, e.label) for e in eval_examples(cfg) + head_stat_examples(cfg)}
        pool = task.test or [e for e in task.eval if (e.prompt, e.label) not in server]
        g = torch.Generator().manual_seed(0)
        order = torch.randperm(len(pool), generator=g).tolist()
        examples, taken = [], {c: 0 for c in range(len(task.label_words))}
        for i in order:
            if taken[pool[i].label] < args.per_class:
                taken[pool[i].label] += 1
                examples.append(pool[i])
        source = (f"TFNS test part, {args.per_class} per class" if task.test else
                  f"TFNS validation, {args.per_class} per class, outside the server's eval subset")
    model = get_peft_model(cfg)
    tok = load_tokenizer(cfg.model.name)
    score = dict(system_prompt=cfg.data.system_prompt, prefix_cache=cfg.model.prefix_cache)
    reset_adapter(model)
    label_head.remove(model)
    base = evaluate(model, tok, task, examples, cfg.data.max_seq_len, **score)
    from safetensors.torch import load_file

    trained = load_file(str(args.run_dir / "adapter" / "adapter_model.safetensors"))
    params = adapter_parameters(model, cfg)
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(trained[k])
    label_head.load(model, args.run_dir / "adapter")  # the run's label head, if it trained one
    adapted = evaluate(model, tok, task, examples, cfg.data.max_seq_len, **score)
    reset_adapter(model)
    label_head.remove(model)
    out = {"run": str(args.run_dir), "examples": len(examples), "source": source, "base": base, "adapter": adapted}
    for name, r in (("base model", base), ("adapter", adapted)):
        print(f"{name:>10}: accuracy {r['accuracy']:.3f}  macro-F1 {r['macro_f1']:.3f}  (majority rate {r['majority_rate']:.3f}, {len(examples)} examples)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
