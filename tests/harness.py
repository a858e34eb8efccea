"""In-process Flower driver for tests: the real ServerApp loop and ClientApp, no Ray, no SuperLink.

`InProcessGrid` is a `flwr.serverapp.Grid` whose nodes are Python objects: one Flower `Context`
per node (node_config partition-id/num-partitions, its own `state` RecordDict that persists across
rounds, as on a SuperNode). `send_and_receive` delivers each message to the ClientApp in this
process and returns what Flower would return:

- every message crosses a simulated wire: it is deflated into Flower 1.42's object bytes and
  inflated again (both directions), so the client never shares tensors or records with the server
  and a reply that Flower could not ship fails here too;
- an exception in the ClientApp becomes an error reply, built like Flower's runtime does
  (`Message(Error(code=CLIENT_APP_RAISED_EXCEPTION, reason="<class ...>:<'...'>"), reply_to=msg)`);
- replies carry `src_node_id` = the node's id (Flower derives it from `reply_to`).

Hooks for fault-injection tests: `before(node_id, msg)` may raise (the client "crashes") or
return a replacement message; `after(node_id, msg, reply)` may return a replacement reply, or
`None` to drop it (a timeout: no reply at all). Every (instruction, reply) pair is kept in
`grid.exchanges`.

`run_in_process(num_clients, **overrides)` resolves a run config (kebab-case keys, or the same
names with underscores) and runs `fl_dplora.server_app.run_server` on such a grid:

    summary, out_dir = run_in_process(3, num_server_rounds=2, dp_mode="none")

`run_cli(["simulate", ...])` runs the installed `fl-dplora` console script in a subprocess and
returns its exit code, output, wall and CPU seconds (also the `cli` fixture of conftest.py).
"""

from __future__ import annotations

import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.task_identity import TaskIdentity

REPO = Path(__file__).resolve().parent.parent
FL_DPLORA = Path(sys.executable).parent / "fl-dplora"  # the console script of this venv

# What the fast in-process tests run: tiny model, few short examples, no DP unless asked.
TINY_DEFAULTS: dict[str, Any] = {
    "model": "tiny-random-llama",
    "task": "fin-sentiment",
    "num-server-rounds": 2,
    "local-steps": 2,
    "batch-size": 8,
    "micro-batch-size": 4,
    "max-seq-len": 64,
    "max-train-samples": 120,
    "max-eval-samples": 16,
    "dp-mode": "none",
    "secure-rng": False,
    "checkpoint-every": 0,
    # the plain LoRA setup the tests were written for (pyproject's defaults carry the DP recipe;
    # tests/test_recipe_e2e.py runs that recipe itself)
    "lora-variant": "lora",
    "lora-layers": 0,
    "lora-targets": "q_proj,v_proj",
    "optimizer": "sgd",
    "learning-rate": 0.05,
    "loss": "answer-tokens",
    "system-prompt": "auto",
    "label-head": False,
    "head-rounds": 0,
}

ClientFn = Callable[[Message, Context], Message]


def wire_copy(msg: Message) -> Message:
    """`msg` after a round trip through Flower's wire format (deflate every object, inflate)."""
    objects = get_all_nested_objects(msg)
    contents = {oid: obj.deflate() for oid, obj in objects.items()}
    copy = inflate_object_from_contents(msg.object_id, contents)
    copy.metadata.__dict__["_message_id"] = msg.metadata.message_id  # not part of the wire body
    return copy


def error_reply(msg: Message, exc: BaseException) -> Message:
    """The error reply Flower's ClientApp runtime sends when the app raises."""
    reason = str(type(exc)) + ":<'" + str(exc) + "'>"
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


@dataclass
class Exchange:
    node_id: int
    instruction: Message  # as the client received it (after the wire)
    reply: Message | None  # as the server received it (after the wire); None = dropped


