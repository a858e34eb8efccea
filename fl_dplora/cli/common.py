"""What every command group of the command line shares."""

from __future__ import annotations

import argparse


def add_run_config(parser: argparse.ArgumentParser, what: str) -> None:
    # Flower's semantics: key=value pairs or a TOML file; append, so a second one never drops the first
    parser.add_argument("--run-config", action="append", default=None, metavar="KEY=VALUE...|FILE.toml",
                        help=f"run-config keys, {what}; or a TOML file of key = value; repeatable, later wins")
