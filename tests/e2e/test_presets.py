"""Named presets (`fl-dplora simulate --preset NAME|FILE.toml`) and `--run-config` given as a TOML
file or more than once: precedence defaults < preset < --run-config, one-line errors naming the
file, and agreement with Flower 1.42's own `--run-config FILE.toml` parser (what `flwr run .` sends).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from fl_dplora.cli import build_parser, prepare_config
from fl_dplora.config import (ConfigError, available_presets, load_preset, parse_overrides, preset_description,
                              defaults, resolve, tfns_recipe_defaults)
from harness import REPO

PRESETS = available_presets()
ERROR = "fl-dplora: error: "


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def _one_error_line(r) -> str:
    """The CLI refused with exit code 2 and exactly one `fl-dplora: error:` line, no traceback, before Ray."""
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and r.stdout == ""
    lines = _lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith(ERROR), r.stderr
    return lines[0].removeprefix(ERROR)


def _pyproject_config() -> dict:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


# ----------------------------------------------------------------------------- one source of defaults
def test_pyproject_declares_exactly_the_packaged_defaults():
    """`flwr run .` reads pyproject's table, `fl-dplora simulate` and a wheel the package's: equal,
    key by key."""
    packaged = defaults()
    declared = _pyproject_config()
    assert set(declared) == set(packaged), set(declared) ^ set(packaged)
    assert resolve(base=declared).to_record() == defaults()
    differ = {k for k in declared if declared[k] != packaged[k]}
    assert differ == set(), differ


def test_the_default_job_is_dp_lora_on_data_to_text():
    """The default trains LoRA A and B under DP-SGD (no label head) with the data-to-text preset's
    recipe; the TFNS label-head job is the fin-sentiment preset, and experiments keep it as their base
    on the earlier TFNS protocol (fin-sentiment-v1) that their committed results were computed with."""
    cfg = defaults()
    assert cfg == resolve(base=load_preset("data-to-text")).to_record()
    assert (cfg["task"], cfg["label-head"], cfg["lora-variant"], cfg["dp-mode"]) == ("data-to-text", False, "lora", "sample")
    assert cfg["target-epsilon"] <= 8.0 and cfg["delta"] == 1e-5 and cfg["accountant"] == "prv"
    tfns = tfns_recipe_defaults()
    assert (tfns["task"], tfns["label-head"], tfns["head-rounds"], tfns["eval-every"]) == ("fin-sentiment-v1", True, 4, 1)
    preset = {**resolve(base=load_preset("fin-sentiment")).to_record(), "max-new-tokens": 64, "eval-every": 1}
    assert preset["task"] == "fin-sentiment" and {**tfns, "task": "fin-sentiment"} == preset


# ----------------------------------------------------------------------------- packaged presets
def test_fin_sentiment_is_packaged_with_a_description():
    assert "fin-sentiment" in PRESETS
    assert PRESETS["fin-sentiment"].parent == REPO / "fl_dplora" / "presets"  # inside the package: the wheel ships it
    assert preset_description(PRESETS["fin-sentiment"]).startswith("TFNS financial sentiment")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_packaged_preset_resolves(name):
    values = load_preset(name)
    assert values, f"{name} sets no keys"
    assert preset_description(PRESETS[name]), f"{name} has no header comment"
    record = resolve(base=values).to_record()
    for key, value in values.items():
        assert record[key] == value, key
    # flwr run rejects an override key that pyproject's [tool.flwr.app.config] does not declare
    assert set(values) <= set(_pyproject_config()), set(values) - set(_pyproject_config())


def test_data_to_text_preset_is_the_measured_dp_lora_recipe():
    """The preset trains LoRA itself under DP (no label head) with exactly the recipe that
    experiments/data-to-text.toml measures (only the dev sample size and the RNG differ)."""
    import tomllib

    cfg = resolve(base=load_preset("data-to-text"))
    assert (cfg.data.task, cfg.train.label_head, cfg.train.head_rounds, cfg.privacy.dp_mode) == ("data-to-text", False, 0, "sample")
    assert (cfg.privacy.target_epsilon, cfg.privacy.delta) == (8.0, 1e-5)
    spec = tomllib.loads((REPO / "experiments" / "data-to-text.toml").read_text())["config"]
    ours, theirs = cfg.to_record(), resolve(base=spec).to_record()
    differ = {k for k in set(spec) & set(load_preset("data-to-text")) if theirs[k] != ours[k]}
    assert differ == {"max-eval-samples"}, differ


def test_fin_sentiment_is_the_label_head_recipe():
    cfg = resolve(base=load_preset("fin-sentiment"))
    assert (cfg.data.task, cfg.train.label_head, cfg.train.loss, cfg.privacy.dp_mode) == ("fin-sentiment", True, "label-words", "sample")
    assert (cfg.privacy.target_epsilon, cfg.privacy.delta, cfg.data.max_eval_samples) == (8.0, 1e-5, 300)


def test_config_presets_lists_each_with_its_first_comment_line(cli):
    r = cli(["config", "--presets"], timeout=120)
    assert r.returncode == 0, r.stderr
    lines = _lines(r.stdout)
    assert len(lines) == len(PRESETS)
    for line, (name, path) in zip(lines, PRESETS.items()):
        assert re.fullmatch(rf"{re.escape(name)}\s+{re.escape(preset_description(path))}", line), line


# ----------------------------------------------------------------------------- precedence
def test_precedence_defaults_then_preset_then_run_config(tmp_path):
    preset = tmp_path / "mine.toml"
    preset.write_text('# mine\nmodel = "tiny-random-llama"\nlora-rank = 6\nnum-server-rounds = 2\n'
                      "learning-rate = 0.01\npopulation = 9\n")
    cfg = prepare_config(["num-server-rounds=3", "learning-rate=0.02 lora-alpha=8"], str(tmp_path / "out"),
                         preset=str(preset))
    defaults_ = defaults()
    assert defaults_["lora-rank"] != 6 and cfg.lora.rank == 6 and cfg.federation.population == 9  # preset over the defaults
    assert cfg.federation.num_server_rounds == 3 and cfg.train.learning_rate == 0.02 and cfg.lora.alpha == 8.0  # run-config over it
    assert cfg.privacy.dp_mode == defaults_["dp-mode"] and cfg.train.seed == defaults_["seed"]  # the rest: defaults
    # the same through a packaged name
    cfg = prepare_config("target-epsilon=4", str(tmp_path / "out2"), preset="fin-sentiment")
    assert cfg.privacy.target_epsilon == 4.0 and cfg.train.label_head is True


def test_num_clients_declares_population_over_the_preset_but_not_over_run_config(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text('model = "tiny-random-llama"\ndp-mode = "none"\nmax-train-samples = 40\npopulation = 9\n')
    assert prepare_config(None, str(tmp_path / "a"), 2, preset=str(preset)).federation.population == 2
    assert prepare_config("population=7", str(tmp_path / "b"), 2, preset=str(preset)).federation.population == 7


# ----------------------------------------------------------------------------- --run-config
def test_run_config_given_twice_merges_in_order():
    args = build_parser().parse_args(["simulate", "--run-config", "lora-rank=4 seed=1", "--run-config", "seed=2"])
    assert parse_overrides(args.run_config) == {"lora-rank": 4, "seed": 2}
    assert parse_overrides(build_parser().parse_args(["simulate", "--run-config", ""]).run_config) == {}  # make run


def test_run_config_takes_a_toml_file(tmp_path):
    f = tmp_path / "over.toml"
    f.write_text('# overrides\nlora-rank = 16\ntask = "medical-qa"\nsecure-rng = false\n')
    assert parse_overrides(str(f)) == {"lora-rank": 16, "task": "medical-qa", "secure-rng": False}
    assert parse_overrides([str(f), "lora-rank=2"]) == {"lora-rank": 2, "task": "medical-qa", "secure-rng": False}
    assert parse_overrides(["lora-rank=2", str(f)])["lora-rank"] == 16  # later wins, whichever form
    assert parse_overrides("task=/abs/card.toml") == {"task": "/abs/card.toml"}  # a key=value pair, not a file


def test_run_config_file_through_the_cli(tmp_path):
    f = tmp_path / "over.toml"
    f.write_text("lora-rank = 16\n")
    args = build_parser().parse_args(["simulate", "--run-config", str(f), "--run-config", "seed=3"])
    cfg = prepare_config(args.run_config, str(tmp_path / "out"))
    assert cfg.lora.rank == 16 and cfg.train.seed == 3


# ----------------------------------------------------------------------------- bad input: one line
def test_unknown_preset_is_one_line_listing_the_available_ones(cli, no_ray, tmp_path):
    r = cli(["simulate", "--preset", "fin-sentimnt", "--output-dir", str(tmp_path / "out")], env=no_ray, timeout=120)
    line = _one_error_line(r)
    assert line.startswith("preset: unknown preset 'fin-sentimnt'") and "fin-sentiment" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("body, key", [
    ("lora-rnak = 4\n", "lora-rnak"),  # unknown key
    ("lora-rank = 0\n", "lora-rank"),  # out of range, even where --run-config below sets it
    ('dp-mode = "local"\n', "dp-mode"),
    ("[tool]\nseed = 1\n", "tool.seed"),  # a table: Flower flattens it to a dotted key
    ("lora-rank = \n", "preset"),  # not TOML
], ids=["unknown-key", "bad-value", "bad-choice", "table", "not-toml"])
def test_bad_preset_is_one_line_naming_the_file(cli, no_ray, tmp_path, body, key):
    preset = tmp_path / "bad.toml"
    preset.write_text("# a broken preset\n" + body)
    r = cli(["simulate", "--preset", str(preset), "--run-config", "lora-rank=4", "--output-dir", str(tmp_path / "out")],
            env=no_ray, timeout=120)
    line = _one_error_line(r)
    assert line.startswith(f"{key}:") and str(preset) in line, line


def test_bad_run_config_file_is_one_line_naming_the_file(tmp_path):
    f = tmp_path / "over.toml"
    f.write_text("lora-rank = -1\n")
    with pytest.raises(ConfigError) as e:
        parse_overrides(["seed=1", str(f)])
    assert _lines(str(e.value)) == [f"lora-rank: must be >= 1, got -1 [in run-config {f}]"]
    with pytest.raises(ConfigError, match=r"^run-config: cannot read .*missing\.toml"):
        parse_overrides(str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match=r"^preset: cannot read .*missing\.toml"):
        load_preset(str(tmp_path / "missing.toml"))


# ----------------------------------------------------------------------------- Flower agrees
def test_flower_reads_each_preset_as_we_do():
    """`flwr run . --run-config PRESET.toml`: Flower 1.42's parser reads the same dict, the SuperLink's
    fuse with pyproject's config accepts every key, and the fused config resolves to our config."""
    from flwr.common.config import get_fused_config_from_dir, parse_config_args

    for name, path in PRESETS.items():
        theirs = parse_config_args([str(path)])
        assert theirs == load_preset(name), name
        fused = get_fused_config_from_dir(REPO, theirs)  # raises on a key pyproject does not declare
        assert resolve(base=fused) == resolve(base=load_preset(name)), name
    # docs/configuration.md: quoted, a value ending in .toml stays a value in Flower too
    assert parse_config_args(["task='/abs/card.toml'"]) == {"task": "/abs/card.toml"}


