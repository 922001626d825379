"""An in-process stand-in for Flower's Grid: answers ``query.identify`` like fedtune's ClientApp.

Used by unit tests and the memory benchmark, which call the strategy directly without Ray.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping

from flwr.app import ConfigRecord, Message, RecordDict


class IdentifyingGrid:
    """Nodes ``node_id -> site name``; identify queries are answered at once, nothing else is."""

    def __init__(self, sites: Mapping[int, str] | Iterable[int]) -> None:
        self.sites = dict(sites) if isinstance(sites, Mapping) else {n: f"partition-{i}" for i, n in enumerate(sites)}
        self._replies: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.sites)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            if message.metadata.message_type != "query.identify":
                raise NotImplementedError("IdentifyingGrid only answers query.identify")
            name = self.sites[message.metadata.dst_node_id]
            self._replies[message.metadata.message_id] = Message(
                RecordDict({"site": ConfigRecord({"name": name})}), reply_to=message
            )
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]
