#!/usr/bin/env python3
"""Write the "three hospitals" demo of docs/deployment.md: a server task card and, per hospital,
its own CSV files (labels 0/1) with a node-side task card that names them.

    python scripts/make_hospital_demo.py OUT_DIR [--rows 60] [--seed 0]

OUT_DIR/server/task.toml + test.csv     the run's task: label words, prompt, the server's eval file
OUT_DIR/hospital-<x>/train.csv, test.csv  columns note,finding (0 = benign, 1 = malignant)
OUT_DIR/hospital-<x>/task.toml          how this hospital's files name columns and labels

The notes are synthetic sentences (no real patient data), built from two phrase pools so that the
label is learnable. Stdlib only.
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

BENIGN = ["well-circumscribed", "uniform cells", "no mitotic activity", "smooth margins", "stable size over 2 years",
          "fatty content", "regular nuclei", "encapsulated", "no invasion", "low uptake"]
MALIGNANT = ["irregular spiculated margins", "marked nuclear atypia", "frequent mitoses", "invasion of adjacent tissue",
             "rapid growth", "necrosis", "pleomorphic cells", "lymph node involvement", "high uptake", "vascular invasion"]
SITES = ["breast", "thyroid", "lung", "liver", "kidney", "skin", "colon"]
INSTRUCTION = "Is the finding in this pathology note benign or malignant? Answer with one word: benign or malignant."
SERVER_CARD = f'''# The run's task (fl_dplora/task_card.py): the server sends it (without file names) to every node.
name = "pathology-notes"
kind = "classification"
label-words = ["benign", "malignant"]
labels = {{ "0" = "benign", "1" = "malignant" }}
instruction = "{INSTRUCTION}"
text-column = "note"
label-column = "finding"
eval-file = "test.csv"
licence = "synthetic demo data, no restrictions"
'''
NODE_CARD = '''# How this hospital's own files name their columns and labels (node-config task-card).
name = "pathology-notes"
label-words = ["benign", "malignant"]
labels = { "0" = "benign", "1" = "malignant" }
text-column = "note"
label-column = "finding"
'''


def note(rng: random.Random, malignant: bool) -> str:
    pool = MALIGNANT if malignant else BENIGN
    return f"{rng.choice(SITES).capitalize()} lesion: {', '.join(rng.sample(pool, 3))}."


def write_csv(path: Path, rng: random.Random, rows: int) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["note", "finding"])
        for _ in range(rows):
            y = rng.random() < 0.4
            w.writerow([note(rng, y), int(y)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--rows", type=int, default=60, help="training rows per hospital (test files: a third of it)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    out = Path(args.out_dir)
    (out / "server").mkdir(parents=True, exist_ok=True)
    (out / "server" / "task.toml").write_text(SERVER_CARD)
    write_csv(out / "server" / "test.csv", rng, max(8, args.rows // 2))
    for name in ("a", "b", "c"):
        d = out / f"hospital-{name}"
        d.mkdir(exist_ok=True)
        write_csv(d / "train.csv", rng, args.rows)
        write_csv(d / "test.csv", rng, max(4, args.rows // 3))
        (d / "task.toml").write_text(NODE_CARD)
    print(f"wrote {out}/server and {out}/hospital-a,b,c")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
