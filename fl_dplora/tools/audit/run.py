"""`run_audit`: plant the canaries, train one federated run through the same apps, score, write
audit.json, audit.md and audit.png.

Both canary kinds also report loss-threshold membership inference on the audited client's own
training examples vs held-out examples (AUC, TPR at 1 % FPR). A lower bound above the claimed
epsilon means the claim is false: the audit flags it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fl_dplora.config import RunConfig
from fl_dplora.data import Example, collate, encode_example
from fl_dplora.tools.audit.bound import auc, exposure, one_run_audit, tpr_at_fpr
from fl_dplora.tools.audit.canaries import (QUESTION, GradientPlan, Plan, candidate_space_bits, gradient_scores,
                                            make_gradient_plan, make_label_flip_plan, make_plan, step_scores)
from fl_dplora.tools.audit.report import average, histograms, markdown


@torch.no_grad()
def sequence_nll(model, tokenizer, examples: Sequence[Example], max_len: int, batch_size: int = 16,
                 mean: bool = False, system_prompt: str = "auto") -> list[float]:
    """Negative log-likelihood of each example's answer tokens (summed, or mean per token)."""
    from fl_dplora.forward import answer_logits

    model.eval()
    device = next(model.parameters()).device
    out: list[float] = []
    for start in range(0, len(examples), batch_size):
        enc = [encode_example(tokenizer, ex, max_len, system_prompt) for ex in examples[start : start + batch_size]]
        batch = {k: v.to(device) for k, v in collate(enc, tokenizer.pad_token_id).items()}
        logits, targets, rows = answer_logits(model, batch)
        nll = F.cross_entropy(logits.float(), targets, reduction="none")
        sums = torch.zeros(len(enc), device=nll.device).index_add(0, rows, nll)
        if mean:
            sums = sums / torch.zeros(len(enc), device=nll.device).index_add(0, rows, torch.ones_like(nll)).clamp(min=1)
        out += sums.cpu().tolist()
    return out


def _claimed_epsilon(summary: Mapping[str, Any], plan: Plan) -> tuple[float, float]:
    """(epsilon, delta) the run claims for the canary's unit (group privacy for repeated examples)."""
    priv = summary["privacy"]
    delta = float(priv["delta"])
    if priv["epsilon"] is None:
        return math.inf, delta
    eps = float(priv["epsilon"])
    if plan.unit == "example":
        # per_client is keyed by node id; the canaries are in partition 0's shard
        eps = next((float(c["epsilon"]) for c in priv.get("per_client", {}).values() if c.get("partition_id") == 0), eps)
    if plan.repeats > 1:  # group privacy for k examples: (k eps, k e^{(k-1) eps} delta)
        k = plan.repeats
        return k * eps, min(1.0, k * math.exp((k - 1) * eps) * delta)
    return eps, delta


# train(run config, one node config per node) -> the run's summary: the same apps on as many nodes
TrainFn = Callable[[RunConfig, list[dict[str, Any]]], dict[str, Any]]
CANARY_KINDS = ("gradient", "text")


