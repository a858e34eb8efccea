"""The commands around runs: `fl-dplora config`, `audit`, `experiment`, `privacy` and `bench`; the
only part of the command line that reaches into the tools wing (fl_dplora/tools/)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from fl_dplora.cli.common import add_run_config
from fl_dplora.cli.run import prepare_config, simulate
from fl_dplora.config import ConfigError, RunConfig, available_presets


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

    def train(run_cfg: RunConfig, node_configs: list[dict[str, Any]]) -> dict[str, Any]:
        return simulate(run_cfg, len(node_configs), args.num_cpus, args.num_gpus, args.ray_address,
                        node_configs=node_configs)

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


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """`config`, `audit`, `experiment`, `privacy`, `bench`."""
    cf = sub.add_parser("config", help="list every run-config key with its default, allowed values and help")
    cf.add_argument("--markdown", action="store_true", help="as the Markdown table of the README")
    cf.add_argument("--presets", action="store_true", help="list the packaged presets (simulate --preset NAME)")
    cf.set_defaults(func=_cmd_config)

    au = sub.add_parser("audit", help="train with planted canaries, then measure exposure, MIA and a one-run epsilon lower bound")
    au.add_argument("--num-clients", type=int, default=5, help="data clients (client-level modes add one per canary)")
    add_run_config(au, "the audited run's keys")
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
