"""`fl-dplora` command line: simulate, privacy, and the tools the issues add.

Bad input ends with one readable line on stderr and exit code 2, never a traceback wall.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from fl_dplora.cli import model, run, tools
from fl_dplora.cli.model import evaluate_adapter, predict_texts
from fl_dplora.cli.run import as_overrides, prepare_config, simulate, simulate_run
from fl_dplora.config import ConfigError
from fl_dplora.console import stderr_handler

__all__ = ["as_overrides", "build_parser", "evaluate_adapter", "main", "predict_texts", "prepare_config",
           "setup_logging", "simulate", "simulate_run"]


def _fail(msg: str, code: int = 2) -> int:
    for line in str(msg).splitlines():
        print(f"fl-dplora: error: {line}", file=sys.stderr)
    return code


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fl-dplora", description="Federated DP-LoRA fine-tuning on Flower")
    p.add_argument("-v", "--verbose", action="store_true", help="debug log; an unexpected error shows its traceback")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    run.add_parsers(sub)  # simulate
    model.add_parsers(sub)  # evaluate, predict, export
    tools.add_parsers(sub)  # config, audit, experiment, privacy, bench
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
    ours = logging.getLogger("fl_dplora")
    ours.handlers[:] = [stderr_handler()]
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

