"""`fl-dplora bench`: the subcommand and one nested command per benchmark module."""

from __future__ import annotations

import argparse

from fl_dplora.tools import bench
from fl_dplora.tools.bench import comm, dp_overhead, prefix_cache, round_overhead, secagg, throughput

# in the order of --help and of the table in the package docstring
BENCHMARKS = (dp_overhead, round_overhead, comm, throughput, prefix_cache, secagg)


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help=f"performance benchmarks ({', '.join(m.NAME for m in BENCHMARKS)})",
                       description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bs = b.add_subparsers(dest="bench", required=True)
    for module in BENCHMARKS:
        module.add_parser(bs)
