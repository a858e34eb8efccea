"""What is done with a trained adapter: `fl-dplora evaluate`, `predict` and `export` (and the Python
API's `Run.evaluate` / `Run.predict` through `evaluate_adapter` / `predict_texts`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fl_dplora.cli.common import add_run_config
from fl_dplora.config import ConfigError, RunConfig, parse_overrides, resolve


def _adapter_source(args: argparse.Namespace) -> tuple[RunConfig, Path | None]:
    """The config and adapter folder of `--run DIR` (the run's own config) or `--adapter` + `--run-config`."""
    from fl_dplora import adapter_io

    overrides = parse_overrides(args.run_config)
    adapter = getattr(args, "adapter", None)  # with --run: e.g. a round's snapshot (save-every)
    if adapter:
        adapter_io.check_adapter_dir(adapter)
    if getattr(args, "run", None):
        return adapter_io.run_config(args.run, overrides), Path(adapter) if adapter else adapter_io.adapter_dir(args.run)
    if adapter:  # its fl_dplora.json holds the config it was trained with: no other flag needed
        from fl_dplora import adapter_record

        return adapter_record.run_config(adapter, overrides), Path(adapter)
    return resolve(overrides), None


def _cmd_evaluate(args: argparse.Namespace) -> int:
    """Score the base model (zero-shot), a saved adapter or a finished run on a task's evaluation
    split, or on the whole of a given file (`--eval-file`)."""
    cfg, adapter = _adapter_source(args)
    if args.output:  # a place the result cannot be written is found now, not after the scoring
        from fl_dplora.run_dir import check_writable_dir

        if Path(args.output).is_dir():
            raise ConfigError(f"--output: {args.output} is a folder; give a file name")
        check_writable_dir(Path(args.output).expanduser().resolve().parent, "--output")
    summary = evaluate_adapter(cfg, adapter, args.eval_file)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(summary, indent=2))
    result, test = summary["final_eval"], summary.get("test_eval")
    print("fl-dplora: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
    if test is not None:
        print("fl-dplora: test part: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in test.items() if k not in ("samples", "generations", "predictions", "labels")))
    return 0


def evaluate_adapter(cfg: RunConfig, adapter: Path | None, eval_file: str | None = None,
                     model: Any = None) -> dict[str, Any]:
    """`fl-dplora evaluate` (and `Run.evaluate`): score `adapter` (None: the base model, zero-shot) on
    the task's evaluation split (and the test part of data-to-text or fin-sentiment), or on every row of `eval_file`.
    `model`: that adapter already loaded (it is not loaded again)."""
    import time

    from fl_dplora.adapter_io import load_adapted_model
    from fl_dplora.data import eval_examples, load_local_file, load_task, with_references
    from fl_dplora.evaluate import evaluate, score_test_part
    from fl_dplora.model_loading import tokenizer_for
    from fl_dplora.models import get_peft_model, reset_adapter
    from fl_dplora.server.start import preflight

    preflight(cfg)
    t0 = time.time()
    task = load_task(cfg.data.task, cfg.train.seed)
    # a given file is scored whole (every row, in order), with the task's prompt and label words
    examples = load_local_file(eval_file, task, flag="--eval-file") if eval_file else eval_examples(cfg)
    if eval_file and task.kind == "generation":  # rows with the same input are its references (mr,ref)
        examples = with_references(examples)
    if model is None and adapter is not None:
        model = load_adapted_model(cfg, adapter, task)
    elif model is None:  # a zero LoRA B makes the adapted model compute exactly the base model
        model = get_peft_model(cfg)
        reset_adapter(model)
    result = evaluate(model, tokenizer_for(cfg), task, examples, cfg.data.max_seq_len,
                      max_new_tokens=cfg.data.max_new_tokens, system_prompt=cfg.data.system_prompt,
                      prefix_cache=cfg.model.prefix_cache)
    summary = {"kind": "adapter" if adapter else "zero-shot", "adapter": str(adapter) if adapter else None,
               "eval_file": eval_file, "final_eval": result, "wall_seconds": time.time() - t0, "config": cfg.to_record()}
    test = None if eval_file else score_test_part(model, tokenizer_for(cfg), task, cfg)
    if test is not None:  # the test part too, as a run reports it at its end
        summary["test_eval"] = test
        summary["wall_seconds"] = time.time() - t0
    return summary


def _cmd_predict(args: argparse.Namespace) -> int:
    """Answer prompts with a finished run's adapter: one JSON line per text."""
    cfg, adapter = _adapter_source(args)
    if adapter is None:
        raise ConfigError("predict: give --run DIR or --adapter DIR")
    texts = list(args.text) or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise ConfigError("predict: give one or more texts (arguments or one per line on stdin)")
    for row in predict_texts(cfg, adapter, texts):
        print(json.dumps(row))
    return 0


def predict_texts(cfg: RunConfig, adapter: Path, texts: list[str], model: Any = None) -> list[dict[str, Any]]:
    """`fl-dplora predict` (and `Run.predict`): one answer per text; `model`: the adapter already loaded."""
    from fl_dplora.adapter_io import answer, load_adapted_model
    from fl_dplora.data import load_task
    from fl_dplora.model_loading import tokenizer_for

    task = load_task(cfg.data.task, cfg.train.seed)
    model = model if model is not None else load_adapted_model(cfg, adapter, task)
    return answer(model, tokenizer_for(cfg), task, cfg, texts)


def _cmd_export(args: argparse.Namespace) -> int:
    from fl_dplora.adapter_io import export

    if (args.run is None) == (args.run_opt is None):
        raise ConfigError("export: give the run's output dir once: fl-dplora export DIR (or --run DIR)")
    out = export(args.run or args.run_opt, args.output, args.merge, parse_overrides(args.run_config),
                 allow_untrained=args.allow_untrained)
    print(f"fl-dplora: {'merged model' if args.merge else 'adapter'} with model card in {out}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """`evaluate`, `predict`, `export`."""
    ev = sub.add_parser("evaluate", help="score the base model (zero-shot), a saved adapter or a finished run")
    ev.add_argument("--run", metavar="DIR", default=None,
                    help="a finished run's output dir: its adapter with its own config (--run-config overrides keys)")
    add_run_config(ev, 'e.g. "task=medical-qa max-eval-samples=500" (over the run\'s config)')
    ev.add_argument("--adapter", default=None, help="an adapter folder, with --run e.g. DIR/adapters/round-2 "
                    "(default: the run's adapter/; without --run the base model, zero-shot)")
    ev.add_argument("--eval-file", default=None, help="score every row of this csv/jsonl/json/parquet file "
                    "(columns text+label: the task's label words or their indices; or instruction+response)")
    ev.add_argument("--output", default=None, help="write the result as JSON here")
    ev.set_defaults(func=_cmd_evaluate)

    pd_ = sub.add_parser("predict", help="answer texts with a finished run's adapter (one JSON line each)")
    pd_.add_argument("text", nargs="*", help="input texts (default: one per line on stdin)")
    pd_.add_argument("--run", metavar="DIR", default=None, help="a finished run's output dir")
    pd_.add_argument("--adapter", default=None, help="an adapter folder; its fl_dplora.json gives model and task")
    add_run_config(pd_, "keys over the run's config")
    pd_.set_defaults(func=_cmd_predict)

    xp = sub.add_parser("export", help="write a run's adapter (or the merged model) with a model card")
    xp.add_argument("run", metavar="DIR", nargs="?", default=None, help="a finished run's output dir")
    xp.add_argument("--run", dest="run_opt", metavar="DIR", default=None, help="the same, as evaluate/predict take it")
    xp.add_argument("--output", required=True, help="a new (or empty) folder")
    xp.add_argument("--merge", action="store_true", help="fold LoRA into the base weights: a transformers folder that loads without peft")
    add_run_config(xp, "keys over the run's config (e.g. model=PATH if it moved)")
    xp.add_argument("--allow-untrained", action="store_true",
                    help="export even if every LoRA B is still its zero init (the adapter adds nothing; the card says so)")
    xp.set_defaults(func=_cmd_export)
