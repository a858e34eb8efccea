"""A hostile or broken client cannot damage the global adapter, and the run says who and why.

One faulty node among four (the in-process harness's fault hooks rewrite its reply, make it
crash, or swallow its reply like a timeout); one round on tiny-random-llama. For every fault:
- dp-mode none: the global adapter after the round is bitwise the initial adapter plus the
  example-weighted mean of the *good* clients' updates as the server received them (the bad
  reply is not averaged in, not even partly), and it is finite;
- the reply is dropped with a reason that metrics.jsonl ("dropped") and a log warning on the
  "fl_dplora" logger both tie to the node id.
dp-mode client: a dropped reply leaves the global bitwise equal to a run in which that node never
answered (same sampling, same server noise); a 1000x update is not dropped but clipped by the
server, so it moves the global by at most C / (q N).
With fewer than min-available good replies the round is skipped and the global is unchanged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from safetensors.torch import load_file

from harness import InProcessGrid, run_in_process

from fl_dplora.write_ahead import read_operator

NUM_CLIENTS = 4
BAD_PARTITION = 1
SEED = 42
FAST = dict(num_server_rounds=1, fraction_train=1.0, max_train_samples=32, batch_size=4, micro_batch_size=4,
            max_seq_len=32, local_steps=1, max_eval_samples=2, eval_every=0, seed=SEED)
CLIENT_MODE = dict(dp_mode="client", noise_multiplier=1.0, target_epsilon=1000.0, accountant="rdp",
                   client_noise="central", max_grad_norm=1.0)
BASE_WEIGHT = "base_model.model.model.layers.0.self_attn.q_proj.weight"  # a frozen base-model tensor


# ----------------------------------------------------------------------------- faults
Arrays = dict[str, np.ndarray]


def _first_key(a: Arrays) -> str:
    return sorted(a)[0]


def nan_value(a: Arrays) -> Arrays:
    k = _first_key(a)
    a[k] = a[k].copy()
    a[k].flat[0] = np.nan
    return a


def inf_value(a: Arrays) -> Arrays:
    k = sorted(a)[-1]
    a[k] = a[k].copy()
    a[k].flat[-1] = -np.inf
    return a


def wrong_shape(a: Arrays) -> Arrays:
    k = _first_key(a)
    a[k] = np.ascontiguousarray(a[k][:, :-1])
    return a


def missing_key(a: Arrays) -> Arrays:
    del a[sorted(a)[-1]]
    return a


def extra_key(a: Arrays) -> Arrays:
    a[BASE_WEIGHT] = np.zeros((16, 16), dtype=np.float32)  # a client trying to overwrite base weights
    return a


def wrong_dtype(a: Arrays) -> Arrays:
    k = _first_key(a)
    a[k] = a[k].astype(np.float64)
    return a


def huge_norm(a: Arrays) -> Arrays:
    return {k: v * np.float32(1000.0) for k, v in a.items()}


def rewrite(fn: Callable[[Arrays], Arrays]):
    """An after-hook for the bad node: the same reply with its arrays rewritten by `fn`."""

    def change(msg: Message, reply: Message) -> Message:
        arrays = {k: v.numpy().copy() for k, v in reply.content["arrays"].items()}
        content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in fn(arrays).items()}),
                              "metrics": MetricRecord(dict(reply.content["metrics"]))})
        return Message(content, reply_to=msg)

    return ("after", change)


def no_arrays():
    def change(msg: Message, reply: Message) -> Message:
        return Message(RecordDict({"metrics": MetricRecord(dict(reply.content["metrics"]))}), reply_to=msg)

    return ("after", change)


def no_reply():
    return ("after", lambda msg, reply: None)  # the node "sleeps past the timeout": nothing arrives


def crash():
    def before(msg: Message) -> Message:
        raise RuntimeError("simulated client crash")

    return ("before", before)


# id -> (hook, substring the drop reason must contain)
FAULTS = {
    "nan": (rewrite(nan_value), "non-finite values"),
    "inf": (rewrite(inf_value), "non-finite values"),
    "wrong-shape": (rewrite(wrong_shape), "shape"),
    "missing-key": (rewrite(missing_key), "wrong keys (missing ['base_model."),
    "extra-base-weight-key": (rewrite(extra_key), f"extra ['{BASE_WEIGHT}']"),
    "wrong-dtype": (rewrite(wrong_dtype), "dtype float64"),
    "no-arrays": (no_arrays(), "no arrays in reply"),
    "1000x-norm": (rewrite(huge_norm), "x round median"),
    "client-raises": (crash(), "simulated client crash"),
    "no-reply-timeout": (no_reply(), "no reply (timeout or node lost)"),
}


# ----------------------------------------------------------------------------- helpers
class Captured(logging.Handler):
    """Records of the "fl_dplora" logger (attached directly: works whatever its propagate flag)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def __enter__(self):
        log = logging.getLogger("fl_dplora")
        self._level = log.level
        log.addHandler(self)
        log.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc):
        log = logging.getLogger("fl_dplora")
        log.removeHandler(self)
        log.setLevel(self._level)

    def warnings(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= logging.WARNING]


