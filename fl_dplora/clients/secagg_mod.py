"""The client side of secure aggregation: Flower's SecAgg+ mod, and the reply shape it reads.

The mod handles the key and share stages itself; in the masked-vector stage it calls our train
function, quantizes and masks the arrays of its FitRes-shaped reply and sends only the masked vector.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat


def fitres_reply(update: Mapping[str, Any], metrics: Mapping[str, Any]) -> RecordDict:
    """A client's reply in the FitRes shape Flower's SecAgg+ mod reads (sorted keys, weight 1): the
    mod quantizes and masks the arrays and sends only the masked vector (plus these public metrics)."""
    import torch

    arrays = [update[k].detach().to("cpu", torch.float32).numpy() for k in sorted(update)]
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), num_examples=1, metrics=dict(metrics))
    return compat.fitres_to_recorddict(res, keep_input=True)


def secagg_when_asked(msg: Message, context: Context, call_next):
    """ClientApp mod: Flower's SecAgg+ mod for train messages of a secure round, others untouched."""
    from flwr.client.mod import secaggplus_mod

    if msg.metadata.message_type == "train" and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)

