"""`fl-dplora` command line: simulate, privacy, and the tools the issues add.

Bad input ends with one readable line on stderr and exit code 2, never a traceback wall.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fl_dplora.config import (LEGACY_VALUES, SCHEMA, ConfigError, available_presets, load_preset, parse_overrides,
                              resolve, resolve_output_dir)


def _fail(msg: str, code: int = 2) -> int:
    for line in str(msg).splitlines():
        print(f"fl-dplora: error: {line}", file=sys.stderr)
    return code


def as_overrides(run_config: str | os.PathLike | list[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """--run-config as given (key=value text, a TOML file, several of them) or a dict (the Python API)."""
    if isinstance(run_config, Mapping):
        return dict(run_config)
    return parse_overrides(os.fspath(run_config) if isinstance(run_config, os.PathLike) else run_config)


def prepare_config(run_config: str | list[str] | Mapping[str, Any] | None, output_dir: str | None,
                   num_clients: int | None = None, preset: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Resolve + validate everything that can be checked before Ray or a model starts.

    Precedence: defaults < preset < --num-clients (as population) < --run-config < --output-dir."""
    base = load_preset(preset) if preset else {}
    overrides = as_overrides(run_config)
    if num_clients is not None and num_clients >= 1 and "population" not in overrides:
        overrides["population"] = num_clients  # the federation simulate builds: declared, public
    if output_dir:
        overrides["output-dir"] = output_dir
    if overwrite:
        overrides["overwrite"] = True
    cfg = resolve(overrides, base=base)  # before the heavy imports below: a typo fails in well under a second
    from fl_dplora.data import looks_like_path, partition_indices
    from fl_dplora.server_app import preflight

    # Paths mean the user's current directory here, whatever directory the workers start in.
    cfg["output-dir"] = str(resolve_output_dir(cfg))
    for key in ("task", "model"):
        p = Path(os.path.expanduser(cfg[key]))
        if looks_like_path(cfg[key]) or p.exists():
            cfg[key] = str(p.resolve())
    preflight(cfg)
    from fl_dplora.tracking import check_report_to

    check_report_to(cfg)  # report-to = wandb without wandb installed: refused now, in one line
    from fl_dplora.run_dir import check_output_dir

    check_output_dir(cfg)  # a folder holding a run: refused now, nothing touched (the ServerApp checks again)
    if cfg["resume"]:  # no/damaged checkpoint or another config: refuse now, not after Ray has started
        from fl_dplora import checkpoint
        from fl_dplora.server_app import _check_resume_config

        _check_resume_config(checkpoint.load(Path(cfg["output-dir"]))["config"], cfg)
    if num_clients is not None:
        if num_clients < 1:
            raise ConfigError(f"num-clients: must be >= 1, got {num_clients}")
        if cfg["min-available"] > num_clients:  # the server would wait forever for the missing nodes
            raise ConfigError(f"min-available: {cfg['min-available']} is more than num-clients {num_clients}")
        partition_indices(cfg["task"], num_clients, cfg["partitioner"], float(cfg["dirichlet-alpha"]),
                          int(cfg["seed"]), int(cfg["max-train-samples"]))
        from fl_dplora.data import load_task

        from fl_dplora.privacy.modes import for_config

        mode = for_config(cfg)
        unit = mode.unit
        if cfg["secure-aggregation"]:  # refused here in one line, before Ray or a model starts
            if cfg["population"] != num_clients:
                raise ConfigError(f"population: {cfg['population']} declared but simulate starts {num_clients} nodes; "
                                  "secure aggregation needs them equal (drop population or match --num-clients)")
            if unit is not None:
                mode.check_secagg_delta(0.0, None)  # sigma is not needed for the refusal odds
        if unit is not None:
            from fl_dplora.privacy.accounting import check_delta

            n = len(load_task(cfg["task"], int(cfg["seed"])).train)
            check_delta(cfg["delta"], n // num_clients if unit == "example" else num_clients)
    return cfg


def simulate(cfg: dict[str, Any], num_clients: int, num_cpus: float, num_gpus: float, ray_address: str | None,
             exit_on_interrupt: bool = False) -> dict:
    """The Flower simulation engine (Ray backend) with the same ServerApp/ClientApp as `flwr run .`."""
    from flwr.simulation import run_simulation

    from fl_dplora.clients.client_app import app as client_app
    from fl_dplora.server_app import build_server_app

    init_args: dict[str, Any] = {"include_dashboard": False, "num_cpus": os.cpu_count() or 2}
    if ray_address:
        init_args = {"address": ray_address}
    backend_config = {"client_resources": {"num_cpus": num_cpus, "num_gpus": num_gpus}, "init_args": init_args}
    out_dir = Path(cfg["output-dir"])
    summary_path = out_dir / "summary.json"
    summary_path.unlink(missing_ok=True)
    previous = _exit_on_interrupt(out_dir, int(cfg["num-server-rounds"])) if exit_on_interrupt else None
    try:
        run_simulation(server_app=build_server_app(cfg), client_app=client_app, num_supernodes=num_clients,
                       backend_config=backend_config)
    finally:
        if previous is not None:
            import signal

            signal.signal(signal.SIGINT, previous)
    if not summary_path.is_file():
        raise RuntimeError(f"the run did not finish (no {summary_path}); see the log above")
    return json.loads(summary_path.read_text())


def _exit_on_interrupt(out_dir: Path, rounds: int):
    """Ctrl-C (SIGINT) during `fl-dplora simulate` ends the process now, in one line, exit 130.

    The ServerApp runs in a thread of Flower's engine that a KeyboardInterrupt never reaches: it
    would wait for the round's replies (round-timeout) and keep the process alive. Everything the
    run wrote stays (metrics.jsonl, the last checkpoint, the write-ahead log, each written with a
    rename or an append), so `--resume DIR` continues it. Ray is shut down first (bounded)."""
    import signal
    import threading

    def stop(signum, frame) -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C kills at once
        metrics = out_dir / "metrics.jsonl"
        done = sum(1 for line in metrics.read_text().splitlines() if line.strip()) if metrics.is_file() else 0
        resumable = (out_dir / "checkpoint.json").is_file() or (out_dir / "checkpoint.pt").is_file()

        def shutdown_ray() -> None:
            try:
                import ray

                if ray.is_initialized():
                    ray.shutdown()
            except Exception:  # noqa: BLE001 - exiting anyway
                pass

        t = threading.Thread(target=shutdown_ray, daemon=True)
        t.start()
        t.join(timeout=15)
        sys.stdout.flush()
        print(f"fl-dplora: error: interrupted after {done} of {rounds} rounds; what was written stays in {out_dir}"
              + (f" (fl-dplora simulate --resume {out_dir} continues it)" if resumable else ""),
              file=sys.stderr, flush=True)  # the last line, after whatever Ray says while it stops
        os._exit(130)

    return signal.signal(signal.SIGINT, stop)  # the handler before: put back when the run ends


def simulate_run(run_config: str | list[str] | Mapping[str, Any] | None = None, num_clients: int | None = None,
                 output_dir: str | None = None, preset: str | None = None, overwrite: bool = False,
                 resume: str | None = None, num_cpus: float = 2.0, num_gpus: float = 0.0,
                 ray_address: str | None = None, exit_on_interrupt: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """`fl-dplora simulate` (and `fl_dplora.simulate`): check everything, run, return (config, summary)."""
    if resume:
        from fl_dplora import checkpoint

        if overwrite:
            raise ConfigError("resume: --resume continues the run in DIR, --overwrite replaces it: give one")
        saved = checkpoint.load(Path(resume).resolve())  # refuses a damaged checkpoint
        if preset:
            raise ConfigError("resume: the run continues with its saved config; drop --preset")
        given = as_overrides(run_config)  # `make run` passes --run-config "" : nothing given
        if given:  # name what would change (one line per key), not just "drop it"
            kept = {k: v for k, v in saved["config"].items() if k in SCHEMA}
            merged = resolve({**kept, **given})  # a bad value fails here, naming its key
            changed = [k for k in given if k not in ("resume", "output-dir") and merged[k] != kept.get(k)]
            raise ConfigError("\n".join(
                f"{k}: {merged[k]!r} differs from the checkpoint's {kept.get(k)!r}; resume continues the saved "
                "config: drop --run-config" for k in changed) or "resume: the run continues with its saved config; "
                "drop --run-config")
        # a checkpoint from before a key existed ran with the key's legacy value, not today's default
        legacy = {k: v for k, v in LEGACY_VALUES.items() if k in SCHEMA and k not in saved["config"]}
        overrides = {k: v for k, v in {**legacy, **saved["config"]}.items()
                     if k not in ("resume", "output-dir", "overwrite")}  # a resume never deletes the run
        run_config = " ".join(f"{k}={_toml_value(v)}" for k, v in overrides.items()) + " resume=true"
        output_dir = str(Path(resume).resolve())
        # simulate declared the federation's size as `population` (older checkpoints: num_nodes)
        num_clients = num_clients or int(saved["config"].get("population") or saved.get("num_nodes") or 0) or None
        if not num_clients:
            raise ConfigError("resume: give --num-clients (the same as the interrupted run)")
    elif num_clients is None:
        num_clients = 5
    cfg = prepare_config(run_config, output_dir, num_clients, preset=preset, overwrite=overwrite)
    return cfg, simulate(cfg, num_clients, num_cpus, num_gpus, ray_address, exit_on_interrupt)


def _cmd_simulate(args: argparse.Namespace) -> int:
    cfg, summary = simulate_run(args.run_config, args.num_clients, args.output_dir, preset=args.preset,
                                overwrite=args.overwrite, resume=args.resume, num_cpus=args.num_cpus,
                                num_gpus=args.num_gpus, ray_address=args.ray_address, exit_on_interrupt=True)
    fe = summary["final_eval"]
    acc = f"accuracy {fe['accuracy']:.4f}, " if fe.get("accuracy") is not None else ""
    eps = summary["privacy"]["epsilon"]
    print(f"fl-dplora: {summary['rounds']} rounds, {acc}eval loss {fe['loss']:.4f}, "
          f"epsilon {eps if eps is None else round(eps, 4)}, output {cfg['output-dir']}")
    return 0


def _toml_value(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (str, bool)) else repr(v)


def _adapter_source(args: argparse.Namespace) -> tuple[dict[str, Any], Path | None]:
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
                                                   for k, v in test.items() if k not in ("samples", "generations")))
    return 0


