"""Deployment end to end: a real SuperLink and real SuperNodes on 127.0.0.1, runs started with `flwr run .`.

What is pinned here (docs/deployment.md explains the commands):
- insecure: 2 SuperNodes, one with a partition of the bundled data, one with its own JSONL file
  (`data-path`); 2 rounds of the tiny model; the released outputs (docs/privacy.md); status finished:completed;
  epsilon grows in round 2, so the privacy ledger outlived the per-round ClientApp process.
- TLS + SuperNode authentication: 2 registered keys train, a third, unregistered key is refused.
- a SuperNode killed (SIGKILL) in the middle of round 1: the run still completes, and
  operator.jsonl names the lost node in that round's "dropped" list.
- a SuperNode restarted between rounds (issue 27): its ledger file and ε log continue (steps = every
  round it trained), and its `max-epsilon` floor of two rounds refuses round 3.

Isolation: FLWR_HOME is a temporary folder (the user's ~/.flwr is never touched), every port is
chosen at run time, and every process started here (with its children: flower-superexec,
flwr-serverapp, flwr-clientapp) is stopped by pid in a `finally`. The test then checks that no
process with this FLWR_HOME is left, including a local SuperLink daemon that `flwr` might spawn.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from fl_dplora.clients.node_policy import NodePolicy
from fl_dplora.privacy.accounting import PrivacyLedger
from fl_dplora.write_ahead import read_operator
from harness import TINY_DEFAULTS, kill_tree, read_metrics, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # 30-85 s a test (or its module fixture) in CI

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
FLWR = str(BIN / "flwr")


def tfns_recipe_defaults_for_run_config() -> dict:
    """The keys where the TFNS recipe differs from today's defaults (pyproject's, which flwr run reads)."""
    from fl_dplora.config import defaults, tfns_recipe_defaults

    now = defaults()
    return {k: v for k, v in tfns_recipe_defaults().items() if v != now[k]}
# Small, fast settings (same as the simulation smoke run); output-dir is added per test (absolute:
# the ServerApp runs in another process with another working directory).
# On the TFNS label-head recipe (the fin-sentiment preset, the defaults these tests were written for).
SMALL = {
    **tfns_recipe_defaults_for_run_config(),
    "model": "tiny-random-llama", "num-server-rounds": 2, "local-steps": 2, "batch-size": 8,
    "micro-batch-size": 4, "max-eval-samples": 32, "max-train-samples": 300, "max-seq-len": 64,
}
# released: DP outputs and the server's evaluation; counts, bytes and timings go to operator.jsonl
METRICS_KEYS = {"round", "eval_loss", "eval_accuracy", "epsilon", "delta"}
SUMMARY_KEYS = {"rounds", "final_eval", "trainable_params", "full_model_params", "full_model_bytes", "privacy", "config"}
PRIVACY_KEYS = {"mode", "noise_multiplier", "max_grad_norm", "sample_rate", "steps", "accountant", "epsilon", "delta"}

for _tool in ("flwr", "flower-superlink", "flower-supernode", "flower-superexec"):
    if not (BIN / _tool).is_file():
        pytest.skip(f"{_tool} not in {BIN} (pip install -e . in the venv)", allow_module_level=True)


# ----------------------------------------------------------------------------- helpers
_PORTS: set[int] = set()


def free_port() -> int:
    """A free TCP port on 127.0.0.1, outside Ray's default worker range 10002-19999."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not 10002 <= port <= 19999 and port not in _PORTS:
            _PORTS.add(port)
            return port
    raise RuntimeError("no free port")


def run_config(**extra) -> str:
    """`--run-config` text: TOML values, strings quoted, booleans lower case."""
    items = {**SMALL, **extra}
    return " ".join(f"{k}={json.dumps(v) if isinstance(v, (str, bool)) else v}" for k, v in items.items())


