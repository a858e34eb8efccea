"""Differential privacy: accounting (`accounting`), noise/clipping (`mechanisms`), per-sample grads.

Kept import-free so `fl_dplora.privacy.mechanisms` does not pull in Opacus' accountants;
import from the submodules.
"""
