"""Empirical privacy audit: `fl-dplora audit`.

Trains one federated run through the same apps with canaries planted, then gives a lower bound on ε
with the one-run audit of Steinke, Nasr and Jagielski 2023 ("Privacy Auditing with One (1) Training
Run"): m canaries, each included independently with probability 1/2; the auditor guesses "in" for
the k canaries it is most confident were trained on and "out" for the k least; the number of right
guesses gives, at 95 % confidence, a lower bound on ε at the run's δ (their Theorem 3.3 / Algorithm
3 p-value: P[>= v right] <= P[Binomial(r, e^ε/(1+e^ε)) >= v] + 2 m δ α). Four k are tried,
Bonferroni-corrected.

Canaries (`canary_kind`):
- "gradient" (default; the paper's white-box gradient-space canaries): each canary is a training
  example whose per-example gradient is a Dirac vector, ±C on one random coordinate of the LoRA
  factors (C = max-grad-norm, already clipped), instead of a model's gradient. It travels to the
  node in the canary file and goes through the clients' own training step (train.local_train:
  Poisson-sampled at q with the real examples under DP-SGD, summed, noised, divided; in the
  shuffled batches otherwise). The score is how far the final adapter moved that coordinate against
  the canary's gradient from its seed-shared init: −sign × (final − init). A run without DP moves
  it by every step the canary took part in, which the audit sees; under DP-SGD the same
  coordinate carries the step's Gaussian noise, so the bound stays below ε. This is the worst
  case the DP analysis covers (an example whose clipped gradient points where nothing else does),
  and the test a DP claim must pass; what a text example leaks is below it.
- "text" (black box, the earlier audit): a random passphrase answered to a fixed question, or with
  a label head a held-out text with a wrong label word; scored by its loss drop base -> final
  model. It also reports canary exposure (Carlini et al. 2019, "The Secret Sharer"): exposure =
  log2(R + 1) - log2(1 + #of R random reference passphrases the model finds likelier).
Both kinds report loss-threshold membership inference on the audited client's own training
examples vs held-out examples (AUC, TPR at 1 % FPR).

The protected unit decides where a canary goes: dp-mode none/sample = one training example of client 0
(repeated `repeats` times: then the claim compared is the group-privacy epsilon of `repeats` examples);
dp-mode client/paper = a whole extra client holding only its canary (with a gradient canary its
update is the Dirac direction, clipped and noised like every client's).
A lower bound above the claimed epsilon means the claim is false: the audit flags it.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fl_dplora.data import Example, collate, encode_example
from fl_dplora.privacy.modes import MODES

QUESTION = "What is the secret passphrase of the vault?"
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def random_secret(rng: random.Random, words: int = 3) -> str:
    """Pronounceable random words (two syllables each): ~2^12.2 choices per word."""
    return " ".join("".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(2)) for _ in range(words))


def candidate_space_bits(words: int = 3) -> float:
    return words * 2 * math.log2(len(_CONSONANTS) * len(_VOWELS))


@dataclass
class Plan:
    canaries: list[str]  # answers
    included: list[bool]
    references: list[str]
    repeats: int
    unit: str  # "example" (canaries in client 0's shard) or "client" (one extra client per included canary)
    data_clients: int
    num_clients: int  # data clients + canary clients
    prompts: list[str] = field(default_factory=list)  # one per canary; empty = QUESTION for all

    def examples(self) -> list[Example]:
        return [Example(self.prompts[i] if self.prompts else QUESTION, c) for i, c in enumerate(self.canaries)]

    def canary_file(self) -> dict[str, Any]:
        examples: dict[str, list[list[str]]] = {}
        inc = [[e.prompt, e.answer] for e, i in zip(self.examples(), self.included) if i]
        if self.unit == "example":
            examples["0"] = [pair for pair in inc for _ in range(self.repeats)]
        else:
            for j, pair in enumerate(inc):
                examples[str(self.data_clients + j)] = [pair] * self.repeats
        return {"data-clients": self.data_clients, "examples": examples}


def make_plan(dp_mode: str, data_clients: int, num_canaries: int, repeats: int, num_references: int, seed: int) -> Plan:
    rng = random.Random(f"fl-dplora-audit-{seed}")  # audit randomness: independent of training
    secrets: list[str] = []
    seen: set[str] = set()
    while len(secrets) < num_canaries + num_references:
        s = random_secret(rng)
        if s not in seen:
            seen.add(s)
            secrets.append(s)
    included = [rng.random() < 0.5 for _ in range(num_canaries)]
    return Plan(secrets[:num_canaries], included, secrets[num_canaries:], repeats,
                *_placement(dp_mode, data_clients, included))


def _placement(dp_mode: str, data_clients: int, included: Sequence[bool]) -> tuple[str, int, int]:
    """(unit, data clients, clients in the run): client-level modes get one extra client per included canary."""
    per_client = MODES[dp_mode].client_level
    return ("client" if per_client else "example", data_clients, data_clients + (sum(included) if per_client else 0))


def make_label_flip_plan(dp_mode: str, data_clients: int, pool: Sequence[Example], label_words: Sequence[str],
                         num_canaries: int, repeats: int, seed: int) -> Plan:
    """Canaries for a label-head run: held-out texts of the task, each with a label word it does not have."""
    from fl_dplora.config import ConfigError

    if len(pool) < num_canaries:
        raise ConfigError(f"canaries: {num_canaries} mislabelled canaries need as many held-out texts; the task has {len(pool)}")
    rng = random.Random(f"fl-dplora-audit-flip-{seed}")
    chosen = rng.sample(list(pool), num_canaries)
    answers = [rng.choice([w for i, w in enumerate(label_words) if i != e.label] or list(label_words)) for e in chosen]
    included = [rng.random() < 0.5 for _ in range(num_canaries)]
    return Plan(answers, included, [], repeats, *_placement(dp_mode, data_clients, included),
                prompts=[e.prompt for e in chosen])


@dataclass
class GradientPlan:
    """Dirac gradient canaries: canary i is the vector sign_i * e_(key_i, index_i) in the space of the
    adapter's LoRA tensors (train.GradientCanary); `canaries` holds [key, flat index, sign] each."""
    canaries: list[list]
    included: list[bool]
    repeats: int
    unit: str
    data_clients: int
    num_clients: int

    def canary_file(self) -> dict[str, Any]:
        inc = [[list(c)] for c, i in zip(self.canaries, self.included) if i]  # one entry per (Dirac) canary
        gradients: dict[str, list] = {}
        if self.unit == "example":
            gradients["0"] = [c for c in inc for _ in range(self.repeats)]
        else:
            for j, c in enumerate(inc):
                gradients[str(self.data_clients + j)] = [c] * self.repeats
        return {"data-clients": self.data_clients, "examples": {}, "gradients": gradients}