class Deployment:
    """Processes of one test: SuperLink, SuperNodes, their logs, the `flwr` CLI with a private FLWR_HOME."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.home = tmp / "flwr-home"
        self.logs = tmp / "logs"
        self.home.mkdir()
        self.logs.mkdir()
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "FLWR_"))}
        self.env.update({
            "FLWR_HOME": str(self.home), "FLWR_DISABLE_UPDATE_CHECK": "1",
            # flower-superlink starts `flower-superexec` by name: the venv's bin must be on PATH.
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            # If anything made `flwr` start its local SuperLink daemon, keep it off the shared default ports.
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
        })
        self.port = free_port()
        self.ca: Path | None = None

    # ------------------------------------------------------------------ processes
    def start(self, name: str, args: list[str], cwd: Path | None = None, **env) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("wb")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd or self.tmp,
                                env={**self.env, **env}, start_new_session=True)
        log.close()
        self.procs.append((name, proc))
        return proc

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def tail(self, name: str, n: int = 40) -> str:
        return f"--- {name}.log (tail) ---\n" + "\n".join(self.log(name).splitlines()[-n:])

    def stop_all(self) -> None:
        """SuperNodes first (newest first), then the SuperLink; each with its whole process tree."""
        for _, proc in reversed(self.procs):
            kill_tree(proc.pid, group=True)  # also when it has exited: its group may have members left
            proc.wait(timeout=30)

    def leftovers(self) -> list[psutil.Process]:
        """Every live process that runs with this test's FLWR_HOME (ours, or a daemon `flwr` spawned)."""
        found = []
        for p in psutil.process_iter(["pid", "status"]):
            if p.pid == os.getpid() or p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            try:
                if p.environ().get("FLWR_HOME") == str(self.home):
                    found.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found

    # ------------------------------------------------------------------ SuperLink
    def write_connection(self, tls: bool) -> None:
        lines = ["[superlink]", 'default = "e2e"', "", "[superlink.e2e]", f'address = "127.0.0.1:{self.port}"']
        lines.append(f'root-certificates = "{self.ca}"' if tls else "insecure = true")
        (self.home / "config.toml").write_text("\n".join(lines) + "\n")

    def start_superlink(self, tls_dir: Path | None = None, **env: str) -> None:
        args = [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
                "--disable-runtime-dependency-installation"]
        if tls_dir is None:
            args.append("--insecure")
        else:
            self.ca = tls_dir / "ca.crt"
            args += ["--ssl-ca-certfile", str(self.ca), "--ssl-certfile", str(tls_dir / "server.crt"),
                     "--ssl-keyfile", str(tls_dir / "server.key"), "--enable-supernode-auth"]
        self.write_connection(tls=tls_dir is not None)
        proc = self.start("superlink", args, **env)
        scheme = "https" if tls_dir else "http"
        ctx = ssl.create_default_context(cafile=str(self.ca)) if tls_dir else None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"SuperLink exited with {proc.returncode}\n{self.tail('superlink')}"
            try:
                with urllib.request.urlopen(f"{scheme}://127.0.0.1:{self.port}/health", timeout=2, context=ctx) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        pytest.fail(f"SuperLink not healthy after 60 s\n{self.tail('superlink')}")

    # ------------------------------------------------------------------ SuperNodes
    def start_supernode(self, name: str, node_config: str, key: Path | None = None) -> subprocess.Popen:
        args = [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}", "--port", str(free_port()),
                "--node-config", node_config]
        args += ["--root-certificates", str(self.ca)] if self.ca else ["--insecure"]
        if key is not None:
            args += ["--auth-supernode-private-key", str(key)]
        # One torch thread per ClientApp: several of them share the 2 cores of a small machine.
        return self.start(name, args, OMP_NUM_THREADS="1")

    # ------------------------------------------------------------------ flwr CLI
    def flwr(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        res = subprocess.run([FLWR, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=self.env)
        if check:
            assert res.returncode == 0, f"flwr {' '.join(args)} -> {res.returncode}\n{res.stdout}\n{res.stderr}"
        return res

    def flwr_json(self, *args: str) -> dict:
        res = self.flwr(*args, "--format", "json", check=False)
        try:
            return json.loads(res.stdout)
        except json.JSONDecodeError:
            return {"success": False, "error-message": res.stdout + res.stderr}

    def online_nodes(self) -> set[str]:
        data = self.flwr_json("supernode", "list", "e2e")
        return {str(n["node-id"]) for n in data.get("nodes", []) if n.get("status") == "online"}

    def wait_nodes(self, n: int, names: list[str], timeout: float = 90) -> set[str]:
        deadline = time.monotonic() + timeout
        online: set[str] = set()
        while time.monotonic() < deadline:
            for name in names:
                proc = dict(self.procs)[name]
                assert proc.poll() is None, f"{name} exited with {proc.returncode}\n{self.tail(name)}"
            online = self.online_nodes()
            if len(online) >= n:
                return online
            time.sleep(1)
        pytest.fail(f"{len(online)}/{n} SuperNodes online after {timeout} s\n" + "\n".join(self.tail(x) for x in names))

    def start_partition_nodes(self, n: int) -> list[str]:
        """n SuperNodes `supernode-i` on partition i of n, online; returns their names."""
        names = [f"supernode-{i}" for i in range(n)]
        for i, name in enumerate(names):
            self.start_supernode(name, f"partition-id={i} num-partitions={n}")
        self.wait_nodes(n, names)
        return names

    def run_status(self, run_id: str) -> dict:
        runs = self.flwr_json("ls", "e2e", "--run-id", run_id).get("runs", [])
        return runs[0] if runs else {}

    def start_run(self, out_dir: Path, **overrides) -> subprocess.Popen:
        """`flwr run . e2e --stream` in the repository root, in the background (log: flwr-run.log)."""
        cfg = run_config(**overrides, **{"output-dir": str(out_dir)})
        return self.start("flwr-run", [FLWR, "run", ".", "e2e", "--stream", "--run-config", cfg], cwd=REPO)

    def finish_run(self, proc: subprocess.Popen, timeout: float = 300) -> dict:
        """Wait for `flwr run --stream`, then read the run's real status (`--stream` exits 0 on failure too)."""
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"flwr run still streaming after {timeout} s\n{self.tail('flwr-run')}")
        m = re.search(r"Successfully started run (\d+)", self.log("flwr-run"))
        assert m, f"flwr run did not start a run (exit {proc.returncode})\n{self.tail('flwr-run')}"
        run_id = m.group(1)
        deadline = time.monotonic() + 60
        status: dict = {}
        while time.monotonic() < deadline:  # the stream can end a moment before the status is final
            status = self.run_status(run_id)
            if str(status.get("status", "")).startswith("finished"):
                break
            time.sleep(1)
        assert status.get("status") == "finished:completed", (
            f"run {run_id}: {status.get('status')} {status.get('status-details')}\n{self.tail('flwr-run', 60)}")
        return status


@pytest.fixture
def deployment(tmp_path):
    dep = Deployment(tmp_path)
    try:
        yield dep
    finally:
        dep.stop_all()
        left = dep.leftovers()
        for p in left:  # by pid: only processes that run with this test's FLWR_HOME
            kill_tree(p.pid, signal.SIGKILL, grace=5)
        assert not left, f"processes left running: {[(p.pid, p.name()) for p in left]}"


def assert_outputs(out: Path, rounds: int = 2) -> tuple[list[dict], dict]:
    """The released outputs (docs/privacy.md): metrics.jsonl (one row per round), summary.json, adapter/."""
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    for r in rows:
        assert METRICS_KEYS <= set(r), METRICS_KEYS - set(r)
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary), SUMMARY_KEYS - set(summary)
    assert {"accuracy", "loss"} <= set(summary["final_eval"])
    assert PRIVACY_KEYS <= set(summary["privacy"]), PRIVACY_KEYS - set(summary["privacy"])
    assert summary["rounds"] == rounds
    from safetensors.torch import load_file

    tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert tensors and all("lora_" in k for k in tensors), list(tensors)[:4]
    saved = sum(t.numel() for t in tensors.values())
    if summary["config"]["label-head"]:  # the label head sits next to the PEFT adapter
        saved += load_file(str(out / "adapter" / "label_head.safetensors"))["proj.weight"].numel()
    # >=: with lora-variant=ffa the file also holds the frozen, seed-shared A matrices.
    assert saved >= summary["trainable_params"] > 0
    return rows, summary


