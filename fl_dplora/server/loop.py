"""The round loop: sample → send → aggregate → record, then the run's end (final adapter, summary)."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from flwr.app import ConfigRecord
from flwr.serverapp import Grid

from fl_dplora import protocol
from fl_dplora.config import RunConfig
from fl_dplora.models import round_keys
from fl_dplora.progress import RoundsProgress
from fl_dplora.server import outputs
from fl_dplora.server.evaluation import evaluate_global, score_test
from fl_dplora.server.ledgers import Charge, charge_round, handback
from fl_dplora.server.run_state import RunState, account_round, save_checkpoint
from fl_dplora.server.start import ServerRun, start_run
from fl_dplora.thread_layout import log_thread_layout

log = logging.getLogger("fl_dplora")


def run_server(grid: Grid, cfg: RunConfig) -> dict[str, Any]:
    """A whole run on `grid` with the resolved run config `cfg`; returns summary.json's content."""
    t_start = time.time()
    run, state = start_run(grid, cfg)
    log_thread_layout("server")  # once per process, after start_run's refusals; operator log only (thread_layout.py)
    rounds, mode, strategy = run.rounds, run.mode, run.strategy
    bar = RoundsProgress(state.rounds_done + 1, rounds)  # with ETA, on a terminal only (progress.py)
    for rnd in bar:
        t_round = time.time()
        charge = charge_round(mode, state.engine, state.server_sigma, state.accountant_sigma, rnd, rounds)
        if charge is None:  # the round would overrun target-epsilon (logged)
            break
        attempt = send_and_aggregate(grid, run, state, rnd, charge)
        st = strategy.stats
        state.totals["up"] += st.bytes_up
        state.totals["down"] += st.bytes_down
        account_round(state, mode, charge, st.client_metrics, rnd, attempt, run.wal, cfg)
        exhausted = [m for m in st.client_metrics if m.get(protocol.BUDGET_EXHAUSTED)]
        if rnd == rounds or (cfg.federation.eval_every and rnd % cfg.federation.eval_every == 0):
            evaluate_round(grid, run, state, rnd)
        row = outputs.metrics_row(rnd, state.last_eval, run.task, mode, state.epsilon, cfg, st.client_metrics)
        seconds = time.time() - t_round
        run.wal.operator(outputs.operator_round(rnd, st, seconds))
        run.writer.round(row)
        run.tracker.round(row)
        if st.sampled and not st.accepted and st.dropped and all("client error" in d for d in st.dropped):
            # Not an outage: every client ran and raised. Carrying on would report an untrained adapter.
            raise RuntimeError(f"round {rnd}: every sampled client failed; first: {st.dropped[0]}")
        state.rounds_done = rnd
        save_round(run, state, rnd)
        outputs.log_round(rnd, rounds, row, st, mode, state.epsilon, seconds)
        bar.show(row)
        if exhausted and len(exhausted) == st.received:
            log.error("stopping early: every sampled client has exhausted its privacy budget (target-epsilon %g)",
                      cfg.privacy.target_epsilon)
            break
    return finish(run, state, t_start)


def send_and_aggregate(grid: Grid, run: ServerRun, state: RunState, rnd: int, charge: Charge) -> str:
    """Sample and instruct the round's clients, then aggregate their replies; returns the write-ahead attempt."""
    strategy, cfg = run.strategy, run.cfg
    config = ConfigRecord({**run.client_cfg, protocol.SIGMA: float(state.server_sigma), **run.head_config})
    if state.resumed and state.client_ledgers:
        # clients restarted with the server lose their context.state: hand back their ledgers, in
        # every round after a resume (a client may be sampled again only rounds later)
        config[protocol.CLIENT_LEDGERS] = json.dumps(handback(state.client_ledgers, state.client_eps))
    messages = strategy.configure_train(rnd, strategy.global_record(round_keys(cfg, rnd, run.params)), config, grid)
    # write-ahead: the round and whom it asks are on disk before any client sees a message
    attempt = run.wal.begin(rnd, [str(int(m.metadata.dst_node_id)) for m in messages],
                            state.accountant_sigma if charge.event is not None else None)
    if run.mode.secagg is not None:  # SecAgg+: the server only ever holds the sum of the round's updates
        strategy.aggregate_secure(rnd, grid)
    else:
        replies = grid.send_and_receive(messages, timeout=cfg.federation.round_timeout) if messages else []
        strategy.aggregate_train(rnd, replies)
    return attempt


def evaluate_round(grid: Grid, run: ServerRun, state: RunState, rnd: int) -> None:
    """The global adapter on the server's public data (released), then on the nodes' own (operator's)."""
    state.last_eval = evaluate_global(run.model, run.params, run.strategy, run.tokenizer, run.task, run.evals, run.cfg)
    fed = run.strategy.federated_evaluate(rnd, ConfigRecord({**run.client_cfg, **run.head_config}), grid)
    if fed is not None:  # metrics of the nodes' private data: the operator's, never released
        run.wal.operator({"round": rnd, "event": "federated-eval", **fed})
        outputs.log_federated_eval(rnd, run.rounds, fed)


def save_round(run: ServerRun, state: RunState, rnd: int) -> None:
    cfg = run.cfg
    if cfg.output.save_every and rnd % cfg.output.save_every == 0:  # a DP output like the final adapter
        outputs.save_adapter(run.model, run.params, run.strategy, run.out_dir / "adapters" / f"round-{rnd}", run.task)
    if cfg.output.checkpoint_every and (rnd % cfg.output.checkpoint_every == 0 or rnd == run.rounds):
        save_checkpoint(run.out_dir, rnd, cfg, run.strategy, state)


def finish(run: ServerRun, state: RunState, t_start: float) -> dict[str, Any]:
    """The final adapter, the test part scored once, summary.json and the operator's summary row."""
    model, params, strategy, task, cfg = run.model, run.params, run.strategy, run.task, run.cfg
    if state.rounds_done < run.rounds and not state.last_eval:
        state.last_eval = evaluate_global(model, params, strategy, run.tokenizer, task, run.evals, cfg)
    outputs.save_adapter(model, params, strategy, run.out_dir / "adapter", task)
    test = score_test(model, params, strategy, run.tokenizer, task, cfg)
    privacy = outputs.privacy_block(cfg, run.mode, state, dim=run.sizes["trainable_params"])
    summary = outputs.summary(cfg, state, privacy, run.sizes, test)
    run.wal.operator(outputs.operator_summary(cfg, state, time.time() - t_start))
    run.writer.summary(summary)
    run.tracker.close()
    log.info("done: final %s, epsilon=%s, output %s",
             {k: round(v, 4) for k, v in state.last_eval.items() if isinstance(v, float)}, privacy["epsilon"],
             run.out_dir)
    return summary
