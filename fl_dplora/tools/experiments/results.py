"""An experiment's results: results.json, results.md (the spec's table; with `aggregate`, cells as
mean and standard error; paired tests on the test part: BLEU for generation, McNemar for classification;
generated texts) and the plots."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fl_dplora.config import SERVER_ONLY_KEYS, ConfigError, resolve
from fl_dplora.tools.experiments.paired import accuracy_of, discordant_counts, exact_mcnemar
from fl_dplora.tools.experiments.spec import LEGACY_VALUES, NON_COMPUTING_KEYS, SPEC_BASE, Experiment, results_root

COLUMNS = {
    "id": ("run", "{}"), "series": ("variant", "{}"), "task": ("task", "{}"), "dp_mode": ("dp-mode", "{}"),
    "lora_variant": ("adapter", "{}"), "lora_rank": ("rank", "{}"), "partitioner": ("partition", "{}"),
    "dirichlet_alpha": ("alpha", "{}"), "target_epsilon": ("target eps", "{}"), "epsilon": ("eps spent", "{:.2f}"),
    "noise_multiplier": ("sigma", "{:.3f}"), "accuracy": ("accuracy", "{:.1%}"), "macro_f1": ("macro-F1", "{:.3f}"),
    "eval_loss": ("eval loss", "{:.3f}"), "perplexity": ("ppl", "{:.2f}"), "examples_processed": ("examples", "{:,}"),
    "trainable_params": ("trainable", "{:,}"), "bytes_up_per_client_round": ("bytes up/client/round", "{:,.0f}"),
    "bytes_up_total": ("bytes up total", "{:,}"), "pct_full_model": ("% of model", "{:.3f}%"),
    "wall_seconds": ("wall s", "{:.0f}"), "rounds": ("rounds", "{}"), "seed": ("seed", "{}"),
    "majority_rate": ("majority", "{:.1%}"), "bleu": ("dev BLEU", "{:.2f}"), "rouge_l": ("dev ROUGE-L", "{:.4f}"),
    "test_bleu": ("test BLEU", "{:.2f}"), "test_bleu_se": ("±SE (bootstrap)", "{:.2f}"),
    "test_rouge_l_se": ("±SE", "{:.4f}"), "test_rouge_l": ("test ROUGE-L", "{:.4f}"), "test_loss": ("test loss", "{:.3f}"),
    "test_accuracy": ("test accuracy", "{:.1%}"), "test_accuracy_se": ("±SE (binomial)", "{:.1%}"),
    "test_macro_f1": ("test macro-F1", "{:.3f}"), "test_majority_rate": ("test majority", "{:.1%}"),
    "test_inputs": ("test inputs", "{:,}"),
}
DEFAULT_TABLE = ["id", "dp_mode", "target_epsilon", "epsilon", "accuracy", "macro_f1", "eval_loss", "wall_seconds"]


def column_text(rec: Mapping[str, Any], col: str) -> str:
    v = rec.get(col)
    if v is None:
        return "∞" if col in ("target_epsilon", "epsilon") and rec.get("kind") == "train" else "–"
    if isinstance(v, (list, tuple, dict)):  # test_predictions etc.: thousands of entries, results.json has them
        return f"({len(v):,} values)"
    try:
        return COLUMNS.get(col, (col, "{}"))[1].format(v)
    except (ValueError, TypeError):
        return str(v)


# ----------------------------------------------------------------------------- cells (spec key `aggregate`)
# What a cell reports as mean and standard error over its runs; what identifies it (kept where all its
# runs agree, None where they do not).
CELL_METRICS = ("accuracy", "macro_f1", "eval_loss", "perplexity", "epsilon", "noise_multiplier", "majority_rate",
                "bleu", "rouge_l", "test_bleu", "test_rouge_l", "test_loss", "test_accuracy", "test_macro_f1")
_CELL_FIELDS = ("series", "kind", "task", "dp_mode", "lora_variant", "lora_rank", "partitioner", "dirichlet_alpha",
                "target_epsilon", "seed", "delta", "num_clients", "rounds", "eval_examples", "examples_processed",
                "trainable_params", "bytes_up_total", "bytes_up_per_client_round", "pct_full_model")
_WITH_N = ("accuracy", "macro_f1")  # rendered "mean ± SE (n)"


def mean_se(values: list[Any]) -> tuple[float | None, float | None]:
    """Mean and standard error (sample std / sqrt(n)) of the values that are not None; SE None for n < 2."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    return mean, (statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else None)


