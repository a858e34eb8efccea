"""The base every dp-mode extends: the hooks the ClientApp, the strategy and the ServerApp call
(calibration, the client's transform, the server's screening and aggregation, what is described),
with the defaults of a mode that protects nothing; where the noise on an update goes (`placement`,
placement.py), and, under secure aggregation, the SecAgg+ wrapper around the mode (`secagg`,
secure.py) with the two hooks it asks of the mode (`secure_step`, `secure_release_terms`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from fl_dplora.config import RunConfig
from fl_dplora.privacy.modes.placement import NONE, NoisePlacement
from fl_dplora.privacy.modes.secure import SecureAggregation
from fl_dplora.privacy.secagg_quantization import SecAggPlan

Update = dict[str, torch.Tensor]


class DPMode:
    name: ClassVar[str] = ""
    unit: ClassVar[str | None] = None  # the protected unit: "example", "client" or None
    trusted: ClassVar[str] = ""  # who must be trusted for the stated ε
    example_level: ClassVar[bool] = False  # clients run DP-SGD and keep per-example ledgers
    client_level: ClassVar[bool] = False  # the server samples clients (Poisson) and keeps the ledger
    releases_raw_counts: ClassVar[bool] = False  # replies may carry shard sizes and losses

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.max_grad_norm = cfg.privacy.max_grad_norm
        self.placement = self._placement(cfg)
        # secure aggregation (Flower's SecAgg+): the server unmasks only the sum of the round's updates
        self.secagg = SecureAggregation(self) if cfg.secagg.enabled else None

    def _placement(self, cfg: RunConfig) -> NoisePlacement:
        """Where the noise on a client's update is added (placement.py); none for a mode without it."""
        return NONE

    # ------------------------------------------------------------ calibration and accounting
    def noise_multipliers(self) -> tuple[float, float]:
        """(σ applied to the noise std σC, σ the accountant sees); client-level modes only."""
        return 0.0, 0.0

    def round_event(self, accountant_sigma: float) -> tuple[float, float, int] | None:
        """The server ledger's (σ, q, steps) event for one round, charged before the round is sent."""
        return None

    # ------------------------------------------------------------ client side
    def client_update(self, delta: Update, sigma: float, generator: torch.Generator | None) -> Update:
        """What the client sends instead of its raw update (clipped and/or noised)."""
        self._not_secure()
        return delta

    def _not_secure(self) -> None:
        """Under secure aggregation a node's update goes to `self.secagg.client_update` (clipped, on the
        grid, with its noise share): the plain path would hand it over without them."""
        if self.secagg is not None:
            raise RuntimeError("secure-aggregation: a node's update goes through mode.secagg.client_update")

    def reply_weight(self, metrics: Mapping[str, Any]) -> float:
        return 1.0

    # ------------------------------------------------------------ server side
    def accept(self, update: Update) -> Update:
        """The server's transform of one validated reply."""
        return update

    def reject_reason(self, update: Update, sigma: float) -> str:
        """Why a well-formed reply cannot come from an honest client of this mode ("" = it can)."""
        return ""

    def drops_outliers(self) -> bool:
        """Replies without a bound the server enforces are screened by norm against the round median."""
        return True

    def aggregate(self, updates: Sequence[Update], weights: Sequence[float], zeros: Update, min_replies: int,
                  sigma: float, generator: torch.Generator | None) -> Update | None:
        """The round's step for the global adapter, or None (too few good replies: keep the global)."""
        if len(updates) < max(1, min_replies):
            return None
        total = sum(weights)
        return {k: sum(w * u[k] for w, u in zip(weights, updates)) / total for k in zeros}

    def describe(self) -> dict[str, Any]:
        return {"mode": self.name, "unit": self.unit, "trusted": self.trusted}

    def reference_note(self) -> str:
        return ""

    # ------------------------------------------------------------ under secure aggregation (secure.py)
    def secure_step(self, total: Update, survivors: int, grid: SecAggPlan, sigma: float,
                    generator: torch.Generator | None) -> Update | None:
        """The round's step from the unmasked sum of `survivors` updates on `grid` (None: keep the global)."""
        if survivors < 1:
            return None
        return {k: v / survivors for k, v in total.items()}

    def secure_release_terms(self, secagg: SecureAggregation, dim: int, sigma: float, epsilon: float) -> dict[str, Any]:
        """What the privacy block's secure_aggregation adds for this mode's unit (nothing to account: none)."""
        return {}
