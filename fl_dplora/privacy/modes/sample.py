"""dp-mode `sample`: example-level DP. The work happens on each node (train.DPSGD, calibrated and
charged by the node itself); the mode only tells the others that clients keep per-example ledgers."""

from __future__ import annotations

from fl_dplora.privacy.modes.base import DPMode


class ExampleDP(DPMode):
    """DP-SGD on each client (per-example clipping, Poisson sampling, noise): every release of a
    client, its update included, is DP for each of its examples, against the server too. The server
    averages the replies uniformly (example counts are private)."""

    name = "sample"
    unit = "example"
    trusted = "nobody (noise added on each client)"
    example_level = True