def evaluate_adapter(cfg: dict[str, Any], adapter: Path | None, eval_file: str | None = None,
                     model: Any = None) -> dict[str, Any]:
    """`fl-dplora evaluate` (and `Run.evaluate`): score `adapter` (None: the base model, zero-shot) on
    the task's evaluation split (and a data-to-text task's test part), or on every row of `eval_file`.
    `model`: that adapter already loaded (it is not loaded again)."""
    import time

    from fl_dplora.adapter_io import load_adapted_model
    from fl_dplora.data import eval_examples, load_local_file, load_task, with_references
    from fl_dplora.evaluate import evaluate, score_test_part
    from fl_dplora.models import get_peft_model, tokenizer_for, reset_adapter
    from fl_dplora.server_app import preflight

    preflight(cfg)
    t0 = time.time()
    task = load_task(cfg["task"], int(cfg["seed"]))
    # a given file is scored whole (every row, in order), with the task's prompt and label words
    examples = load_local_file(eval_file, task, flag="--eval-file") if eval_file else eval_examples(cfg)
    if eval_file and task.kind == "generation":  # rows with the same input are its references (mr,ref)
        examples = with_references(examples)
    if model is None and adapter is not None:
        model = load_adapted_model(cfg, adapter, task)
    elif model is None:  # a zero LoRA B makes the adapted model compute exactly the base model
        model = get_peft_model(cfg)
        reset_adapter(model)
    result = evaluate(model, tokenizer_for(cfg), task, examples, int(cfg["max-seq-len"]),
                      max_new_tokens=int(cfg["max-new-tokens"]), system_prompt=cfg["system-prompt"],
                      prefix_cache=cfg["prefix-cache"])
    summary = {"kind": "adapter" if adapter else "zero-shot", "adapter": str(adapter) if adapter else None,
               "eval_file": eval_file, "final_eval": result, "wall_seconds": time.time() - t0, "config": cfg}
    test = None if eval_file else score_test_part(model, tokenizer_for(cfg), task, cfg)
    if test is not None:  # data-to-text: the test part too, as a run reports it at its end
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