class InProcessGrid(Grid):
    """A Grid with `num_nodes` in-process SuperNodes running the project's ClientApp."""

    def __init__(
        self,
        num_nodes: int,
        *,
        client: ClientFn | None = None,
        node_configs: Iterable[Mapping[str, Any]] | None = None,
        before: Callable[[int, Message], Message | None] | None = None,
        after: Callable[[int, Message, Message], Message | None] | None = None,
        wire: bool = True,
        seed: int = 0,
        run_id: int = 1,
    ) -> None:
        if client is None:
            from fl_dplora.clients.client_app import app as client

        self.client = client
        self.before, self.after, self.wire = before, after, wire
        self.run_id = run_id
        # What Flower's ServerApp runtime sets before `main` runs; `Message(...)` reads it.
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
        rng = random.Random(seed)
        # Flower's node ids are random 64-bit integers, not 0..N-1: do not let code assume otherwise.
        ids: list[int] = []
        while len(ids) < num_nodes:
            nid = rng.randrange(2, 2**63)
            if nid not in ids:
                ids.append(nid)
        configs = list(node_configs) if node_configs is not None else [
            {"partition-id": i, "num-partitions": num_nodes} for i in range(num_nodes)
        ]
        if len(configs) != num_nodes:
            raise ValueError("node_configs: one mapping per node")
        self.contexts: dict[int, Context] = {
            nid: Context(run_id=run_id, node_id=nid, node_config=dict(cfg), state=RecordDict(), run_config={})
            for nid, cfg in zip(ids, configs)
        }
        self.offline: set[int] = set()  # node ids that get_node_ids() hides (disconnected)
        self.exchanges: list[Exchange] = []
        self._replies: dict[str, Message] = {}

    # -------------------------------------------------------------- Grid API
    def set_run(self, run) -> None:  # noqa: ANN001 - flwr's Run; the in-process grid has one run
        self._run = run

    @property
    def run(self):  # noqa: ANN201
        return getattr(self, "_run", None)

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return [nid for nid in self.contexts if nid not in self.offline]

    def node_id_of(self, partition_id: int) -> int:
        for nid, ctx in self.contexts.items():
            if ctx.node_config.get("partition-id") == partition_id:
                return nid
        raise KeyError(partition_id)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            md = msg.metadata
            if md.dst_node_id not in self.contexts:
                raise ValueError(f"message for unknown node {md.dst_node_id}")
            md.__dict__["_message_id"] = str(uuid.uuid4())
            md.__dict__["_run_id"] = self.run_id
            md.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
            reply = self._deliver(msg)
            if reply is not None:
                self._replies[md.message_id] = reply
            ids.append(md.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return list(self.pull_messages(self.push_messages(messages)))

    # -------------------------------------------------------------- one node
    def _deliver(self, msg: Message) -> Message | None:
        nid = msg.metadata.dst_node_id
        received = wire_copy(msg) if self.wire else msg
        try:
            if self.before is not None:
                received = self.before(nid, received) or received
            reply = self.client(received, self.contexts[nid])
            if not isinstance(reply, Message):
                raise TypeError(f"ClientApp returned {type(reply).__name__}, not a Message")
        except Exception as exc:  # noqa: BLE001 - Flower turns any ClientApp exception into an error reply
            reply = error_reply(received, exc)
        if self.after is not None:
            reply = self.after(nid, received, reply)
        if reply is not None:
            reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            if self.wire:
                reply = wire_copy(reply)
        self.exchanges.append(Exchange(nid, received, reply))
        return reply


def tiny_config(defaults: Mapping[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """A resolved run config: pyproject defaults <- `defaults` (TINY_DEFAULTS when None) <- overrides
    (underscores or dashes in key names). Raises ConfigError like the CLI would."""
    from fl_dplora.config import resolve

    base = TINY_DEFAULTS if defaults is None else defaults
    return resolve({**base, **{k.replace("_", "-"): v for k, v in overrides.items()}})


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl."""
    import json

    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def run_in_process(
    num_clients: int,
    *,
    output_dir: str | Path | None = None,
    grid: InProcessGrid | None = None,
    defaults: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> tuple[dict[str, Any], Path]:
    """Run the real server loop with `num_clients` in-process clients; return (summary, output dir).

    `overrides` are run-config keys (`dp_mode="sample"` or `**{"dp-mode": "sample"}`) on top of
    `defaults` (TINY_DEFAULTS when None; `{}` = pyproject's, as the CLI uses). Pass `grid` to inject
    faults or inspect `grid.exchanges` afterwards. The output dir defaults to a fresh temp dir.
    """
    from fl_dplora.server_app import run_server

    if output_dir is None:
        output_dir = tempfile.mkdtemp(prefix="fl-dplora-test-")
    overrides = {"population": num_clients, **overrides}  # declared like `simulate --num-clients` does
    cfg = tiny_config(defaults, **overrides, **{"output-dir": str(output_dir)})
    grid = grid if grid is not None else InProcessGrid(num_clients, seed=int(cfg["seed"]))
    summary = run_server(grid, cfg)
    return summary, Path(cfg["output-dir"])


# ----------------------------------------------------------------------------- the real CLI
@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    cpu_s: float  # user + system CPU time of the child: robust to a busy machine, unlike wall time


def run_cli(args: list[str], *, timeout: float = 600, env: Mapping[str, str] | None = None,
            cwd: str | Path | None = None) -> CliResult:
    """Run `fl-dplora ARGS` (the installed console script) in a subprocess and capture everything."""
    if not FL_DPLORA.is_file():
        raise FileNotFoundError(f"console script missing: {FL_DPLORA} (pip install -e . in the venv)")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([str(FL_DPLORA), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=str(cwd or REPO))
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return CliResult(proc.returncode, proc.stdout, proc.stderr, wall, cpu)


# ----------------------------------------------------------------------------- processes
def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_tree(pid: int, sig: int = signal.SIGTERM, grace: float = 15.0, group: bool = False) -> None:
    """Signal a process and all its descendants (collected first), then SIGKILL what is left.

    group=True: `pid` was started with start_new_session=True, so its process group has id `pid`;
    signal that group too (it also reaches members whose parent already died). flower-superexec
    starts its own group, hence the tree as well.
    """
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    if group:
        _signal_group(pid, sig)
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    if group:
        _signal_group(pid, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=10)
