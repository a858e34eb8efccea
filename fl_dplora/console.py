"""What a user sees on the console, in one place: other libraries' warnings that we know to be
harmless are dropped, and a config error inside the ServerApp is one line.

Known harmless (each checked; fl_dplora/__init__.py installs the filters, so every process that
loads the app has them: the CLI, Flower's ServerApp/ClientApp processes and Ray's actors):
- Flower's "`run_simulation` is deprecated": `fl-dplora simulate` uses it on purpose (the same
  ServerApp/ClientApp as `flwr run`, in this process);
- Flower's "fraction_evaluate is set to 0.0": federated evaluation is off by default here
  (fraction-evaluate), the server evaluates centrally;
- Flower's "Manually terminating ClientAppActor": the engine stopping its actors at the end;
- transformers' FutureWarning on `is_gradient_checkpointing`: PEFT reads the old name when it wraps
  a model (every run, evaluate, predict, export);
- Ray's FutureWarning about overriding CUDA_VISIBLE_DEVICES for num_gpus=0 actors: we rely on
  today's behaviour (a CPU client sees no GPU), so the variable that silences it by changing it is
  not set.

Under `flwr run` (and the simulation engine) Flower logs any exception that leaves the ServerApp
with its traceback, ~30 lines for a typo in a run-config value. The ServerApp logs the error's
lines itself (`fl-dplora: error: ...`) and re-raises, so the run still ends `finished:failed` with
a non-zero exit of Flower's app process; the filter below drops Flower's records about that one
exception, and nothing else.
"""

from __future__ import annotations

import logging
import warnings

from fl_dplora.config import ConfigError

def stderr_handler() -> logging.Handler:
    """Our log lines on stderr (`12:00:00 INFO ...`): the CLI's and a Ray actor's alike."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    return handler


_FLOWER_NOISE = ("The `run_simulation` function is deprecated", "fraction_evaluate is set to 0.0",
                 "Manually terminating ClientAppActor")
_WARNINGS = ((FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
             (FutureWarning, r"Tip: In future versions of Ray, Ray will no longer override accelerator"))


class _DropKnownNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except (TypeError, ValueError):
            return True
        return not any(noise in text for noise in _FLOWER_NOISE)


def quiet_known_warnings() -> None:
    """Drop the known-harmless warnings listed above (idempotent)."""
    for category, message in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    flwr_logger = logging.getLogger("flwr")
    if not any(isinstance(f, _DropKnownNoise) for f in flwr_logger.filters):
        flwr_logger.addFilter(_DropKnownNoise())


def _carries_config_error(record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    seen = set()
    while exc is not None and id(exc) not in seen:  # Flower wraps it: RuntimeError(...) from ConfigError
        if isinstance(exc, ConfigError):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    args = record.args if isinstance(record.args, tuple) else ()
    if any(isinstance(a, ConfigError) for a in args):  # "An exception occurred !! %s"
        return True
    return "fl_dplora.config.ConfigError" in str(record.msg)  # a traceback.format_exc() logged as text


class _DropConfigErrorTracebacks(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _carries_config_error(record)


def one_line_config_errors() -> None:
    """Install the filter on Flower's logger (idempotent)."""
    flwr_logger = logging.getLogger("flwr")
    if not any(isinstance(f, _DropConfigErrorTracebacks) for f in flwr_logger.filters):
        flwr_logger.addFilter(_DropConfigErrorTracebacks())


def report_config_error(log: logging.Logger, exc: ConfigError) -> None:
    """One line per problem, the same words `fl-dplora` prints."""
    for line in str(exc).splitlines():
        log.error("fl-dplora: error: %s", line)
