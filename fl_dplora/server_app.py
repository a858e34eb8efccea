"""Flower ServerApp: rounds of (sample → train → validate/aggregate → account → evaluate → log).

Writes into the output dir (docs/privacy.md, "Threat model"). Released: metrics.jsonl (one line per round: ε and the
evaluation on the server's public set), summary.json, adapter/. The operator's, not for release
(write_ahead.py): operator.jsonl (who took part, drops, bytes, timings) and rounds.wal.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fl_dplora import checkpoint, label_head, protocol
from fl_dplora.config import SERVER_ONLY_KEYS, ConfigError, resolve
from fl_dplora.data import check_task, encode_all, eval_examples, head_stat_examples, load_task
from fl_dplora.forward import attach_prefix, label_token_ids
from fl_dplora.evaluate import evaluate, score_test_part
from fl_dplora.models import (
    adapter_parameters, check_lora_targets, check_model_name, check_runtime, full_model_stats, get_peft_model, load_adapter_weights,
    reset_adapter, round_keys, server_device, tokenizer_for,
)
from fl_dplora.privacy.accounting import PrivacyLedger, extends
from fl_dplora.privacy.modes import for_config
from fl_dplora.run_dir import claim_output_dir
from fl_dplora.strategies.dp_lora import DPLoRAFedAvg
from fl_dplora.tracking import Tracker, check_report_to
from fl_dplora.train import stage_config
from fl_dplora.write_ahead import WriteAhead

log = logging.getLogger("fl_dplora")


def preflight(cfg: Mapping[str, Any]) -> None:
    """Cheap checks that need no model: fail in a second, not after a model load."""
    check_model_name(cfg["model"])
    check_runtime(cfg)
    check_task(cfg["task"])
    check_lora_targets(cfg)  # on the model's skeleton (meta device): before any file is written


class RunWriter:
    def __init__(self, out_dir: Path, keep_rounds: int = 0):
        """Start metrics.jsonl afresh, or keep its first `keep_rounds` rows when resuming."""
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = out_dir / "metrics.jsonl"
        kept = []
        if keep_rounds and self.metrics_path.is_file():
            rows = [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]
            kept = [r for r in rows if r["round"] <= keep_rounds]
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def round(self, row: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def summary(self, summary: dict[str, Any]) -> None:
        tmp = self.out_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(self.out_dir / "summary.json")


def run_server(grid: Grid, cfg: dict[str, Any]) -> dict[str, Any]:
    from fl_dplora.progress import RoundsProgress

    t_start = time.time()
    preflight(cfg)
    check_report_to(cfg)  # a tracker whose package is missing: one line, before any file is written
    # a new run never reuses a folder holding a run: refused (one line), or its files deleted (overwrite)
    out_dir = claim_output_dir(cfg)
    resumed = checkpoint.load(out_dir) if cfg["resume"] else None  # refuse a damaged one before anything else
    if resumed is not None:
        _check_resume_config(resumed["config"], cfg)
    writer = RunWriter(out_dir, keep_rounds=resumed["round"] if resumed else 0)
    wal = WriteAhead(out_dir, fresh=resumed is None)
    tracker = Tracker(cfg, out_dir)  # report-to and metrics.png: each released row, as it is written
    mode = for_config(cfg)
    task = load_task(cfg["task"], int(cfg["seed"]))
    evals = eval_examples(cfg)
    model = get_peft_model(cfg, device=server_device(cfg))
    reset_adapter(model)  # the process-cached model may hold a previous run's adapter
    tokenizer = tokenizer_for(cfg)
    head_config = _setup_label_head(model, tokenizer, task, cfg)
    params = adapter_parameters(model, cfg)
    full_params, full_bytes = full_model_stats(model)
    trainable = sum(p.numel() for p in params.values())

    server_sigma, accountant_sigma = mode.noise_multipliers()
    if mode.secure and mode.unit:
        mode.check_secagg_delta(server_sigma, trainable)  # refused rounds must not matter next to δ
    strategy = DPLoRAFedAvg(cfg, {k: p.detach() for k, p in params.items()}, server_sigma=server_sigma)
    if mode.secure:  # SecAgg+: the nodes present must be the declared population, checked before any client trains
        strategy.fix_secure_members(grid, float(cfg["round-timeout"]))
    server_ledger = PrivacyLedger()
    client_eps: dict[int, dict[str, Any]] = {}
    log.info("fl-dplora: %s on %s, dp-mode=%s, %d trainable LoRA values (%.4f%% of %d), output %s",
             cfg["model"], cfg["task"], mode.name, trainable, 100 * trainable / full_params, full_params, out_dir)
    if mode.client_level:
        log.info("client-level DP: noise multiplier %.4f (accountant sees %.4f), q=%.3f, %d rounds, divisor q x population = %g",
                 server_sigma, accountant_sigma, cfg["fraction-train"], cfg["num-server-rounds"], mode.divisor)
    note = mode.reference_note()
    if note:
        log.info(note)

    rounds = int(cfg["num-server-rounds"])
    totals = {"up": 0, "down": 0}
    last_eval: dict[str, float] = {}
    epsilon = 0.0
    rounds_done = 0
    # what the server knows of each node's ledger, keyed by the node's Flower node id (the SuperLink's
    # authenticated identity of the replying node), never by a number the node reports
    client_ledgers: dict[str, dict[str, list]] = {}
    if resumed is not None:
        strategy.load_state_dict(resumed["strategy"])
        server_ledger = PrivacyLedger.from_record(resumed["server_ledger"])
        client_eps = {int(k): v for k, v in resumed["client_eps"].items()}
        client_ledgers, totals = resumed["client_ledgers"], resumed["totals"]
        last_eval = dict(resumed.get("last_eval", {}))  # rows between evaluations repeat the last one
        rounds_done = int(resumed["round"])
        charged = _charge_unaccounted(wal.unaccounted(rounds_done), mode, accountant_sigma, server_ledger,
                                      client_ledgers, client_eps, cfg)
        epsilon = _run_epsilon(mode, server_ledger, client_ledgers, cfg)
        if mode.client_level and server_ledger.total_steps > rounds_done:  # a crash charged a lost attempt
            again = mode.remaining_noise_multipliers(server_ledger.history, rounds - rounds_done,
                                                     server_ledger.history[-1][0])
            if again is not None and again[1] != accountant_sigma:  # None: σ fixed, or nothing left to spend
                log.info("resume: %d attempts charged; noise multiplier %.4f -> %.4f so that the last %d round(s) fit "
                         "target-epsilon %g", server_ledger.total_steps, server_sigma, again[0], rounds - rounds_done,
                         cfg["target-epsilon"])
                (server_sigma, accountant_sigma), strategy.server_sigma = again, again[0]
        log.info("resuming %s after round %d (epsilon so far %.4g, %d begun round(s) after the checkpoint charged)",
                 out_dir, rounds_done, epsilon, charged)
    bar = RoundsProgress(rounds_done + 1, rounds)  # with ETA, on a terminal only (progress.py)
    client_cfg = {k: v for k, v in cfg.items() if k not in SERVER_ONLY_KEYS}  # what clients are sent
    if task.card is not None:  # nodes with their own data read it with the run's card, not the server's files
        client_cfg[protocol.TASK_CARD] = task.card.to_wire()
    for rnd in bar:
        t_round = time.time()
        event = mode.round_event(accountant_sigma)
        if event is not None:
            # Every round is accounted (Poisson client sampling): never start one that overruns the budget.
            next_ledger = PrivacyLedger(server_ledger.history)
            next_ledger.step(*event)
            next_epsilon = next_ledger.epsilon(cfg["delta"], cfg["accountant"])
            if next_epsilon > cfg["target-epsilon"] * (1 + 1e-6):
                log.error("stopping early: round %d would raise epsilon to %.4g > target-epsilon %g "
                          "(noise-multiplier %g is too small for %d rounds; set it <= 0 to calibrate)",
                          rnd, next_epsilon, cfg["target-epsilon"], server_sigma, rounds)
                break
        config = ConfigRecord({**client_cfg, protocol.SIGMA: float(server_sigma), **head_config})
        if resumed is not None and client_ledgers:
            # clients restarted with the server lose their context.state: hand back their ledgers, in
            # every round after a resume (a client may be sampled again only rounds later)
            config[protocol.CLIENT_LEDGERS] = json.dumps(_handback(client_ledgers, client_eps))
        messages = strategy.configure_train(rnd, strategy.global_record(round_keys(cfg, rnd, params)), config, grid)
        # write-ahead: the round and whom it asks are on disk before any client sees a message
        attempt = wal.begin(rnd, [str(int(m.metadata.dst_node_id)) for m in messages],
                            accountant_sigma if event is not None else None)
        if mode.secure:  # SecAgg+: the server only ever holds the sum of the round's updates
            strategy.aggregate_secure(rnd, grid)
        else:
            replies = grid.send_and_receive(messages, timeout=float(cfg["round-timeout"])) if messages else []
            strategy.aggregate_train(rnd, replies)
        st = strategy.stats
        totals["up"] += st.bytes_up
        totals["down"] += st.bytes_down

        if event is not None:
            server_ledger, epsilon = next_ledger, next_epsilon
        if mode.example_level:
            for m in st.client_metrics:
                if "epsilon" in m:
                    _take_reported_ledger(m, rnd, client_ledgers, client_eps, wal, cfg)
            epsilon = _run_epsilon(mode, server_ledger, client_ledgers, cfg)
        wal.replied(attempt, rnd, client_ledgers if mode.example_level else {})
        exhausted = [m for m in st.client_metrics if m.get(protocol.BUDGET_EXHAUSTED)]

        if rnd == rounds or (cfg["eval-every"] and rnd % int(cfg["eval-every"]) == 0):
            last_eval = _evaluate_global(model, params, strategy, tokenizer, task, evals, cfg)
            fed = strategy.federated_evaluate(rnd, ConfigRecord({**client_cfg, **head_config}), grid)
            if fed is not None:  # metrics of the nodes' private data: the operator's, never released
                wal.operator({"round": rnd, "event": "federated-eval", **fed})
                log.info("[round %d/%d] federated eval (operator log): %d/%d nodes, %d declined, %d examples, %s", rnd,
                         rounds, fed["replied"], fed["asked"], len(fed["declined"]), fed["num-examples"],
                         " ".join(f"{k}={v:.4f}" for k, v in fed["weighted"].items()) or "-")
        losses = [m["train_loss"] for m in st.client_metrics if "train_loss" in m]
        row = {  # released: DP outputs and the evaluation on the server's own data only
            "round": rnd,
            "eval_loss": last_eval.get("loss"), "eval_accuracy": last_eval.get("accuracy"),
            "eval_macro_f1": last_eval.get("macro_f1"), "eval_majority_rate": last_eval.get("majority_rate"),
            **({"eval_bleu": last_eval.get("bleu"), "eval_rouge_l": last_eval.get("rouge_l")} if task.kind == "generation" else {}),
            "epsilon": epsilon if mode.unit else None, "delta": cfg["delta"] if mode.unit else None,
        }
        if mode.releases_raw_counts:  # no DP: the clients' own mean loss may be shown
            row["train_loss"] = sum(losses) / len(losses) if losses else None
        seconds = time.time() - t_round
        wal.operator({"round": rnd, "sampled": st.sampled, "accepted": st.accepted, "dropped": st.dropped,
                      "bytes_up": st.bytes_up, "bytes_down": st.bytes_down, "seconds": seconds,
                      "client_seconds": sum(float(m.get("compute-seconds", 0.0)) for m in st.client_metrics)})
        writer.round(row)
        tracker.round(row)
        if st.sampled and not st.accepted and st.dropped and all("client error" in d for d in st.dropped):
            # Not an outage: every client ran and raised. Carrying on would report an untrained adapter.
            raise RuntimeError(f"round {rnd}: every sampled client failed; first: {st.dropped[0]}")
        rounds_done = rnd
        if cfg["save-every"] and rnd % int(cfg["save-every"]) == 0:  # a DP output like the final adapter
            _save_adapter(model, params, strategy, out_dir / "adapters" / f"round-{rnd}", task)
        if cfg["checkpoint-every"] and (rnd % int(cfg["checkpoint-every"]) == 0 or rnd == rounds):
            checkpoint.save(out_dir, {
                "round": rnd, "config": dict(cfg), "strategy": strategy.state_dict(),
                "server_ledger": server_ledger.to_record(), "client_eps": {str(k): v for k, v in client_eps.items()},
                "client_ledgers": client_ledgers, "totals": totals, "epsilon": float(epsilon),
                "last_eval": dict(last_eval),
            })
        acc = (f" acc={row['eval_accuracy']:.3f} (majority {row['eval_majority_rate']:.3f}) f1={row['eval_macro_f1']:.3f}"
               if row["eval_accuracy"] is not None else "")
        if row.get("eval_bleu") is not None:
            acc += f" bleu={row['eval_bleu']:.2f} rouge_l={row['eval_rouge_l']:.4f}"
        eps = f" eps={epsilon:.3f}" if mode.unit else ""
        log.info("[round %d/%d] clients=%d/%d eval_loss=%s%s%s up=%dB down=%dB %.1fs", rnd, rounds, st.accepted,
                 st.sampled, f"{row['eval_loss']:.4f}" if row["eval_loss"] is not None else "-", acc, eps,
                 st.bytes_up, st.bytes_down, seconds)
        bar.show(row)
        if exhausted and len(exhausted) == st.received:
            log.error("stopping early: every sampled client has exhausted its privacy budget (target-epsilon %g)",
                      cfg["target-epsilon"])
            break

    if rounds_done < rounds and not last_eval:
        last_eval = _evaluate_global(model, params, strategy, tokenizer, task, evals, cfg)
    _save_adapter(model, params, strategy, out_dir / "adapter", task)
    test = _score_test_part(model, params, strategy, tokenizer, task, cfg)

    privacy = _privacy_block(cfg, mode, server_sigma, accountant_sigma, client_eps, epsilon, rounds_done,
                             server_ledger, client_ledgers, dim=trainable)
    summary = {
        "rounds": rounds_done,
        "final_eval": {"accuracy": last_eval.get("accuracy"), "loss": last_eval.get("loss"),
                       **{k: v for k, v in last_eval.items() if k not in ("accuracy", "loss")}},
        "trainable_params": trainable, "full_model_params": full_params, "full_model_bytes": full_bytes,
        "privacy": privacy, "config": cfg,
    }
    if test is not None:
        summary["test_eval"] = test
    # bytes and wall time depend on who took part: the operator's, next to the per-round rows
    # the ledgers let a reviewer recompute every ε with an accountant of their own
    wal.operator({"event": "summary", "bytes_up_total": totals["up"], "bytes_down_total": totals["down"],
                  "wall_seconds": time.time() - t_start, "rounds": rounds_done, "accountant": cfg["accountant"],
                  "delta": cfg["delta"], "server_ledger": server_ledger.to_record(), "client_ledgers": client_ledgers})
    writer.summary(summary)
    tracker.close()
    log.info("done: final %s, epsilon=%s, output %s", {k: round(v, 4) for k, v in last_eval.items() if isinstance(v, float)},
             privacy["epsilon"], out_dir)
    return summary


def _run_epsilon(mode, server_ledger: PrivacyLedger, client_ledgers: Mapping[str, Mapping[str, list]], cfg) -> float:
    if mode.client_level:
        return server_ledger.epsilon(cfg["delta"], cfg["accountant"])
    if mode.example_level:
        return max((PrivacyLedger.from_record(r).epsilon(cfg["delta"], cfg["accountant"]) for r in client_ledgers.values()),
                   default=0.0)
    return 0.0


def _charge_unaccounted(attempts, mode, accountant_sigma: float, server_ledger: PrivacyLedger,
                        client_ledgers: dict[str, dict[str, list]], client_eps: dict[int, dict[str, Any]], cfg) -> int:
    """Charge every round begun after the checkpoint (write_ahead.py), in the order they began."""
    for att in attempts:
        event = mode.round_event(accountant_sigma if att.sigma is None else float(att.sigma))
        if event is not None:
            server_ledger.step(*event)
        if not mode.example_level:
            continue
        if att.ledgers is not None:  # the ledgers its replies reported (they include that round)
            client_ledgers.update({k: dict(v) for k, v in att.ledgers.items()})
            continue
        for key in att.asked:  # replies lost: the worst case of that round for each asked client
            if key not in client_ledgers:
                log.warning("resume: node %s was asked in round %d but never reported a ledger; it cannot be charged here "
                            "(its own ledger, if it kept one, is charged on the node)", key, att.round)
                continue
            _charge_worst_case(key, att.round, client_ledgers, client_eps, cfg)
    for key in client_ledgers:  # what the summary reports per client follows the ledger
        _refresh_client_eps(key, client_ledgers, client_eps, cfg)
    return len(attempts)


def _charge_worst_case(key: str, rnd: int, client_ledgers: dict[str, dict[str, list]],
                       client_eps: dict[int, dict[str, Any]], cfg) -> None:
    """One round's steps on the server's copy of a node's ledger, with the σ and q it last reported."""
    ledger = PrivacyLedger.from_record(client_ledgers[key])
    known = client_eps.get(int(key), {}) if key.isdigit() else {}
    sigma = float(known.get("sigma", ledger.history[-1][0] if ledger.history else 0.0))
    rate = float(known.get("sample-rate", 1.0))
    n = int(round(int(cfg["batch-size"]) / rate)) if 0 < rate < 1 else 1  # q unknown -> q = 1
    stage = stage_config(cfg, rnd, n)
    ledger.step(sigma, min(1.0, int(stage["batch-size"]) / n) if n > 1 else 1.0, int(stage["local-steps"]))
    client_ledgers[key] = ledger.to_record()


