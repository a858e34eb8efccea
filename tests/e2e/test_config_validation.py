"""A bad run config is refused up front with one line per problem, each starting with the key.

The table goes through `parse_overrides` + `resolve` (what `--run-config` goes through first, in
milliseconds); a handful of rows also go through the real `fl-dplora simulate` in a subprocess
whose `import ray` exits with code 97, which proves they fail before Ray starts: exit code 2,
no traceback, one line on stderr naming the key, nothing written, a few CPU seconds.
Near-miss controls show the checks are not broader than they should be.
"""

from __future__ import annotations


import pytest

from fl_dplora.config import ConfigError, parse_overrides, resolve

from conftest import RAY_IMPORTED
CPU_BUDGET_S = 10.0  # child CPU time: a busy machine inflates wall time, not this

# (--run-config text, key the line must start with, words the line must contain)
BAD = [
    # wrong types
    ("lora-rank=abc", "lora-rank", "expected int"),
    ("lora-rank=2.5", "lora-rank", "expected int"),
    ('fraction-train="x"', "fraction-train", "expected float"),
    ("learning-rate=true", "learning-rate", "expected float"),
    ("secure-rng=maybe", "secure-rng", "true or false"),
    ("seed=99999999999999999999", "seed", "64-bit"),
    # out of range
    ("fraction-train=1.5", "fraction-train", "<= 1"),
    ("fraction-train=0", "fraction-train", "> 0"),
    ("learning-rate=0", "learning-rate", "> 0"),
    ("learning-rate=-0.1", "learning-rate", "> 0"),
    ("learning-rate=nan", "learning-rate", "finite"),
    ("delta=0", "delta", "> 0"),
    ("delta=1.5", "delta", "<= 1"),
    ("max-grad-norm=0", "max-grad-norm", "> 0"),
    ("lora-rank=0", "lora-rank", ">= 1"),
    ("lora-alpha=0", "lora-alpha", "> 0"),
    ("lora-dropout=1", "lora-dropout", "<= 0.9"),
    ("batch-size=0", "batch-size", ">= 1"),
    ("micro-batch-size=0", "micro-batch-size", ">= 1"),
    ("num-server-rounds=0", "num-server-rounds", ">= 1"),
    ("local-steps=0", "local-steps", ">= 1"),
    ("max-seq-len=4", "max-seq-len", ">= 8"),
    ("momentum=1.5", "momentum", "<="),
    ("target-epsilon=0", "target-epsilon", "> 0"),
    ("noise-multiplier=inf", "noise-multiplier", "finite"),
    ("dirichlet-alpha=0", "dirichlet-alpha", "> 0"),
    ("round-timeout=0", "round-timeout", ">= 1"),
    ("checkpoint-every=-1", "checkpoint-every", ">= 0"),
    # unknown keys, with a suggestion
    ("lora-rnak=4", "lora-rnak", "did you mean 'lora-rank'"),
    ("dp_mode=none", "dp_mode", "did you mean 'dp-mode'"),
    ("learning-rat=0.1", "learning-rat", "did you mean 'learning-rate'"),
    # contradictory settings
    ('lora-variant=ffa lora-targets=""', "lora-targets", "at least one module"),
    ("micro-batch-size=32 batch-size=16", "micro-batch-size", "larger than batch-size"),
    ("dp-mode=sample target-epsilon=inf noise-multiplier=0", "target-epsilon", "finite"),
    ("dp-mode=client population=5 target-epsilon=inf noise-multiplier=-1", "target-epsilon", "finite"),
    ("dp-mode=client noise-multiplier=1", "population", "number of clients"),
    ("dp-mode=sample delta=0.5", "delta", "too large"),
    # unknown choice values: the line lists the valid ones
    ("dp-mode=foo", "dp-mode", "none, sample, client, paper"),
    ("partitioner=bar", "partitioner", "iid, dirichlet"),
    ("optimizer=sgdd", "optimizer", "sgd, adamw"),
    ("lora-variant=dora", "lora-variant", "lora, ffa"),
    ("accountant=gdp", "accountant", "rdp, prv"),
    ("transfer-dtype=int8", "transfer-dtype", "float32, bfloat16, float16"),
    ("client-noise=nowhere", "client-noise", "central, local"),
    ("lr-schedule=step", "lr-schedule", "constant, cosine, linear"),
]

