"""`fl-dplora simulate` (and `--resume`): check everything a run needs before Ray or a model
starts, run the Flower simulation engine, stop cleanly on Ctrl-C. The Python API's
`fl_dplora.simulate` goes through `simulate_run`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fl_dplora.cli.common import add_run_config
from fl_dplora.config import (SCHEMA, ConfigError, RunConfig, available_presets, load_preset, parse_overrides,
                              resolve, resolve_output_dir)


def as_overrides(run_config: str | os.PathLike | list[str] | Mapping[str, Any] | RunConfig | None) -> dict[str, Any]:
    """--run-config as given (key=value text, a TOML file, several of them), a dict or a RunConfig (the Python API)."""
    if isinstance(run_config, RunConfig):
        return run_config.to_record()
    if isinstance(run_config, Mapping):
        return dict(run_config)
    return parse_overrides(os.fspath(run_config) if isinstance(run_config, os.PathLike) else run_config)


def prepare_config(run_config: str | list[str] | Mapping[str, Any] | None, output_dir: str | None,
                   num_clients: int | None = None, preset: str | None = None, overwrite: bool = False) -> RunConfig:
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
    from fl_dplora.server.start import preflight

    # Paths mean the user's current directory here, whatever directory the workers start in.
    paths = {"output-dir": str(resolve_output_dir(cfg.output.output_dir))}
    for key, value in (("task", cfg.data.task), ("model", cfg.model.name)):
        p = Path(os.path.expanduser(value))
        if looks_like_path(value) or p.exists():
            paths[key] = str(p.resolve())
    cfg = cfg.with_values(paths)
    preflight(cfg)
    from fl_dplora.tracking import check_report_to

    check_report_to(cfg)  # report-to = wandb without wandb installed: refused now, in one line
    from fl_dplora.run_dir import check_output_dir

    check_output_dir(cfg)  # a folder holding a run: refused now, nothing touched (the ServerApp checks again)
    if cfg.output.resume:  # no/damaged checkpoint or another config: refuse now, not after Ray has started
        from fl_dplora import checkpoint
        from fl_dplora.server.run_state import check_resume_config

        check_resume_config(checkpoint.load(Path(cfg.output.output_dir))["config"], cfg)
    if num_clients is not None:
        if num_clients < 1:
            raise ConfigError(f"num-clients: must be >= 1, got {num_clients}")
        if cfg.federation.min_available > num_clients:  # the server would wait forever for the missing nodes
            raise ConfigError(f"min-available: {cfg.federation.min_available} is more than num-clients {num_clients}")
        partition_indices(cfg.data.task, num_clients, cfg.data.partitioner, cfg.data.dirichlet_alpha,
                          cfg.train.seed, cfg.data.max_train_samples)
        from fl_dplora.data import load_task

        from fl_dplora.privacy.modes import for_config

        mode = for_config(cfg)
        unit = mode.unit
        if cfg.secagg.enabled:  # refused here in one line, before Ray or a model starts
            if cfg.federation.population != num_clients:
                raise ConfigError(f"population: {cfg.federation.population} declared but simulate starts {num_clients} nodes; "
                                  "secure aggregation needs them equal (drop population or match --num-clients)")
            if unit is not None:
                mode.secagg.check_delta(0.0, None)  # sigma is not needed for the refusal odds
        if unit is not None:
            from fl_dplora.privacy.accounting import check_delta

            n = len(load_task(cfg.data.task, cfg.train.seed).train)
            check_delta(cfg.privacy.delta, n // num_clients if unit == "example" else num_clients)
    return cfg


def simulate(cfg: RunConfig, num_clients: int, num_cpus: float, num_gpus: float, ray_address: str | None,
             exit_on_interrupt: bool = False, node_configs: Sequence[Mapping[str, Any]] | None = None) -> dict:
    """The Flower simulation engine (Ray backend) with the same ServerApp/ClientApp as `flwr run .`.
    `node_configs`: one node config per simulated node (by partition-id), what a SuperNode's
    `--node-config` would set; the engine itself sets only partition-id and num-partitions."""
    from flwr.simulation import run_simulation

    from fl_dplora.clients.client_app import app as client_app
    from fl_dplora.server.app import build_server_app

    if node_configs is not None:
        if len(node_configs) != num_clients:
            raise ValueError("node_configs: one mapping per simulated node")
        client_app = _with_node_configs(client_app, node_configs)

    init_args: dict[str, Any] = {"include_dashboard": False, "num_cpus": os.cpu_count() or 2}
    if ray_address:
        init_args = {"address": ray_address}
    backend_config = {"client_resources": {"num_cpus": num_cpus, "num_gpus": num_gpus}, "init_args": init_args}
    out_dir = Path(cfg.output.output_dir)
    summary_path = out_dir / "summary.json"
    summary_path.unlink(missing_ok=True)
    previous = _exit_on_interrupt(out_dir, cfg.federation.num_server_rounds) if exit_on_interrupt else None
    try:
        run_simulation(server_app=build_server_app(cfg.to_record()), client_app=client_app, num_supernodes=num_clients,
                       backend_config=backend_config)
    finally:
        if previous is not None:
            import signal

            signal.signal(signal.SIGINT, previous)
    if not summary_path.is_file():
        raise RuntimeError(f"the run did not finish (no {summary_path}); see the log above")
    return json.loads(summary_path.read_text())


def _with_node_configs(app, node_configs: Sequence[Mapping[str, Any]]):
    """`app` on simulated nodes that carry node configs of their own: node `partition-id`'s entry is
    merged into its context's node config before each message reaches the app."""
    from flwr.clientapp import ClientApp

    class NodeConfigApp(ClientApp):
        def __call__(self, message, context):
            context.node_config.update(node_configs[int(context.node_config["partition-id"])])
            return app(message, context)

    return NodeConfigApp()