def assert_clean_stop(dep: Deployment) -> None:
    dep.stop_all()
    left = dep.leftovers()
    assert not left, f"still running after stop: {[(p.pid, p.name(), p.cmdline()[:3]) for p in left]}"


# ----------------------------------------------------------------------------- tests
def test_insecure_deployment_partition_and_data_path_nodes(deployment: Deployment, tmp_path):
    """SuperLink + 2 SuperNodes: node 0 trains on partition 0 of 2, node 1 only on its own JSONL file."""
    dep = deployment
    data = tmp_path / "node-data"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_sample_node_data.py"), str(data),
                    "--nodes", "2", "--rows", "120"], check=True, capture_output=True)
    own_file = data / "node-1.jsonl"
    dep.start_superlink()
    dep.start_supernode("supernode-0", "partition-id=0 num-partitions=2")
    dep.start_supernode("supernode-1", f"data-path={json.dumps(str(own_file))}")  # a TOML string: quoted
    dep.wait_nodes(2, ["supernode-0", "supernode-1"])

    out = tmp_path / "run-out"
    dep.finish_run(dep.start_run(out))
    rows, summary = assert_outputs(out)
    # Node 1 has no partition-id: without its data file its ClientApp would fail and be dropped.
    assert [(r["accepted"], r["dropped"]) for r in read_operator(out)[0]] == [(2, []), (2, [])]
    # dp-mode=sample (default): the ledger lives in the SuperNode's context.state, so epsilon grows
    # across rounds although each round runs in a fresh flwr-clientapp process.
    assert summary["privacy"]["mode"] == "sample"
    assert 0 < rows[0]["epsilon"] < rows[1]["epsilon"] <= summary["config"]["target-epsilon"] + 1e-6
    assert summary["config"]["output-dir"] == str(out)
    assert_clean_stop(dep)


