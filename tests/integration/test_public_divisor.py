"""DP-SGD's sample rate and divisor come from public numbers (issue 27 defect 7).

- a node that declares `shard-size` samples at batch/shard-size and divides by the expected batch
  from it: two nodes with files of different sizes send the same q, σ, ε and ledger (old code: q = B/n);
- a node with its own file and no declared size sets q from its n, which it then releases, so its ε
  is accounted under replace-one (old code: add/remove), calibrated and checked under it;
- the replace-one bound is valid: at q = 1 it is at least the exact ε of the Gaussian mechanism with
  sensitivity 2C (one record's value changed), which the add/remove ε is not;
- local_train divides by the public expected batch, not by the shard's n (old code: q·n = n at q = 1).
"""

from __future__ import annotations

import csv
import math

import pytest
import torch
from harness import REPO, InProcessGrid, run_in_process, tiny_config
from scipy.optimize import brentq
from scipy.stats import norm

from fl_dplora.privacy.accounting import PrivacyLedger, calibrate_schedule
from fl_dplora.privacy.sample_rate import basis

DP = {"dp-mode": "sample", "num-server-rounds": 1, "local-steps": 1, "batch-size": 16, "micro-batch-size": 8,
      "max-seq-len": 32, "max-eval-samples": 2, "eval-every": 0, "accountant": "rdp", "target-epsilon": 8.0,
      "secure-rng": False}


