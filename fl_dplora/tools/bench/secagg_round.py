"""The round `fl-dplora bench secagg` times (secagg.py): adapter shapes without weights, and one
setup per adapter variant (N fixed clipped updates, the SecAgg+ plan, both instructions) that runs one
aggregation round plain or secure on a fresh in-process grid and checks its sum.

Nothing here times or reports: secagg.py does, through common.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fl_dplora.config import RunConfig

Shapes = dict[str, tuple[int, ...]]
METRICS = {"partition-id": 0, "num-examples": 16}  # what a client-level DP reply carries (partition id set per node)


# ------------------------------------------------------------------ adapter shapes
def model_config(name: str):
    """(transformers config, where it came from) without loading any weights."""
    from pathlib import Path

    from transformers import AutoConfig

    from fl_dplora.model_loading import TINY_ALIASES, smollm2_gguf_path, tiny_config

    if name in TINY_ALIASES:  # the vocabulary size changes no adapter shape
        return tiny_config(name, 49152), f"{name}: models.tiny_config"
    path = smollm2_gguf_path() if name == "smollm2-135m" else Path(name).expanduser()
    if path.suffix == ".gguf":
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name), f"the metadata of {path.name}"
    return AutoConfig.from_pretrained(name), f"{name}/config.json"


def adapter_shapes(name: str, rank: int, targets: str, layers: int) -> tuple[dict[str, Shapes], dict[str, Any]]:
    """{"lora": shapes, "ffa": shapes} of the transmitted tensors, keyed like models.adapter_parameters
    (FFA: the lora_B tensors only), from a meta-device model wrapped by PEFT as get_peft_model does."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config, source = model_config(name)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config)
    n_layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    chosen = list(range(n_layers - layers, n_layers)) if n_layers and 0 < layers < n_layers else None
    wrapped = get_peft_model(base, LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=[t.strip() for t in targets.split(",") if t.strip()],
        layers_to_transform=chosen, bias="none", task_type="CAUSAL_LM",
        fan_in_fan_out=getattr(config, "model_type", "") == "gpt2"))
    lora = {n.replace(".default", ""): tuple(p.shape) for n, p in wrapped.named_parameters() if "lora_" in n}
    info = {"config_source": source, "hidden_size": getattr(config, "hidden_size", None), "num_layers": n_layers,
            "adapted_layers": len(chosen) if chosen else n_layers,
            "num_attention_heads": getattr(config, "num_attention_heads", None),
            "num_key_value_heads": getattr(config, "num_key_value_heads", None)}
    return {"lora": lora, "ffa": {k: s for k, s in lora.items() if "lora_A" not in k}}, info


