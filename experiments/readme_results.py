"""Regenerate the README "Results" block from the committed results.json files (no number typed by hand).

    python experiments/readme_results.py   # rewrites README.md between the results markers
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from fl_dplora import experiments as ex  # noqa: E402

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
ORDER = ["dp-recipe", "epsilon-sweep", "comm-vs-rank", "non-iid", "mode-compare", "seed-check"]


def block() -> str:
    parts = []
    for name in ORDER:
        path = ROOT / "experiments" / "results" / name / "results.json"
        if not path.is_file():
            parts.append(f"### {name}\n\nNot run yet: `fl-dplora experiment {name}`.\n")
            continue
        data = json.loads(path.read_text())
        spec = ex.load_spec(name, ROOT / "experiments")
        cols = spec.table or ex.DEFAULT_TABLE
        status = "" if data["complete"] else f" (partial: {len(data['runs'])} of {len(spec.runs)} runs finished)"
        lines = [f"### {name}{status}", "", spec.description.strip(), "",
                 f"`{data['command']}`: {len(data['runs'])} runs, {data['total_wall_seconds'] / 60:.0f} min here "
                 f"(2 CPU cores); full table: [results.md](experiments/results/{name}/results.md).", ""]
        if data.get("cells") and spec.aggregate:  # runs that differ only in seed etc.: one row each, mean ± SE
            lines += ex.cell_table(spec, data["cells"])
        else:
            lines += ["| " + " | ".join(ex._COLUMNS.get(c, (c,))[0] for c in cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(ex._cell(r, c) for c in cols) + " |" for r in data["runs"]]
        lines.append("")
        for p in spec.plots:
            if (path.parent / p["file"]).is_file():
                lines.append(f"![{p.get('title', p['file'])}](experiments/results/{name}/{p['file']})")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} block")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + BEGIN + "\n" + block() + END + tail)


if __name__ == "__main__":
    main()
