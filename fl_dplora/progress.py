"""The server's rounds bar: rounds done of the run, elapsed time and ETA, the last ε and evaluation.

Shown on a terminal only. FL_DPLORA_PROGRESS=0 hides it, =1 shows it anywhere (`make run` sets it;
it also turns on the clients' local-step bars, clients/local_update.py); unset, it shows when
stderr is a terminal and the CI variable is not set, so logs, pipes, `flwr run`'s streamed log and
CI stay free of carriage-return lines. While it is shown, our log lines and Flower's are printed
above it (tqdm.write) instead of through it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from typing import IO, Any

ENV = "FL_DPLORA_PROGRESS"
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"


def enabled(stream: IO[str] | None = None) -> bool:
    """Whether a progress bar belongs on `stream` (default: stderr)."""
    flag = os.environ.get(ENV, "").strip()
    if flag in ("0", "false", "no", "off"):
        return False
    if flag in ("1", "true", "yes", "on"):
        return True
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false"):
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a real stream
        return False


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


@contextlib.contextmanager
def rounds_bar(total: int, done: int = 0, stream: IO[str] | None = None,
               loggers: tuple[str, ...] = ("fl_dplora", "flwr")) -> Iterator[Any]:
    """A bar over rounds `done+1..total` (update(1) per finished round), or a no-op one off a terminal."""
    stream = sys.stderr if stream is None else stream
    if not enabled(stream):
        yield _NoBar()
        return
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    bar = tqdm(total=total, initial=done, desc="rounds", unit="round", file=stream, bar_format=BAR_FORMAT,
               dynamic_ncols=True, mininterval=0, smoothing=0.3)
    try:
        with logging_redirect_tqdm(loggers=[logging.getLogger(name) for name in loggers], tqdm_class=tqdm):
            yield bar
    finally:
        bar.close()


def postfix(row: Mapping[str, Any]) -> str:
    """The bar's tail for a metrics.jsonl row: ε and the evaluation the run reports."""
    parts = []
    if row.get("epsilon") is not None:
        parts.append(f"eps={row['epsilon']:.3g}")
    if row.get("eval_loss") is not None:
        parts.append(f"loss={row['eval_loss']:.4f}")
    if row.get("eval_accuracy") is not None:
        parts.append(f"acc={row['eval_accuracy']:.3f}")
    if row.get("eval_bleu") is not None:
        parts.append(f"bleu={row['eval_bleu']:.2f}")
    return " ".join(parts)


class RoundsProgress:
    """`for rnd in RoundsProgress(first, total)`: the rounds first..total, a bar over them on a terminal.
    A round counts as done when the loop asks for the next one; `show(row)` puts its ε and scores on
    the bar. Leaving the loop (break, return, an exception) closes the bar and restores the log handlers."""

    def __init__(self, first: int, total: int, stream: IO[str] | None = None):
        self.first, self.total, self.stream = int(first), int(total), stream
        self.bar: Any = _NoBar()

    def __iter__(self) -> Iterator[int]:
        with rounds_bar(self.total, self.first - 1, self.stream) as bar:
            self.bar = bar
            try:
                for rnd in range(self.first, self.total + 1):
                    yield rnd
                    bar.update(1)
            finally:
                self.bar = _NoBar()

    def show(self, row: Mapping[str, Any]) -> None:
        self.bar.set_postfix_str(postfix(row))
