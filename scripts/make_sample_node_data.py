#!/usr/bin/env python3
"""Write one small JSONL data file per SuperNode, for trying docker/compose.yaml.

    python scripts/make_sample_node_data.py [OUT_DIR] [--nodes 3] [--rows 200]

Takes disjoint slices of the bundled TFNS financial-sentiment training split
(fl_dplora/data_files/tfns/sent_train.csv, columns text,label with labels 0/1/2),
so the files fit the default task (fin-sentiment). Output: OUT_DIR/node-<i>.jsonl,
default OUT_DIR docker/data (git-ignored). Stdlib only: runs without the project's
dependencies. Real deployments use each organisation's own file instead.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "fl_dplora" / "data_files" / "tfns" / "sent_train.csv"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", nargs="?", default=str(REPO / "docker" / "data"))
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--rows", type=int, default=200, help="rows per node")
    args = p.parse_args(argv)
    if args.nodes < 1 or args.rows < 1:
        print("make_sample_node_data: --nodes and --rows must be >= 1", file=sys.stderr)
        return 2
    with SOURCE.open(newline="", encoding="utf-8") as f:
        rows = [{"text": r["text"], "label": int(r["label"])} for r in csv.DictReader(f)]
    need = args.nodes * args.rows
    if need > len(rows):
        print(f"make_sample_node_data: {need} rows requested, {SOURCE.name} has {len(rows)}", file=sys.stderr)
        return 2
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(args.nodes):
        path = out / f"node-{i}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for r in rows[i * args.rows:(i + 1) * args.rows]:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