def _refresh_client_eps(key: str, client_ledgers, client_eps: dict[int, dict[str, Any]], cfg) -> None:
    if key.isdigit() and int(key) in client_eps:
        ledger = PrivacyLedger.from_record(client_ledgers[key])
        client_eps[int(key)].update(epsilon=ledger.epsilon(cfg["delta"], cfg["accountant"]),
                                    **{"steps-total": ledger.total_steps})


def _take_reported_ledger(m: Mapping[str, Any], rnd: int, client_ledgers: dict[str, dict[str, list]],
                          client_eps: dict[int, dict[str, Any]], wal: WriteAhead, cfg) -> bool:
    """Store the ledger a node's reply reports, under the node's Flower node id (set by the server from
    the message the reply answers, never from the reply's metrics). A report that does not extend the
    stored ledger (shorter, or another history) is rejected: the stored one stays, charged with this
    round's steps if the node trained, and the rejection goes to the operator log. True if taken."""
    key = str(int(m["node_id"]))
    reported = protocol.ledger_from_metrics(m)
    stored = client_ledgers.get(key)
    if stored is None or extends(stored, reported):
        client_eps[int(key)] = {k: v for k, v in m.items() if not k.startswith(protocol.LEDGER_PREFIX)}
        client_ledgers[key] = reported
        return True
    trained = not m.get(protocol.BUDGET_EXHAUSTED)
    why = (f"reported ledger ({sum(reported['steps'])} steps) does not extend the stored one "
           f"({sum(stored['steps'])} steps)")
    log.warning("round %d: node %s: %s; kept the stored ledger%s", rnd, key, why,
                ", charged with this round's steps" if trained else "")
    wal.operator({"round": rnd, "event": "ledger-rejected", "node": key, "partition-id": m.get("partition-id"),
                  "why": why, "stored": dict(stored), "reported": reported, "charged": trained})
    if trained:
        _charge_worst_case(key, rnd, client_ledgers, client_eps, cfg)
    _refresh_client_eps(key, client_ledgers, client_eps, cfg)
    return False


