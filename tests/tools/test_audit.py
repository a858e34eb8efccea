"""Privacy audit (`fl-dplora audit`): the statistics, and whole audits on tiny setups.

Gradient canaries (the default, Steinke et al. 2023's white-box canaries) on the plain tiny LoRA
setup: no DP -> a lower bound >= 1; DP at eps ~1 -> lower bound <= the claim; the planted bug
(noise silently zero, accountant still reporting eps ~1) -> flagged. The same no-DP run audited
with the older text canaries stays below 1 (the audit without power of issue 27 defect 9).
Text canaries keep their own checks on a memorisable setup (a LoRA on the output head too).
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from fl_dplora.tools import audit
from fl_dplora.write_ahead import read_operator
from harness import run_in_process, tiny_config

MEMORISABLE = {
    "model": "tiny-random-llama", "max-train-samples": 60, "batch-size": 16, "micro-batch-size": 16,
    "local-steps": 20, "num-server-rounds": 2, "optimizer": "adamw", "learning-rate": 0.01, "lora-rank": 16,
    "lora-targets": "q_proj,v_proj,lm_head",
}


# ----------------------------------------------------------------------------- statistics
def test_lower_bound_matches_closed_form_for_perfect_guesses():
    # delta = 0 and v = r: the p-value is q^r, so the bound solves q^r = p exactly.
    r, p = 64, 0.05
    q = p ** (1 / r)
    expected = math.log(q / (1 - q))
    assert audit.epsilon_lower_bound(128, r, r, 0.0, p) == pytest.approx(expected, rel=1e-6)
    assert audit.epsilon_lower_bound(128, r, r // 2, 0.0, p) == 0.0  # chance level proves nothing


def test_p_value_matches_the_papers_loop():
    """Steinke et al.'s Algorithm (their published loop), transcribed directly, vs our vectorised one."""
    from scipy.stats import binom

    def loop(m, r, v, eps, delta):
        q = 1 / (1 + math.exp(-eps))
        beta, alpha, acc = binom.sf(v - 1, r, q), 0.0, 0.0
        for i in range(1, v + 1):
            acc += binom.pmf(v - i, r, q)
            alpha = max(alpha, acc / i)
        return min(1.0, beta + alpha * delta * 2 * m)

    for args in [(200, 60, 50, 1.0, 1e-3), (1000, 500, 300, 0.5, 1e-5), (128, 64, 64, 2.0, 1e-5), (64, 16, 9, 0.1, 1e-2)]:
        assert audit.p_value_dp(*args) == pytest.approx(loop(*args), rel=1e-9)


def test_lower_bound_numbers():
    """Closed-form numbers of the paper's bound (delta = 0: the p-value of r right out of r is q^r, so
    eps = log(q / (1 - q)) with q = p^(1/r)): 100 right guesses out of 100 at 95 % give 3.493, 64 of 64
    3.038; the delta term (2 m delta alpha) at delta = 1e-5 and m = 1000 lowers it only slightly."""
    assert audit.epsilon_lower_bound(1000, 100, 100, 0.0, 0.05) == pytest.approx(3.4930, abs=1e-3)
    assert audit.epsilon_lower_bound(128, 64, 64, 0.0, 0.05) == pytest.approx(3.0382, abs=1e-3)
    with_delta = audit.epsilon_lower_bound(1000, 100, 100, 1e-5, 0.05)
    assert 3.3 < with_delta < 3.4930


def test_delta_term_makes_the_test_more_conservative():
    assert audit.p_value_dp(200, 60, 50, 1.0, 1e-3) > audit.p_value_dp(200, 60, 50, 1.0, 0.0)
    assert audit.epsilon_lower_bound(200, 60, 50, 1e-3) < audit.epsilon_lower_bound(200, 60, 50, 0.0)


