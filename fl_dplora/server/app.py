"""The Flower ServerApp (`fl_dplora.server.app:app` in pyproject.toml): the run config is validated
once here, and the resolved config is what every later step reads."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fl_dplora.config import ConfigError, resolve
from fl_dplora.server.loop import run_server

log = logging.getLogger("fl_dplora")


def build_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose config is Flower's run config with `overrides` on top (for fl-dplora simulate)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        if not log.handlers:  # under `flwr run` nobody configured our logger: use Flower's console
            from flwr.supercore.logger import FLOWER_LOGGER

            log.handlers[:] = FLOWER_LOGGER.handlers
            log.setLevel(logging.INFO)
            log.propagate = False
        from fl_dplora.console import one_line_config_errors, report_config_error

        one_line_config_errors()
        try:
            run_server(grid, resolve(overrides, base=dict(context.run_config)))
        except ConfigError as exc:  # bad input: its lines, no traceback; the run still fails
            report_config_error(log, exc)
            raise

    return server


app = build_server_app()