def _handback(client_ledgers: Mapping[str, Mapping[str, list]], client_eps: Mapping[int, Mapping[str, Any]]):
    """The ledgers a resumed run sends its nodes: by node id, and (for a simulation restarted with new
    node ids) the longest one per reported partition label. A node adopts one only if it extends its own."""
    out: dict[str, Any] = dict(client_ledgers)
    for key, record in client_ledgers.items():
        label = client_eps.get(int(key), {}).get("partition-id") if key.isdigit() else None
        if label is None:
            continue
        name = f"{protocol.LABEL_KEY_PREFIX}{int(label)}"
        if name not in out or sum(record["steps"]) > sum(out[name]["steps"]):
            out[name] = dict(record)
    return out


def _setup_label_head(model, tokenizer, task, cfg: Mapping[str, Any]) -> dict[str, list[float]]:
    """label-head: a fresh zero head whose feature statistics come from public examples (the task's
    evaluation data outside the scored subset); returns them as the config entries clients read."""
    label_head.remove(model)
    if not cfg["label-head"]:
        return {}
    if task.kind != "classification":
        raise ConfigError(f"label-head: needs a classification task; {cfg['task']} is {task.kind}")
    ids = label_token_ids(tokenizer, task.label_words)
    public = encode_all(tokenizer, head_stat_examples(cfg), int(cfg["max-seq-len"]), cfg["system-prompt"])
    if public:
        public = attach_prefix(model, public, cfg["prefix-cache"])
        mean, scale = label_head.feature_stats(model, public, tokenizer.pad_token_id)
    else:  # every evaluation row is scored: no scored prompt may shape the head, so no data at all
        mean, scale = label_head.neutral_stats(int(model.config.hidden_size))
        log.warning("label-head: the server scores all of the task's evaluation rows, so no public unscored prompt is "
                    "left for the feature statistics: data-independent ones (mean 0, scale 1) are used; set "
                    "max-eval-samples below the eval set's size to take them from the rows it does not score")
    label_head.install(model, ids.tolist(), mean, scale)
    head_rounds = min(int(cfg["head-rounds"]), int(cfg["num-server-rounds"]))
    stages = (f"rounds 1-{head_rounds} train only the head" if head_rounds else "") + (
        f"{', then ' if head_rounds else ''}rounds {head_rounds + 1}-{cfg['num-server-rounds']} LoRA and head"
        if head_rounds < int(cfg["num-server-rounds"]) else "")
    log.info("label-head: %d values (%d labels), feature statistics from %d public examples; %s",
             label_head.get(model).proj.weight.numel(), len(ids), len(public), stages)
    return dict(label_head.stats_to_config(mean, scale))