def predict_texts(cfg: dict[str, Any], adapter: Path, texts: list[str], model: Any = None) -> list[dict[str, Any]]:
    """`fl-dplora predict` (and `Run.predict`): one answer per text; `model`: the adapter already loaded."""
    from fl_dplora.adapter_io import answer, load_adapted_model
    from fl_dplora.data import load_task
    from fl_dplora.models import tokenizer_for

    task = load_task(cfg["task"], int(cfg["seed"]))
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


def _cmd_config(args: argparse.Namespace) -> int:
    """Every run-config key: type, default, allowed values and help (the schema of config.py)."""
    from fl_dplora.config import describe_keys, preset_description

    if args.presets:
        presets = available_presets()
        width = max(map(len, presets), default=0)
        for name, path in presets.items():
            print(f"{name:<{width}}  {preset_description(path)}")
        return 0
    print(describe_keys(markdown=args.markdown))
    return 0


def _cmd_experiment(args: argparse.Namespace) -> int:
    from fl_dplora.tools import experiments as ex

    if args.list or not args.name:
        for name in ex.available():
            spec = ex.load_spec(name)
            print(f"{name}: {len(spec.runs)} runs. {spec.description.strip().splitlines()[0] if spec.description else ''}")
        return 0
    spec = ex.load_spec(args.name)
    only = [s for s in args.only.split(",") if s] if args.only else None
    if args.verify:
        with tempfile.TemporaryDirectory(prefix="fl-dplora-verify-") as scratch:
            failed = ex.verify(spec, only=only, scratch=Path(scratch))
        print(f"fl-dplora: {'all reruns reproduced the cached numbers' if not failed else f'{failed} run(s) differ'}")
        return 1 if failed else 0
    records = ex.execute(spec, only=only, force=args.force, dry_run=args.dry_run, train=not args.report_only)
    if not args.dry_run:
        out = ex.report(spec, records, f"fl-dplora experiment {args.name}")
        print(f"fl-dplora: {len(records)}/{len(spec.runs)} runs done; results in {out}")
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from fl_dplora.tools.audit import run_audit

    for name in ("canaries", "references"):
        if getattr(args, name) < 8:
            raise ConfigError(f"--{name}: need at least 8, got {getattr(args, name)}")
    if args.repeats < 1:
        raise ConfigError(f"--repeats: must be >= 1, got {args.repeats}")
    out = Path(args.output_dir).resolve()
    cfg = prepare_config(args.run_config, str(out / "run"), args.num_clients, overwrite=args.overwrite)

    def train(run_cfg: dict[str, Any], num_clients: int) -> dict[str, Any]:
        return simulate(run_cfg, num_clients, args.num_cpus, args.num_gpus, args.ray_address)

    r = run_audit(cfg, args.num_clients, out, train, num_canaries=args.canaries, repeats=args.repeats,
                  num_references=args.references, audit_seed=args.audit_seed, canary_kind=args.canary_kind)
    claimed = "inf" if r["epsilon_claimed"] is None else f"{r['epsilon_claimed']:.3f}"
    exposure = ("" if r["exposure_mean"] is None  # label-flip canaries have no answer space to rank in
                else f"exposure mean {r['exposure_mean']:.2f} max {r['exposure_max']:.2f} bits; ")
    print(f"fl-dplora: audit: epsilon lower bound {r['epsilon_lower_bound']:.3f} vs claimed {claimed}; {exposure}"
          f"MIA AUC {r['mia_auc']:.3f}; {out / 'audit.json'}")
    if r["flagged"]:
        print("fl-dplora: audit: FLAGGED: the lower bound exceeds the claimed epsilon", file=sys.stderr)
        return 3
    return 0


