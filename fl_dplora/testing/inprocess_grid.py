"""An in-process Flower Grid: the real ClientApp on N simulated SuperNodes, no Ray, no SuperLink.

Used by the tests (tests/harness.py) and by `fl-dplora bench secagg`. Every message crosses a
simulated wire (deflated into Flower 1.42's object bytes and inflated again, both directions), an
exception in the ClientApp becomes the error reply Flower's runtime would send, and each node keeps
its own `Context` (node_config, a `state` that persists across messages, as on a SuperNode).
Hooks: `before(node_id, msg)` may raise (the client "crashes") or return a replacement message;
`after(node_id, msg, reply)` may return a replacement reply, or None to drop it (a timeout).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.task_identity import TaskIdentity

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
    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
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
