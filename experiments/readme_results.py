"""Regenerate the generated blocks of the docs from their sources (no number or key typed by hand).

    python experiments/readme_results.py

- docs/results.md, between the results markers: the tables of the committed results.json files;
- docs/configuration.md, between the config markers: the run-config table of the schema
  (`fl_dplora.config.describe_keys(markdown=True)`, the same as `fl-dplora config --markdown`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from fl_dplora.tools import experiments as ex  # noqa: E402
from fl_dplora.config import describe_keys  # noqa: E402

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
CONFIG_BEGIN, CONFIG_END = "<!-- config:begin -->", "<!-- config:end -->"
CONFIG_PAGE = Path("docs") / "configuration.md"  # where the run-config table lives, relative to ROOT
RESULTS_PAGE = Path("docs") / "results.md"  # where the results block lives, relative to ROOT
LINK_PREFIX = "../"  # from docs/results.md back to the repository root
ORDER = ["data-to-text", "data-to-text-lr", "tfns-test", "dp-recipe", "epsilon-sweep", "comm-vs-rank", "non-iid", "mode-compare", "seed-check"]


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
        where = f"{LINK_PREFIX}experiments/results/{name}"
        status = "" if data["complete"] else f" (partial: {len(data['runs'])} of {len(spec.runs)} runs finished)"
        lines = [f"### {name}{status}", "", spec.description.strip(), "",
                 f"`{data['command']}`: {len(data['runs'])} runs, {data['total_wall_seconds'] / 60:.0f} min here "
                 f"(2 CPU cores); full table: [results.md]({where}/results.md).", ""]
        if data.get("cells") and spec.aggregate:  # runs that differ only in seed etc.: one row each, mean ± SE
            lines += ex.cell_table(spec, data["cells"])
        else:
            lines += ["| " + " | ".join(ex.COLUMNS.get(c, (c,))[0] for c in cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(ex.column_text(r, c) for c in cols) + " |" for r in data["runs"]]
        # classification test parts: tweet-by-tweet comparisons (its headings one level below this block's)
        lines += [f"##{x}" if x.startswith("## ") else x for x in ex.paired_accuracy_tests(data["runs"])]
        lines.append("")
        for p in spec.plots:
            if (path.parent / p["file"]).is_file():
                lines.append(f"![{p.get('title', p['file'])}]({where}/{p['file']})")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def config_block() -> str:
    return describe_keys(markdown=True) + "\n"


def between(text: str, begin: str, end: str) -> str:
    """What a file holds between two markers."""
    return text.split(begin, 1)[1].split(end, 1)[0]


def replace(path: Path, begin: str, end: str, content: str) -> None:
    text = path.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{path.relative_to(ROOT)} has no {begin} ... {end} block")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(head + begin + "\n" + content + end + tail)


def main() -> None:
    replace(ROOT / RESULTS_PAGE, BEGIN, END, block())
    replace(ROOT / CONFIG_PAGE, CONFIG_BEGIN, CONFIG_END, config_block())


if __name__ == "__main__":
    main()