def _check_resume_config(saved: Mapping[str, Any], cfg: Mapping[str, Any]) -> None:
    """Resuming with other settings would not be the same run: name every key that differs.

    A key that the checkpoint lacks (written before the key existed) counts as its LEGACY_VALUES
    value, the one that computes what runs did before; a missing key without one still differs.
    """
    from fl_dplora import config  # read LEGACY_VALUES now: keys may be added to it

    ignore = {"resume", "overwrite", "output-dir", "round-timeout", "save-every"}
    missing = object()  # a key the checkpoint lacks and LEGACY_VALUES does not know: differs from anything
    was = {k: saved[k] if k in saved else config.LEGACY_VALUES.get(k, missing) for k in cfg}
    diff = [k for k in cfg if k not in ignore and was[k] != cfg[k]]
    if diff:
        raise ConfigError("\n".join(f"{k}: {cfg[k]!r} differs from the checkpoint's "
                                     f"{None if was[k] is missing else was[k]!r}; resume with the same config"
                                     for k in diff))


def _save_adapter(model, params, strategy, folder: Path, task) -> None:
    """The global adapter (and label head) as a PEFT folder that `fl-dplora evaluate --adapter` reads."""
    from fl_dplora.adapter_io import name_base_model

    load_adapter_weights(params, strategy.global_weights)
    model.save_pretrained(str(folder))
    name_base_model(folder, strategy.cfg)  # a base AutoPeftModelForCausalLM loads, not what PEFT saw
    label_head.save(model, folder, task.label_words)


