"""A wheel built from the tree runs the documented recipe (issue 28, defect 2: a normal install used to
read `pyproject.toml` next to the package, which a wheel does not have, and ran another recipe).

The wheel is built with pip (offline: the build backend comes from pip's configured index) and
installed with `--no-deps` into a fresh venv that sees this venv's site-packages as plain paths: the
dependencies are importable, but this venv's `.pth` files are not processed, so neither the editable
fl_dplora nor the source tree is on `sys.path` (data.py would otherwise fall back to the tree's
data_files and hide a file missing from the wheel). Every command runs outside the repository.

Checks: (a) the wheel holds every file of the package in the tree (presets, task cards, data files);
(b) the installed package's defaults equal pyproject's `[tool.flwr.app.config]`; (c) `fl-dplora
config` from the wheel prints what the editable install prints; (d) a tiny `fl-dplora simulate` of
the default task (data-to-text, tiny random model) completes from the wheel with the config the
editable install resolves.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import tomllib
import venv
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import FL_DPLORA, REPO

pytestmark = pytest.mark.slow

PACKAGE = REPO / "fl_dplora"
TINY_RUN = ("model=tiny-random-llama num-server-rounds=1 local-steps=1 batch-size=8 micro-batch-size=4 "
            "max-train-samples=40 max-eval-samples=4 max-seq-len=32 max-new-tokens=4 checkpoint-every=0")
NUM_CLIENTS = 2


@dataclass
class WheelEnv:
    wheel: Path
    python: Path
    script: Path  # the fl-dplora console script the wheel installed
    site: Path
    cwd: Path  # outside the repository
    env: dict[str, str]

    def run(self, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=timeout)


def _tree_files() -> set[str]:
    """The package's files in the tree (tracked by git when it is there), as wheel paths."""
    try:
        out = subprocess.run(["git", "ls-files", "fl_dplora"], cwd=REPO, capture_output=True, text=True, check=True).stdout
        files = {line for line in out.splitlines() if line and (REPO / line).is_file()}
    except (OSError, subprocess.CalledProcessError):
        files = {str(p.relative_to(REPO)) for p in PACKAGE.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    return {f for f in files if not f.endswith((".pyc", ".pyo"))}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(out), str(REPO)]
    if importlib.util.find_spec("hatchling") is not None:  # the backend is here: no isolated build env
        cmd.insert(4, "--no-build-isolation")
    r = subprocess.run(cmd, cwd=out, capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and "hatchling" in r.stderr and "No matching distribution" in r.stderr:
        pytest.skip("pip cannot get the build backend hatchling (no index reachable)")
    assert r.returncode == 0, r.stderr[-3000:]
    wheels = list(out.glob("fl_dplora-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> WheelEnv:
    root = tmp_path_factory.mktemp("wheel_env")
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt").create(env_dir)
    python = env_dir / "bin" / "python"
    # the wheel first, into the bare venv: pip sees no other fl-dplora there (nothing to replace)
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                        "--quiet", str(wheel)], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True, cwd=root).stdout.strip())
    # then this venv's site-packages as plain path lines: its packages import, its .pth files
    # (the editable install's line naming the tree) are not run
    deps = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "zz_fl_dplora_test_deps.pth").write_text("".join(f"{p}\n" for p in deps))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV",
                                                               "FL_DPLORA_DATA_DIR", "FL_DPLORA_EXPERIMENTS")}
    env["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(env_dir)
    cwd = root / "cwd"
    cwd.mkdir()
    return WheelEnv(wheel, python, env_dir / "bin" / "fl-dplora", site, cwd, env)


def _pyproject_config() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_the_wheel_holds_every_package_file_the_runtime_reads(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    tree = _tree_files()
    assert tree and not tree - names, sorted(tree - names)
    presets = {f"fl_dplora/presets/{p.name}" for p in (PACKAGE / "presets").glob("*.toml")}
    assert presets and presets <= names
    for task in ("e2e", "tfns", "pubmedqa", "dolly15k"):  # the built-in tasks' cards and data (data.py, task_card.py)
        assert f"fl_dplora/data_files/{task}/task.toml" in names
    default_job = {"fl_dplora/data_files/e2e/devset.csv", "fl_dplora/data_files/e2e/testset_part_a.csv"}
    assert default_job <= names  # the default task (data-to-text): clients' and server's data
    assert not [n for n in names if n == "pyproject.toml" or n.endswith("/pyproject.toml")]  # defaults come from the package


PROBE = r"""
import json, sys
import fl_dplora, fl_dplora.config as c, fl_dplora.data as d
print(json.dumps({"file": fl_dplora.__file__, "path": sys.path, "data_dir": str(d.DATA_DIR),
                  "presets_dir": str(c.PRESETS_DIR), "presets": sorted(c.available_presets()),
                  "defaults": c.defaults(), "resolved": c.resolve({}).to_record()}))
"""


@pytest.fixture(scope="module")
def probe(installed) -> dict:
    r = installed.run([str(installed.python), "-c", PROBE])
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])


def test_the_installed_package_is_the_wheel_and_not_the_tree(installed, probe):
    site = installed.site.resolve()
    assert Path(probe["file"]).resolve().is_relative_to(site), probe["file"]
    assert str(REPO) not in probe["path"], probe["path"]  # the editable install's .pth was not run
    assert Path(probe["data_dir"]).resolve() == site / "fl_dplora" / "data_files"
    assert Path(probe["presets_dir"]).resolve() == site / "fl_dplora" / "presets"
    assert probe["presets"] == sorted(p.stem for p in (PACKAGE / "presets").glob("*.toml"))


def test_the_wheel_resolves_pyprojects_defaults(probe):
    declared = _pyproject_config()
    packaged = probe["defaults"]
    assert set(packaged) == set(declared), set(packaged) ^ set(declared)
    assert {k: packaged[k] for k in declared} == declared
    from fl_dplora.config import resolve

    assert probe["resolved"] == json.loads(json.dumps(resolve(base=declared).to_record()))


@pytest.mark.parametrize("args", [["config"], ["config", "--presets"]], ids=["keys", "presets"])
def test_fl_dplora_config_from_the_wheel_prints_what_the_editable_install_prints(installed, args):
    wheel = installed.run([str(installed.script), *args])
    assert wheel.returncode == 0, wheel.stderr[-3000:]
    tree = subprocess.run([str(FL_DPLORA), *args], cwd=installed.cwd, capture_output=True, text=True, timeout=300)
    assert tree.returncode == 0, tree.stderr[-3000:]
    assert wheel.stdout == tree.stdout and wheel.stdout.strip()


def test_a_tiny_simulate_of_the_default_task_completes_from_the_wheel(installed):
    out = installed.cwd / "run"
    r = installed.run([str(installed.script), "simulate", "--num-clients", str(NUM_CLIENTS), "--num-cpus", "1",
                       "--output-dir", str(out), "--run-config", TINY_RUN], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 1 and (out / "adapter" / "adapter_model.safetensors").is_file()
    from fl_dplora.config import parse_overrides, resolve

    # what the editable install resolves for the same command (cli.prepare_config's precedence)
    expected = resolve({**parse_overrides(TINY_RUN), "population": NUM_CLIENTS, "output-dir": str(out)}).to_record()
    got = summary["config"]
    assert got["task"] == "data-to-text" == _pyproject_config()["task"]  # the default job's data, from the wheel
    assert {k: got.get(k) for k in expected} == json.loads(json.dumps(expected))