def _gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact ε of one Gaussian mechanism with sensitivity/std = mu (Balle and Wang 2018)."""
    return brentq(lambda e: norm.cdf(mu / 2 - e / mu) - math.exp(e) * norm.cdf(-mu / 2 - e / mu) - delta, 0, 500)


def _node_file(path, rows: int, skip: int):
    src = REPO / "fl_dplora" / "data_files" / "tfns" / "sent_train.csv"
    with src.open() as f:
        lines = list(csv.DictReader(f))[skip : skip + rows]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows({"text": r["text"], "label": r["label"]} for r in lines)
    return path


# ---------------------------------------------------------------- pure pieces
@pytest.mark.parametrize("sigma", [1.0, 2.0, 4.0])
def test_replace_one_bound_covers_the_exact_replace_one_gaussian(sigma):
    exact = _gaussian_epsilon(2.0 / sigma, 1e-5)  # q = 1: one value replaced moves the sum by up to 2C
    add_remove = PrivacyLedger([(sigma, 1.0, 1)]).epsilon(1e-5, "rdp")
    replace_one = PrivacyLedger([(sigma, 1.0, 1)], "replace-one").epsilon(1e-5, "rdp")
    assert add_remove < exact <= replace_one < 2.0 * exact


def test_replace_one_composes_calibrates_and_travels_in_the_record():
    events = [(1.0, 0.2, 20), (1.5, 1.0, 3)]
    a, r = PrivacyLedger(events), PrivacyLedger(events, "replace-one")
    assert r.epsilon(1e-5, "prv") > a.epsilon(1e-5, "prv")
    assert PrivacyLedger.from_record(r.to_record()).adjacency == "replace-one"
    assert "adjacency" not in a.to_record()  # the add/remove record reads as before
    sigma_a = calibrate_schedule(8.0, 1e-5, ((0.2, 20),), "rdp")
    sigma_r = calibrate_schedule(8.0, 1e-5, ((0.2, 20),), "rdp", adjacency="replace-one")
    assert sigma_r > sigma_a
    assert PrivacyLedger([(sigma_r, 0.2, 20)], "replace-one").epsilon(1e-5, "rdp") <= 8.0
    with pytest.raises(ValueError, match="adjacency"):
        PrivacyLedger(events, "swap")


def test_basis_picks_the_public_size_and_its_adjacency():
    assert basis(37, 100, own_file=True) == basis(90, 100, own_file=True)  # declared: n is not used
    assert basis(37, 100, own_file=True).adjacency == "add-remove"
    assert basis(37, None, own_file=True).adjacency == "replace-one"
    assert basis(37, None, own_file=False).adjacency == "add-remove"  # a simulation partition (public config)
    b = basis(37, 100, own_file=True)
    assert (b.rate(16), b.divisor(16)) == (0.16, 16.0) and (b.rate(0 or 100), b.divisor(100)) == (1.0, 100.0)


def test_local_train_divides_by_the_public_expected_batch_not_by_n():
    """q = 1 (batch >= size): the noiseless DP-SGD step is the clipped sum over the public size."""
    from fl_dplora.data import encode_all, load_task
    from fl_dplora.model_loading import load_tokenizer
    from fl_dplora.models import adapter_parameters, get_peft_model, reset_adapter
    from fl_dplora.train import DPSGD, local_train

    cfg = tiny_config(**{"batch-size": 64, "micro-batch-size": 8, "local-steps": 1, "optimizer": "sgd",
                         "momentum": 0.0, "learning-rate": 1.0, "max-seq-len": 32})
    model = get_peft_model(cfg)
    data = encode_all(load_tokenizer(cfg.model.name), load_task("fin-sentiment", 0).train[:6], 32, "auto")
    params = [p for p in adapter_parameters(model, cfg).values() if p.requires_grad]

    def step(size):
        reset_adapter(model)
        for i, p in enumerate(params):  # LoRA B starts at 0: give it values so A gets gradients too
            torch.manual_seed(i)
            p.data.normal_(0, 0.1)
        before = [p.detach().clone() for p in params]
        opt = torch.optim.SGD(params, lr=1.0)
        local_train(model, params, data, cfg, optimizer=opt, dp=DPSGD(0.0, 1e-2, None),
                    sampling_generator=torch.Generator().manual_seed(0), public_size=size)
        return torch.cat([(p.detach() - b).flatten() for p, b in zip(params, before)])

    by_n, by_public = step(None), step(60)
    assert by_n.norm() > 0
    # the clipped sum of the 6 examples over the old divisor q·n = 6, and over the public one 60
    assert float((by_public * 60 - by_n * 6).norm() / (by_n * 6).norm()) < 1e-3


# ---------------------------------------------------------------- nodes with their own files
def test_nodes_declaring_a_size_send_nothing_that_depends_on_their_n(tmp_path):
    files = [_node_file(tmp_path / "a.csv", 12, 0), _node_file(tmp_path / "b.csv", 30, 100)]
    configs = [{"data-path": str(f), "shard-size": 64} for f in files]
    grid = InProcessGrid(2, node_configs=configs, seed=3)
    summary, _ = run_in_process(2, output_dir=tmp_path / "run", grid=grid, **DP)
    a, b = (summary["privacy"]["per_client"][str(nid)] for nid in grid.contexts)
    assert a["sample_rate"] == b["sample_rate"] == 16 / 64  # batch / shard-size, whatever the file holds
    assert a["sigma"] == b["sigma"] and a["epsilon"] == b["epsilon"] and a["adjacency"] == "add-remove"
    assert summary["privacy"]["adjacency"] == "add-remove"
    replies = [ex.reply for ex in grid.exchanges if ex.reply is not None and not ex.reply.has_error()
               and "metrics" in ex.reply.content]
    shown = [{k: v for k, v in dict(r.content["metrics"]).items() if k != "partition-id"} for r in replies]
    assert len(shown) >= 2 and all(m == shown[0] for m in shown)  # every public number the same


def test_a_node_that_releases_its_n_is_accounted_under_replace_one(tmp_path):
    f = _node_file(tmp_path / "a.csv", 40, 0)
    grid = InProcessGrid(2, node_configs=[{"data-path": str(f)}, {"partition-id": 1, "num-partitions": 2}], seed=3)
    summary, _ = run_in_process(2, output_dir=tmp_path / "run", grid=grid, **{**DP, "max-train-samples": 40})
    own, sim = (summary["privacy"]["per_client"][str(nid)] for nid in grid.contexts)
    assert own["adjacency"] == "replace-one" and sim["adjacency"] == "add-remove"
    worst = max((own, sim), key=lambda c: c["epsilon"])
    assert summary["privacy"]["adjacency"] == worst["adjacency"]  # the headline ε's adjacency
    assert own["sample_rate"] == 16 / 40  # its n, released: consistent only with replace-one
    cfg = tiny_config(**DP)
    # calibrated for replace-one (more noise than add/remove at the same q), and its ε is that bound
    assert own["sigma"] == pytest.approx(calibrate_schedule(8.0, cfg.privacy.delta, ((16 / 40, 1),), "rdp",
                                                            adjacency="replace-one"))
    assert own["sigma"] > calibrate_schedule(8.0, cfg.privacy.delta, ((16 / 40, 1),), "rdp")
    assert own["epsilon"] == pytest.approx(PrivacyLedger([(own["sigma"], 16 / 40, 1)], "replace-one").epsilon(
        cfg.privacy.delta, "rdp")) and own["epsilon"] <= 8.0
    assert summary["privacy"]["epsilon"] >= own["epsilon"] - 1e-9