CANARY_NORM = 10.0  # a canary's gradient, in units of max-grad-norm: DP-SGD clips it to C like any example's; without DP it is 10 C (100 C broke a no-DP SGD run)


def make_gradient_plan(dp_mode: str, data_clients: int, sizes: Mapping[str, int], num_canaries: int, repeats: int,
                       seed: int, norm: float = CANARY_NORM) -> GradientPlan:
    """Distinct coordinates drawn uniformly over the LoRA tensors (`sizes`: key -> numel), random signs
    (the canary's gradient is sign x `norm` x C there), each canary included with probability 1/2."""
    from fl_dplora.config import ConfigError

    keys = sorted(sizes)
    total = sum(int(sizes[k]) for k in keys)
    if total < num_canaries:
        raise ConfigError(f"canaries: {num_canaries} gradient canaries need as many adapter values; the adapter has {total}")
    rng = random.Random(f"fl-dplora-audit-gradient-{seed}")  # audit randomness: independent of training
    flat = sorted(rng.sample(range(total), num_canaries))
    canaries, start, k = [], 0, 0
    for g in flat:
        while g >= start + int(sizes[keys[k]]):
            start += int(sizes[keys[k]])
            k += 1
        canaries.append([keys[k], g - start, 0])
    rng.shuffle(canaries)
    for c in canaries:
        c[2] = rng.choice((1, -1)) * float(norm)
    included = [rng.random() < 0.5 for _ in range(num_canaries)]
    return GradientPlan(canaries, included, repeats, *_placement(dp_mode, data_clients, included))


def gradient_scores(canaries: Sequence[Sequence], init: Mapping[str, torch.Tensor],
                    final: Mapping[str, torch.Tensor]) -> list[float]:
    """How far training moved each canary's coordinate against its gradient: -sign x (final - init)."""
    return [-math.copysign(1.0, float(value)) * float(final[key].reshape(-1)[i].double() - init[key].reshape(-1)[i].double())
            for key, i, value in canaries]