def test_tls_and_supernode_auth_refuse_unregistered_key(deployment: Deployment, tmp_path):
    """TLS + SuperNode auth: 2 registered keys run 2 rounds; a third, unregistered key is refused."""
    dep = deployment
    certs = tmp_path / "certs"
    subprocess.run(["bash", str(REPO / "scripts" / "generate_test_certs.sh"), str(certs), "3"],
                   check=True, capture_output=True, env=dep.env)
    dep.start_superlink(tls_dir=certs)
    registered = set()
    for i in (0, 1):
        res = dep.flwr_json("supernode", "register", str(certs / f"supernode-{i}.pub"), "e2e")
        assert res.get("success"), res
        registered.add(str(res["node-id"]))

    intruder = dep.start_supernode("supernode-unregistered", "partition-id=0 num-partitions=2",
                                   key=certs / "supernode-2")
    dep.start_supernode("supernode-0", "partition-id=0 num-partitions=2", key=certs / "supernode-0")
    dep.start_supernode("supernode-1", "partition-id=1 num-partitions=2", key=certs / "supernode-1")
    try:
        code = intruder.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"unregistered SuperNode still running after 60 s\n{dep.tail('supernode-unregistered')}")
    assert code != 0
    assert "Failed to activate SuperNode" in dep.log("supernode-unregistered"), dep.tail("supernode-unregistered")
    assert "No SuperNode found with the given public key" in dep.log("superlink"), dep.tail("superlink")
    assert dep.wait_nodes(2, ["supernode-0", "supernode-1"]) == registered

    out = tmp_path / "run-out"
    dep.finish_run(dep.start_run(out, **{"dp-mode": "none"}))
    rows, _ = assert_outputs(out)
    assert [(r["accepted"], r["dropped"]) for r in read_operator(out)[0]] == [(2, []), (2, [])]
    assert all(r["train_loss"] is not None for r in rows)
    assert_clean_stop(dep)


