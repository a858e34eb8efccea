"""The tools wing: what measures, compares and reports on runs (`fl-dplora bench`, `experiment`, `audit`),
beside the runtime package that runs them. No runtime module imports from here (tests/tools/test_layout.py)."""