# ----------------------------------------------------------------------------- make run
def test_make_run_passes_the_preset_through():
    def dry(*extra: str) -> str:
        out = subprocess.run(["make", "-n", "run", *extra], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return [ln for ln in out.stdout.splitlines() if "fl-dplora simulate" in ln][-1]

    assert dry("PRESET=fin-sentiment").endswith('--run-config "" --preset "fin-sentiment"')
    assert "--preset" not in dry() and "--preset" not in dry("PRESET=")


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_simulate_with_a_preset_file_end_to_end(cli, tmp_path):
    preset = tmp_path / "tiny.toml"
    preset.write_text("\n".join([
        "# a tiny preset for the test", 'model = "tiny-random-llama"', 'task = "fin-sentiment"',
        "num-server-rounds = 2", "local-steps = 2", "batch-size = 8", "micro-batch-size = 4", "max-seq-len = 64",
        "max-train-samples = 120", "max-eval-samples = 16", 'dp-mode = "none"', "secure-rng = false",
        "checkpoint-every = 0", 'lora-variant = "lora"', "lora-layers = 0", 'lora-targets = "q_proj,v_proj"',
        "lora-rank = 4", 'optimizer = "sgd"', "learning-rate = 0.05", 'loss = "answer-tokens"',
        'system-prompt = "auto"', "label-head = false", "head-rounds = 0", ""]))
    out = tmp_path / "out"
    r = cli(["simulate", "--preset", str(preset), "--num-clients", "2", "--num-cpus", "1",
             "--run-config", "num-server-rounds=1", "--output-dir", str(out)], timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    cfg = summary["config"]
    assert summary["rounds"] == 1 and cfg["num-server-rounds"] == 1  # --run-config over the preset
    assert cfg["model"] == "tiny-random-llama" and cfg["lora-rank"] == 4 and cfg["population"] == 2  # the preset
    assert cfg["dp-mode"] == "none" and summary["privacy"]["epsilon"] is None
