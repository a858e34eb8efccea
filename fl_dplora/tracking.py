"""Run tracking: each round's released metrics and ε where people already look.

`report-to` (run config): `none` (default), `tensorboard` (event files in OUTPUT/tensorboard/, via
torch.utils.tensorboard's SummaryWriter: `tensorboard --logdir OUTPUT`), `wandb` or `mlflow` (when
the package is installed; their own environment variables choose project, entity, tracking URI).
Whatever the key, every run draws OUTPUT/metrics.png (BLEU or accuracy, evaluation loss and ε by
round), redrawn after each round so an interrupted run has one too.

Only released values are logged: the rows of metrics.jsonl (the server's evaluation on its own
data, ε and δ; train loss only without DP) and the run config. Never the operator's log.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fl_dplora.config import SCHEMA, ConfigError, RunConfig

log = logging.getLogger("fl_dplora")

REPORT_TO = SCHEMA["report-to"].choices
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
PLOT = "metrics.png"


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def check_report_to(cfg: RunConfig) -> None:
    """One line, before any model or Ray: the package `report-to` needs is not installed."""
    target = cfg.output.report_to
    package = PACKAGES.get(target)
    if package and not _installed(package):
        raise ConfigError(f"report-to: {target} needs the {package} package, which is not installed "
                          f"(pip install {package}; or report-to = none)")


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """A metrics.jsonl row as named scalars: eval/<metric>, privacy/epsilon, train/loss."""
    out = {}
    for key, value in row.items():
        if key in ("round", "delta") or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if key == "epsilon":
            out["privacy/epsilon"] = float(value)
        elif key.startswith("eval_"):
            out[f"eval/{key.removeprefix('eval_')}"] = float(value)
        elif key == "train_loss":
            out["train/loss"] = float(value)
    return out


class Tracker:
    """The run's `report-to` sink and its metrics.png; `round(row)` after each metrics.jsonl row."""

    def __init__(self, cfg: RunConfig, out_dir: Path):
        self.kind, self.out_dir = cfg.output.report_to, Path(out_dir)
        self.title = f"{Path(cfg.model.name).name} on {Path(cfg.data.task).name}, dp-mode {cfg.privacy.dp_mode}"
        self._sink: Any = None
        check_report_to(cfg)
        if self.kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self._sink = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))
            self._sink.add_text("run-config", "\n".join(f"    {k} = {json.dumps(v)}" for k, v in cfg.to_record().items()))
        elif self.kind == "wandb":
            import wandb

            self._sink = wandb.init(project="fl-dplora", name=self.out_dir.name, dir=str(self.out_dir), config=cfg.to_record())
        elif self.kind == "mlflow":
            import mlflow

            self._sink = mlflow.start_run(run_name=self.out_dir.name)
            mlflow.log_params(cfg.to_record())
        if self.kind != "none":
            log.info("report-to %s: each round's released metrics and epsilon%s", self.kind,
                     f" in {self.out_dir / 'tensorboard'}" if self.kind == "tensorboard" else "")

    def round(self, row: Mapping[str, Any]) -> None:
        values, step = scalars(row), int(row["round"])
        if self.kind == "tensorboard":
            for name, value in values.items():
                self._sink.add_scalar(name, value, step)
            self._sink.flush()  # on disk each round: an interrupted run keeps its curves
        elif self.kind == "wandb":
            import wandb

            wandb.log(values, step=step)
        elif self.kind == "mlflow":
            import mlflow

            mlflow.log_metrics(values, step=step)
        write_plot(self.out_dir / "metrics.jsonl", self.out_dir / PLOT, self.title)

    def close(self) -> None:
        if self._sink is None:
            return
        if self.kind == "tensorboard":
            self._sink.close()
        elif self.kind == "wandb":
            self._sink.finish()
        elif self.kind == "mlflow":
            import mlflow

            mlflow.end_run()
        self._sink = None


# ----------------------------------------------------------------------------- metrics.png
def plot_series(rows: list[Mapping[str, Any]]) -> list[tuple[str, list[int], list[float]]]:
    """(label, rounds, values) of each panel: BLEU (generation) or accuracy, evaluation loss, ε; a
    panel with no value in any round (ε without DP, a score not evaluated yet) is left out."""
    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(int(r["round"]), float(r[key])) for r in rows if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    score = ("eval_bleu", "BLEU") if any(r.get("eval_bleu") is not None for r in rows) else ("eval_accuracy", "accuracy")
    panels = []
    for key, label in (score, ("eval_loss", "eval loss"), ("epsilon", "epsilon")):
        xs, ys = series(key)
        if xs:
            panels.append((label, xs, ys))
    return panels


def write_plot(metrics_path: Path, png: Path, title: str = "") -> Path | None:
    """metrics.png from metrics.jsonl (matplotlib's object API: no pyplot state, no display needed)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:  # a dependency, but a broken install must not fail the run
        return None
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    panels = plot_series(rows)
    if not panels:
        return None
    fig = Figure(figsize=(4 * len(panels), 3.2), layout="constrained")
    for ax, (label, xs, ys) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        ax.plot(xs, ys, marker="o")
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.set_title(label + " by round")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title)
    tmp = png.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(png)
    return png
