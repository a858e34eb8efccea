"""The Python API, for notebooks: `fl_dplora.simulate(...)` runs a job, `fl_dplora.load_run(DIR)`
opens a finished one (docs/python-api.md).

Both go through the command line's own code (cli.simulate_run, cli.evaluate_adapter,
cli.predict_texts, adapter_io): a run started here is checked, run, written and scored exactly as
`fl-dplora simulate` / `evaluate` / `predict` do it. Bad input raises `fl_dplora.config.ConfigError`
(a ValueError) with the same one-line message the CLI prints.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    from fl_dplora.config import RunConfig

# what `simulate` accepts as its run config: a dict of keys (or a RunConfig), a TOML file, or --run-config text
RunConfigInput: TypeAlias = "Mapping[str, Any] | RunConfig | str | os.PathLike | Sequence[str] | None"


def simulate(run_config: RunConfigInput = None, *, num_clients: int | None = None, output_dir: str | os.PathLike | None = None,
             preset: str | None = None, overwrite: bool = False, resume: str | os.PathLike | None = None,
             num_cpus: float = 2.0, num_gpus: float = 0.0, ray_address: str | None = None) -> Run:
    """Run a job in Flower's simulation engine, as `fl-dplora simulate` does, and open it.

    run_config: a dict of run-config keys ({"model": "tiny-random-llama", "num-server-rounds": 1}), a RunConfig,
    the path of a TOML file of them, or `--run-config` text ("key=value ..."); over the defaults and
    `preset`. num_clients: virtual clients (default 5, or the resumed run's). output_dir: where the run
    writes (default ~/fl-dplora/runs/<timestamp>); a folder holding a run is refused unless
    `overwrite` (deletes it) or `resume` (the folder of an interrupted run, continued).
    """
    from fl_dplora.cli import simulate_run

    cfg, _ = simulate_run(run_config, num_clients, None if output_dir is None else os.fspath(output_dir),
                          preset=preset, overwrite=overwrite, resume=None if resume is None else os.fspath(resume),
                          num_cpus=num_cpus, num_gpus=num_gpus, ray_address=ray_address)
    return Run(cfg.output.output_dir)


def load_run(path: str | os.PathLike) -> Run:
    """Open the output folder of a finished run (it holds summary.json)."""
    return Run(path)


class Run:
    """A finished run's folder: its config, per-round metrics, privacy block and adapter, and the
    adapter's answers and scores (the base model and adapter are loaded once, on first use)."""

    def __init__(self, path: str | os.PathLike):
        from fl_dplora.adapter_io import read_summary

        self.path = Path(path).expanduser().resolve()
        self.summary: dict[str, Any] = read_summary(self.path)  # ConfigError if the run did not finish
        self._model = None

    def __repr__(self) -> str:
        eps = self.privacy.get("epsilon")
        return (f"Run({str(self.path)!r}: {self.summary.get('rounds')} rounds, dp-mode {self.privacy.get('mode')}, "
                f"epsilon {'inf' if eps is None else f'{eps:.4g}'})")

    @property
    def config(self) -> dict[str, Any]:
        """The run's resolved run config (every key, as it ran)."""
        return dict(self.summary["config"])

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """One dict per round, as released in metrics.jsonl (evaluation, epsilon, delta)."""
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    @property
    def privacy(self) -> dict[str, Any]:
        """summary.json's privacy block: dp-mode, epsilon, delta, noise multiplier, accountant, ..."""
        return dict(self.summary.get("privacy") or {})

    @property
    def final_eval(self) -> dict[str, Any]:
        return dict(self.summary.get("final_eval") or {})

    @property
    def adapter_dir(self) -> Path:
        """The global adapter (a PEFT folder; `fl_dplora.json` beside it names its base and config)."""
        from fl_dplora.adapter_io import adapter_dir

        return adapter_dir(self.path)

    def _config_for_use(self) -> RunConfig:
        from fl_dplora.adapter_io import run_config

        return run_config(self.path, summary=self.summary)

    def _loaded(self, cfg: RunConfig):
        if self._model is None:
            from fl_dplora.adapter_io import load_adapted_model
            from fl_dplora.data import load_task

            self._model = load_adapted_model(cfg, self.adapter_dir, load_task(cfg.data.task, cfg.train.seed))
        return self._model

    def predict(self, text: str | Sequence[str]) -> dict[str, Any] | list[dict[str, Any]]:
        """The adapter's answer to one text (a dict: text, answer, and for classification each label's
        probability), or a list of them for a list of texts: what `fl-dplora predict --run DIR` prints."""
        from fl_dplora.cli import predict_texts

        texts = [text] if isinstance(text, str) else list(text)
        cfg = self._config_for_use()
        rows = predict_texts(cfg, self.adapter_dir, texts, model=self._loaded(cfg))
        return rows[0] if isinstance(text, str) else rows

    def evaluate(self, eval_file: str | os.PathLike | None = None) -> dict[str, Any]:
        """Score the adapter on the run's evaluation set, or on every row of `eval_file`: what
        `fl-dplora evaluate --run DIR [--eval-file FILE] --output X` writes (final_eval, test_eval, ...)."""
        from fl_dplora.cli import evaluate_adapter

        cfg = self._config_for_use()
        return evaluate_adapter(cfg, self.adapter_dir, None if eval_file is None else os.fspath(eval_file),
                                model=self._loaded(cfg))
