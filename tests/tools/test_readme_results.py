"""The docs' results are the committed results.json files, and docs/configuration.md's run-config table is the
schema's: neither is typed by hand (experiments/readme_results.py writes both)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
RESULTS = (REPO / "docs" / "results.md").read_text()


def _generator():
    spec = importlib.util.spec_from_file_location("readme_results", REPO / "experiments" / "readme_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _records() -> list[dict]:
    """Every committed run, plus every seed-aggregated cell as a record of its means."""
    recs = []
    for path in sorted((REPO / "experiments" / "results").glob("*/results.json")):
        data = json.loads(path.read_text())
        recs += data["runs"]
        recs += [{k[: -len("_mean")]: v for k, v in c.items() if k.endswith("_mean")} for c in data.get("cells", [])]
    return recs


def test_results_block_is_what_readme_results_generates():
    mod = _generator()
    assert mod.RESULTS_PAGE == Path("docs") / "results.md" and mod.BEGIN not in README
    committed = mod.between(RESULTS, mod.BEGIN, mod.END)
    assert committed.strip() == mod.block().strip(), "docs/results.md results block is stale: run python experiments/readme_results.py"
    # its links are relative to docs/: they reach the committed tables and plots
    targets = re.findall(r"\]\(([^)]+)\)", committed)
    assert targets and all((REPO / "docs" / t).resolve().is_file() for t in targets), targets


def test_config_page_table_is_the_schema(capsys):
    """Between the config markers of docs/configuration.md: exactly what `fl-dplora config --markdown` prints."""
    from fl_dplora.cli import main
    from fl_dplora.config import describe_keys

    mod = _generator()
    assert mod.CONFIG_PAGE == Path("docs") / "configuration.md" and mod.CONFIG_BEGIN not in README
    committed = mod.between((REPO / mod.CONFIG_PAGE).read_text(), mod.CONFIG_BEGIN, mod.CONFIG_END)
    assert main(["config", "--markdown"]) == 0
    printed = capsys.readouterr().out
    assert printed == describe_keys(markdown=True) + "\n"
    assert committed == "\n" + printed, "docs/configuration.md run-config table is stale: run python experiments/readme_results.py"


def test_numbers_in_the_results_prose_are_in_some_results_json():
    """Accuracies (`67.0 %`), sigmas (`σ = 1.05`, `0.543`), byte counts (`262,566 B`), losses and
    perplexities (`ppl 18.20`) quoted in the 'What agrees with the paper' prose of docs/results.md
    must each be a value of a committed run."""
    prose = RESULTS.split("## What agrees with the paper", 1)[1].split("<!-- results:begin -->", 1)[0]
    recs = _records()
    accuracies = {f"{100 * r['accuracy']:.1f}" for r in recs if r.get("accuracy") is not None}
    sigmas = {f"{r['noise_multiplier']:.{n}f}" for r in recs if r.get("noise_multiplier") for n in (2, 3)}
    byte_counts = {f"{round(r['bytes_up_per_client_round']):,}" for r in recs if r.get("bytes_up_per_client_round")}
    losses = {f"{r['eval_loss']:.{n}f}" for r in recs if r.get("eval_loss") is not None for n in (1, 3)}
    perplexities = {f"{r['perplexity']:.2f}" for r in recs if r.get("perplexity") is not None}
    quoted_acc = re.findall(r"(?<![\d.])(\d{1,3}\.\d) %", prose)
    quoted_sigma = re.findall(r"σ (?:= )?(\d\.\d{2,3})|\((\d\.\d{3}) vs (\d\.\d{3})\)", prose)
    quoted_bytes = re.findall(r"(\d{1,3}(?:,\d{3})+) B\b", prose)
    quoted_loss = re.findall(r"loss (\d+\.\d+)", prose)
    quoted_ppl = re.findall(r"ppl (\d+\.\d+)", prose)
    assert len(quoted_acc) >= 10 and quoted_bytes and quoted_sigma  # the prose does quote results
    assert not sorted(set(quoted_acc) - accuracies)
    assert not sorted({s for group in quoted_sigma for s in group if s} - sigmas)
    assert not sorted(set(quoted_bytes) - byte_counts)
    assert not sorted(set(quoted_loss) - losses)
    assert quoted_ppl and not sorted(set(quoted_ppl) - perplexities)


def test_committed_reproduction_checks_passed():
    """docs/results.md cites verify.json files: each rerun there reproduced its cached run, bit for bit."""
    files = sorted((REPO / "experiments" / "results").glob("*/verify.json"))
    assert files and all(f"](../experiments/results/{f.parent.name}/verify.json)" in RESULTS for f in files)
    for f in files:
        runs = json.loads(f.read_text())["runs"]
        assert runs and all(r["reproduced"] and r["bit_identical"] and not r["differences"] for r in runs), f


def test_config_table_names_the_type_of_numeric_keys_without_a_range():
    """`fl-dplora config` once listed `text` as the allowed values of `seed` and `noise-multiplier`."""
    from fl_dplora.config import SCHEMA, allowed_values

    assert allowed_values(SCHEMA["seed"]) == "integer" and allowed_values(SCHEMA["noise-multiplier"]) == "number"
    assert [k for k, spec in SCHEMA.items() if spec.type is not str and allowed_values(spec) == "text"] == []
    assert allowed_values(SCHEMA["output-dir"]) == "text"
