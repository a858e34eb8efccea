"""Named, versioned experiments: `fl-dplora experiment NAME`.

A spec is a TOML file `experiments/NAME.toml` listing runs (run-config overrides on top of `config`,
optionally expanded by a `matrix` of values). Every run is a real `fl-dplora simulate` subprocess
(the same ClientApp/ServerApp as `flwr run .`); a `zero-shot` run is `fl-dplora evaluate` of the
base model. Each run's output dir is `results/runs/<hash>/`, where the hash covers the resolved run
config, the number of clients and the run kind, so a finished run is never repeated: a sweep can be
stopped and continued, and experiments that share a run (say ffa, eps 8, IID) share its result.

After the runs: `results/NAME/results.json` (one record per run, the numbers every table and plot
is made from), `results.md` and the PNG plots the spec asks for. A spec with `aggregate = ["seed"]`
also gets `cells` there: the runs that differ only in those keys, as mean and standard error.
"""

from fl_dplora.tools.experiments.results import (
    CELL_METRICS, COLUMNS, DEFAULT_TABLE, aggregate_cells, cell_columns, cell_table, column_text, markdown, mean_se,
    paired_accuracy_tests, plot, report,
)
from fl_dplora.tools.experiments.runner import (
    command, compare_summaries, execute, is_done, record, run_dir, verify,
)
from fl_dplora.tools.experiments.spec import (
    CACHE_VERSION, SPEC_BASE, Experiment, RunSpec, available, experiments_dir, load_spec, results_root,
)

__all__ = [
    "CACHE_VERSION", "CELL_METRICS", "COLUMNS", "DEFAULT_TABLE", "SPEC_BASE", "Experiment", "RunSpec", "aggregate_cells",
    "available", "cell_columns", "cell_table", "column_text", "command", "compare_summaries", "execute",
    "experiments_dir", "is_done", "load_spec", "markdown", "mean_se", "paired_accuracy_tests", "plot", "record", "report", "results_root",
    "run_dir", "verify",
]