def test_killed_supernode_is_dropped_and_the_run_completes(deployment: Deployment, tmp_path):
    """3 SuperNodes, one SIGKILLed while it trains in round 1: the round times out for it (60 s),
    the other replies are aggregated (min-available=1), round 2 runs, operator.jsonl names the node."""
    dep = deployment
    dep.start_superlink()
    names = dep.start_partition_nodes(3)
    victim = names[2]
    victim_id = re.search(r"SuperNode ID: (\d+)", dep.log(victim)).group(1)

    out = tmp_path / "run-out"
    run = dep.start_run(out, **{"dp-mode": "none", "round-timeout": 60.0, "min-available": 1})
    deadline = time.monotonic() + 180
    while "Start `flwr-clientapp` process" not in dep.log(victim):  # it received round 1's message
        assert run.poll() is None, f"run ended before round 1 reached {victim}\n{dep.tail('flwr-run')}"
        assert time.monotonic() < deadline, f"{victim} got no message\n{dep.tail(victim)}"
        time.sleep(0.5)
    kill_tree(dict(dep.procs)[victim].pid, signal.SIGKILL, grace=5, group=True)  # the node is lost mid-round

    dep.finish_run(run, timeout=360)
    rows, summary = assert_outputs(out)
    r1, r2 = read_operator(out)[0]  # who took part and who was dropped: the operator's log
    assert r1["sampled"] == 3 and r1["accepted"] == 2
    assert any(d.startswith(f"node {victim_id}:") for d in r1["dropped"]), r1["dropped"]
    assert r2["accepted"] == 2  # the run goes on with the two nodes left
    assert f"node {victim_id}" in dep.log("flwr-run")  # the ServerApp log names it too
    assert summary["rounds"] == 2
    assert_clean_stop(dep)


def test_three_hospitals_task_cards_privacy_floor_and_federated_evaluation(deployment: Deployment, tmp_path):
    """SuperLink + 3 SuperNodes (docs/deployment.md, "Three hospitals"): each hospital holds its own
    CSV labelled 0/1 and a task card naming the labels benign/malignant; the server's card (label
    words, prompt, its own test file) reaches the nodes with the instructions. Hospital b allows at
    most ε = 2 (the run targets 8) and refuses; hospital c's file has an unknown label and refuses
    before training; a trains. fraction-evaluate = 1: hospital a (exact-eval = true) scores the global
    adapter on its own test file, the means go to the operator log; b (it requires DP) and c (a DP run,
    no exact-eval) decline and send no metric of their files."""
    dep = deployment
    demo = tmp_path / "hospitals"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_hospital_demo.py"), str(demo), "--rows", "40"],
                   check=True, capture_output=True)
    bad = demo / "hospital-c" / "train.csv"
    bad.write_text(bad.read_text().replace(",1\n", ",2\n", 1))  # one row labelled 2: not in c's card
    dep.start_superlink()
    logs = {}
    for name, extra in (("a", " exact-eval=true"), ("b", " max-epsilon=2.0"), ("c", "")):
        d = demo / f"hospital-{name}"
        logs[name] = tmp_path / f"eps-{name}.jsonl"
        node_config = " ".join(f"{k}={json.dumps(str(v))}" for k, v in (
            ("data-path", d / "train.csv"), ("task-card", d / "task.toml"), ("eval-path", d / "test.csv"),
            ("epsilon-log", logs[name]))) + extra
        dep.start_supernode(f"hospital-{name}", node_config)
    dep.wait_nodes(3, ["hospital-a", "hospital-b", "hospital-c"])

    out = tmp_path / "run-out"
    dep.finish_run(dep.start_run(out, task=str(demo / "server" / "task.toml"), **{"fraction-evaluate": 1.0}))
    rows, summary = assert_outputs(out)
    operator = read_operator(out)[0]
    assert [r["accepted"] for r in operator] == [1, 1]
    for r in operator:
        reasons = " ".join(r["dropped"])
        assert "node policy: the run targets epsilon 8; this node allows at most max-epsilon 2" in reasons
        assert "data-path: label '2' in" in reasons
    # the hospitals' own logs: a spent ε in both rounds, b refused both times, c never got that far
    spent = [json.loads(line) for line in logs["a"].read_text().splitlines()]
    assert [r["round"] for r in spent] == [1, 2] and 0 < spent[0]["epsilon"] < spent[1]["epsilon"] <= 8.0
    assert all("max-epsilon 2" in json.loads(line)["refused"] for line in logs["b"].read_text().splitlines())
    assert not logs["c"].exists()
    # federated evaluation through each node's policy: a answers on its own test file; b requires DP
    # and c did not opt in to exact metrics in a DP run: both decline, with no metric of their files
    fed = [json.loads(line) for line in (out / "operator.jsonl").read_text().splitlines()
           if json.loads(line).get("event") == "federated-eval"]
    assert [f["round"] for f in fed] == [1, 2] and all(f["replied"] == 1 and len(f["declined"]) == 2 for f in fed)
    reasons = " ".join(fed[-1]["declined"])
    assert "this node requires DP" in reasons and "set exact-eval = true" in reasons
    assert [n["num-examples"] for n in fed[-1]["nodes"]] == [13] and fed[-1]["num-examples"] == 13
    assert 0 <= fed[-1]["weighted"]["accuracy"] <= 1 and "majority-rate" not in fed[-1]["nodes"][0]
    # the run trained the card's label words, scored on the server's own test file
    assert summary["config"]["task"] == str(demo / "server" / "task.toml")
    assert summary["final_eval"]["num_examples"] == 20
    assert "federated" not in json.dumps(rows)
    assert_clean_stop(dep)


