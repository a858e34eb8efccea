"""Flower ClientApp: receive the global adapter, train locally (with DP), send back only the update.

What leaves the client: the LoRA update (A and B, or B only with FFA) under the PEFT adapter keys,
and a few scalars. Under any DP mode the scalars are data-independent or DP outputs themselves
(ε, σ, q, expected example counts); the raw training loss is only reported with dp-mode = none.
Per-client state that must outlive a round (the privacy ledger, the calibrated σ) is kept in
Flower's `context.state`, so a thousand virtual clients cost a thousand small records, not models.
With secure aggregation, Flower's SecAgg+ mod wraps the train function and sends only masked vectors.

This module stays light (no torch): on a SuperNode every message starts a fresh flwr-clientapp
process, and the SecAgg+ key, share and unmask stages need only the mod (local_update.py and
evaluate_handler.py are the heavy halves, imported by the handlers below).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fl_dplora.clients.secagg_mod import secagg_when_asked

app = ClientApp(mods=[secagg_when_asked])  # Flower's SecAgg+ mod, for the rounds the server runs securely


@app.train()
def train(msg: Message, context: Context) -> Message:
    from fl_dplora.clients.local_update import train as local_train

    return local_train(msg, context)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    from fl_dplora.clients.evaluate_handler import evaluate_global as local_evaluate

    return local_evaluate(msg, context)