def _cmd_privacy(args: argparse.Namespace) -> int:
    from fl_dplora.privacy.accounting import format_table, privacy_table

    if (args.target_epsilon is None) == (args.noise_multiplier is None):
        raise ConfigError("privacy: give exactly one of --target-epsilon or --noise-multiplier")
    if args.sample_rate is None:
        if not args.batch_size or not args.num_examples:
            raise ConfigError("privacy: give --sample-rate, or --batch-size and --num-examples")
        args.sample_rate = args.batch_size / args.num_examples
    steps = args.steps if args.steps else args.rounds * args.local_steps
    rows = privacy_table(args.target_epsilon, args.noise_multiplier, args.delta, args.sample_rate, steps)
    print(f"q = {args.sample_rate:.6g}, steps = {steps}, delta = {args.delta:g}")
    print(format_table(rows))
    return 0


class _HelpWithDefaults(argparse.RawDescriptionHelpFormatter):
    """--help names each option's default as "(default: X)", where it has one worth naming; a
    description keeps its own lines (bench's table of benchmarks)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not (action.default is None or action.default is False or action.default in ("", argparse.SUPPRESS)) \
                and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fl-dplora")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown (not installed)"


def _add_run_config(parser: argparse.ArgumentParser, what: str) -> None:
    # Flower's semantics: key=value pairs or a TOML file; append, so a second one never drops the first
    parser.add_argument("--run-config", action="append", default=None, metavar="KEY=VALUE...|FILE.toml",
                        help=f"run-config keys, {what}; or a TOML file of key = value; repeatable, later wins")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fl-dplora", description="Federated DP-LoRA fine-tuning on Flower")
    p.add_argument("-v", "--verbose", action="store_true", help="debug log; an unexpected error shows its traceback")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("simulate", help="run the Flower app in the simulation engine (Ray backend)")
    s.add_argument("--num-clients", type=int, default=None, help="virtual clients (default: 5, or the resumed run's)")
    s.add_argument("--resume", metavar="DIR", help="continue the interrupted run in DIR from its last checkpoint")
    s.add_argument("--preset", metavar="NAME|FILE.toml", default=None,
                   help=f"run-config keys from a packaged preset ({', '.join(available_presets())}; "
                   "fl-dplora config --presets) or a TOML file; --run-config overrides them")
    _add_run_config(s, 'e.g. "dp-mode=sample target-epsilon=8"')
    s.add_argument("--output-dir", default=None, help="where the run writes; a folder holding a run is refused unless --resume or --overwrite "
                   "(default: ~/fl-dplora/runs/<timestamp>)")
    s.add_argument("--overwrite", action="store_true", help="replace the run already in --output-dir (its files are deleted)")
    s.add_argument("--num-cpus", type=float, default=2.0, help="CPUs per virtual client (Ray)")
    s.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per virtual client; fractions share a GPU")
    s.add_argument("--ray-address", default=None, help="attach to a running Ray cluster, e.g. auto")
    s.set_defaults(func=_cmd_simulate)

    ev = sub.add_parser("evaluate", help="score the base model (zero-shot), a saved adapter or a finished run")
    ev.add_argument("--run", metavar="DIR", default=None,
                    help="a finished run's output dir: its adapter with its own config (--run-config overrides keys)")
    _add_run_config(ev, 'e.g. "task=medical-qa max-eval-samples=500" (over the run\'s config)')
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
    _add_run_config(pd_, "keys over the run's config")
    pd_.set_defaults(func=_cmd_predict)

    xp = sub.add_parser("export", help="write a run's adapter (or the merged model) with a model card")
    xp.add_argument("run", metavar="DIR", nargs="?", default=None, help="a finished run's output dir")
    xp.add_argument("--run", dest="run_opt", metavar="DIR", default=None, help="the same, as evaluate/predict take it")
    xp.add_argument("--output", required=True, help="a new (or empty) folder")
    xp.add_argument("--merge", action="store_true", help="fold LoRA into the base weights: a transformers folder that loads without peft")
    _add_run_config(xp, "keys over the run's config (e.g. model=PATH if it moved)")
    xp.add_argument("--allow-untrained", action="store_true",
                    help="export even if every LoRA B is still its zero init (the adapter adds nothing; the card says so)")
    xp.set_defaults(func=_cmd_export)

    cf = sub.add_parser("config", help="list every run-config key with its default, allowed values and help")
    cf.add_argument("--markdown", action="store_true", help="as the Markdown table of the README")
    cf.add_argument("--presets", action="store_true", help="list the packaged presets (simulate --preset NAME)")
    cf.set_defaults(func=_cmd_config)

    au = sub.add_parser("audit", help="train with planted canaries, then measure exposure, MIA and a one-run epsilon lower bound")
    au.add_argument("--num-clients", type=int, default=5, help="data clients (client-level modes add one per canary)")
    _add_run_config(au, "the audited run's keys")
    au.add_argument("--output-dir", required=True, help="the audit's folder (its run in DIR/run, audit.json)")
    au.add_argument("--overwrite", action="store_true", help="replace the audit run already in --output-dir")
    au.add_argument("--canaries", type=int, default=256, help="canaries, each included with probability 1/2")
    au.add_argument("--canary-kind", choices=("gradient", "text"), default="gradient",
                    help="gradient: Dirac gradient canaries on the LoRA factors (white box); text: passphrases or "
                         "mislabelled texts scored by their loss, with exposure (default: gradient)")
    au.add_argument("--repeats", type=int, default=1, help="copies of each included canary (>1: group privacy is compared)")
    au.add_argument("--references", type=int, default=256, help="random passphrases that rank each text canary")
    au.add_argument("--audit-seed", type=int, default=0, help="which canaries are drawn and included")
    au.add_argument("--num-cpus", type=float, default=2.0, help="CPUs per virtual client (Ray)")
    au.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per virtual client; fractions share a GPU")
    au.add_argument("--ray-address", default=None, help="attach to a running Ray cluster, e.g. auto")
    au.set_defaults(func=_cmd_audit)

    ex = sub.add_parser("experiment", help="run a named experiment from experiments/NAME.toml (cached per run)")
    ex.add_argument("name", nargs="?", help="experiment name (see --list)")
    ex.add_argument("--list", action="store_true", help="list the experiments")
    ex.add_argument("--only", default="", help="comma-separated run ids")
    ex.add_argument("--force", action="store_true", help="rerun even cached runs")
    ex.add_argument("--dry-run", action="store_true", help="show what would run")
    ex.add_argument("--report-only", action="store_true", help="write results from the finished runs only")
    ex.add_argument("--verify", action="store_true",
                    help="rerun finished runs (with --only: those) in a scratch dir and check their numbers match")
    ex.set_defaults(func=_cmd_experiment)

    pr = sub.add_parser("privacy", help="sigma for a target epsilon, or epsilon for a sigma, per accountant")
    pr.add_argument("--target-epsilon", type=float, help="the sigma that spends this epsilon")
    pr.add_argument("--noise-multiplier", type=float, help="the epsilon this sigma spends")
    pr.add_argument("--delta", type=float, default=1e-5, help="delta")
    pr.add_argument("--sample-rate", type=float, help="q (or give --batch-size and --num-examples)")
    pr.add_argument("--batch-size", type=int, help="expected batch size (q = batch-size / num-examples)")
    pr.add_argument("--num-examples", type=int, help="records one client holds")
    pr.add_argument("--rounds", type=int, default=1, help="federated rounds")
    pr.add_argument("--local-steps", type=int, default=1, help="steps per round")
    pr.add_argument("--steps", type=int, default=0, help="total steps (overrides rounds x local-steps)")
    pr.set_defaults(func=_cmd_privacy)
    from fl_dplora.tools.bench.cli import add_parser as _add_bench
    _add_bench(sub)
    for parser in _all_parsers(p):  # --help shows every option's default, nested commands too
        parser.formatter_class = _HelpWithDefaults
    return p


def _all_parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _all_parsers(child)


def setup_logging(verbose: bool = False) -> None:
    """Our one-line-per-round log on stderr; Flower keeps its own handler (no duplicates)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    ours = logging.getLogger("fl_dplora")
    ours.handlers[:] = [handler]
    ours.setLevel(logging.DEBUG if verbose else logging.INFO)
    ours.propagate = False
    logging.getLogger("flwr").propagate = False
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return args.func(args)
    except ConfigError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except BrokenPipeError:  # `fl-dplora config | head`: the reader left, nothing more to say
        sys.stderr.close()
        return 0
    except RuntimeError as exc:
        if args.verbose:
            raise
        return _fail(str(exc), 1)


if __name__ == "__main__":
    sys.exit(main())
