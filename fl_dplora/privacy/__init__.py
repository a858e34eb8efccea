"""Differential privacy: accounting (`accounting`), noise/clipping (`mechanisms`), per-sample grads.

Kept import-free so `fl_dplora.privacy.mechanisms` does not pull in Opacus' accountants;
import from the submodules. `epsilon` and `noise_multiplier` below, Opacus-style helpers over
`accounting`, import it when called.
"""

from __future__ import annotations


def epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "prv") -> float:
    """ε after `steps` Poisson-subsampled Gaussian steps (DP-SGD steps, or client-level rounds) at
    noise multiplier σ and sample rate q, at `delta`, with Opacus' "prv" or "rdp" accountant: the
    accountant every run uses (add-remove adjacency)."""
    from fl_dplora.privacy import accounting

    accounting._check_accountant(accountant)
    accounting._check_calibration_inputs(1.0, delta, sample_rate, steps)
    if not (isinstance(noise_multiplier, (int, float)) and noise_multiplier >= 0):
        raise accounting.ConfigError(f"noise_multiplier: must be >= 0, got {noise_multiplier!r}")
    return accounting.epsilon_for(float(noise_multiplier), float(sample_rate), int(steps), float(delta), accountant)


def noise_multiplier(*, target_epsilon: float, sample_rate: float, steps: int, delta: float, accountant: str = "prv",
                     epsilon_tolerance: float = 0.01) -> float:
    """The smallest σ (to `epsilon_tolerance`, relative) whose ε after `steps` steps at sample rate q
    is <= target_epsilon; the σ returned is one whose ε was computed and found within the target (the
    calibration a run does when noise-multiplier <= 0). Like Opacus' get_noise_multiplier."""
    from fl_dplora.privacy import accounting

    return accounting.calibrate_noise_multiplier(float(target_epsilon), float(delta), float(sample_rate), int(steps),
                                                 accountant, epsilon_tolerance)
