"""fl-dplora: federated DP-LoRA fine-tuning on Flower."""

from fl_dplora.console import quiet_known_warnings as _quiet_known_warnings

# here, so that every process that loads the app drops them: the CLI, Flower's app processes, Ray's actors
_quiet_known_warnings()
