"""What a run writes: the released files (DP outputs and the public config only) and the operator's rows.

Released (docs/privacy.md, "Threat model"): metrics.jsonl, summary.json, adapter/ (and adapters/round-N).
The operator's, never released (write_ahead.py's operator.jsonl): who took part, drops, bytes, timings,
the ledgers, and the software and CPU the run used (a rerun that differs in the 8th digit is then explained
by the environment, not searched for in the commits).
"""

from __future__ import annotations

import json
import logging
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from fl_dplora import label_head
from fl_dplora.config import RunConfig
from fl_dplora.models import load_adapter_weights
from fl_dplora.server.run_state import RunState

log = logging.getLogger("fl_dplora")


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


def save_adapter(model, params, strategy, folder: Path, task) -> None:
    """The global adapter (and label head) as a PEFT folder that `fl-dplora evaluate --adapter` reads."""
    from fl_dplora.adapter_io import name_base_model

    load_adapter_weights(params, strategy.global_weights)
    model.save_pretrained(str(folder))
    name_base_model(folder, strategy.cfg)  # a base AutoPeftModelForCausalLM loads, not what PEFT saw
    label_head.save(model, folder, task.label_words)


def metrics_row(rnd: int, last_eval: dict[str, float], task, mode, epsilon: float, cfg: RunConfig,
                client_metrics) -> dict[str, Any]:
    """A round's released row: DP outputs and the evaluation on the server's own data only."""
    row = {
        "round": rnd,
        "eval_loss": last_eval.get("loss"), "eval_accuracy": last_eval.get("accuracy"),
        "eval_macro_f1": last_eval.get("macro_f1"), "eval_majority_rate": last_eval.get("majority_rate"),
        **({"eval_bleu": last_eval.get("bleu"), "eval_rouge_l": last_eval.get("rouge_l")} if task.kind == "generation" else {}),
        "epsilon": epsilon if mode.unit else None, "delta": cfg.privacy.delta if mode.unit else None,
    }
    if mode.releases_raw_counts:  # no DP: the clients' own mean loss may be shown
        losses = [m["train_loss"] for m in client_metrics if "train_loss" in m]
        row["train_loss"] = sum(losses) / len(losses) if losses else None
    return row


def operator_round(rnd: int, st, seconds: float) -> dict[str, Any]:
    """A round's operator row: who took part depends on the nodes, so it is not DP."""
    return {"round": rnd, "sampled": st.sampled, "accepted": st.accepted, "dropped": st.dropped,
            "bytes_up": st.bytes_up, "bytes_down": st.bytes_down, "seconds": seconds,
            "client_seconds": sum(float(m.get("compute-seconds", 0.0)) for m in st.client_metrics)}


def log_round(rnd: int, rounds: int, row: dict[str, Any], st, mode, epsilon: float, seconds: float) -> None:
    acc = (f" acc={row['eval_accuracy']:.3f} (majority {row['eval_majority_rate']:.3f}) f1={row['eval_macro_f1']:.3f}"
           if row["eval_accuracy"] is not None else "")
    if row.get("eval_bleu") is not None:
        acc += f" bleu={row['eval_bleu']:.2f} rouge_l={row['eval_rouge_l']:.4f}"
    eps = f" eps={epsilon:.3f}" if mode.unit else ""
    log.info("[round %d/%d] clients=%d/%d eval_loss=%s%s%s up=%dB down=%dB %.1fs", rnd, rounds, st.accepted,
             st.sampled, f"{row['eval_loss']:.4f}" if row["eval_loss"] is not None else "-", acc, eps,
             st.bytes_up, st.bytes_down, seconds)


def log_federated_eval(rnd: int, rounds: int, fed: dict[str, Any]) -> None:
    log.info("[round %d/%d] federated eval (operator log): %d/%d nodes, %d declined, %d examples, %s", rnd,
             rounds, fed["replied"], fed["asked"], len(fed["declined"]), fed["num-examples"],
             " ".join(f"{k}={v:.4f}" for k, v in fed["weighted"].items()) or "-")