def _cell_key(rec: Mapping[str, Any], keys: list[str]) -> str:
    """What a run computes (as its hash sees it) less the aggregated keys, plus its series and kind."""
    try:
        cfg = resolve(rec.get("overrides", {}), base=SPEC_BASE).to_record()
    except ConfigError:  # a record of an older schema: its overrides as they are
        cfg = dict(rec.get("overrides", {}))
    drop = SERVER_ONLY_KEYS | NON_COMPUTING_KEYS | {"population"} | {k.replace("_", "-") for k in keys}
    keep = {k: v for k, v in sorted(cfg.items()) if k not in drop and LEGACY_VALUES.get(k, object()) != v}
    return json.dumps({"series": rec.get("series"), "kind": rec.get("kind"), "config": keep}, sort_keys=True, default=str)


def aggregate_cells(records: list[dict[str, Any]], keys: list[str],
                    metrics: tuple[str, ...] | list[str] = CELL_METRICS) -> list[dict[str, Any]]:
    """Group records that differ only in `keys` (e.g. ["seed"]) into cells, in first-run order.

    Each cell: its identifying fields, `n` (runs present), `ids`, the list of each aggregated key's values
    (`seed: [42, 1, 2]`) and `<metric>_mean` / `<metric>_se` for every metric."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        groups.setdefault(_cell_key(rec, keys), []).append(rec)
    cells = []
    for recs in groups.values():
        cell: dict[str, Any] = {}
        for f in _CELL_FIELDS:
            if f in keys:
                continue
            vals = [r.get(f) for r in recs]
            cell[f] = vals[0] if all(v == vals[0] for v in vals) else None
        cell["n"] = len(recs)
        cell["ids"] = [r["id"] for r in recs]
        for k in keys:
            cell[k] = [r.get(k) for r in recs]
        for m in metrics:
            cell[f"{m}_mean"], cell[f"{m}_se"] = mean_se([r.get(m) for r in recs])
        cells.append(cell)
    return cells


def cell_columns(exp: Experiment) -> list[str]:
    """Columns of the cells table: the spec table's identifying columns, the aggregated keys, its metrics."""
    cols = exp.table or DEFAULT_TABLE
    ident = [c for c in cols if c in _CELL_FIELDS and c not in exp.aggregate]
    if "series" not in ident:
        ident.insert(0, "series")
    metrics = [c for c in cols if c in CELL_METRICS]
    metrics += [m for m in _WITH_N if m not in metrics]
    return ident + list(exp.aggregate) + metrics


def _cell_stat(cell: Mapping[str, Any], col: str) -> str:
    if col in CELL_METRICS:
        mean, se = cell.get(f"{col}_mean"), cell.get(f"{col}_se")
        if mean is None:
            return "∞" if col == "epsilon" and cell.get("kind") == "train" else "–"
        fmt = COLUMNS.get(col, (col, "{}"))[1]
        text = fmt.format(mean) + (f" ± {fmt.format(se)}" if se is not None else "")
        return text + (f" ({cell.get('n')})" if col in _WITH_N else "")
    if isinstance(cell.get(col), list):  # an aggregated key: its values
        return ", ".join(column_text({col: v}, col) for v in cell[col])
    return column_text(cell, col)