def _exit_on_interrupt(out_dir: Path, rounds: int):
    """Ctrl-C (SIGINT) during `fl-dplora simulate` ends the process now, in one line, exit 130.

    The ServerApp runs in a thread of Flower's engine that a KeyboardInterrupt never reaches: it
    would wait for the round's replies (round-timeout) and keep the process alive. Everything the
    run wrote stays (metrics.jsonl, the last checkpoint, the write-ahead log, each written with a
    rename or an append), so `--resume DIR` continues it. Ray is not shut down here: Flower's
    worker threads keep calling Ray, and a call after `ray.shutdown()` makes Ray's core worker exit
    the process with status 1 from C++ (seen in CI), so the exit code would depend on a race.
    Ray's raylet and GCS share the driver's fate, but its dashboard and runtime-env agents were
    seen to outlive it (> 25 s): a forked child waits for this process to exit, then kills every
    descendant it had."""
    import signal

    def stop(signum, frame) -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C kills at once
        metrics = out_dir / "metrics.jsonl"
        done = sum(1 for line in metrics.read_text().splitlines() if line.strip()) if metrics.is_file() else 0
        resumable = (out_dir / "checkpoint.json").is_file() or (out_dir / "checkpoint.pt").is_file()
        _reap_descendants_after_exit()
        sys.stdout.flush()
        print(f"fl-dplora: error: interrupted after {done} of {rounds} rounds; what was written stays in {out_dir}"
              + (f" (fl-dplora simulate --resume {out_dir} continues it)" if resumable else ""),
              file=sys.stderr, flush=True)
        os._exit(130)

    return signal.signal(signal.SIGINT, stop)  # the handler before: put back when the run ends


def _descendants(pid: int) -> list[int]:
    """Every live descendant of `pid`, from /proc (Linux; elsewhere none)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            stat = entry.read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])  # after "(comm)": state, ppid
        children.setdefault(ppid, []).append(int(entry.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _reap_descendants_after_exit() -> None:
    """Fork a child that SIGKILLs this process's descendants once this process has exited."""
    import signal

    parent, victims = os.getpid(), _descendants(os.getpid())
    if not victims or os.fork() != 0:
        return
    try:  # the child: only system calls (the parent has threads); it holds no pipe of the caller's
        for fd in (0, 1, 2):
            os.close(fd)
        deadline = time.monotonic() + 60
        while os.getppid() == parent and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    finally:
        os._exit(0)


def simulate_run(run_config: str | list[str] | Mapping[str, Any] | None = None, num_clients: int | None = None,
                 output_dir: str | None = None, preset: str | None = None, overwrite: bool = False,
                 resume: str | None = None, num_cpus: float = 2.0, num_gpus: float = 0.0,
                 ray_address: str | None = None, exit_on_interrupt: bool = False) -> tuple[RunConfig, dict[str, Any]]:
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
            merged = resolve({**kept, **given}).to_record()  # a bad value fails here, naming its key
            changed = [k for k in given if k not in ("resume", "output-dir") and merged[k] != kept.get(k)]
            raise ConfigError("\n".join(
                f"{k}: {merged[k]!r} differs from the checkpoint's {kept.get(k)!r}; resume continues the saved "
                "config: drop --run-config" for k in changed) or "resume: the run continues with its saved config; "
                "drop --run-config")
        # a checkpoint from before a key existed holds it at the value its run computed with (checkpoint.migrate)
        overrides = {k: v for k, v in saved["config"].items()
                     if k not in ("resume", "output-dir", "overwrite")}  # a resume never deletes the run
        run_config = " ".join(f"{k}={_toml_value(v)}" for k, v in overrides.items()) + " resume=true"
        output_dir = str(Path(resume).resolve())
        # simulate declared the federation's size as `population` (older checkpoints: num_nodes)
        num_clients = num_clients or resolve(overrides).federation.population or int(saved.get("num_nodes") or 0) or None
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
          f"epsilon {eps if eps is None else round(eps, 4)}, output {cfg.output.output_dir}")
    return 0


def _toml_value(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (str, bool)) else repr(v)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """`simulate`."""
    s = sub.add_parser("simulate", help="run the Flower app in the simulation engine (Ray backend)")
    s.add_argument("--num-clients", type=int, default=None, help="virtual clients (default: 5, or the resumed run's)")
    s.add_argument("--resume", metavar="DIR", help="continue the interrupted run in DIR from its last checkpoint")
    s.add_argument("--preset", metavar="NAME|FILE.toml", default=None,
                   help=f"run-config keys from a packaged preset ({', '.join(available_presets())}; "
                   "fl-dplora config --presets) or a TOML file; --run-config overrides them")
    add_run_config(s, 'e.g. "dp-mode=sample target-epsilon=8"')
    s.add_argument("--output-dir", default=None, help="where the run writes; a folder holding a run is refused unless --resume or --overwrite "
                   "(default: ~/fl-dplora/runs/<timestamp>)")
    s.add_argument("--overwrite", action="store_true", help="replace the run already in --output-dir (its files are deleted)")
    s.add_argument("--num-cpus", type=float, default=2.0, help="CPUs per virtual client (Ray)")
    s.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per virtual client; fractions share a GPU")
    s.add_argument("--ray-address", default=None, help="attach to a running Ray cluster, e.g. auto")
    s.set_defaults(func=_cmd_simulate)
