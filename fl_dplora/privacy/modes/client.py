"""dp-mode `client`: client-level DP (DP-FedAvg), with central, local or (under SecAgg+)
distributed noise.

A client-level release never lets the number of clients that took part shape it (neighbouring runs
differ by one client): the sum of updates is divided by the public expected count
`fraction-train x population`, and its noise has the same variance whatever the number m of good
replies (central: one draw of σC on the sum; local: each client's σC plus the server's top-up to the
variance of the full population, so σ²C²·population whatever m).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from fl_dplora.config import RunConfig
from fl_dplora.privacy.mechanisms import clip_to_norm, gaussian_like, global_norm
from fl_dplora.privacy.modes.base import DPMode, Update
from fl_dplora.privacy.modes.placement import CENTRAL, DISTRIBUTED, LOCAL, NoisePlacement


class ClientDP(DPMode):
    """DP-FedAvg: Poisson client sampling with q = fraction-train, each update clipped to C,
    Gaussian noise σC on the sum, divided by q x population. Central noise: the server clips (it does
    not trust the client's clipping) and adds the noise, so it must be trusted with every update.
    Local noise: each client clips and adds σC itself; the server only validates (re-clipping a noised
    update would shrink the signal by ~1/(σ√d)) and tops the noise up to the full population's."""

    name = "client"
    unit = "client"
    client_level = True

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        if self.placement.node_shares:
            self.trusted = ("nobody for each update (the server unmasks only the sum, whose noise any "
                            "threshold clients supply); the server for participation")
        elif self.secagg is not None:
            self.trusted = "the server for the noise on the sum (it never sees a single update)"
        else:
            self.trusted = ("nobody for each update (local DP per client); the server for participation"
                            if self.placement.server_sees_noised_updates else "the server (it sees every clipped update)")
        self.population = self.cfg.federation.population
        self.divisor = self.cfg.federation.fraction_train * self.population

    def _placement(self, cfg: RunConfig) -> NoisePlacement:
        """client-noise local: each client; distributed (only under secure aggregation): shares; else central."""
        if cfg.privacy.client_noise == "local":
            return LOCAL
        return DISTRIBUTED if cfg.secagg.enabled and cfg.privacy.client_noise == "distributed" else CENTRAL

    # sensitivity of one client's contribution in units of C (its clipped parts), for the accountant
    def _sensitivity(self) -> float:
        return 1.0

    def noise_multipliers(self) -> tuple[float, float]:
        from fl_dplora.privacy.engine import PrivacyEngine

        cfg, factor = self.cfg, self._sensitivity()
        if cfg.privacy.noise_multiplier > 0:
            sigma = cfg.privacy.noise_multiplier
        else:  # every round of the run at q = fraction-train (Poisson client sampling)
            sigma = factor * PrivacyEngine.for_run(cfg.privacy).calibrate(((cfg.federation.fraction_train,
                                                                            cfg.federation.num_server_rounds),))
        return sigma, sigma / factor

    def remaining_noise_multipliers(self, charged: Sequence[tuple[float, float, int]], rounds_left: int,
                                    keep: float | None = None) -> tuple[float, float] | None:
        """(σ applied, σ accounted) for the last `rounds_left` rounds after a resume whose charges (`charged`,
        a crashed attempt too) exceed the rounds done: all fit the target, at no less than the plan's ε; `keep`
        (the σ last charged) stays while they fit at it, so node and server keep the σ chosen at the resume.
        Distributed noise: the server announces one σ for every share and the SecAgg+ grid (run_state.resume,
        node_privacy.share_sigma). None: σ stays (fixed, or nothing left)."""
        from fl_dplora.config import ConfigError
        from fl_dplora.privacy.accounting import PrivacyLedger
        from fl_dplora.privacy.engine import PrivacyEngine
        cfg, factor, q = self.cfg, self._sensitivity(), self.cfg.federation.fraction_train
        if cfg.privacy.noise_multiplier > 0 or rounds_left < 1:
            return None
        engine = PrivacyEngine.for_run(cfg.privacy)
        # `keep` fits: ε exactly within the target (no tolerance: σ stays only where it provably fits)
        if keep is not None and engine.epsilon(PrivacyLedger([*charged, (keep, q, rounds_left)])) <= engine.target_epsilon:
            return factor * keep, keep
        plan = engine.plan_epsilon(self.noise_multipliers()[1], ((q, cfg.federation.num_server_rounds),))
        try:
            sigma = engine.calibrate_remaining(charged, ((q, int(rounds_left)),), at_least=plan)
        except ConfigError:
            return None
        return factor * sigma, sigma

    def remaining_against_server(self, attempts: Sequence[float], rounds_left: int,
                                 keep: float | None = None) -> tuple[float, float] | None:
        """Local or distributed noise after a rerun: (σ applied, σ accounted) for the last `rounds_left`
        rounds such that every attempt (`attempts`' accounted σ's, then these), composed against the server as
        epsilon_against_server does (rate 1, σ/2), stays within the uninterrupted plan's R attempts at the
        config's σ; `keep` while it fits. Composing Gaussians at rate 1 depends only on Σ 1/σ², so the
        order holds at every δ (the node's own too). None: neither, σ fixed, or nothing left."""
        from fl_dplora.config import ConfigError
        from fl_dplora.privacy.engine import PrivacyEngine
        cfg, factor = self.cfg, self._sensitivity()
        if not self.placement.node_noise_faces_server or cfg.privacy.noise_multiplier > 0 or rounds_left < 1:
            return None
        plan = self.epsilon_against_server([self.noise_multipliers()[1]] * cfg.federation.num_server_rounds)
        if keep is not None and self.epsilon_against_server([*attempts, *[keep] * rounds_left]) <= plan:
            return factor * keep, keep
        try:
            # the target is the plan's ε against the server; each attempt composes at rate 1, σ/2
            engine = PrivacyEngine(plan, cfg.privacy.delta, cfg.privacy.accountant)
            half = engine.calibrate_remaining([(float(s) / 2.0, 1.0, 1) for s in attempts], ((1.0, int(rounds_left)),))
        except ConfigError:
            return None
        return factor * 2.0 * half, 2.0 * half

    def round_event(self, accountant_sigma: float) -> tuple[float, float, int]:
        return accountant_sigma, self.cfg.federation.fraction_train, 1

    def _clip(self, delta: Update) -> Update:
        keys = list(delta)
        return dict(zip(keys, clip_to_norm([delta[k] for k in keys], self.max_grad_norm)[0]))

    def client_update(self, delta: Update, sigma: float, generator: torch.Generator | None) -> Update:
        self._not_secure()
        delta = self._clip(delta)  # the raw norm is data-dependent and un-noised: it never leaves
        if self.placement.server_sees_noised_updates:
            delta = {k: v + gaussian_like(v, sigma * self.max_grad_norm, generator) for k, v in delta.items()}
        return delta

    def accept(self, update: Update) -> Update:
        return update if self.placement.server_sees_noised_updates else self._clip(update)

    def _clip_norm(self) -> float:
        return self.max_grad_norm

    def reject_reason(self, update: Update, sigma: float) -> str:
        """Local noise: the server cannot re-clip, but an honest reply's norm is at most the clipping
        norm plus the noise's, whose chi tail beyond sqrt(d) + 10 has probability < 1e-20: a larger
        norm is a client that skipped its clipping, and is dropped whole (a decision on a DP output)."""
        if not self.placement.server_sees_noised_updates:
            return ""
        d = sum(t.numel() for t in update.values())
        limit = self._clip_norm() + sigma * self.max_grad_norm * (math.sqrt(d) + 10.0)
        norm = float(global_norm(list(update.values())))
        return f"update norm {norm:.4g} > {limit:.4g}, more than clipping plus noise allow" if norm > limit else ""

    def drops_outliers(self) -> bool:
        return False  # every reply is bounded (clipped here, or noise of known variance on a clipped update)

    def aggregate(self, updates, weights, zeros, min_replies, sigma, generator):
        m = len(updates)
        if m > self.population:  # the population is declared wrong: its noise top-up cannot hide m
            raise RuntimeError(f"population: {m} good replies in a round but population = {self.population}; "
                               "declare the number of clients in the federation")
        total = {k: z.clone() for k, z in zeros.items()}
        for u in updates:
            for k in total:
                total[k] += u[k]
        # Central: the sum gets one σC draw. Local: the m replies carry σC each; the server adds the
        # noise of the population - m clients that did not reply, so the variance never reveals m.
        # A round with no reply is still noised: the accountant charged it.
        local = self.placement.server_sees_noised_updates
        std = sigma * self.max_grad_norm * (math.sqrt(self.population - m) if local else 1.0)
        own = self.noise_multipliers()[0] if local else sigma
        if own < sigma:  # σ raised by a resume: replies carry the nodes' σ (the config's), topped up to σ too
            std = self.max_grad_norm * math.sqrt(sigma**2 * (self.population - m) + (sigma**2 - own**2) * m)
        for k in total:
            total[k] += gaussian_like(total[k], std, generator)
        return {k: v / self.divisor for k, v in total.items()}

    def secure_step(self, total, survivors, grid, sigma, generator):
        """Central: one draw of σC' on the unmasked sum. Distributed: the survivors' shares carry
        σ²C'²·m/threshold >= σ²C'²; the server tops the variance up to the whole population's, so it
        never reveals m (as with local noise). Either way divided by the public q x population."""
        if survivors > self.population:
            raise RuntimeError(f"population: {survivors} clients summed in a round but population = {self.population}")
        std = (grid.noise_std_per_client * math.sqrt(self.population - survivors) if self.placement.node_shares
               else sigma * grid.sensitivity)
        return {k: (v + gaussian_like(v, std, generator)) / self.divisor for k, v in total.items()}

    def secure_release_terms(self, secagg, dim, sigma, epsilon):
        """A client-level release under SecAgg+ also states when a round is refused (fewer than `needed`
        survive; the neighbour without one client may be refused while the run is not) and the δ that
        costs (SecureAggregation.delta_extra)."""
        return {"needed": secagg.needed(), "dropout_rate": self.cfg.secagg.dropout_rate,
                "refusal_probability_per_round": secagg.refusal_probability(),
                "delta_extra": secagg.delta_extra(sigma, dim, epsilon)}

    def epsilon_against_server(self, accountant_sigmas: Sequence[float], delta: float | None = None) -> float | None:
        """Local noise: each update the server sees is a Gaussian mechanism on its own. Distributed
        noise under secure aggregation: the sum it unmasks carries >= σC' whoever survived. Either way
        the server knows who took part, so a client's data is replaced, not removed: its update moves
        by up to 2x the sensitivity, and there is no amplification by sampling (rate 1) for each round
        the client took part in (σ per round: `accountant_sigmas`; the server's worst case: every round)."""
        if not self.placement.node_noise_faces_server or not accountant_sigmas:
            return None
        from fl_dplora.privacy.accounting import PrivacyLedger

        ledger = PrivacyLedger()
        for sigma in accountant_sigmas:
            ledger.step(float(sigma) / 2.0, 1.0, 1)
        return ledger.epsilon(self.cfg.privacy.delta if delta is None else delta, self.cfg.privacy.accountant)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "population": self.population, "divisor": self.divisor,
                "noise_placement": self.placement.adds_noise, "secure_aggregation": self.secagg is not None}