def faulty_grid(fault: tuple[str, Callable] | None, bad: set[int] | None = None) -> InProcessGrid:
    grid = InProcessGrid(NUM_CLIENTS, seed=SEED)
    bad_nodes = {grid.node_id_of(BAD_PARTITION)} if bad is None else {grid.node_id_of(p) for p in bad}
    if fault is not None:
        where, fn = fault
        if where == "before":
            grid.before = lambda nid, msg: fn(msg) if nid in bad_nodes else None
        else:
            grid.after = lambda nid, msg, reply: fn(msg, reply) if nid in bad_nodes else reply
    return grid


def run(grid: InProcessGrid, tmp_path: Path, name: str, **overrides):
    with Captured() as cap:
        summary, out = run_in_process(NUM_CLIENTS, grid=grid, output_dir=tmp_path / name, **{**FAST, **overrides})
    rows = read_operator(out)[0]  # who replied and what was dropped: the operator log
    return summary, out, rows, cap


def final_adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def initial_adapter(grid: InProcessGrid) -> dict[str, torch.Tensor]:
    """The global adapter the server broadcast in round 1, as the clients received it."""
    arrays = grid.exchanges[0].instruction.content["arrays"]
    return {k: torch.from_numpy(v.numpy().copy()) for k, v in arrays.items()}


def assert_finite(adapter: dict[str, torch.Tensor]) -> None:
    for k, t in adapter.items():
        assert torch.isfinite(t).all(), f"{k} is not finite"


def assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), f"{k}: max |diff| {float((a[k] - b[k]).abs().max()):.3g}"


def fedavg_of_good_replies(grid: InProcessGrid, bad_nodes: set[int]) -> dict[str, torch.Tensor]:
    """initial + sum_i(n_i u_i) / sum_i(n_i) over the good replies, in the order they arrived,
    computed with the same float32 operations as the server (so the comparison can be exact)."""
    init = initial_adapter(grid)
    updates, weights = [], []
    for ex in grid.exchanges:
        if ex.node_id in bad_nodes:
            continue
        assert ex.reply is not None and not ex.reply.has_error()
        updates.append({k: torch.from_numpy(v.numpy().copy()) for k, v in ex.reply.content["arrays"].items()})
        weights.append(float(ex.reply.content["metrics"]["num-examples"]))
    assert len(updates) == NUM_CLIENTS - len(bad_nodes)
    wsum = sum(weights)
    out = {}
    for k, v in init.items():
        out[k] = v.clone()
        out[k] += sum(w * u[k] for w, u in zip(weights, updates)) / wsum
    return out


def assert_dropped(rows, cap: Captured, node: int, reason: str) -> None:
    dropped = rows[0]["dropped"]
    assert len(dropped) == 1, dropped
    assert dropped[0].startswith(f"node {node}: ") and reason in dropped[0], dropped[0]
    named = [w for w in cap.warnings() if str(node) in w and reason in w]
    assert len(named) == 1, cap.warnings()


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("fault_id", list(FAULTS))
def test_bad_reply_is_dropped_and_the_global_is_the_mean_of_the_good_ones(fault_id, tmp_path):
    fault, reason = FAULTS[fault_id]
    grid = faulty_grid(fault)
    bad = grid.node_id_of(BAD_PARTITION)
    summary, out, rows, cap = run(grid, tmp_path, fault_id, dp_mode="none")

    adapter = final_adapter(out)
    assert_finite(adapter)
    assert_bitwise(adapter, fedavg_of_good_replies(grid, {bad}))
    init = initial_adapter(grid)
    assert any(not torch.equal(adapter[k], init[k]) for k in adapter)  # the good clients did move it
    assert [r["round"] for r in rows] == [1]
    assert rows[0]["sampled"] == NUM_CLIENTS and rows[0]["accepted"] == NUM_CLIENTS - 1
    assert_dropped(rows, cap, bad, reason)
    assert math.isfinite(summary["final_eval"]["loss"])