def _evaluate_global(model, params, strategy, tokenizer, task, evals, cfg) -> dict[str, float]:
    load_adapter_weights(params, strategy.global_weights)
    return evaluate(model, tokenizer, task, evals, int(cfg["max-seq-len"]), max_new_tokens=int(cfg["max-new-tokens"]),
                    system_prompt=cfg["system-prompt"], prefix_cache=cfg["prefix-cache"])


def _score_test_part(model, params, strategy, tokenizer, task, cfg) -> dict[str, Any] | None:
    load_adapter_weights(params, strategy.global_weights)
    result = score_test_part(model, tokenizer, task, cfg)
    if result is not None:
        log.info("test part (%d inputs, scored once): %s", result["num_inputs"],
                 " ".join(f"{k}={v:.4f}" for k, v in result.items() if isinstance(v, float)))
    return result


def _privacy_block(cfg, mode, server_sigma, accountant_sigma, client_eps, epsilon, rounds_done, server_ledger,
                   client_ledgers=None, dim: int = 0) -> dict[str, Any]:
    block = {"mode": mode.name, "noise_multiplier": None, "max_grad_norm": None, "sample_rate": None, "steps": 0,
             "accountant": None, "epsilon": None, "delta": cfg["delta"]}
    if mode.unit is None:
        if mode.secure:
            block["secure_aggregation"] = mode.secagg_describe(dim, 0.0, 0.0)
        return block
    block.update(max_grad_norm=cfg["max-grad-norm"], accountant=cfg["accountant"], epsilon=epsilon,
                 unit=mode.unit, trusted=mode.trusted)
    if mode.example_level:
        # each node's q comes from a public size, or its n is released and its ε is replace-one (sample_rate.py)
        worst = max(client_eps.values(), key=lambda m: float(m["epsilon"]), default={})
        ledger = (client_ledgers or {}).get(str(worst.get("node_id")))
        adjacency = {k: (client_ledgers or {}).get(str(k), {}).get("adjacency", "add-remove") for k in client_eps}
        if ledger:  # every (sigma, q, steps) event of the worst client: label-head runs mix two q's
            block["history"] = [list(e) for e in zip(ledger["sigmas"], ledger["rates"], ledger["steps"])]
        block.update(noise_multiplier=worst.get("sigma"), sample_rate=worst.get("sample-rate"),
                     adjacency=adjacency.get(int(worst.get("node_id", -1)), "add-remove"),
                     steps=int(worst.get("steps-total", 0)), per_client={
                         str(k): {"epsilon": m["epsilon"], "sigma": m.get("sigma"), "sample_rate": m.get("sample-rate"),
                                  "steps": m.get("steps-total"), "partition_id": m.get("partition-id"),
                                  "adjacency": adjacency[k]}
                         for k, m in sorted(client_eps.items())})  # keyed by node id; partition_id: the node's label
    else:  # steps = rounds charged, a resumed run's begun-but-lost attempts included
        block.update(noise_multiplier=server_sigma, accountant_noise_multiplier=accountant_sigma,
                     sample_rate=cfg["fraction-train"], steps=server_ledger.total_steps, **mode.describe())
        block["mode"] = mode.name
        if mode.secure:
            block["secure_aggregation"] = mode.secagg_describe(dim, server_sigma, epsilon)
        block["history"] = [list(e) for e in server_ledger.history]  # σ recalibrated after a resume: two σ's
        # the nodes' own noise is the config's σ whatever a resume raised the server's to (modes.ClientDP.aggregate)
        against_server = mode.epsilon_against_server([mode.noise_multipliers()[1]] * server_ledger.total_steps)
        if against_server is not None:
            block["epsilon_against_server"] = against_server
    return block


def build_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose config is Flower's run config with `overrides` on top (for fl-dplora simulate)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        if not log.handlers:  # under `flwr run` nobody configured our logger: use Flower's console
            from flwr.supercore.logger import FLOWER_LOGGER

            log.handlers[:] = FLOWER_LOGGER.handlers
            log.setLevel(logging.INFO)
            log.propagate = False
        from fl_dplora.console import one_line_config_errors, report_config_error

        one_line_config_errors()
        try:
            run_server(grid, resolve(overrides, base=dict(context.run_config)))
        except ConfigError as exc:  # bad input: its lines, no traceback; the run still fails
            report_config_error(log, exc)
            raise

    return server


app = build_server_app()