def cell_table(exp: Experiment, cells: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: one row per cell, metrics as mean ± standard error (accuracy, macro-F1: and n)."""
    cols = cell_columns(exp)
    lines = [f"Mean ± standard error (sample std / √n) over {', '.join(exp.aggregate)}; (n) = runs in the cell.", "",
             "| " + " | ".join(COLUMNS.get(c, (c,))[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    return lines + ["| " + " | ".join(_cell_stat(c, col) for col in cols) + " |" for c in cells]


def markdown(exp: Experiment, records: list[dict[str, Any]], command: str) -> str:
    cols = exp.table or DEFAULT_TABLE
    wall = sum(r["wall_seconds"] for r in records)
    lines = [f"# {exp.name} (spec version {exp.version})", "", exp.description.strip(), "",
             f"Regenerate: `{command}` (runs cached by config hash; {len(records)} runs, {wall / 60:.0f} min of run time here).", ""]
    if exp.aggregate:
        lines += [*cell_table(exp, aggregate_cells(records, exp.aggregate)), "", "Every run:", ""]
    lines += ["| " + " | ".join(COLUMNS.get(c, (c,))[0] for c in cols) + " |",
             "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(column_text(r, c) for c in cols) + " |" for r in records]
    lines += _paired_bleu_tests(records)
    lines += paired_accuracy_tests(records)
    lines += _generated_texts(records)
    if exp.notes:
        lines += ["", exp.notes.strip()]
    for p in exp.plots:
        lines += ["", f"![{p.get('title', p['file'])}]({p['file']})"]
    return "\n".join(lines) + "\n"


def _paired_bleu_tests(records: list[dict[str, Any]]) -> list[str]:
    """Generation tasks: each trained run's test BLEU against the zero-shot base model and against the
    no-DP run of its seed, on the same test inputs (paired bootstrap, evaluate.paired_bleu_p_value)."""
    runs = [r for r in records if r.get("test_generations")]
    base = next((r for r in runs if r["kind"] == "zero-shot"), None)
    trained = [r for r in runs if r["kind"] == "train"]
    if not trained:
        return []
    from fl_dplora.data import load_task
    from fl_dplora.evaluate import paired_bleu_p_value

    refs = [list(e.references) for e in load_task(trained[0]["task"], 0).test]
    lines = ["", "## Paired tests on the test part (BLEU difference, paired bootstrap, 1,000 resamples)", "",
             "| run | test BLEU | vs zero-shot | p | vs no DP (same seed) | p |", "|---|---|---|---|---|---|"]
    for r in trained:
        cells = [r["id"], f"{r['test_bleu']:.2f}"]
        nodp = next((x for x in trained if x["target_epsilon"] is None and x["seed"] == r["seed"] and x is not r), None)
        for other in (base, nodp):
            if other is None or len(other["test_generations"]) != len(r["test_generations"]):
                cells += ["–", "–"]
                continue
            p = paired_bleu_p_value(other["test_generations"], r["test_generations"], refs)
            cells += [f"{r['test_bleu'] - other['test_bleu']:+.2f}", f"{p:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _p_text(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"  # a 1,600-example test gives p far below 0.001


def _pairable(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    """Both runs scored the same test examples: equally many predictions, the same labels in the same order."""
    return a is not None and b is not None and len(a["test_predictions"]) == len(b["test_predictions"]) \
        and a.get("test_labels") == b.get("test_labels")


def paired_accuracy_tests(records: list[dict[str, Any]]) -> list[str]:
    """Classification tasks: each trained run's test accuracy against the zero-shot base model and against
    the run of its seed in the reference series (the spec's first trained series), by exact McNemar on
    the same test examples; then per pair of series, one McNemar test over their seeds' pooled decisions."""
    runs = [r for r in records if r.get("test_predictions") and r.get("test_labels")]
    base = next((r for r in runs if r["kind"] == "zero-shot"), None)
    trained = [r for r in runs if r["kind"] == "train"]
    if not trained:
        return []
    series = list(dict.fromkeys(r["series"] for r in records if r["kind"] == "train"))
    ref = series[0]
    # each series' run of each seed; a seed with several runs in a series (another matrix key) is ambiguous: unpaired
    by_seed: dict[str, dict[Any, list[dict[str, Any]]]] = {}
    for r in trained:
        by_seed.setdefault(r["series"], {}).setdefault(r["seed"], []).append(r)

    def partner(name: str, seed: Any) -> dict[str, Any] | None:
        found = by_seed.get(name, {}).get(seed, [])
        return found[0] if len(found) == 1 else None

    def diff_p(r: Mapping[str, Any], other: Mapping[str, Any] | None) -> list[str]:
        if not _pairable(r, other):
            return ["–", "–"]
        d = accuracy_of(r["test_predictions"], r["test_labels"]) - accuracy_of(other["test_predictions"], other["test_labels"])
        b, c = discordant_counts(r["test_predictions"], other["test_predictions"], r["test_labels"])
        return [f"{100 * d:+.1f} pp", _p_text(exact_mcnemar(b, c))]

    lines = ["", "## Paired tests on the test part (accuracy difference, exact McNemar)", "",
             f"| run | test accuracy | vs zero-shot | p | vs {ref} (same seed) | p |", "|---|---|---|---|---|---|"]
    for r in trained:
        vs_ref = ["–", "–"] if r["series"] == ref else diff_p(r, partner(ref, r["seed"]))
        cells = [r["id"], f"{accuracy_of(r['test_predictions'], r['test_labels']):.1%}", *diff_p(r, base), *vs_ref]
        lines.append("| " + " | ".join(cells) + " |")

    # pooled: series A's seeds against series B's same seeds, one test over every paired decision
    pooled = []
    for i, a in enumerate(series):
        for b_name in series[i + 1:]:
            pairs = [(x, y) for seed in by_seed.get(a, {})
                     if _pairable(x := partner(a, seed), y := partner(b_name, seed))]
            if not pairs:
                continue
            b = c = n = 0
            for x, y in pairs:
                db, dc = discordant_counts(x["test_predictions"], y["test_predictions"], x["test_labels"])
                b, c, n = b + db, c + dc, n + len(x["test_labels"])
            seeds = ", ".join(str(x["seed"]) for x, _ in pairs)
            pooled.append(f"| {a} vs {b_name} | {seeds} | {n:,} | {b:,} | {c:,} | {100 * (b - c) / n:+.1f} pp | "
                          f"{_p_text(exact_mcnemar(b, c))} |")
    if pooled:
        lines += ["", "Pooled over seeds (b: only A right, c: only B right). The seeds share the test inputs, so the "
                  "pooled decisions are not independent: read p as optimistic.", "",
                  "| A vs B | seeds | decisions | b | c | A − B | p |", "|---|---|---|---|---|---|---|", *pooled]
    return lines


def _generated_texts(records: list[dict[str, Any]]) -> list[str]:
    """Generation tasks: each run's texts for the same first test inputs (people judge generation by
    reading it), grouped by input."""
    # classification samples ('predicted', 'label') are not generated texts
    runs = [r for r in records if r.get("test_samples") and all("generated" in x for x in r["test_samples"])]
    if not runs:
        return []
    lines = ["", "## Generated texts (test part, the same first inputs in every run)"]
    for i, sample in enumerate(runs[0]["test_samples"]):
        lines += ["", f"**{sample['input'].splitlines()[-1]}**", "", f"- reference: {sample['references'][0]}"]
        lines += [f"- {r['id']}: {r['test_samples'][i]['generated'].strip() if i < len(r['test_samples']) else '–'}"
                  for r in runs]
    return lines


def _xvalue(rec: Mapping[str, Any], key: str) -> Any:
    if key in ("target_epsilon", "epsilon") and rec.get(key) is None:
        return math.inf
    return rec.get(key)


def plot(exp: Experiment, records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for spec in exp.plots:
        kind, y = spec.get("kind", "line"), spec.get("y", "accuracy")
        recs = [r for r in records if r["kind"] == "train" and (not spec.get("series") or r["series"] in spec["series"])]
        fig, ax = plt.subplots(figsize=(6.4, 5.0), dpi=120)
        if kind == "rounds":
            for r in recs:
                pts = [(p["round"], p[y]) for p in r.get("per_round", []) if p.get(y) is not None]
                ax.plot([x for x, _ in pts], [v for _, v in pts], marker="o", label=r["series"] if spec.get("by") == "series" else r["id"])
            ax.set_xlabel(spec.get("xlabel", "round"))
            ax.xaxis.get_major_locator().set_params(integer=True)
        else:
            x = spec.get("x", "target_epsilon")
            # (series, x, y, SE): a spec with `aggregate` plots cell means with SE bars, unless x is aggregated
            if exp.aggregate and x not in exp.aggregate:
                extra = tuple(dict.fromkeys(m for m in (y, x) if m not in CELL_METRICS and (m == y or m not in _CELL_FIELDS)))
                cells = aggregate_cells(recs, exp.aggregate, CELL_METRICS + extra)
                points = [(c["series"], _xvalue({**c, x: c.get(x, c.get(f"{x}_mean"))}, x), c.get(f"{y}_mean"),
                           c.get(f"{y}_se")) for c in cells]
                bars = True
            else:
                points = [(r["series"], _xvalue(r, x), r.get(y), None) for r in recs]
                bars = False
            values = [p[1] for p in points]
            if all(isinstance(v, (int, float)) for v in values):
                xs_all = sorted(set(values), reverse=bool(spec.get("reverse", x in ("target_epsilon", "epsilon"))))
            else:  # names: keep the spec's run order
                xs_all = list(dict.fromkeys(values))
            pos = {v: i for i, v in enumerate(xs_all)}
            categorical = spec.get("categorical", True)
            series = list(dict.fromkeys(p[0] for p in points))
            # side-by-side bars only where several series share an x; one bar per x stays centred
            shared = len({(p[0], p[1]) for p in points}) > len(xs_all)
            width = 0.8 / max(1, len(series)) if shared else 0.6
            for j, s in enumerate(series):
                pts = sorted(((a, b, e) for name, a, b, e in points if name == s and b is not None), key=lambda t: pos[t[0]])
                xs = [pos[a] if categorical else a for a, _, _ in pts]
                ys, errs = [b for _, b, _ in pts], [math.nan if e is None else e for _, _, e in pts]  # n = 1: no bar
                if kind == "bar":
                    offset = (j - (len(series) - 1) / 2) * width if shared else 0.0
                    ax.bar([v + offset for v in xs], ys, width, label=s, **({"yerr": errs, "capsize": 4} if bars else {}))
                elif bars:
                    ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=4, label=s)
                else:
                    ax.plot(xs, ys, marker="o", label=s)
            if categorical:
                ax.set_xticks(range(len(xs_all)), ["∞" if v == math.inf else f"{v:g}" if isinstance(v, float) else str(v) for v in xs_all],
                              rotation=20 if any(isinstance(v, str) and len(v) > 8 for v in xs_all) else 0)
            ax.set_xlabel(spec.get("xlabel", x))
            if spec.get("logy"):
                ax.set_yscale("log")
        for ref in spec.get("references", []):  # horizontal lines: zero-shot, majority class, ...
            val = next((r.get(y) for r in records if r["id"] == ref), None)
            if val is not None:
                ax.axhline(val, linestyle="--", color="grey", linewidth=1)
                ax.annotate(ref, (0.01, val), xycoords=("axes fraction", "data"), fontsize=8, color="grey", va="bottom")
        ax.set_ylabel(spec.get("ylabel", y))
        ax.set_title(spec.get("title", exp.name), fontsize=10)
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if labels:  # below the axes: never over the data
            fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=2, frameon=False)
        fig.tight_layout(rect=(0, 0.06 * ((len(labels) + 1) // 2) if labels else 0, 1, 1))
        path = out_dir / spec["file"]
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def report(exp: Experiment, records: list[dict[str, Any]], command: str) -> Path:
    out = results_root() / exp.name
    out.mkdir(parents=True, exist_ok=True)
    payload = {"experiment": exp.name, "version": exp.version, "description": exp.description, "command": command,
               "spec": str(exp.path.name), "complete": len(records) == len(exp.runs),
               "total_wall_seconds": round(sum(r["wall_seconds"] for r in records), 1)}
    if exp.aggregate:
        payload["aggregate"] = list(exp.aggregate)
        payload["cells"] = aggregate_cells(records, exp.aggregate)
    payload["runs"] = records
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "results.md").write_text(markdown(exp, records, command))
    plot(exp, records, out)
    return out
