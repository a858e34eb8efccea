"""Everything before round 1: the checks that need no model, the output dir, the model and its label
head, the strategy, and the state a checkpoint restores. The order is the point: every check that can
refuse a run comes before any file is written or any client trains."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.serverapp import Grid

from fl_dplora import checkpoint, protocol
from fl_dplora.config import RunConfig, SERVER_ONLY_KEYS
from fl_dplora.data import check_task, eval_examples, load_task
from fl_dplora.model_loading import check_model_name, check_runtime, server_device, tokenizer_for
from fl_dplora.models import adapter_parameters, check_lora_targets, full_model_stats, get_peft_model, reset_adapter
from fl_dplora.privacy.engine import PrivacyEngine
from fl_dplora.privacy.modes import for_config
from fl_dplora.run_dir import claim_output_dir
from fl_dplora.server.evaluation import setup_label_head
from fl_dplora.server.outputs import RunWriter
from fl_dplora.server.run_state import RunState, check_resume_config, resume
from fl_dplora.strategies.dp_lora import DPLoRAFedAvg
from fl_dplora.tracking import Tracker, check_report_to
from fl_dplora.write_ahead import WriteAhead

log = logging.getLogger("fl_dplora")


def preflight(cfg: RunConfig) -> None:
    """Cheap checks that need no model: fail in a second, not after a model load."""
    check_model_name(cfg.model.name)
    check_runtime(cfg)
    check_task(cfg.data.task)
    check_lora_targets(cfg)  # on the model's skeleton (meta device): before any file is written


@dataclass
class ServerRun:
    """What stays fixed for a run's rounds (what changes is RunState)."""

    cfg: RunConfig
    out_dir: Path
    mode: Any  # privacy.modes: the dp-mode's object
    task: Any
    evals: list
    model: Any
    tokenizer: Any
    head_config: dict[str, list[float]]  # the label head's public feature statistics, sent to the clients
    params: dict[str, Any]  # the adapter's tensors in the model
    sizes: dict[str, int]  # trainable_params, full_model_params, full_model_bytes (summary.json)
    strategy: DPLoRAFedAvg
    writer: RunWriter
    wal: WriteAhead
    tracker: Tracker
    client_cfg: dict[str, Any]  # the run config the clients are sent

    @property
    def rounds(self) -> int:
        return self.cfg.federation.num_server_rounds


def start_run(grid: Grid, cfg: RunConfig) -> tuple[ServerRun, RunState]:
    preflight(cfg)
    check_report_to(cfg)  # a tracker whose package is missing: one line, before any file is written
    # a new run never reuses a folder holding a run: refused (one line), or its files deleted (overwrite)
    out_dir = claim_output_dir(cfg)
    resumed = checkpoint.load(out_dir) if cfg.output.resume else None  # refuse a damaged one before anything else
    if resumed is not None:
        check_resume_config(resumed["config"], cfg)
    writer = RunWriter(out_dir, keep_rounds=resumed["round"] if resumed else 0)
    wal = WriteAhead(out_dir, fresh=resumed is None)
    tracker = Tracker(cfg, out_dir)  # report-to and metrics.png: each released row, as it is written
    mode = for_config(cfg)  # the run's one mode object: the strategy uses it too
    task = load_task(cfg.data.task, cfg.train.seed)
    evals = eval_examples(cfg)
    model = get_peft_model(cfg, device=server_device(cfg))
    reset_adapter(model)  # the process-cached model may hold a previous run's adapter
    tokenizer = tokenizer_for(cfg)
    head_config = setup_label_head(model, tokenizer, task, cfg)
    params = adapter_parameters(model, cfg)
    full_params, full_bytes = full_model_stats(model)
    trainable = sum(p.numel() for p in params.values())

    state = RunState(*mode.noise_multipliers(), engine=PrivacyEngine.for_run(cfg.privacy))  # the run's one engine
    if mode.secagg is not None and mode.unit:
        mode.secagg.check_delta(state.server_sigma, trainable)  # refused rounds must not matter next to δ
    strategy = DPLoRAFedAvg(cfg, {k: p.detach() for k, p in params.items()}, server_sigma=state.server_sigma, mode=mode)
    if mode.secagg is not None:  # SecAgg+: the nodes present must be the declared population, checked before any client trains
        strategy.fix_secure_members(grid, cfg.federation.round_timeout)
    log.info("fl-dplora: %s on %s, dp-mode=%s, %d trainable LoRA values (%.4f%% of %d), output %s",
             cfg.model.name, cfg.data.task, mode.name, trainable, 100 * trainable / full_params, full_params, out_dir)
    if mode.client_level:
        log.info("client-level DP: noise multiplier %.4f (accountant sees %.4f), q=%.3f, %d rounds, divisor q x population = %g",
                 state.server_sigma, state.accountant_sigma, cfg.federation.fraction_train, cfg.federation.num_server_rounds, mode.divisor)
    note = mode.reference_note()
    if note:
        log.info(note)
    if resumed is not None:
        resume(state, resumed, strategy, wal, mode, cfg, out_dir)

    client_cfg = {k: v for k, v in cfg.to_record().items() if k not in SERVER_ONLY_KEYS}  # what clients are sent
    if task.card is not None:  # nodes with their own data read it with the run's card, not the server's files
        client_cfg[protocol.TASK_CARD] = task.card.to_wire()
    sizes = {"trainable_params": trainable, "full_model_params": full_params, "full_model_bytes": full_bytes}
    return ServerRun(cfg, out_dir, mode, task, evals, model, tokenizer, head_config, params, sizes, strategy, writer,
                     wal, tracker, client_cfg), state