def test_secure_aggregation_with_a_real_superlink_and_three_supernodes(deployment: Deployment, tmp_path):
    """SecAgg+ (insecure transport) with 3 SuperNodes, dp-mode=client, distributed noise, one round of
    LoRA and label head. Flower's secaggplus_mod keeps each node's protocol state (keys, shares, seeds)
    in the SuperNode's context.state across the four stage messages of a round, each handled by a fresh
    flwr-clientapp process: the run completes only if that state outlives every one of those processes.
    (Two rounds through the same mod: tests/e2e/test_simulate_e2e.py.)"""
    dep = deployment
    dep.start_superlink()
    names = dep.start_partition_nodes(3)

    out = tmp_path / "run-out"
    dep.finish_run(dep.start_run(out, **{"dp-mode": "client", "secure-aggregation": True, "client-noise": "distributed",
                                         "population": 3, "num-server-rounds": 1, "head-rounds": 0}), timeout=480)
    rows, summary = assert_outputs(out, rounds=1)
    p = summary["privacy"]
    assert p["mode"] == "client" and p["steps"] == 1
    sa = p["secure_aggregation"]
    assert sa["threshold"] == 2  # automatic for 3 clients: max(2, ceil(2 x 3 / 3))
    assert {"delta_extra", "secagg_saturation_bound", "secagg_wraparound_bound"} <= set(sa), sa
    target = summary["config"]["target-epsilon"]
    assert rows[0]["epsilon"] == pytest.approx(p["epsilon"])
    assert 0 < p["epsilon"] <= target + 1e-6
    # distributed noise: the server unmasks only a sum that already carries the full noise (a finite
    # epsilon against it; larger than the run's: it knows who took part)
    assert p["epsilon"] < p["epsilon_against_server"] < float("inf")
    ops = read_operator(out)[0]
    assert [(r["sampled"], r["accepted"], r["dropped"]) for r in ops] == [(3, 3, [])]
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in ops)
    # every node ran all four SecAgg+ stages, each in its own flwr-clientapp process
    for name in names:
        assert dep.log(name).count("Start `flwr-clientapp` process") >= 4, dep.tail(name)
    assert_clean_stop(dep)


