"""One object per dp-mode: what it protects, against whom, how it calibrates, transforms, aggregates,
accounts and what it releases, one module per mode (the pattern of Opacus' accountant registry).

The ClientApp, the strategy and the ServerApp ask the run's mode (`for_config(cfg)`) instead of
branching on the `dp-mode` string; a new mode is one new module with its class, registered in
`MODES` below, plus its tests.
"""

from __future__ import annotations

from fl_dplora.config import RunConfig
from fl_dplora.privacy.modes.base import DPMode, Update
from fl_dplora.privacy.modes.client import ClientDP
from fl_dplora.privacy.modes.none import NoDP
from fl_dplora.privacy.modes.paper import PaperDP
from fl_dplora.privacy.modes.sample import ExampleDP

__all__ = ["MODES", "ClientDP", "DPMode", "ExampleDP", "NoDP", "PaperDP", "Update", "client_level_modes", "for_config"]

# dp-mode name -> class (as Opacus maps a mechanism name to its accountant); `client_level_modes` keeps this order
MODES: dict[str, type[DPMode]] = {cls.name: cls for cls in (NoDP, ExampleDP, ClientDP, PaperDP)}


def for_config(cfg: RunConfig) -> DPMode:
    """The run's dp-mode object (the ServerApp builds it once per run: server/start.py)."""
    return MODES[cfg.privacy.dp_mode](cfg)


def client_level_modes() -> tuple[str, ...]:
    return tuple(name for name, cls in MODES.items() if cls.client_level)
