"""Secure aggregation (Flower's SecAgg+) as a wrapper around a dp-mode: `mode.secagg` when the run
has secure-aggregation = true, None otherwise. A node hands its update to the secure sum the same way
whatever the mode; what is the mode's own is asked of it through small hooks:

- `mode.placement.node_shares`: each node adds a share of the noise (distributed noise), on the grid;
- `mode.secure_step(total, survivors, grid, sigma, generator)`: how the unmasked sum becomes the round's step;
- `mode.secure_release_terms(secagg, dim, sigma, epsilon)`: what the privacy block adds for the mode's unit
  (client level: the refusal odds and the δ they cost).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from fl_dplora.privacy.mechanisms import clip_to_norm, gaussian_like
from fl_dplora.privacy.secagg_quantization import SecAggPlan, plan, refusal_probability, round_to_grid

Update = dict[str, torch.Tensor]


class SecureAggregation:
    """The SecAgg+ steps of one run around its dp-mode: the threshold, the grid, a node's masked-to-be
    update and its refusals, the server's step from the unmasked sum, and what δ does not cover."""

    def __init__(self, mode: Any) -> None:  # the DPMode it wraps (base.py imports this module, not the reverse)
        self.mode = mode
        self.cfg = mode.cfg
        self.max_grad_norm = mode.max_grad_norm

    def threshold(self) -> int:
        """Flower's reconstruction threshold: the fewest surviving clients whose masked updates can
        be unmasked (and, with distributed noise, the fewest whose noise shares make the full σC')."""
        if self.cfg.secagg.threshold > 0:
            return self.cfg.secagg.threshold
        expected = self.cfg.federation.fraction_train * self.cfg.federation.population
        return max(2, math.ceil(2 * expected / 3))

    def needed(self) -> int:
        """The fewest sampled clients that survive every SecAgg+ stage with which a round is unmasked:
        the threshold, and `min-available` (the strategy refuses a round below either)."""
        return max(2, self.threshold(), self.cfg.federation.min_available)

    def refusal_probability(self) -> float:
        """Per round: P(the other population - 1 clients alone fall short of `needed`), each sampled
        with fraction-train and surviving with 1 - secagg-dropout-rate (secagg_quantization)."""
        return refusal_probability(self.cfg.federation.population, self.cfg.federation.fraction_train, self.needed(),
                                   self.cfg.secagg.dropout_rate)

    def plan(self, dim: int, sigma: float) -> SecAggPlan:
        """The SecAgg+ grid for updates of `dim` values (secagg_quantization.py), public config only."""
        return plan(self.max_grad_norm, dim, self.cfg.federation.population, self.cfg.federation.num_server_rounds,
                    sigma if self.mode.placement.node_shares else 0.0, self.threshold())

    def setup_refusal(self, setup: Mapping[str, Any] | None, dim: int, sigma: float) -> str:
        """Why a node will not hand its update to this SecAgg+ round ("" = it will), from what its
        SecAgg+ mod was set up with (`setup`: the mod's state; None: the message did not come through
        the mod, so the update would leave unmasked). A distributed noise share is σC'/√t for the run's
        public threshold t: the mod must refuse to take part in unmasking fewer than t clients (else a
        server that sends a larger t in the config than it runs the protocol with gets a sum with less
        than σC'), and quantize on the grid this node computes from the run's config."""
        if not setup or not int(setup.get("threshold", 0)):
            return "secure-aggregation: this train message does not come through SecAgg+; the update would leave unmasked"
        t = self.threshold()
        if int(setup["threshold"]) < t:
            return (f"secure-aggregation: the SecAgg+ reconstruction threshold {int(setup['threshold'])} is below the "
                    f"run's secagg-threshold {t}, which this node's noise share is computed from")
        grid = self.plan(dim, sigma)
        theirs = (float(setup.get("clipping_range", 0.0)), int(setup.get("target_range", 0)), int(setup.get("mod_range", 0)))
        mine = (grid.clipping_range, grid.quantization_range, grid.modulus_range)
        if theirs != mine:
            return (f"secure-aggregation: the SecAgg+ grid (clipping, quantization, modulus) {theirs} is not this "
                    f"node's {mine} for the run's config")
        return ""

    def client_update(self, delta: Update, sigma: float, generator: torch.Generator | None) -> Update:
        """What a client hands to SecAgg+ instead of the mode's `client_update`: its update clipped to C
        here (the server never sees it to clip), rounded onto the grid, plus (distributed noise) its
        share N(0, (σC')²/threshold)."""
        keys = list(delta)
        clipped = dict(zip(keys, clip_to_norm([delta[k] for k in keys], self.max_grad_norm)[0]))
        grid = self.plan(sum(t.numel() for t in clipped.values()), sigma)
        out = {}
        for k, t in clipped.items():
            v = round_to_grid(t, grid.step, generator)
            if grid.noise_std_per_client > 0:  # rounding the noise separately keeps it independent of the data
                v = v + round_to_grid(gaussian_like(t.double(), grid.noise_std_per_client, generator), grid.step, generator)
            out[k] = v
        return out

    def aggregate(self, total: Update | None, survivors: int, sigma: float, dim: int,
                  generator: torch.Generator | None) -> Update | None:
        """The round's step from the unmasked sum of `survivors` updates (None: the round was refused)."""
        if total is None:
            return None
        return self.mode.secure_step(total, survivors, self.plan(dim, sigma), sigma, generator)

    def describe(self, dim: int, sigma: float, epsilon: float) -> dict[str, Any]:
        """Public facts of the secure sum for the privacy block: grid, bounds, what δ does not cover."""
        out: dict[str, Any] = {"threshold": self.threshold(), "shares": self.cfg.secagg.shares or "all sampled",
                               **self.plan(dim, sigma).describe()}
        out.update(self.mode.secure_release_terms(self, dim, sigma, epsilon))
        return out

    def delta_extra(self, sigma: float, dim: int | None, epsilon: float) -> float:
        """What the stated δ does not cover: rounds in which the neighbour without one client can be
        refused while the run is not (fewer than max(threshold, min-available) of the other clients
        sampled and surviving a declared secagg-dropout-rate), and the mod clipping a noisy coordinate,
        each a departure from the accounted mechanism with the probability below; (1 + e^ε)·P is added
        to δ (docs/privacy.md). A certain refusal makes it >= 1: check_delta refuses the run."""
        rounds = self.cfg.federation.num_server_rounds
        p = rounds * self.refusal_probability()
        p += self.plan(dim, sigma).saturation_bound if dim else 0.0  # dim None: refusals only
        return (1 + math.exp(epsilon)) * p

    def check_delta(self, sigma: float, dim: int | None) -> None:
        """Refuse a secure-aggregation run whose refused rounds or saturated coordinates could matter
        next to δ (more than 1 % of it, at the target ε), in one line naming the keys to change
        (dim None: the refusals alone, which need no model; `simulate` checks them before Ray starts)."""
        from fl_dplora.config import ConfigError

        if self.delta_extra(sigma, dim, self.cfg.privacy.target_epsilon) <= 0.01 * self.cfg.privacy.delta:
            return
        t, m, needed = self.threshold(), self.cfg.federation.min_available, self.needed()
        q, d, p = self.cfg.federation.fraction_train, self.cfg.secagg.dropout_rate, self.refusal_probability()
        population = self.cfg.federation.population
        if needed > population - 1:
            raise ConfigError(f"secure-aggregation: a round is refused when fewer than {needed} clients (max of secagg-threshold "
                              f"{t}, min-available {m}) get through it, so a dataset without one of the {population} "
                              f"clients is refused every round and membership is exposed; " + (
                                  f"lower min-available or secagg-threshold to at most {population - 1}"
                                  if population >= 3 else "set population >= 3 (client-level DP needs a neighbour of >= 2)"))
        if p > 0:
            raise ConfigError(f"secure-aggregation: a round is refused when fewer than {needed} clients (max of secagg-threshold "
                              f"{t}, min-available {m}) are sampled and survive (probability {p:.3g} per round for the other "
                              f"{population - 1} at fraction-train {q:g}, secagg-dropout-rate {d:g}), more than 1% of "
                              f"delta {self.cfg.privacy.delta:g} over the run; raise fraction-train or lower secagg-threshold, "
                              "min-available or secagg-dropout-rate")
        raise ConfigError(f"secure-aggregation: the noisy shares may saturate the SecAgg+ clipping range more often than 1% of "
                          f"delta {self.cfg.privacy.delta:g} at target-epsilon {self.cfg.privacy.target_epsilon:g}; lower target-epsilon")
