"""Run tracking (fl_dplora/tracking.py): `report-to` logs each round's released metrics and ε through
the library's own writer; every run draws metrics.png; a tracker whose package is missing is one
line before anything runs."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest

from fl_dplora import tracking
from fl_dplora.config import ConfigError, resolve
from harness import read_metrics

TINY = ("model=tiny-random-llama task=fin-sentiment local-steps=1 batch-size=8 micro-batch-size=4 "
        "max-train-samples=40 max-eval-samples=8 max-seq-len=48")
GEN_ROWS = [{"round": 1, "eval_loss": 2.0, "eval_accuracy": None, "eval_bleu": 10.0, "eval_rouge_l": 0.3,
             "epsilon": 4.0, "delta": 1e-5},
            {"round": 2, "eval_loss": 1.5, "eval_accuracy": None, "eval_bleu": 20.0, "eval_rouge_l": 0.4,
             "epsilon": 6.0, "delta": 1e-5}]


def _png_width(path: Path) -> int:
    from matplotlib.image import imread

    return imread(str(path)).shape[1]


# ----------------------------------------------------------------------------- what is logged
def test_a_row_becomes_named_scalars():
    row = {"round": 3, "eval_loss": 0.5, "eval_accuracy": 0.75, "eval_macro_f1": None, "epsilon": 2.5, "delta": 1e-5,
           "train_loss": 0.25}
    assert tracking.scalars(row) == {"eval/loss": 0.5, "eval/accuracy": 0.75, "privacy/epsilon": 2.5, "train/loss": 0.25}


def test_the_plot_shows_bleu_for_generation_and_accuracy_for_classification():
    assert [p[0] for p in tracking.plot_series(GEN_ROWS)] == ["BLEU", "eval loss", "epsilon"]
    assert tracking.plot_series(GEN_ROWS)[0][1:] == ([1, 2], [10.0, 20.0])
    cls = [{"round": 1, "eval_loss": 1.0, "eval_accuracy": 0.5, "epsilon": None}]
    assert [p[0] for p in tracking.plot_series(cls)] == ["accuracy", "eval loss"]  # no DP: no epsilon panel


def test_metrics_png_has_a_panel_per_series(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GEN_ROWS))
    png = tracking.write_plot(tmp_path / "metrics.jsonl", tmp_path / "metrics.png", "t")
    assert png == tmp_path / "metrics.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _png_width(png) == 3 * 400  # three panels, 4 inches each at 100 dpi
    assert not list(tmp_path.glob("*.tmp.png"))


def _cfg(tmp_path, report_to):
    return resolve({"model": "tiny-random-llama", "report-to": report_to, "output-dir": str(tmp_path)})


def _fake(monkeypatch, name, **attrs):
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.calls = []
    for attr, ret in attrs.items():
        setattr(module, attr, lambda *a, _attr=attr, _ret=ret, **k: module.calls.append((_attr, a, k)) or _ret)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def test_wandb_gets_the_config_and_each_round(monkeypatch, tmp_path):
    run = types.SimpleNamespace(finish=lambda: wandb.calls.append(("finish", (), {})))
    wandb = _fake(monkeypatch, "wandb", init=run, log=None)
    tracker = tracking.Tracker(_cfg(tmp_path, "wandb"), tmp_path)
    (tmp_path / "metrics.jsonl").write_text(json.dumps(GEN_ROWS[0]) + "\n")
    tracker.round(GEN_ROWS[0])
    tracker.close()
    (init, _, kw), (log, args, logkw), (finish, _, _) = wandb.calls
    assert init == "init" and kw["project"] == "fl-dplora" and kw["config"]["model"] == "tiny-random-llama"
    assert (log, args, logkw) == ("log", ({"eval/loss": 2.0, "eval/bleu": 10.0, "eval/rouge_l": 0.3,
                                           "privacy/epsilon": 4.0},), {"step": 1})
    assert finish == "finish" and (tmp_path / "metrics.png").is_file()


def test_mlflow_gets_the_config_and_each_round(monkeypatch, tmp_path):
    mlflow = _fake(monkeypatch, "mlflow", start_run=object(), log_params=None, log_metrics=None, end_run=None)
    tracker = tracking.Tracker(_cfg(tmp_path, "mlflow"), tmp_path)
    (tmp_path / "metrics.jsonl").write_text(json.dumps(GEN_ROWS[0]) + "\n")
    tracker.round(GEN_ROWS[0])
    tracker.close()
    names = [c[0] for c in mlflow.calls]
    assert names == ["start_run", "log_params", "log_metrics", "end_run"]
    assert mlflow.calls[1][1][0]["model"] == "tiny-random-llama"
    assert mlflow.calls[2][1] == ({"eval/loss": 2.0, "eval/bleu": 10.0, "eval/rouge_l": 0.3, "privacy/epsilon": 4.0},)
    assert mlflow.calls[2][2] == {"step": 1}


# ----------------------------------------------------------------------------- refused in one line
def test_an_unknown_tracker_is_refused():
    with pytest.raises(ConfigError, match="report-to: unknown value 'comet'; choose one of none, tensorboard, wandb, mlflow"):
        resolve({"report-to": "comet"})


def test_a_missing_tensorboard_is_one_line_before_anything(monkeypatch, tmp_path):
    from fl_dplora.cli import prepare_config

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError) as info:
        prepare_config(f"{TINY} report-to=tensorboard", str(tmp_path / "run"), 2)
    assert str(info.value) == ("report-to: tensorboard needs the tensorboard package, which is not installed "
                               "(pip install tensorboard; or report-to = none)")
    assert not (tmp_path / "run").exists()


def test_the_server_app_checks_it_too(monkeypatch, tmp_path):
    from harness import run_in_process

    monkeypatch.setattr(tracking, "_installed", lambda package: False)
    with pytest.raises(ConfigError, match="report-to: wandb needs the wandb package"):
        run_in_process(2, output_dir=tmp_path / "run", report_to="wandb")
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_not_installed_through_the_cli(cli, no_ray, tmp_path):
    r = cli(["simulate", "--num-clients", "2", "--output-dir", str(tmp_path / "run"), "--run-config",
             f"{TINY} report-to=wandb"], env=no_ray, timeout=120)
    assert r.returncode == 2 and r.stdout == "", r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == ["fl-dplora: error: report-to: wandb needs the wandb package, which is not "
                                             "installed (pip install wandb; or report-to = none)"]
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_report_to_tensorboard_through_fl_dplora_simulate(cli, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    r = cli(["simulate", "--num-clients", "2", "--output-dir", str(out), "--run-config",
             f"{TINY} num-server-rounds=2 eval-every=1 report-to=tensorboard"], timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = read_metrics(out)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for tag, key in (("privacy/epsilon", "epsilon"), ("eval/loss", "eval_loss"), ("eval/accuracy", "eval_accuracy")):
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        assert logged == [(row["round"], pytest.approx(row[key], rel=1e-6)) for row in rows], tag
    assert [row["round"] for row in rows] == [1, 2] and rows[-1]["epsilon"] > rows[0]["epsilon"] > 0
    assert _png_width(out / "metrics.png") == 3 * 400  # accuracy, loss, epsilon
