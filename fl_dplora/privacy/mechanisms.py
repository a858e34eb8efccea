"""Clipping and Gaussian noise: the two operations every dp-mode is built from.

Noise is drawn from the operating system's CSPRNG by default. A seeded generator is only for
reproducible research runs (`secure-rng = false`): whoever knows the seed can subtract the noise.
"""

from __future__ import annotations

import math
import os

import torch

_TWO_POW_53 = float(2**53)


def secure_standard_normal(numel: int) -> torch.Tensor:
    """N(0, 1) samples (float64) from os.urandom via Box-Muller; uniforms have 53 random bits."""
    pairs = (numel + 1) // 2
    raw = torch.frombuffer(bytearray(os.urandom(16 * pairs)), dtype=torch.int64).view(2, pairs)
    # top 53 bits of each 64-bit word -> uniform in (0, 1]; (x >> 11) of a signed int keeps sign, so mask
    u = ((raw >> 11) & ((1 << 53) - 1)).to(torch.float64).add_(1.0).div_(_TWO_POW_53)
    radius = torch.sqrt(-2.0 * torch.log(u[0]))
    angle = 2.0 * math.pi * u[1]
    z = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])
    return z[:numel]


def secure_uniform(numel: int) -> torch.Tensor:
    """Uniforms in (0, 1] (float64, 53 random bits each) from os.urandom."""
    raw = torch.frombuffer(bytearray(os.urandom(8 * numel)), dtype=torch.int64) if numel else torch.zeros(0, dtype=torch.int64)
    return ((raw >> 11) & ((1 << 53) - 1)).to(torch.float64).add_(1.0).div_(_TWO_POW_53)


SECURE_DRAWS = 4  # as Opacus' secure mode: the mean of 4 draws (x2) blurs the low bits a floating-point attack reads


def gaussian_like(t: torch.Tensor, std: float, generator: torch.Generator | None) -> torch.Tensor:
    """N(0, std^2) noise shaped like `t` (CSPRNG when `generator` is None), drawn and scaled in float64.

    Secure noise sums SECURE_DRAWS standard normals and divides by sqrt(SECURE_DRAWS) (Opacus'
    `_generate_noise` in secure mode does the same with 4 draws): a single Box-Muller value rounded
    to float leaves gaps an attacker can use (Mironov 2012); the sum's distribution has none at the
    resolution of the float32 result. Residual risk (docs/privacy.md): this is a mitigation, not
    the exact discrete sampling of a proven-secure implementation."""
    if std == 0.0:
        return torch.zeros_like(t)
    if generator is None:
        z = secure_standard_normal(SECURE_DRAWS * t.numel()).view(SECURE_DRAWS, *t.shape).sum(0) / math.sqrt(SECURE_DRAWS)
    else:
        z = torch.randn(t.shape, generator=generator, dtype=torch.float64, device=generator.device)
    return (z * std).to(device=t.device, dtype=t.dtype)


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum((t.detach().double() ** 2).sum() for t in tensors))


def clip_to_norm(tensors: list[torch.Tensor], max_grad_norm: float) -> tuple[list[torch.Tensor], float]:
    """Scale the tensors jointly so that their L2 norm is at most `max_grad_norm`; return (tensors, norm)."""
    norm = float(global_norm(tensors))
    factor = min(1.0, max_grad_norm / (norm + 1e-12))
    return [t * factor for t in tensors], norm


def make_generator(seed: int | None, *parts: int) -> torch.Generator | None:
    """A seeded torch generator for reproducible runs, or None (CSPRNG) when seed is None."""
    if seed is None:
        return None
    mixed = hash((seed, *parts)) & 0x7FFF_FFFF_FFFF_FFFF  # ints hash deterministically in CPython
    return torch.Generator().manual_seed(mixed)
