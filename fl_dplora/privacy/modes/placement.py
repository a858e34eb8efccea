"""Where a mode's noise on a client's update is added (`DPMode.placement`): one object per placement,
asked for the few facts the node, the strategy and the server act on, instead of flags.

- CENTRAL: the server adds σC to the sum of the clipped updates it sees (or, under SecAgg+, to the sum
  it unmasks); it must be trusted with the noise.
- LOCAL: each node adds its whole σC before the update leaves; the server sees each noised update,
  cannot re-clip it, and tops the sum's noise up to the whole population's.
- DISTRIBUTED: under SecAgg+, each node adds a share (σC'/√threshold) of the sum's noise; the server
  unmasks only the sum, which any threshold survivors make noisy enough.
- NONE: no noise on the update itself (dp-mode none; dp-mode sample noises inside DP-SGD instead).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NoisePlacement:
    name: str
    adds_noise: str  # who adds the noise on a client's update (the privacy block's noise_placement)
    server_sees_noised_updates: bool  # each node's update reaches the server with the node's whole noise on it
    node_shares: bool  # each node adds a share of the noise on the secure sum (one σ for every share and the grid)

    @property
    def node_noise_faces_server(self) -> bool:
        """The noise the nodes add is what stands between a node's data and the server (the server adds
        none before it sees that data): a node's ε against the server (rate 1, its own σ) is its own to
        charge and check, and a server instruction below the node's σ is a warning."""
        return self.server_sees_noised_updates or self.node_shares


NONE = NoisePlacement("none", "nobody (no noise on the update)", False, False)
CENTRAL = NoisePlacement("central", "server sum", False, False)
LOCAL = NoisePlacement("local", "each client (+ server top-up)", True, False)
DISTRIBUTED = NoisePlacement("distributed", "each client's share under secure aggregation (+ server top-up)", False, True)

PLACEMENTS: dict[str, NoisePlacement] = {p.name: p for p in (CENTRAL, LOCAL, DISTRIBUTED)}  # client-noise -> placement
