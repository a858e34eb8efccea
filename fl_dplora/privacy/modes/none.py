"""dp-mode `none`: plain FedAvg, nothing protected (the baseline every DP run is compared with)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fl_dplora.privacy.modes.base import DPMode, Update


class NoDP(DPMode):
    """FedAvg weighted by each client's example count; nothing is protected."""

    name = "none"
    trusted = "everyone (no DP)"
    releases_raw_counts = True

    def reply_weight(self, metrics: Mapping[str, Any]) -> float:
        return float(metrics.get("num-examples", 1))

    def client_update(self, delta: Update, sigma: float, generator: torch.Generator | None) -> Update:
        # secure aggregation: a uniform mean of updates clipped to C (the grid needs a bound)
        return self.secure_update(delta, 0.0, generator) if self.secure else delta