# Close to a bad row, but valid: the checks must not refuse these.
GOOD = [
    "dp-mode=none target-epsilon=inf noise-multiplier=0",  # no DP: nothing to calibrate
    "dp-mode=sample target-epsilon=inf noise-multiplier=1.0",  # fixed sigma: epsilon is only reported
    "micro-batch-size=16 batch-size=16",
    "fraction-train=1 lora-dropout=0.9 delta=1 dp-mode=none",
    "lora-variant=ffa lora-targets=q_proj",
    "seed=-1",
    "learning-rate=1",  # an int where a float is expected
    "lora-rank=4.0",  # an integral float where an int is expected
]

# Rows that also go through the real CLI (plus the checks that need what only the CLI knows: the
# output dir's checkpoint for resume=true, the number of clients for min-available).
CLI_ROWS = ["lora-rank=abc", 'fraction-train="x"', "fraction-train=1.5", "lora-rnak=4",
            "micro-batch-size=32 batch-size=16", "dp-mode=sample target-epsilon=inf noise-multiplier=0",
            "optimizer=sgdd", 'lora-variant=ffa lora-targets=""', "seed=99999999999999999999"]


def _check_one_line(msg: str, key: str, words: str) -> None:
    lines = msg.splitlines()
    assert len(lines) == 1, msg
    assert lines[0].startswith(f"{key}:"), lines[0]
    assert words in lines[0], lines[0]


@pytest.mark.parametrize("run_config, key, words", BAD, ids=[b[0] for b in BAD])
def test_bad_config_is_refused_with_one_line_naming_the_key(run_config, key, words):
    with pytest.raises(ConfigError) as exc:
        resolve(parse_overrides(run_config))
    _check_one_line(str(exc.value), key, words)


@pytest.mark.parametrize("run_config", GOOD)
def test_near_misses_are_accepted(run_config):
    resolve(parse_overrides(run_config))


def test_every_problem_gets_its_own_line():
    with pytest.raises(ConfigError) as exc:
        resolve(parse_overrides("lora-rank=0 batch-size=abc lora-rnak=4 dp-mode=foo"))
    lines = str(exc.value).splitlines()
    assert sorted(ln.split(":")[0] for ln in lines) == ["batch-size", "dp-mode", "lora-rank", "lora-rnak"], lines


def test_flower_run_config_is_validated_too():
    """The ServerApp resolves Flower's context.run_config (base) the same way."""
    with pytest.raises(ConfigError) as exc:
        resolve(None, base={"fraction-train": 1.5})
    _check_one_line(str(exc.value), "fraction-train", "<= 1")


# ----------------------------------------------------------------------------- the real CLI
def _cli_refuses(cli, no_ray, tmp_path, run_config: str, key: str, words: str) -> None:
    out = tmp_path / "out"
    r = cli(["simulate", "--num-clients", "2", "--run-config", f"model=tiny-random-llama {run_config}",
             "--output-dir", str(out)], env=no_ray, timeout=120)
    assert r.returncode != RAY_IMPORTED, f"Ray was imported before the config was refused:\n{r.stderr}"
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("fl-dplora: error: "), lines[0]
    _check_one_line(lines[0].removeprefix("fl-dplora: error: "), key, words)
    assert r.stdout == ""
    assert not out.exists()
    assert r.cpu_s < CPU_BUDGET_S, f"{r.cpu_s:.1f} s CPU ({r.wall_s:.1f} s wall)"


@pytest.mark.parametrize("run_config", CLI_ROWS)
def test_cli_refuses_bad_config_before_ray(run_config, cli, no_ray, tmp_path):
    _, key, words = next(b for b in BAD if b[0] == run_config)
    _cli_refuses(cli, no_ray, tmp_path, run_config, key, words)


def test_cli_refuses_resume_without_a_checkpoint_before_ray(cli, no_ray, tmp_path):
    _cli_refuses(cli, no_ray, tmp_path, "resume=true", "resume", "no checkpoint")


def test_cli_refuses_more_min_available_than_clients_before_ray(cli, no_ray, tmp_path):
    """The simulation has exactly --num-clients nodes: the server would wait for a third forever."""
    _cli_refuses(cli, no_ray, tmp_path, "min-available=3", "min-available", "more than num-clients 2")


def test_pyproject_declares_every_key_flwr_run_may_override():
    """`flwr run --run-config` refuses keys the app's pyproject does not declare ("Key 'population' is
    not present in the main dictionary"): without `population` no deployment could run client-level DP
    or secure aggregation. Every key is declared (`fl-dplora audit`'s canaries travel in node configs)."""
    import tomllib

    from fl_dplora.config import PACKAGE_DIR, SCHEMA

    declared = tomllib.loads((PACKAGE_DIR.parent / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert not set(SCHEMA) - set(declared)
    assert not set(declared) - set(SCHEMA)