def _signal_tree(pid: int, sig: int) -> None:
    """Send `sig` to a process and its descendants; a few passes, so that a child spawned during the
    first one (flower-superexec starting a flwr-clientapp) is reached too."""
    done: set[int] = set()
    for _ in range(3):
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for p in procs:
            if p.pid not in done:
                try:
                    p.send_signal(sig)
                except psutil.NoSuchProcess:
                    pass
                done.add(p.pid)
        time.sleep(0.2)


def _wait_log(dep: Deployment, name: str, pattern: str, run: subprocess.Popen, timeout: float = 120) -> re.Match:
    deadline = time.monotonic() + timeout
    while not (m := re.search(pattern, dep.log(name))):
        assert run.poll() is None, f"the run ended while waiting for {pattern!r} in {name}\n{dep.tail('flwr-run')}"
        assert time.monotonic() < deadline, f"no {pattern!r} in {name} after {timeout} s\n{dep.tail(name)}"
        time.sleep(0.2)
    return m


def test_a_restarted_supernode_continues_its_ledger_and_its_floor_stops_it(deployment: Deployment, tmp_path):
    """Issue 27: SuperNode 0 (an ε log, max-epsilon = ε of two rounds) is stopped after its round-1
    reply and restarted with the same node config before round 2. Its fresh flwr-clientapp and empty
    context.state read the ledger file back: its ε log shows rounds 1 and 2 trained with steps 1 and 2
    and round 3 refused for max-epsilon; the ledger holds charges for rounds 1 and 2 only.

    Flower gives the restarted SuperNode a new node id (insecure mode: a fresh key pair, registered
    again), so the server sees two nodes: the old id with the 1-step ledger of round 1, the new id
    with the 2-step ledger the node reports (round 1 included: a new id never resets the node's own
    ledger, which is keyed by its data and the run id, not by the Flower node id).

    Between the rounds: node 1 is paused (SIGSTOP) once round 1 is sent, so round 1 cannot end before
    node 0 is gone (SIGTERM: it deregisters at once) and back; min-available = 2 makes round 2 wait
    for it. A paused node stays online for the SuperLink's heartbeat patience (> 30 s)."""
    dep = deployment
    run_cfg = {**TINY_DEFAULTS, "dp-mode": "sample", "num-server-rounds": 3, "local-steps": 1,
               # q = 1 (a batch larger than each node's 8 examples), so the floor is known up front
               "max-train-samples": 16, "batch-size": 32, "micro-batch-size": 4, "max-seq-len": 32,
               "max-eval-samples": 2, "eval-every": 0, "accountant": "rdp", "noise-multiplier": 2.0,
               "target-epsilon": 50.0, "fraction-train": 1.0, "min-available": 2, "round-timeout": 120.0}
    cfg = tiny_config(**run_cfg)
    log = tmp_path / "node0-epsilon.jsonl"
    node0 = {"partition-id": 0, "num-partitions": 2, "epsilon-log": str(log)}
    delta = NodePolicy.from_node_config({**node0, "max-epsilon": 1.0}).delta(cfg.privacy.delta)  # the node's δ
    eps = [PrivacyLedger([(2.0, 1.0, k)]).epsilon(delta, cfg.privacy.accountant) for k in (1, 2, 3)]
    node0["max-epsilon"] = eps[1]  # two rounds of one step at q = 1
    node0_config = " ".join(f"{k}={json.dumps(v)}" for k, v in node0.items())

    dep.start_superlink(FLWR_LOG_LEVEL="DEBUG")  # its debug log shows when the ServerApp pulls a reply
    dep.start_supernode("supernode-0", node0_config)
    dep.start_supernode("supernode-1", "partition-id=1 num-partitions=2")
    dep.wait_nodes(2, ["supernode-0", "supernode-1"])
    old_id = re.search(r"SuperNode ID: (\d+)", dep.log("supernode-0")).group(1)
    procs = dict(dep.procs)

    out = tmp_path / "run-out"
    t0 = time.monotonic()
    run = dep.start_run(out, **run_cfg)
    paused = False
    try:
        _wait_log(dep, "supernode-0", r"Receiving: train message", run)  # round 1 is out, to both nodes
        _signal_tree(procs["supernode-1"].pid, signal.SIGSTOP)  # node 1 holds round 1 open
        paused = True
        _wait_log(dep, "supernode-0", r"Sent successfully", run)  # node 0's round-1 reply is at the SuperLink
        assert [r["round"] for r in map(json.loads, log.read_text().splitlines())] == [1]
        # ... and the ServerApp has pulled it (it polls every 3 s): Flower answers a message whose node has
        # gone offline with "Node Unavailable", even when its reply is stored, if it was not pulled before
        pushed = _wait_log(dep, "superlink", rf"Push replies from node_id={old_id}\b", run, timeout=30).end()
        deadline = time.monotonic() + 30
        while "Runtime.PullObject" not in dep.log("superlink")[pushed:]:  # node 1 is paused: node 0's reply
            assert time.monotonic() < deadline, f"the ServerApp did not pull node 0's reply\n{dep.tail('superlink')}"
            time.sleep(0.2)

        victim = procs["supernode-0"]
        tree = psutil.Process(victim.pid).children(recursive=True)
        victim.send_signal(signal.SIGTERM)  # a graceful stop: the SuperNode deactivates and unregisters
        victim.wait(timeout=30)
        _, alive = psutil.wait_procs(tree, timeout=15)  # flower-superexec follows its parent
        for p in alive:
            kill_tree(p.pid, signal.SIGKILL, grace=5)

        dep.start_supernode("supernode-0-restarted", node0_config)  # same node config, same data
        new_id = _wait_log(dep, "supernode-0-restarted", r"SuperNode ID: (\d+)", run, timeout=90).group(1)
        deadline = time.monotonic() + 60
        while not ({new_id} <= (online := dep.online_nodes()) and old_id not in online):
            assert time.monotonic() < deadline, f"online: {online}, old {old_id}, new {new_id}"
            time.sleep(0.5)
    finally:
        if paused:
            _signal_tree(procs["supernode-1"].pid, signal.SIGCONT)
    dep.finish_run(run, timeout=240)
    wall = time.monotonic() - t0

    # the node's own ε log: rounds 1 and 2 trained (steps 1, 2 across the restart), round 3 refused
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    trained = [r for r in rows if "refused" not in r]
    assert [(r["round"], r["steps"]) for r in trained] == [(1, 1), (2, 2)], rows
    assert [r["epsilon"] for r in trained] == pytest.approx(eps[:2])
    assert all(r["run-id"] == trained[0]["run-id"] for r in rows)
    (refused,) = [r for r in rows if "refused" in r]
    assert refused["round"] == 3 and "max-epsilon" in refused["refused"], refused
    assert f"{eps[2]:.4g}" in refused["refused"]  # the third step, counted from the file
    # its ledger: next to the ε log, keyed by the run id (and data), owner-only, one charge per round trained
    path = NodePolicy.from_node_config(node0).ledger_path(int(trained[0]["run-id"]))
    assert path.parent == log.parent and (path.stat().st_mode & 0o777) == 0o600
    ledger = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["event"], r["round"]) for r in ledger] == [("charge", 1), ("charge", 2)], ledger

    # what the server saw: two node ids for node 0's data, the new one refused round 3
    _, summary = assert_outputs(out, rounds=3)
    per_client = summary["privacy"]["per_client"]
    assert per_client[old_id]["steps"] == 1 and per_client[old_id]["epsilon"] == pytest.approx(eps[0])
    assert per_client[new_id]["steps"] == 2 and per_client[new_id]["epsilon"] == pytest.approx(eps[1])
    r1, _, r3 = read_operator(out)[0]
    assert r1["accepted"] == 2, r1  # node 0's round-1 reply counted, node 1's after its pause
    assert any(d.startswith(f"node {new_id}:") and "max-epsilon" in d for d in r3["dropped"]), r3["dropped"]
    assert not any(d.startswith(f"node {old_id}:") for r in read_operator(out)[0] for d in r["dropped"])
    print(f"restart run: {wall:.1f} s from flwr run to finished")
    assert_clean_stop(dep)