def test_a_clean_round_drops_nothing_and_averages_everyone(tmp_path):
    """Control for the test above: the same check with no fault includes all four clients."""
    grid = faulty_grid(None)
    _, out, rows, cap = run(grid, tmp_path, "clean", dp_mode="none")
    assert_bitwise(final_adapter(out), fedavg_of_good_replies(grid, set()))
    assert rows[0]["dropped"] == [] and rows[0]["accepted"] == NUM_CLIENTS
    assert not [w for w in cap.warnings() if "dropped" in w]


@pytest.fixture(scope="module")
def client_mode_reference(tmp_path_factory):
    """dp-mode client, the bad node never answers: what the global must be when its reply is dropped."""
    grid = faulty_grid(no_reply())
    _, out, rows, _ = run(grid, tmp_path_factory.mktemp("client-ref"), "ref", **CLIENT_MODE)
    assert rows[0]["sampled"] == NUM_CLIENTS  # q = 1: every node sampled, in every run alike
    return final_adapter(out)


@pytest.mark.parametrize("fault_id", ["nan", "extra-base-weight-key", "client-raises"])
def test_client_mode_drops_a_bad_reply_exactly(fault_id, client_mode_reference, tmp_path):
    fault, reason = FAULTS[fault_id]
    grid = faulty_grid(fault)
    bad = grid.node_id_of(BAD_PARTITION)
    _, out, rows, cap = run(grid, tmp_path, fault_id, **CLIENT_MODE)
    adapter = final_adapter(out)
    assert_finite(adapter)
    assert_bitwise(adapter, client_mode_reference)
    assert_dropped(rows, cap, bad, reason)
    assert rows[0]["accepted"] == NUM_CLIENTS - 1


def test_client_mode_clips_a_1000x_update_to_the_clipping_bound(client_mode_reference, tmp_path):
    grid = faulty_grid(FAULTS["1000x-norm"][0])
    _, out, rows, cap = run(grid, tmp_path, "huge", **CLIENT_MODE)
    adapter = final_adapter(out)
    assert_finite(adapter)
    # Not dropped: the server clips it (the mechanism the accountant assumes needs no outlier rule).
    assert rows[0]["dropped"] == [] and rows[0]["accepted"] == NUM_CLIENTS
    # Its whole effect on the global is its clipped update divided by the expected count q N.
    diff = torch.cat([(adapter[k].double() - client_mode_reference[k].double()).flatten() for k in adapter])
    bound = CLIENT_MODE["max_grad_norm"] / (FAST["fraction_train"] * NUM_CLIENTS)
    assert 0 < float(diff.norm()) <= bound * (1 + 1e-5), float(diff.norm())
    # The raw 1000x update the client sent was far above the bound.
    sent = [ex.reply for ex in grid.exchanges if ex.node_id == grid.node_id_of(BAD_PARTITION)][0]
    raw = math.sqrt(sum(float((v.numpy().astype(np.float64) ** 2).sum()) for v in sent.content["arrays"].values()))
    assert raw > 10 * CLIENT_MODE["max_grad_norm"]


def test_too_few_good_replies_skip_the_round_and_keep_the_global(tmp_path):
    """min-available 3 of 4, two bad nodes (a NaN update and a crash): 2 good < 3, nothing changes."""
    grid = InProcessGrid(NUM_CLIENTS, seed=SEED)
    nan_node, crash_node = grid.node_id_of(1), grid.node_id_of(2)
    (_, nan_hook), (_, crash_hook) = rewrite(nan_value), crash()
    grid.after = lambda nid, msg, reply: nan_hook(msg, reply) if nid == nan_node else reply
    grid.before = lambda nid, msg: crash_hook(msg) if nid == crash_node else None
    summary, out, rows, cap = run(grid, tmp_path, "skip", dp_mode="none", min_available=3)

    adapter = final_adapter(out)
    assert_bitwise(adapter, initial_adapter(grid))  # unchanged, bit for bit
    dropped = rows[0]["dropped"]
    assert any(d.startswith(f"node {nan_node}: ") and "non-finite" in d for d in dropped), dropped
    assert any(d.startswith(f"node {crash_node}: ") and "simulated client crash" in d for d in dropped), dropped
    assert len(dropped) == 2
    assert any("2 good replies < min-available 3" in w and "unchanged" in w for w in cap.warnings()), cap.warnings()
    assert math.isfinite(summary["final_eval"]["loss"])
