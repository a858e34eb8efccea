"""The client process that `throughput.client_peak_rss` starts (bench throughput, prefix-cache):
the real ClientApp, two train rounds, its memory in KiB as one line `RSS-JSON {...}` on stdout.

    python -m fl_dplora.tools.bench.client_rss OVERRIDES_JSON NUM_PARTITIONS THREADS

Heavy imports happen inside `main`, after the first RSS reading (rss_start_kb).
"""

from __future__ import annotations

import json
import resource
import sys
import time
import warnings


def hwm_kb() -> int | None:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])


def rss_kb() -> int | None:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])


def reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main(argv: list[str]) -> None:
    warnings.filterwarnings("ignore")
    out: dict[str, object] = {"rss_start_kb": rss_kb()}
    overrides = json.loads(argv[0])
    import torch

    if int(argv[2]) > 0:
        torch.set_num_threads(int(argv[2]))
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    from fl_dplora import protocol
    from fl_dplora.clients.client_app import app
    from fl_dplora.config import resolve
    from fl_dplora.models import adapter_parameters, get_peft_model
    from fl_dplora.transport import to_array_record

    cfg = resolve(overrides)
    out["rss_after_import_kb"] = rss_kb()
    model = get_peft_model(cfg)
    glob = {k: p.detach().clone() for k, p in adapter_parameters(model, cfg).items()}
    out["rss_after_model_kb"] = rss_kb()
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": int(argv[1])},
                  state=RecordDict(), run_config={})
    for rnd in (1, 2):
        config = ConfigRecord({**cfg.to_record(), protocol.SIGMA: 0.0})
        config[protocol.ROUND] = rnd
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID  # the server's side
        msg = Message(RecordDict({"arrays": to_array_record(glob, cfg.federation.transfer_dtype), "config": config}),
                      dst_node_id=1, message_type="train")
        TaskIdentity.node_id = 1  # the client's side
        out[f"hwm_reset_round{rnd}"] = reset_hwm()
        out[f"rss_before_round{rnd}_kb"], out[f"hwm_after_reset_round{rnd}_kb"] = rss_kb(), hwm_kb()
        t0 = time.perf_counter()
        reply = app(msg, ctx)
        out[f"round{rnd}_seconds"] = time.perf_counter() - t0
        if reply.has_error():
            raise SystemExit("client error: " + reply.error.reason)
        out[f"peak_rss_round{rnd}_kb"] = hwm_kb()
        # a DP reply carries no timing (issue 15): the child times the handler itself (round{rnd}_seconds)
    out["peak_rss_process_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("RSS-JSON " + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
