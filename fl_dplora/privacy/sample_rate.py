"""Which size a node's DP-SGD sample rate and divisor come from, and the adjacency that makes it honest.

DP-SGD samples each example with q = batch / size and divides the noisy sum by q·size, the expected
batch. Both travel: q in every reply, the ledger and summary.json, the divisor in the update's scale.
So `size` must be public, or ε must be stated for neighbours that share it (issue 27 defect 7):

- declared (`shard-size` in the node config): q and the divisor come from that public number, never
  from the node's file, whose size is neither used nor released: add/remove adjacency (one example
  more or less) is then the honest one;
- a simulation partition (no data file): its size is a function of the public run config (pool,
  seed, partitioner), so q = batch/n is public and add/remove holds for records added to it;
- a node's own file without a declared size: its n sets q (Opacus' convention), so n is released
  (shard sizes are public in this case) and ε is accounted under replace-one, the adjacency
  that keeps n fixed (accounting._replace_one_epsilon). Under add/remove an exact n would be a
  noiseless count.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SampleBasis:
    size: int  # the number q and the divisor are computed from
    adjacency: str  # "add-remove" or "replace-one" (accounting.ADJACENCIES)

    def rate(self, batch: int) -> float:
        return min(1.0, int(batch) / self.size)

    def divisor(self, batch: int) -> float:
        """The expected batch q·size: a public constant (batch, or size at q = 1), never the shard's n."""
        return self.rate(batch) * self.size


def basis(n: int, declared: int | None, own_file: bool) -> SampleBasis:
    """The node's basis: its declared `shard-size`, else its n (public for a simulation partition,
    released under replace-one for its own file)."""
    if declared is not None:
        return SampleBasis(int(declared), "add-remove")
    if n < 1:
        raise ValueError("shard-size: the node's training data is empty")
    return SampleBasis(int(n), "replace-one" if own_file else "add-remove")