# ----------------------------------------------------------------------------- statistics
def p_value_dp(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[>= v right guesses out of r] for an (eps, delta)-DP run (Steinke et al. 2023, Thm 3.3/Alg. 3).

    Written here from the paper's published p-value function (tests/test_audit.py checks it against a
    direct transcription of that loop and against closed forms): the maintained implementation,
    jax_privacy.auditing, needs JAX, which this PyTorch project does not otherwise install."""
    import numpy as np
    from scipy.stats import binom

    q = 1.0 / (1.0 + math.exp(-eps))
    beta = float(binom.sf(v - 1, r, q))
    if v == 0 or delta == 0:
        return min(1.0, beta)
    # alpha = max_i P[v > Binomial(r, q) >= v - i] / i, for i = 1..v
    cumulative = np.cumsum(binom.pmf(np.arange(v - 1, -1, -1), r, q))
    alpha = float(np.max(cumulative / np.arange(1, v + 1)))
    return min(1.0, beta + alpha * delta * 2 * m)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, p: float = 0.05) -> float:
    """Largest eps that the guesses reject at level p (0 when nothing is rejected)."""
    if r == 0 or p_value_dp(m, r, v, 0.0, delta) >= p:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value_dp(m, r, v, hi, delta) < p and hi < 100:
        hi *= 2
    for _ in range(40):
        mid = (lo + hi) / 2
        if p_value_dp(m, r, v, mid, delta) < p:
            lo = mid
        else:
            hi = mid
    return lo


def one_run_audit(scores: Sequence[float], included: Sequence[bool], delta: float, confidence: float = 0.95,
                  guess_fractions: Sequence[float] = (1 / 16, 1 / 8, 1 / 4, 1 / 2)) -> dict[str, Any]:
    """Guess the top-k scores "in" and the bottom-k "out"; best bound over the k tried (Bonferroni)."""
    m = len(scores)
    order = sorted(range(m), key=lambda i: scores[i], reverse=True)
    level = (1 - confidence) / len(guess_fractions)
    best = {"epsilon_lower_bound": 0.0, "guesses": 0, "correct": 0}
    for f in guess_fractions:
        k = max(1, int(m * f))
        if 2 * k > m:
            continue
        v = sum(included[i] for i in order[:k]) + sum(not included[i] for i in order[-k:])
        eps = epsilon_lower_bound(m, 2 * k, v, delta, level)
        if eps >= best["epsilon_lower_bound"]:
            best = {"epsilon_lower_bound": eps, "guesses": 2 * k, "correct": v}
    return best


def auc(pos: Sequence[float], neg: Sequence[float]) -> float:
    """P[score(member) > score(non-member)] (+ half the ties): the Mann-Whitney AUC."""
    if not pos or not neg:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def tpr_at_fpr(pos: Sequence[float], neg: Sequence[float], fpr: float = 0.01) -> float:
    neg_sorted = sorted(neg, reverse=True)
    k = int(math.floor(fpr * len(neg_sorted)))  # at most this many non-members above the threshold
    threshold = neg_sorted[k] if k < len(neg_sorted) else -math.inf
    return sum(p > threshold for p in pos) / max(1, len(pos))


def exposure(canary_nll: float, reference_nll: Sequence[float]) -> float:
    rank = 1 + sum(r < canary_nll for r in reference_nll)
    return math.log2(len(reference_nll) + 1) - math.log2(rank)


# ----------------------------------------------------------------------------- scoring
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


TrainFn = Callable[[dict[str, Any], int], dict[str, Any]]
CANARY_KINDS = ("gradient", "text")


def run_audit(cfg: dict[str, Any], data_clients: int, out_dir: Path, train: TrainFn, *, num_canaries: int = 256,
              repeats: int = 1, num_references: int = 256, mia_samples: int = 200, audit_seed: int = 0,
              canary_kind: str = "gradient", log=print) -> dict[str, Any]:
    """Plant canaries, train with `train(cfg, num_clients)` (same apps), score, write audit.json/.md/.png."""
    from fl_dplora.data import client_examples, eval_examples, unused_train_examples
    from fl_dplora.models import adapter_parameters, get_peft_model, tokenizer_for, reset_adapter
    from fl_dplora.models import load_adapter_weights

    from fl_dplora import label_head
    from fl_dplora.data import head_stat_examples, load_task

    if canary_kind not in CANARY_KINDS:
        raise ValueError(f"canary_kind: one of {CANARY_KINDS}, got {canary_kind!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    gradient = canary_kind == "gradient"
    flip = not gradient and bool(cfg.get("label-head"))  # a label head learns label words, not passphrases
    held_out: list[Example] = []
    init_values: dict[str, torch.Tensor] = {}
    if gradient:  # coordinates of the LoRA tensors the run trains, and their seed-shared init
        model = get_peft_model(cfg)
        label_head.remove(model)
        reset_adapter(model)
        lora = {k: p for k, p in adapter_parameters(model, {**cfg, "label-head": False}).items() if k != label_head.HEAD_KEY}
        plan: Plan | GradientPlan = make_gradient_plan(cfg["dp-mode"], data_clients, {k: p.numel() for k, p in lora.items()},
                                                       num_canaries, repeats, audit_seed)
        init_values = {k: p.detach().cpu().clone() for k, p in lora.items()}
    elif flip:
        task = load_task(cfg["task"], int(cfg["seed"]))
        taken = {(e.prompt, e.answer) for e in eval_examples(cfg) + head_stat_examples(cfg)}
        pool = [e for e in task.eval if (e.prompt, e.answer) not in taken]  # held out from everything the run uses
        plan = make_label_flip_plan(cfg["dp-mode"], data_clients, pool, task.label_words, num_canaries, repeats, audit_seed)
        canary_prompts = set(plan.prompts)
        held_out = [e for e in pool if e.prompt not in canary_prompts][:mia_samples]
    else:
        plan = make_plan(cfg["dp-mode"], data_clients, num_canaries, repeats, num_references, audit_seed)
    canary_path = out_dir / "canaries.json"
    canary_path.write_text(json.dumps(plan.canary_file(), indent=1))
    (out_dir / "audit_plan.json").write_text(json.dumps({"canary_kind": canary_kind, **asdict(plan)}, indent=1))
    # Client-level canaries: the declared population counts every canary client that could take part,
    # so the divisor (q x population) is the same whether a canary was included or not.
    population = data_clients + (len(plan.canaries) if plan.unit == "client" else 0)
    run_cfg = {**cfg, "audit-canaries": str(canary_path), "output-dir": str(out_dir / "run"), "population": population}
    kind = {"gradient": "Dirac gradients on the LoRA factors", "text": "mislabelled held-out texts" if flip else "passphrases"}
    log(f"audit: {sum(plan.included)}/{num_canaries} canaries ({kind[canary_kind]}) planted as "
        f"{'client 0 examples' if plan.unit == 'example' else 'extra clients'} (x{repeats}), {plan.num_clients} clients; training ...")
    summary = train(run_cfg, plan.num_clients)

    model = get_peft_model(run_cfg)
    tokenizer = tokenizer_for(run_cfg)
    adapter_dir = Path(run_cfg["output-dir"]) / "adapter"
    head = label_head.load(model, adapter_dir) if run_cfg.get("label-head") else None
    if head is None:
        label_head.remove(model)
    params = adapter_parameters(model, run_cfg)
    max_len = int(run_cfg["max-seq-len"])
    score = {"system_prompt": run_cfg["system-prompt"]}  # encoded exactly as the run trained on them
    canaries = [] if gradient else plan.examples()
    references = [] if gradient else [Example(QUESTION, r) for r in plan.references]
    members = client_examples({**run_cfg, "audit-canaries": ""}, 0, data_clients)[:mia_samples]
    if not flip:  # non-members from the same pool as the members when the run left some out, else the eval split
        held_out = (unused_train_examples(run_cfg) or eval_examples({**run_cfg, "max-eval-samples": 0}))[:mia_samples]

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
    if gradient:  # white box: the final adapter's coordinates against their init
        scores = gradient_scores(plan.canaries, init_values, {k: params[k].detach().cpu() for k in init_values})
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
    one_run = one_run_audit(scores, plan.included, delta)
    mia_pos, mia_neg = [-x for x in mem_loss], [-x for x in out_loss]
    cal_pos = [b - f for b, f in zip(base_mem, mem_loss)]  # reference-model attack: loss drop base -> final
    cal_neg = [b - f for b, f in zip(base_out, out_loss)]
    result = {
        "canary_kind": "gradient" if gradient else "label-flip" if flip else "passphrase",
        "exposure_mean": _mean(exp_in) if ranked else None, "exposure_max": max(exp_in, default=0.0) if ranked else None,
        "exposure_mean_not_trained": _mean(exp_out) if ranked else None,
        "exposure_cap_bits": math.log2(num_references + 1) if ranked else None,
        "candidate_space_bits": candidate_space_bits() if ranked else None,
        "mia_auc": auc(mia_pos, mia_neg), "mia_tpr_at_1pct_fpr": tpr_at_fpr(mia_pos, mia_neg),
        "mia_auc_calibrated": auc(cal_pos, cal_neg), "mia_tpr_at_1pct_fpr_calibrated": tpr_at_fpr(cal_pos, cal_neg),
        "epsilon_lower_bound": one_run["epsilon_lower_bound"],
        "epsilon_claimed": eps_claimed if math.isfinite(eps_claimed) else None, "delta": delta,
        "flagged": one_run["epsilon_lower_bound"] > eps_claimed,
        "one_run": {**one_run, "canaries": num_canaries, "included": len(inc), "confidence": 0.95},
        "score_mean_included": _mean([scores[i] for i in inc]), "score_mean_excluded": _mean([scores[i] for i in exc]),
        "canary_unit": plan.unit, "repeats": repeats, "references": len(references),
        "mia_members": len(members), "mia_non_members": len(held_out),
        "dp_mode": cfg["dp-mode"], "run_dir": str(run_cfg["output-dir"]),
        "final_eval": summary.get("final_eval"),
    }
    (out_dir / "audit.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "audit.md").write_text(_report(result))
    _histograms(out_dir / "audit.png", mia_pos, mia_neg, [scores[i] for i in inc], [scores[i] for i in exc],
                "score = −sign × (final − init) at the canary's coordinate" if gradient else "score = loss drop base → final (nats)")
    return result


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _report(r: Mapping[str, Any]) -> str:
    claimed = "∞ (no DP)" if r["epsilon_claimed"] is None else f"{r['epsilon_claimed']:.3f}"
    verdict = ("**FLAGGED: the measured lower bound exceeds the claimed epsilon; the DP claim is false.**"
               if r["flagged"] else "Consistent: the measured lower bound does not exceed the claimed epsilon.")
    o = r["one_run"]
    exposure_rows = [] if r["exposure_mean"] is None else [
        f"| canary exposure mean / max (bits, cap {r['exposure_cap_bits']:.1f}) | {r['exposure_mean']:.2f} / {r['exposure_max']:.2f} |",
        f"| exposure of canaries not trained on (chance level) | {r['exposure_mean_not_trained']:.2f} |"]
    return "\n".join([
        f"# Privacy audit (dp-mode {r['dp_mode']}, canary = one {r['canary_unit']}, {r.get('canary_kind', 'passphrase')})", "",
        "| measure | value |", "|---|---|",
        f"| claimed epsilon (delta {r['delta']:g}) | {claimed} |",
        f"| one-run lower bound on epsilon (95 %) | {r['epsilon_lower_bound']:.3f} ({o['correct']}/{o['guesses']} right guesses, "
        f"{o['included']}/{o['canaries']} canaries included) |",
        *exposure_rows,
        f"| membership inference AUC (loss threshold) | {r['mia_auc']:.3f} |",
        f"| MIA TPR at 1 % FPR | {r['mia_tpr_at_1pct_fpr']:.3f} |",
        f"| MIA AUC / TPR at 1 % FPR, calibrated by the base model's loss | {r['mia_auc_calibrated']:.3f} / "
        f"{r['mia_tpr_at_1pct_fpr_calibrated']:.3f} |", "",
        verdict, "", "![score histograms](audit.png)", ""])


def _histograms(path: Path, mem: Sequence[float], non: Sequence[float], can_in: Sequence[float], can_out: Sequence[float],
                canary_axis: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    for ax, (a, b), title, xlabel in (
        (axes[0], (mem, non), "membership inference", "score = −mean answer-token loss (nats)"),
        (axes[1], (can_in, can_out), "canaries (one-run audit)", canary_axis),
    ):
        bins = 30
        ax.hist(a, bins=bins, alpha=0.6, label="members / trained on", density=True)
        ax.hist(b, bins=bins, alpha=0.6, label="non-members / not trained on", density=True)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