def privacy_block(cfg: RunConfig, mode, state: RunState, dim: int = 0) -> dict[str, Any]:
    """summary.json's `privacy`: the mode, its noise and ε; per client for the example-level modes."""
    block = {"mode": mode.name, "noise_multiplier": None, "max_grad_norm": None, "sample_rate": None, "steps": 0,
             "accountant": None, "epsilon": None, "delta": cfg.privacy.delta}
    if mode.unit is None:
        if mode.secagg is not None:
            block["secure_aggregation"] = mode.secagg.describe(dim, 0.0, 0.0)
        return block
    block.update(max_grad_norm=cfg.privacy.max_grad_norm, accountant=cfg.privacy.accountant, epsilon=state.epsilon,
                 unit=mode.unit, trusted=mode.trusted)
    if mode.example_level:
        block.update(_example_level(state.client_eps, state.client_ledgers))
    else:  # steps = rounds charged, a resumed run's begun-but-lost attempts included
        server_ledger = state.engine.ledger
        block.update(noise_multiplier=state.server_sigma, accountant_noise_multiplier=state.accountant_sigma,
                     sample_rate=cfg.federation.fraction_train, steps=server_ledger.total_steps, **mode.describe())
        block["mode"] = mode.name
        if mode.secagg is not None:
            block["secure_aggregation"] = mode.secagg.describe(dim, state.server_sigma, state.epsilon)
        block["history"] = [list(e) for e in server_ledger.history]  # σ recalibrated after a resume: two σ's
        # the nodes' own noise is the config's σ whatever a resume raised the server's to (modes.ClientDP.aggregate)
        against_server = mode.epsilon_against_server([mode.noise_multipliers()[1]] * server_ledger.total_steps)
        if against_server is not None:
            block["epsilon_against_server"] = against_server
    return block


def _example_level(client_eps, client_ledgers) -> dict[str, Any]:
    # each node's q comes from a public size, or its n is released and its ε is replace-one (sample_rate.py)
    worst = max(client_eps.values(), key=lambda m: float(m["epsilon"]), default={})
    ledger = (client_ledgers or {}).get(str(worst.get("node_id")))
    adjacency = {k: (client_ledgers or {}).get(str(k), {}).get("adjacency", "add-remove") for k in client_eps}
    out: dict[str, Any] = {}
    if ledger:  # every (sigma, q, steps) event of the worst client: label-head runs mix two q's
        out["history"] = [list(e) for e in zip(ledger["sigmas"], ledger["rates"], ledger["steps"])]
    out.update(noise_multiplier=worst.get("sigma"), sample_rate=worst.get("sample-rate"),
               adjacency=adjacency.get(int(worst.get("node_id", -1)), "add-remove"),
               steps=int(worst.get("steps-total", 0)), per_client={
                   str(k): {"epsilon": m["epsilon"], "sigma": m.get("sigma"), "sample_rate": m.get("sample-rate"),
                            "steps": m.get("steps-total"), "partition_id": m.get("partition-id"),
                            "adjacency": adjacency[k]}
                   for k, m in sorted(client_eps.items())})  # keyed by node id; partition_id: the node's label
    return out


def summary(cfg: RunConfig, state: RunState, privacy: dict[str, Any], sizes: dict[str, int],
            test: dict[str, Any] | None) -> dict[str, Any]:
    """summary.json: the rounds done, the final evaluation, the model's sizes, the privacy block, the config."""
    last_eval = state.last_eval
    out = {
        "rounds": state.rounds_done,
        "final_eval": {"accuracy": last_eval.get("accuracy"), "loss": last_eval.get("loss"),
                       **{k: v for k, v in last_eval.items() if k not in ("accuracy", "loss")}},
        **sizes, "privacy": privacy, "config": cfg.to_record(),
    }
    if test is not None:
        out["test_eval"] = test
    return out


SOFTWARE = ("torch", "transformers", "peft", "opacus", "flwr", "numpy")


def _cpu_model() -> str:
    try:  # Linux names the CPU model here; platform.processor() is often empty there
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def software_environment() -> dict[str, Any]:
    """Python, the numeric packages' versions, the platform and the CPU: what a bit-for-bit rerun needs alike."""
    versions = {}
    for name in SOFTWARE:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"python": platform.python_version(), **versions, "platform": platform.platform(),
            "cpu": _cpu_model(), "cpu_count": os.cpu_count()}


def operator_summary(cfg: RunConfig, state: RunState, wall_seconds: float) -> dict[str, Any]:
    """bytes and wall time depend on who took part: the operator's, next to the per-round rows; the
    ledgers let a reviewer recompute every ε with an accountant of their own."""
    return {"event": "summary", "bytes_up_total": state.totals["up"], "bytes_down_total": state.totals["down"],
            "wall_seconds": wall_seconds, "rounds": state.rounds_done, "accountant": cfg.privacy.accountant,
            "delta": cfg.privacy.delta, "server_ledger": state.engine.state_dict(),
            "client_ledgers": state.client_ledgers, "environment": software_environment()}
