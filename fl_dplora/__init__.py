"""fl-dplora: federated DP-LoRA fine-tuning on Flower.

Python API (docs/python-api.md): `simulate(run_config, num_clients=..., output_dir=...)` runs a job
and returns a `Run`; `load_run(DIR)` opens a finished one; `fl_dplora.privacy.epsilon(...)` and
`noise_multiplier(...)` account a DP-SGD schedule. They are imported on first use, so `import
fl_dplora` stays light (no torch, Flower or transformers).
"""

from fl_dplora.console import quiet_known_warnings as _quiet_known_warnings

# here, so that every process that loads the app drops them: the CLI, Flower's app processes, Ray's actors
_quiet_known_warnings()

__all__ = ["simulate", "load_run", "Run"]


def __getattr__(name: str):
    if name in __all__:
        from fl_dplora import api

        return getattr(api, name)
    raise AttributeError(f"module 'fl_dplora' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