def test_bound_is_valid_and_has_power_on_randomized_response():
    """Randomized response is exactly eps-DP per canary: the 95 % bound must stay <= eps in about
    95 % of trials (it would not if the p-value were anti-conservative), yet be well above 0."""
    eps, m, trials = 1.0, 1000, 200
    rng = random.Random(1)
    keep = math.exp(eps) / (1 + math.exp(eps))
    bounds = []
    for _ in range(trials):
        included = [rng.random() < 0.5 for _ in range(m)]
        # the best attack on randomized response: the released bit, scored +-1 with random tie-breaks
        scores = [(1 if (x if rng.random() < keep else not x) else -1) + 1e-3 * rng.random() for x in included]
        bounds.append(audit.one_run_audit(scores, included, delta=0.0, guess_fractions=(0.5,))["epsilon_lower_bound"])
    violations = sum(b > eps for b in bounds)
    assert violations <= 0.1 * trials, violations
    assert sorted(bounds)[trials // 2] > 0.5  # median: the audit does detect most of the leakage


def test_exposure_auc_and_tpr():
    refs = [float(i) for i in range(1, 256)]  # 255 references
    assert audit.exposure(0.5, refs) == pytest.approx(8.0)  # likelier than every reference: log2(256)
    assert audit.exposure(1000.0, refs) == pytest.approx(0.0)
    assert audit.auc([2, 3], [0, 1]) == 1.0 and audit.auc([1, 1], [1, 1]) == 0.5
    neg = [i / 100 for i in range(100)]
    assert audit.tpr_at_fpr([2.0, 0.5, 0.995], neg, 0.01) == pytest.approx(2 / 3)


def test_plan_places_canaries_by_protected_unit():
    ex = audit.make_plan("sample", 3, 64, 2, 16, seed=0)
    assert ex.unit == "example" and ex.num_clients == 3
    assert len(ex.canary_file()["examples"]["0"]) == 2 * sum(ex.included)
    cl = audit.make_plan("client", 3, 64, 1, 16, seed=0)
    files = cl.canary_file()["examples"]
    assert cl.num_clients == 3 + sum(cl.included) and sorted(map(int, files)) == list(range(3, cl.num_clients))
    assert len(set(ex.canaries + ex.references)) == 64 + 16  # all distinct
    assert 20 < sum(ex.included) < 44  # Bernoulli(1/2)


def test_gradient_plan_draws_distinct_dirac_coordinates_and_places_them_by_unit():
    sizes = {"a.lora_A.weight": 40, "a.lora_B.weight": 24, "b.lora_A.weight": 64}
    ex = audit.make_gradient_plan("sample", 3, sizes, 100, 2, seed=0)
    coords = [(k, i) for k, i, _ in ex.canaries]
    assert len(set(coords)) == 100 and all(0 <= i < sizes[k] for k, i in coords)
    assert {s for *_, s in ex.canaries} == {audit.CANARY_NORM, -audit.CANARY_NORM} and ex.unit == "example"
    assert ex.num_clients == 3
    planted = ex.canary_file()
    assert planted["gradients"]["0"] == [[c] for c, i in zip(ex.canaries, ex.included) if i for _ in range(2)]
    assert 30 < sum(ex.included) < 70
    cl = audit.make_gradient_plan("client", 3, sizes, 16, 1, seed=0)
    files = cl.canary_file()["gradients"]
    assert sorted(map(int, files)) == list(range(3, cl.num_clients)) and all(len(v) == 1 for v in files.values())
    with pytest.raises(Exception, match="adapter values"):
        audit.make_gradient_plan("sample", 3, {"x": 10}, 16, 1, seed=0)


def test_gradient_scores_read_the_move_against_the_canary():
    init = {"w": torch.zeros(2, 3)}
    final = {"w": torch.tensor([[0.0, -0.5, 0.0], [0.25, 0.0, 0.0]])}
    # a canary with gradient +e_1 pushes w[1] down (SGD): score +0.5; gradient -e_3 pushes w[3] up: +0.25
    assert audit.gradient_scores([["w", 1, 100.0], ["w", 3, -100.0], ["w", 0, 1]], init, final) == [0.5, 0.25, 0.0]


def _sgd_adapter(local_steps: int):
    """A tiny model's fresh adapter under SGD at lr 1 with no momentum (a step moves a coordinate by
    exactly its gradient): (cfg, model, the trained keys, their tensors)."""
    from fl_dplora.models import adapter_parameters, get_peft_model, reset_adapter

    cfg = tiny_config(**{"optimizer": "sgd", "momentum": 0.0, "learning-rate": 1.0, "local-steps": local_steps,
                         "batch-size": 4, "micro-batch-size": 4, "max-grad-norm": 0.5})
    model = get_peft_model(cfg)
    reset_adapter(model)
    params = adapter_parameters(model, cfg)
    keys = [k for k in params if params[k].requires_grad]
    return cfg, model, keys, [params[k] for k in keys]


def test_a_gradient_canary_goes_through_the_dp_sgd_step():
    """local_train: a canary is sampled like an example and adds exactly its vector x C to the clipped
    sum (no noise, SGD, lr 1, q = 1: the step moves its coordinate by C / divisor)."""
    from fl_dplora.models import reset_adapter
    from fl_dplora.train import DPSGD, GradientCanary, local_train, make_optimizer

    cfg, model, keys, trainable = _sgd_adapter(local_steps=1)
    a = keys.index(next(k for k in keys if "lora_A" in k))
    before = trainable[a].detach().clone()
    opt = make_optimizer(trainable, cfg.train)
    canary = GradientCanary(((a, 3, 100.0),))  # clipped to C like every per-example gradient
    local_train(model, trainable, [], cfg, optimizer=opt, dp=DPSGD(0.0, 0.5, None),
                sampling_generator=torch.Generator().manual_seed(0), public_size=1, canaries=[canary])
    moved = trainable[a].detach() - before
    assert moved.view(-1)[3].item() == pytest.approx(-0.5)  # -lr x C x 1 / (q x size = 1)
    assert moved.abs().sum().item() == pytest.approx(0.5)  # nothing else moved (no real example, no noise)
    reset_adapter(model)


# ----------------------------------------------------------------------------- whole audits: gradient canaries
GRADIENT = {"max-train-samples": 60, "batch-size": 16, "micro-batch-size": 16, "local-steps": 10, "num-server-rounds": 2,
            "max-eval-samples": 8, "eval-every": 0}


def _gradient_audit(tmp_path, canary_kind="gradient", **overrides):
    cfg = tiny_config(**{**GRADIENT, **overrides})

    def train(run_cfg, nodes):
        return run_in_process(len(nodes), node_configs=nodes, defaults=run_cfg.to_record(),
                              output_dir=run_cfg.output.output_dir)[0]

    result = audit.run_audit(cfg, 3, tmp_path, train, num_canaries=128, num_references=64, mia_samples=30,
                             canary_kind=canary_kind, log=lambda *a: None)
    print({k: result[k] for k in ("canary_kind", "epsilon_lower_bound", "epsilon_claimed", "one_run", "one_run_views",
                                  "score_mean_included", "score_mean_excluded")})
    return result


def test_step_scores_sum_client_zeros_gradient_at_each_coordinate_times_the_sign():
    from fl_dplora.tools.audit.canaries import step_scores

    canaries = [["a", 3, 10.0], ["b", 0, -10.0]]
    rows = [{"partition": 0, "round": 1, "steps": [[0.5, -0.25], [0.1, None]]},  # None: not trained that step
            {"partition": 1, "round": 1, "steps": [[9.0, 9.0]]},  # another client's: not the audited one
            {"partition": 0, "round": 2, "steps": [[-0.1, -0.5]]}]
    assert step_scores(canaries, rows) == pytest.approx([0.5, 0.75])
    assert step_scores(canaries, [rows[1]]) is None


def test_local_train_reports_the_noised_gradient_at_observed_coordinates():
    """What the audit's white-box view records is the step's gradient after the noise and the divisor
    (the released value DP-SGD accounts for), at planted and unplanted coordinates alike."""
    from fl_dplora.models import reset_adapter
    from fl_dplora.train import DPSGD, GradientCanary, local_train, make_optimizer

    cfg, model, _, trainable = _sgd_adapter(local_steps=2)
    before = [p.detach().clone() for p in trainable]
    opt = make_optimizer(trainable, cfg.train)
    stats = local_train(model, trainable, [], cfg, optimizer=opt, dp=DPSGD(2.0, 0.5, torch.Generator().manual_seed(1)),
                        sampling_generator=torch.Generator().manual_seed(0), public_size=1,
                        canaries=[GradientCanary(((0, 3, 100.0),))], observe=[(0, 3), (1, 5), (-1, 0)])
    assert len(stats.observed) == 2 and all(row[2] is None for row in stats.observed)
    moved = [before[0].view(-1)[3] - trainable[0].detach().view(-1)[3], before[1].view(-1)[5] - trainable[1].detach().view(-1)[5]]
    # SGD at lr 1: the coordinates moved by exactly the sum of the recorded gradients
    assert sum(row[0] for row in stats.observed) == pytest.approx(float(moved[0]), abs=1e-5)
    assert sum(row[1] for row in stats.observed) == pytest.approx(float(moved[1]), abs=1e-5)
    assert abs(stats.observed[0][1]) > 0.05  # noise of std sigma x C = 1 there: not an un-noised zero
    reset_adapter(model)


@pytest.mark.slow
def test_gradient_audit_without_dp_has_power(tmp_path):
    r = _gradient_audit(tmp_path, dp_mode="none")
    assert r["canary_kind"] == "gradient" and r["epsilon_claimed"] is None and not r["flagged"]
    assert r["epsilon_lower_bound"] >= 1.0, r["one_run"]
    saved = json.loads((tmp_path / "audit.json").read_text())
    assert saved["epsilon_lower_bound"] == r["epsilon_lower_bound"] and "gradient" in (tmp_path / "audit.md").read_text()
    planted = json.loads((tmp_path / "canaries.json").read_text())["gradients"]["0"]
    assert len(planted) == r["one_run"]["included"]
    views = {v["view"]: v["epsilon_lower_bound"] for v in r["one_run_views"]}
    assert views["every step (white box)"] >= 1.0 and views["final adapter"] >= 1.0, views


@pytest.mark.slow
def test_text_canaries_on_the_same_run_have_no_power(tmp_path):
    """What issue 27 defect 9 found: the earlier (text) canaries give no bound >= 1 without DP here."""
    r = _gradient_audit(tmp_path, canary_kind="text", dp_mode="none")
    assert r["canary_kind"] == "passphrase" and r["epsilon_lower_bound"] < 1.0


@pytest.mark.slow
def test_gradient_audit_of_a_dp_run_stays_below_its_claim(tmp_path):
    r = _gradient_audit(tmp_path, dp_mode="sample", target_epsilon=1.0, secure_rng=False)
    assert 0.9 < r["epsilon_claimed"] <= 1.0
    assert r["epsilon_lower_bound"] <= r["epsilon_claimed"] and not r["flagged"]
    assert [v["view"] for v in r["one_run_views"]] == ["final adapter", "every step (white box)"]
    assert all(v["epsilon_lower_bound"] <= r["epsilon_claimed"] for v in r["one_run_views"])


@pytest.mark.slow
def test_gradient_audit_flags_a_run_that_claims_dp_but_adds_no_noise(tmp_path, monkeypatch):
    import fl_dplora.train

    monkeypatch.setattr(fl_dplora.train, "gaussian_like", lambda s, std, gen: torch.zeros_like(s))  # the planted bug
    r = _gradient_audit(tmp_path, dp_mode="sample", target_epsilon=1.0, secure_rng=False)
    assert 0.9 < r["epsilon_claimed"] <= 1.0  # the accountant still claims eps ~1 ...
    assert r["flagged"] and r["epsilon_lower_bound"] > 1.5  # ... and the audit refutes it


# ----------------------------------------------------------------------------- whole audits: text canaries
def _audit(tmp_path, **overrides):
    cfg = tiny_config(None, **{**MEMORISABLE, **overrides})

    def train(run_cfg, nodes):
        return run_in_process(len(nodes), node_configs=nodes, defaults=run_cfg.to_record(),
                              output_dir=run_cfg.output.output_dir)[0]

    result = audit.run_audit(cfg, 3, tmp_path, train, num_canaries=128, num_references=128, mia_samples=60,
                             canary_kind="text", log=lambda *a: None)
    saved = json.loads((tmp_path / "audit.json").read_text())
    for key in ("exposure_mean", "exposure_max", "mia_auc", "epsilon_lower_bound", "epsilon_claimed", "delta"):
        assert key in saved
    assert (tmp_path / "audit.png").stat().st_size > 10_000 and "lower bound" in (tmp_path / "audit.md").read_text()
    print({k: result[k] for k in ("exposure_mean", "mia_auc", "mia_auc_calibrated", "epsilon_lower_bound", "epsilon_claimed", "one_run")})
    return result


@pytest.mark.slow
def test_audit_without_dp_finds_memorisation(tmp_path):
    r = _audit(tmp_path, dp_mode="none")
    assert r["epsilon_claimed"] is None and not r["flagged"]
    assert r["exposure_mean"] > 5.0 > r["exposure_mean_not_trained"] + 2
    assert r["epsilon_lower_bound"] > 2.0  # vs the DP run's eps ~1 below


@pytest.mark.slow
def test_audit_of_a_dp_run_stays_below_its_claim(tmp_path):
    r = _audit(tmp_path, dp_mode="sample", target_epsilon=1.0, secure_rng=False)
    assert 0.9 < r["epsilon_claimed"] <= 1.0
    assert r["epsilon_lower_bound"] <= r["epsilon_claimed"] and not r["flagged"]
    assert r["exposure_mean"] < 3.0


@pytest.mark.slow
def test_audit_flags_a_run_that_claims_dp_but_adds_no_noise(tmp_path, monkeypatch):
    import fl_dplora.train

    monkeypatch.setattr(fl_dplora.train, "gaussian_like", lambda s, std, gen: torch.zeros_like(s))  # the planted bug
    r = _audit(tmp_path, dp_mode="sample", target_epsilon=1.0, secure_rng=False)
    assert 0.9 < r["epsilon_claimed"] <= 1.0  # the accountant still claims eps ~1 ...
    assert r["flagged"] and r["epsilon_lower_bound"] > 1.5  # ... and the audit refutes it


@pytest.mark.slow
def test_audit_cli_client_mode_canaries_are_whole_clients(cli, tmp_path):
    rc = ("model=tiny-random-llama task=fin-sentiment max-train-samples=40 batch-size=8 micro-batch-size=8 local-steps=2 "
          "num-server-rounds=2 dp-mode=client target-epsilon=4 secure-rng=false max-eval-samples=8 "
          "label-head=false head-rounds=0")
    res = cli(["audit", "--num-clients", "2", "--canaries", "16", "--references", "16", "--run-config", rc,
               "--output-dir", str(tmp_path)], timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads((tmp_path / "audit.json").read_text())
    assert r["canary_kind"] == "gradient"  # the default: each canary client's update is its Dirac direction
    assert r["canary_unit"] == "client" and r["epsilon_claimed"] <= 4.0 and r["epsilon_lower_bound"] <= r["epsilon_claimed"]
    included = r["one_run"]["included"]
    rows = read_operator(tmp_path / "run")[0]
    assert all(row["sampled"] == 2 + included for row in rows)  # q = fraction-train = 1: every node, every round
    assert "epsilon lower bound" in res.stdout


def test_audit_cli_rejects_bad_input_before_training(cli, tmp_path):
    res = cli(["audit", "--canaries", "2", "--run-config", "model=tiny-random-llama task=fin-sentiment label-head=false head-rounds=0",
               "--output-dir", str(tmp_path)])
    assert res.returncode == 2 and "--canaries" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- label-head runs: mislabelled canaries
def test_label_flip_canaries_are_held_out_texts_with_a_wrong_label():
    from fl_dplora.data import eval_examples, head_stat_examples, load_task

    cfg = tiny_config(**{"label-head": True, "loss": "label-words", "head-rounds": 2})
    task = load_task(cfg.data.task, cfg.train.seed)
    taken = {(e.prompt, e.answer) for e in eval_examples(cfg) + head_stat_examples(cfg)}
    pool = [e for e in task.eval if (e.prompt, e.answer) not in taken]
    plan = audit.make_label_flip_plan("sample", 3, pool, task.label_words, 64, 1, 0)
    truth = {e.prompt: e.label for e in pool}
    assert len(plan.canaries) == len(plan.prompts) == 64 and not plan.references
    assert all(task.label_words.index(a) != truth[p] for p, a in zip(plan.prompts, plan.canaries))
    assert not {p for p in plan.prompts} & {e.prompt for e in eval_examples(cfg) + head_stat_examples(cfg)}
    planted = plan.canary_file()["examples"]["0"]
    assert planted == [[p, a] for p, a, i in zip(plan.prompts, plan.canaries, plan.included) if i]
    with pytest.raises(Exception, match="held-out texts"):
        audit.make_label_flip_plan("sample", 3, pool[:10], task.label_words, 64, 1, 0)


@pytest.mark.slow
def test_label_head_audit_sees_memorised_flips_without_dp_and_stays_below_the_claim_with_it(tmp_path):
    """A label-head run is audited with mislabelled canaries: without DP the planted ones lose more
    loss than the others (the audit can see memorisation), with DP the bound stays below the claim."""
    head = {"model": "tiny-random-llama", "max-train-samples": 60, "label-head": True, "loss": "label-words",
            "head-rounds": 2, "num-server-rounds": 2, "head-local-steps": 40, "head-learning-rate": 0.5,
            "lora-targets": "q_proj,v_proj", "max-eval-samples": 8, "eval-every": 0, "max-seq-len": 64}

    def run(sub, **over):
        cfg = tiny_config(**{**head, **over, "output-dir": str(tmp_path / sub / "run")})
        train = lambda run_cfg, nodes: run_in_process(len(nodes), node_configs=nodes,  # noqa: E731
                                                      defaults=run_cfg.to_record(),
                                                      output_dir=run_cfg.output.output_dir)[0]
        return audit.run_audit(cfg, 3, tmp_path / sub, train, num_canaries=64, mia_samples=30, canary_kind="text",
                               log=lambda *a: None)

    free = run("none", **{"dp-mode": "none"})
    assert free["canary_kind"] == "label-flip" and free["exposure_mean"] is None
    assert free["score_mean_included"] > free["score_mean_excluded"] + 0.05, free
    dp = run("dp", **{"dp-mode": "sample", "target-epsilon": 1.0, "secure-rng": False})
    assert 0.9 < dp["epsilon_claimed"] <= 1.0 and dp["epsilon_lower_bound"] <= dp["epsilon_claimed"] and not dp["flagged"]
    assert "label-flip" in (tmp_path / "dp" / "audit.md").read_text()
