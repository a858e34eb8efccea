"""dp-mode `none`: plain FedAvg, nothing protected (the baseline every DP run is compared with).
Under secure aggregation (secure.py) it is a uniform mean of updates clipped to C (the grid needs a bound)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fl_dplora.privacy.modes.base import DPMode


class NoDP(DPMode):
    """FedAvg weighted by each client's example count; nothing is protected."""

    name = "none"
    trusted = "everyone (no DP)"
    releases_raw_counts = True

    def reply_weight(self, metrics: Mapping[str, Any]) -> float:
        return float(metrics.get("num-examples", 1))
