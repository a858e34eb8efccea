"""The base every dp-mode extends: the hooks the ClientApp, the strategy and the ServerApp call
(calibration, the client's transform, the server's screening and aggregation, what is described),
with the defaults of a mode that protects nothing, and the SecAgg+ steps every mode shares (a node
hands its update to the secure sum the same way whatever the mode; only the noise differs).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from fl_dplora.privacy.mechanisms import clip_to_norm, gaussian_like
from fl_dplora.privacy.secagg_quantization import SecAggPlan, plan, refusal_probability, round_to_grid

Update = dict[str, torch.Tensor]


class DPMode:
    name: ClassVar[str] = ""
    unit: ClassVar[str | None] = None  # the protected unit: "example", "client" or None
    trusted: ClassVar[str] = ""  # who must be trusted for the stated ε
    example_level: ClassVar[bool] = False  # clients run DP-SGD and keep per-example ledgers
    client_level: ClassVar[bool] = False  # the server samples clients (Poisson) and keeps the ledger
    local_noise: ClassVar[bool] = False  # each client noises its own update before it leaves
    releases_raw_counts: ClassVar[bool] = False  # replies may carry shard sizes and losses

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        self.cfg = cfg
        self.c = float(cfg["max-grad-norm"])
        # secure aggregation (Flower's SecAgg+): the server unmasks only the sum of the round's updates
        self.secure = bool(cfg.get("secure-aggregation", False))
        self.distributed_noise = self.secure and cfg.get("client-noise") == "distributed"

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
        return delta

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

    # ------------------------------------------------------------ secure aggregation
    def secagg_threshold(self) -> int:
        """Flower's reconstruction threshold: the fewest surviving clients whose masked updates can
        be unmasked (and, with distributed noise, the fewest whose noise shares make the full σC')."""
        if int(self.cfg["secagg-threshold"]) > 0:
            return int(self.cfg["secagg-threshold"])
        expected = float(self.cfg["fraction-train"]) * int(self.cfg["population"])
        return max(2, math.ceil(2 * expected / 3))

    def secagg_needed(self) -> int:
        """The fewest sampled clients that survive every SecAgg+ stage with which a round is unmasked:
        the threshold, and `min-available` (the strategy refuses a round below either)."""
        return max(2, self.secagg_threshold(), int(self.cfg["min-available"]))

    def secagg_refusal_probability(self) -> float:
        """Per round: P(the other population - 1 clients alone fall short of `secagg_needed`), each
        sampled with fraction-train and surviving with 1 - secagg-dropout-rate (secagg_quantization)."""
        return refusal_probability(int(self.cfg["population"]), float(self.cfg["fraction-train"]), self.secagg_needed(),
                                   float(self.cfg.get("secagg-dropout-rate", 0.0)))

    def secagg_plan(self, dim: int, sigma: float) -> SecAggPlan:
        """The SecAgg+ grid for updates of `dim` values (secagg_quantization.py), public config only."""
        return plan(self.c, dim, int(self.cfg["population"]), int(self.cfg["num-server-rounds"]),
                    sigma if self.distributed_noise else 0.0, self.secagg_threshold())

    def secagg_setup_refusal(self, setup: Mapping[str, Any] | None, dim: int, sigma: float) -> str:
        """Why a node will not hand its update to this SecAgg+ round ("" = it will), from what its
        SecAgg+ mod was set up with (`setup`: the mod's state; None: the message did not come through
        the mod, so the update would leave unmasked). A distributed noise share is σC'/√t for the run's
        public threshold t: the mod must refuse to take part in unmasking fewer than t clients (else a
        server that sends a larger t in the config than it runs the protocol with gets a sum with less
        than σC'), and quantize on the grid this node computes from the run's config."""
        if not setup or not int(setup.get("threshold", 0)):
            return "secure-aggregation: this train message does not come through SecAgg+; the update would leave unmasked"
        t = self.secagg_threshold()
        if int(setup["threshold"]) < t:
            return (f"secure-aggregation: the SecAgg+ reconstruction threshold {int(setup['threshold'])} is below the "
                    f"run's secagg-threshold {t}, which this node's noise share is computed from")
        grid = self.secagg_plan(dim, sigma)
        theirs = (float(setup.get("clipping_range", 0.0)), int(setup.get("target_range", 0)), int(setup.get("mod_range", 0)))
        mine = (grid.clipping_range, grid.quantization_range, grid.modulus_range)
        if theirs != mine:
            return (f"secure-aggregation: the SecAgg+ grid (clipping, quantization, modulus) {theirs} is not this "
                    f"node's {mine} for the run's config")
        return ""

    def secure_update(self, delta: Update, sigma: float, generator: torch.Generator | None) -> Update:
        """What a client hands to SecAgg+: its update clipped to C here (the server never sees it to
        clip), rounded onto the grid, plus (distributed noise) its share N(0, (σC')²/threshold)."""
        keys = list(delta)
        clipped = dict(zip(keys, clip_to_norm([delta[k] for k in keys], self.c)[0]))
        grid = self.secagg_plan(sum(t.numel() for t in clipped.values()), sigma)
        out = {}
        for k, t in clipped.items():
            v = round_to_grid(t, grid.step, generator)
            if grid.noise_std_per_client > 0:  # rounding the noise separately keeps it independent of the data
                v = v + round_to_grid(gaussian_like(t.double(), grid.noise_std_per_client, generator), grid.step, generator)
            out[k] = v
        return out

    def secagg_describe(self, dim: int, sigma: float, epsilon: float) -> dict[str, Any]:
        """Public facts of the secure sum for the privacy block: grid, bounds, what δ does not cover."""
        out: dict[str, Any] = {"threshold": self.secagg_threshold(), "shares": int(self.cfg["secagg-shares"]) or "all sampled",
                               **self.secagg_plan(dim, sigma).describe()}
        if self.unit == "client":
            out["needed"] = self.secagg_needed()
            out["dropout_rate"] = float(self.cfg.get("secagg-dropout-rate", 0.0))
            out["refusal_probability_per_round"] = self.secagg_refusal_probability()
            out["delta_extra"] = self.secagg_delta_extra(sigma, dim, epsilon)
        return out

    def aggregate_secure_sum(self, total: Update | None, survivors: int, sigma: float, dim: int,
                             generator: torch.Generator | None) -> Update | None:
        """The round's step from the unmasked sum of `survivors` updates (None: the round was refused)."""
        if total is None or survivors < 1:
            return None
        return {k: v / survivors for k, v in total.items()}
