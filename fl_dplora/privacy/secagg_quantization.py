"""The integer grid that Flower's SecAgg+ sums on, chosen so that the sum is exact and bounded.

SecAgg+ (flwr.client.mod.secaggplus_mod) clips every coordinate to [-c, c], maps it onto the integers
0..T with stochastic rounding (unseeded NumPy), masks it and sums modulo M. We pick c and T as powers
of two and round each update onto that grid ourselves (with the run's generator) before the mod sees
it: the mod's own rounding is then the identity (every value is an exact multiple of Δ = 2c/T in
float32), so a seeded run stays bit-reproducible and the rounding the analysis needs is ours.

What the plan guarantees, and reports:
- no modular wrap-around: at most `max_clients` values in [0, T] are summed and max_clients·T < M;
- sensitivity: a client's rounded update moves the sum by at most C' = C + √d·Δ (clip C, then each
  of the d coordinates moves by less than Δ); the noise is calibrated to C', not C;
- saturation: with distributed noise a client's noisy coordinate can leave [-c, c] (the mod would
  clip it); c is doubled until the union bound over coordinates, clients and rounds is below
  SATURATION_TARGET. Central noise is added after the sum: nothing can saturate (bound 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MODULUS = 2**32  # Flower's default modulus_range
QUANTIZATION_RANGE = 2**22  # Flower's default quantization_range (T)
SATURATION_TARGET = 1e-12  # per run, for every client and round together


@dataclass(frozen=True)
class SecAggPlan:
    clipping_range: float  # c: every coordinate the mod sees lies in [-c, c]
    quantization_range: int  # T: c maps to T, -c to 0
    modulus_range: int  # M
    max_clients: int  # the most masked vectors summed in one round
    step: float  # Δ = 2c / T
    sensitivity: float  # C' = C + √d·Δ: what one client can move the sum by
    noise_std_per_client: float  # distributed noise: each client's std (0 = central noise)
    saturation_bound: float  # P(any coordinate of any client in any round is clipped by the mod)

    def describe(self) -> dict[str, float | int]:
        return {"secagg_clipping_range": self.clipping_range, "secagg_quantization_range": self.quantization_range,
                "secagg_modulus": self.modulus_range, "secagg_step": self.step,
                "secagg_sensitivity": self.sensitivity, "secagg_saturation_bound": self.saturation_bound,
                "secagg_wraparound_bound": 0.0}


def plan(max_grad_norm: float, dim: int, max_clients: int, rounds: int, noise_multiplier: float = 0.0,
         min_survivors: int = 1) -> SecAggPlan:
    """The grid for updates of L2 norm <= max_grad_norm in `dim` values, summed over at most `max_clients`.

    noise_multiplier > 0 means distributed noise: each client adds N(0, (σC')²/min_survivors) per
    coordinate, so any `min_survivors` replies carry the full σC' between them."""
    if max_clients < 1 or dim < 1:
        raise ValueError("secure aggregation: needs at least one client and one value")
    t = QUANTIZATION_RANGE
    while max_clients * t >= MODULUS:  # the integer sum must stay below the modulus
        t //= 2
    if t < 2**10:
        raise ValueError(f"secure aggregation: {max_clients} clients leave under 2^10 levels per value in a 32-bit sum")
    c = 2.0 ** math.ceil(math.log2(max_grad_norm))
    while True:
        step = 2 * c / t
        sensitivity = max_grad_norm + math.sqrt(dim) * step
        std = noise_multiplier * sensitivity / math.sqrt(min_survivors) if noise_multiplier > 0 else 0.0
        margin = c - sensitivity - step  # |rounded update| <= C'; rounding the noise adds < Δ
        if margin > 0:
            if std == 0.0:
                bound = 0.0
                break
            bound = rounds * max_clients * dim * math.erfc(margin / (std * math.sqrt(2)))
            if bound <= SATURATION_TARGET:
                break
        c *= 2
    return SecAggPlan(c, t, MODULUS, max_clients, step, sensitivity, std, bound)


def round_to_grid(t: torch.Tensor, step: float, generator: torch.Generator | None) -> torch.Tensor:
    """Unbiased stochastic rounding onto step·Z (float32, exact for the powers of two above).

    Hand-written rather than Flower's `quantize`: that one draws from NumPy's global, unseeded state,
    so a seeded run would not repeat; on values already on the grid it changes nothing."""
    scaled = t.detach().double() / step
    low = torch.floor(scaled)
    if generator is None:
        from fl_dplora.privacy.mechanisms import secure_uniform

        u = secure_uniform(scaled.numel()).view(scaled.shape)
    else:
        u = torch.rand(scaled.shape, generator=generator, dtype=torch.float64)
    return ((low + (u < scaled - low).double()) * step).to(torch.float32)


def refusal_probability(population: int, fraction: float, needed: int, dropout: float = 0.0) -> float:
    """P(fewer than `needed` of the other population - 1 clients are sampled and survive) in one round.

    Each other client is Poisson-sampled with `fraction` and, once sampled, gets through every SecAgg+
    stage with probability 1 - `dropout`, independently of the data. This event does not depend on the
    protected client, and outside it the run and its neighbour without that client both release the
    accounted sum; inside it the neighbour is refused whatever the client does. So it is the chance per
    round that a refusal can tell the two apart (1.0: the neighbour is refused every round)."""
    others = max(0, population - 1)
    p = fraction * (1.0 - dropout)
    return min(1.0, float(sum(math.comb(others, k) * p**k * (1 - p) ** (others - k)
                              for k in range(min(needed, others + 1)))))