def _node_configs(planted: Mapping[str, Any], num_clients: int, folder: Path) -> list[dict[str, Any]]:
    """One node config per simulated node: its partition and, as `audit-canaries`, its own canary file
    (what is planted on it, the coordinates it observes and where it writes them, how many data clients
    share the real data). The run config, which every node and the released summary see, carries none."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("partition-*.json"):
        old.unlink()
    nodes = []
    for p in range(num_clients):
        part, path = str(p), folder / f"partition-{p}.json"
        observe = planted.get("observe", {}).get(part, [])
        path.write_text(json.dumps({"data-clients": planted["data-clients"], "examples": planted["examples"].get(part, []),
                                    "gradients": planted.get("gradients", {}).get(part, []), "observe": observe,
                                    "observations": planted["observations"] if observe else ""}, indent=1))
        nodes.append({"partition-id": p, "num-partitions": num_clients, "audit-canaries": str(path)})
    return nodes


def run_audit(cfg: RunConfig, data_clients: int, out_dir: Path, train: TrainFn, *, num_canaries: int = 256,
              repeats: int = 1, num_references: int = 256, mia_samples: int = 200, audit_seed: int = 0,
              canary_kind: str = "gradient", log=print) -> dict[str, Any]:
    """Plant canaries, train with `train(cfg, num_clients)` (same apps), score, write audit.json/.md/.png."""
    from fl_dplora.data import client_examples, eval_examples, unused_train_examples
    from fl_dplora.model_loading import tokenizer_for
    from fl_dplora.models import adapter_parameters, get_peft_model, reset_adapter
    from fl_dplora.models import load_adapter_weights

    from fl_dplora import label_head
    from fl_dplora.data import head_stat_examples, load_task

    if canary_kind not in CANARY_KINDS:
        raise ValueError(f"canary_kind: one of {CANARY_KINDS}, got {canary_kind!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    gradient = canary_kind == "gradient"
    flip = not gradient and cfg.train.label_head  # a label head learns label words, not passphrases
    held_out: list[Example] = []
    init_values: dict[str, torch.Tensor] = {}
    if gradient:  # coordinates of the LoRA tensors the run trains, and their seed-shared init
        model = get_peft_model(cfg)
        label_head.remove(model)
        reset_adapter(model)
        lora = {k: p for k, p in adapter_parameters(model, cfg.with_values({"label-head": False})).items()
                if k != label_head.HEAD_KEY}
        plan: Plan | GradientPlan = make_gradient_plan(cfg.privacy.dp_mode, data_clients, {k: p.numel() for k, p in lora.items()},
                                                       num_canaries, repeats, audit_seed)
        init_values = {k: p.detach().cpu().clone() for k, p in lora.items()}
    elif flip:
        task = load_task(cfg.data.task, cfg.train.seed)
        taken = {(e.prompt, e.answer) for e in eval_examples(cfg) + head_stat_examples(cfg)}
        pool = [e for e in task.eval if (e.prompt, e.answer) not in taken]  # held out from everything the run uses
        plan = make_label_flip_plan(cfg.privacy.dp_mode, data_clients, pool, task.label_words, num_canaries, repeats, audit_seed)
        canary_prompts = set(plan.prompts)
        held_out = [e for e in pool if e.prompt not in canary_prompts][:mia_samples]
    else:
        plan = make_plan(cfg.privacy.dp_mode, data_clients, num_canaries, repeats, num_references, audit_seed)
    canary_path = out_dir / "canaries.json"
    observations = out_dir / "observed_steps.jsonl"  # client 0's gradients at the canary coordinates (white box)
    observations.unlink(missing_ok=True)
    planted = {**plan.canary_file(), "observations": str(observations)}
    canary_path.write_text(json.dumps(planted, indent=1))  # the auditor's record of every node's part
    (out_dir / "audit_plan.json").write_text(json.dumps({"canary_kind": canary_kind, **asdict(plan)}, indent=1))
    # Client-level canaries: the declared population counts every canary client that could take part,
    # so the divisor (q x population) is the same whether a canary was included or not.
    population = data_clients + (len(plan.canaries) if plan.unit == "client" else 0)
    run_cfg = cfg.with_values({"output-dir": str(out_dir / "run"), "population": population})
    node_configs = _node_configs(planted, plan.num_clients, out_dir / "nodes")  # the canaries travel as node data
    kind = {"gradient": "Dirac gradients on the LoRA factors", "text": "mislabelled held-out texts" if flip else "passphrases"}
    log(f"audit: {sum(plan.included)}/{num_canaries} canaries ({kind[canary_kind]}) planted as "
        f"{'client 0 examples' if plan.unit == 'example' else 'extra clients'} (x{repeats}), {plan.num_clients} clients; training ...")
    summary = train(run_cfg, node_configs)

    model = get_peft_model(run_cfg)
    tokenizer = tokenizer_for(run_cfg)
    adapter_dir = Path(run_cfg.output.output_dir) / "adapter"
    head = label_head.load(model, adapter_dir) if run_cfg.train.label_head else None
    if head is None:
        label_head.remove(model)
    params = adapter_parameters(model, run_cfg)
    max_len = run_cfg.data.max_seq_len
    score = {"system_prompt": run_cfg.data.system_prompt}  # encoded exactly as the run trained on them
    canaries = [] if gradient else plan.examples()
    references = [] if gradient else [Example(QUESTION, r) for r in plan.references]
    members = client_examples(run_cfg, 0, data_clients)[:mia_samples]
    if not flip:  # non-members from the same pool as the members when the run left some out, else the eval split
        held_out = (unused_train_examples(run_cfg)
                    or eval_examples(run_cfg.with_values({"max-eval-samples": 0})))[:mia_samples]

    trained_head = head.proj.weight.detach().clone() if head is not None else None
    reset_adapter(model)  # base model (and a zero head: no opinion): calibrates each example's own difficulty
    if head is not None:
        with torch.no_grad():
            head.proj.weight.zero_()
    base_canary = sequence_nll(model, tokenizer, canaries, max_len, **score)
    base_mem = sequence_nll(model, tokenizer, members, max_len, mean=True, **score)
    base_out = sequence_nll(model, tokenizer, held_out, max_len, mean=True, **score)
    from safetensors.torch import load_file

    trained = load_file(str(adapter_dir / "adapter_model.safetensors"))
    load_adapter_weights({k: p for k, p in params.items() if k != label_head.HEAD_KEY}, trained)  # the head: below
    if head is not None:
        with torch.no_grad():
            head.proj.weight.copy_(trained_head)
    final_canary = sequence_nll(model, tokenizer, canaries, max_len, **score)
    final_refs = sequence_nll(model, tokenizer, references, max_len, **score)
    mem_loss = sequence_nll(model, tokenizer, members, max_len, mean=True, **score)
    out_loss = sequence_nll(model, tokenizer, held_out, max_len, mean=True, **score)
    stepwise = None
    if gradient:  # the final adapter's coordinates against their init; and every step's gradient (white box)
        scores = gradient_scores(plan.canaries, init_values, {k: params[k].detach().cpu() for k in init_values})
        if observations.exists():
            rows = [json.loads(line) for line in observations.read_text().splitlines() if line.strip()]
            stepwise = step_scores(plan.canaries, rows)
    else:  # black box: how much training lowered each canary's loss
        scores = [b - f for b, f in zip(base_canary, final_canary)]
    reset_adapter(model)
    label_head.remove(model)

    inc = [i for i, x in enumerate(plan.included) if x]
    exc = [i for i, x in enumerate(plan.included) if not x]
    ranked = not gradient and not flip  # passphrases have an answer space to rank in
    exp_in = [exposure(final_canary[i], final_refs) for i in inc] if ranked else []
    exp_out = [exposure(final_canary[i], final_refs) for i in exc] if ranked else []
    eps_claimed, delta = _claimed_epsilon(summary, plan)
    # two views of the same canaries: each bound at 97.5 % (Bonferroni), the larger one reported
    confidence = 0.975 if stepwise is not None else 0.95
    final_view = {**one_run_audit(scores, plan.included, delta, confidence), "view": "final adapter"}
    views = [final_view]
    if stepwise is not None:
        views.append({**one_run_audit(stepwise, plan.included, delta, confidence), "view": "every step (white box)"})
    one_run = max(views, key=lambda v: v["epsilon_lower_bound"])
    mia_pos, mia_neg = [-x for x in mem_loss], [-x for x in out_loss]
    cal_pos = [b - f for b, f in zip(base_mem, mem_loss)]  # reference-model attack: loss drop base -> final
    cal_neg = [b - f for b, f in zip(base_out, out_loss)]
    result = {
        "canary_kind": "gradient" if gradient else "label-flip" if flip else "passphrase",
        "exposure_mean": average(exp_in) if ranked else None, "exposure_max": max(exp_in, default=0.0) if ranked else None,
        "exposure_mean_not_trained": average(exp_out) if ranked else None,
        "exposure_cap_bits": math.log2(num_references + 1) if ranked else None,
        "candidate_space_bits": candidate_space_bits() if ranked else None,
        "mia_auc": auc(mia_pos, mia_neg), "mia_tpr_at_1pct_fpr": tpr_at_fpr(mia_pos, mia_neg),
        "mia_auc_calibrated": auc(cal_pos, cal_neg), "mia_tpr_at_1pct_fpr_calibrated": tpr_at_fpr(cal_pos, cal_neg),
        "epsilon_lower_bound": one_run["epsilon_lower_bound"],
        "epsilon_claimed": eps_claimed if math.isfinite(eps_claimed) else None, "delta": delta,
        "flagged": one_run["epsilon_lower_bound"] > eps_claimed,
        "one_run": {**one_run, "canaries": num_canaries, "included": len(inc), "confidence": confidence},
        "one_run_views": views,
        "score_mean_included": average([scores[i] for i in inc]), "score_mean_excluded": average([scores[i] for i in exc]),
        "step_score_mean_included": None if stepwise is None else average([stepwise[i] for i in inc]),
        "step_score_mean_excluded": None if stepwise is None else average([stepwise[i] for i in exc]),
        "canary_unit": plan.unit, "repeats": repeats, "references": len(references),
        "mia_members": len(members), "mia_non_members": len(held_out),
        "dp_mode": cfg.privacy.dp_mode, "run_dir": run_cfg.output.output_dir,
        "final_eval": summary.get("final_eval"),
    }
    (out_dir / "audit.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "audit.md").write_text(markdown(result))
    shown = stepwise if stepwise is not None and one_run is views[-1] else scores
    axis = ("score = sign × Σ over steps of client 0's gradient there" if shown is stepwise
            else "score = −sign × (final − init) at the canary's coordinate" if gradient
            else "score = loss drop base → final (nats)")
    histograms(out_dir / "audit.png", mia_pos, mia_neg, [shown[i] for i in inc], [shown[i] for i in exc], axis)
    return result