# ------------------------------------------------------------------ one setup (LoRA or FFA)
class SecAggSetup:
    """One adapter's shapes, the N fixed updates, the plan and both instructions; `plain_round()`
    and `secure_round()` run one round on a fresh in-process grid made by `new_grid()`."""

    def __init__(self, name: str, shapes: Shapes, num_clients: int, *, clip: float = 1.0, seed: int = 0,
                 threshold: int = 0, shares: int = 0, config: RunConfig | None = None) -> None:
        import torch
        from flwr.app import ConfigRecord, RecordDict

        from fl_dplora import protocol
        from fl_dplora.privacy.mechanisms import clip_to_norm
        from fl_dplora.privacy.secagg_quantization import plan, round_to_grid
        from fl_dplora.transport import to_array_record

        if num_clients < 2:
            raise ValueError("bench secagg: SecAgg+ needs at least 2 clients")
        self.name, self.shapes, self.n, self.seed = name, dict(sorted(shapes.items())), num_clients, seed
        self.keys = list(self.shapes)
        self.dim = sum(math.prod(s) for s in self.shapes.values())
        self.threshold = min(num_clients, threshold or max(2, math.ceil(2 * num_clients / 3)))  # the run's default
        self.shares = shares
        self.plan = plan(clip, self.dim, num_clients, rounds=1, noise_multiplier=0.0, min_survivors=self.threshold)
        g = torch.Generator().manual_seed(seed)
        # a clipped update: random direction, L2 norm 2 scaled to the clip norm (non-zero everywhere:
        # Flower stores identical arrays once, so zeros would understate the bytes)
        self.updates, self.rounded = [], []
        for _ in range(num_clients):
            raw = [torch.randn(self.shapes[k], generator=g) * (2 * clip / math.sqrt(self.dim)) for k in self.keys]
            clipped = dict(zip(self.keys, (t.float() for t in clip_to_norm(raw, clip)[0])))
            self.updates.append(clipped)
            self.rounded.append({k: round_to_grid(t, self.plan.step, g) for k, t in clipped.items()})
        glob = {k: torch.randn(self.shapes[k], generator=g) * 0.02 for k in self.keys}
        base = config.to_record() if config is not None else {}

        def instruction(secure: bool) -> RecordDict:
            cfg = ConfigRecord({**base, protocol.SIGMA: 0.0, "secure-aggregation": secure})
            cfg[protocol.ROUND] = 1
            return RecordDict({"arrays": to_array_record(glob), "config": cfg})

        self.instruction = {False: instruction(False), True: instruction(True)}

    # -------------------------------------------------------------- nodes
    def client(self):
        """The nodes' ClientApp: the project's SecAgg+ mod around a train function that replies this
        node's fixed update (plain: float32 ArrayRecord; secure: its grid-rounded update, FitRes-shaped)."""
        from flwr.app import Message, MetricRecord, RecordDict
        from flwr.clientapp import ClientApp
        from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

        from fl_dplora.clients.secagg_mod import fitres_reply, secagg_when_asked
        from fl_dplora.transport import to_array_record

        app = ClientApp(mods=[secagg_when_asked])

        @app.train()
        def train(msg, context):
            part = int(context.node_config["partition-id"])
            metrics = {**METRICS, "partition-id": part}
            if RECORD_KEY_CONFIGS in msg.content.config_records:  # a secure round: the mod's SecAgg+ stage
                return Message(fitres_reply(self.rounded[part], metrics), reply_to=msg)
            content = RecordDict({"arrays": to_array_record(self.updates[part]), "metrics": MetricRecord(metrics)})
            return Message(content, reply_to=msg)

        return app

    def new_grid(self):
        from fl_dplora.testing.inprocess_grid import InProcessGrid

        return InProcessGrid(self.n, client=self.client(), seed=self.seed)

    # -------------------------------------------------------------- one round each way
    def plain_round(self, grid) -> dict[str, Any]:
        """As DPLoRAFedAvg does it: one instruction per node, wire bytes counted, replies read and summed."""
        import torch
        from flwr.app import Message
        from flwr.common import MessageType

        from fl_dplora.transport import from_array_record, wire_bytes

        content = self.instruction[False]
        nodes = sorted(grid.get_node_ids())
        down = wire_bytes(content) * len(nodes)
        sent = [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=nid) for nid in nodes]
        total = {k: torch.zeros(s) for k, s in self.shapes.items()}
        up, replied = 0, 0
        for reply in grid.send_and_receive(sent, timeout=None):
            if reply.has_error():
                raise RuntimeError(f"bench secagg: plain round: client error {reply.error.reason}")
            up += wire_bytes(reply.content)
            update = from_array_record(reply.content["arrays"])
            for k in self.keys:
                total[k] += update[k]
            replied += 1
        return {"total": total, "replies": replied, "bytes_up": up, "bytes_down": down}

    def secure_round(self, grid) -> Any:
        from fl_dplora.strategies.secagg import secure_sum

        contents = {nid: self.instruction[True] for nid in sorted(grid.get_node_ids())}
        return secure_sum(grid, 1, contents, self.shapes, self.plan, self.threshold, self.shares, None)

    # -------------------------------------------------------------- checks
    def _flat(self, tensors: Mapping[str, Any]):
        import numpy as np

        return np.concatenate([tensors[k].detach().double().numpy().ravel() for k in self.keys])

    def _float32_tolerance(self) -> float:
        """What float32 summation of the N updates may round away: 2·N·eps·max_j Σ_i |u_ij|."""
        import numpy as np

        return 2 * self.n * float(np.finfo(np.float32).eps) * float(sum(np.abs(self._flat(u)) for u in self.updates).max())

    def check_plain(self, result: dict[str, Any]) -> float:
        import numpy as np

        if result["replies"] != self.n:
            raise RuntimeError(f"bench secagg: plain round: {result['replies']} of {self.n} replies")
        ref = sum(self._flat(u) for u in self.updates)
        diff = float(np.abs(self._flat(result["total"]) - ref).max())
        tol = self._float32_tolerance()
        if diff > tol:
            raise RuntimeError(f"bench secagg: plain sum off by {diff:.3g} > {tol:.3g}")
        return diff

    def check_secure(self, outcome) -> dict[str, Any]:
        """The unmasked sum vs the plain sum of the clipped updates (within survivors x step) and vs the
        sum of the rounded updates the clients handed on (within float32 rounding). Raises if not."""
        import numpy as np

        if outcome.total is None:
            raise RuntimeError(f"bench secagg: no unmasked sum: {outcome.reason or outcome.failures}")
        if len(outcome.survivors) != self.n:
            raise RuntimeError(f"bench secagg: {len(outcome.survivors)} of {self.n} survived: {outcome.failures}")
        total = self._flat(outcome.total)
        plain = sum(self._flat(u) for u in self.updates)
        rounded = sum(self._flat(u) for u in self.rounded)
        m, step = len(outcome.survivors), self.plan.step
        fp = self._float32_tolerance()
        diff_plain = float(np.abs(total - plain).max())
        diff_rounded = float(np.abs(total - rounded).max())
        ok = diff_plain <= m * step + fp and diff_rounded <= fp and float(np.abs(plain).max()) > 100 * m * step
        check = {"survivors": m, "step": step, "bound": m * step, "max_abs_diff_vs_plain": diff_plain,
                 "diff_in_steps": diff_plain / step, "max_abs_diff_vs_rounded": diff_rounded,
                 "float32_tolerance": fp, "max_abs_sum": float(np.abs(plain).max()), "passed": ok}
        if not ok:
            raise RuntimeError(f"bench secagg: {self.name}: the unmasked sum is wrong: {check}")
        return check
