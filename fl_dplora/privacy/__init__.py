"""Differential-privacy accounting (pure PyTorch/Opacus; no Flower imports)."""

from fl_dplora.privacy.accounting import (
    ACCOUNTANTS,
    PrivacyLedger,
    calibrate_noise_multiplier,
    check_delta,
    epsilon_for,
    format_table,
    paper_noise_multiplier,
    privacy_table,
)

__all__ = [
    "ACCOUNTANTS",
    "PrivacyLedger",
    "calibrate_noise_multiplier",
    "check_delta",
    "epsilon_for",
    "format_table",
    "paper_noise_multiplier",
    "privacy_table",
]
