"""Test support shipped with the package: an in-process Flower grid (tests and `fl-dplora bench secagg`).
No runtime module imports from here (tests/tools/test_layout.py)."""
