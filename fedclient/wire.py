"""The wire format: algorithm :class:`~aggregators.base.RecordParts` <-> Flower ``RecordDict``.

Both the coordinator and the client package speak it, so it lives here and ``fedserver`` imports
it (``fedserver`` -> ``fedclient.tasks``/``fedclient.wire`` are the allowed arrows).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

if TYPE_CHECKING:  # aggregators (torch) is imported where it is used: a search reply needs none of it
    from aggregators.base import RecordParts

ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"
FATAL = "fatal"
"""A reply holding only this ConfigRecord says the run cannot go on (e.g. diverged weights)."""


def fatal_record(reason: str) -> RecordDict:
    """The content of a reply that asks the coordinator to stop the run, saying why."""
    return RecordDict({FATAL: ConfigRecord({"reason": reason})})


def fatal_reason(content: RecordDict) -> str | None:
    """The reason of a :func:`fatal_record` reply, else ``None``."""
    record = content.get(FATAL) if FATAL in content else None
    if isinstance(record, ConfigRecord):
        return str(record.get("reason", "no reason given"))
    return None


REFUSAL = "refusal"
"""A reply holding only this ConfigRecord says the site declines this round (e.g. its privacy
budget would be exceeded); the run goes on without it."""


def refusal_record(reason: str, code: str = "") -> RecordDict:
    """The content of a reply that declines the task, saying why; ``code`` is a machine-readable
    kind for refusals the coordinator can act on (e.g. ``unknown-key-epoch``: send the keys)."""
    return RecordDict({REFUSAL: ConfigRecord({"reason": reason, **({"code": code} if code else {})})})


def refusal_code(content: RecordDict) -> str:
    """The ``code`` of a :func:`refusal_record` reply ("" if none or not a refusal)."""
    record = content.get(REFUSAL) if REFUSAL in content else None
    return str(record.get("code", "")) if isinstance(record, ConfigRecord) else ""


def refusal_reason(content: RecordDict) -> str | None:
    """The reason of a :func:`refusal_record` reply, else ``None``."""
    record = content.get(REFUSAL) if REFUSAL in content else None
    if isinstance(record, ConfigRecord):
        return str(record.get("reason", "no reason given"))
    return None


def array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in arrays.items()})


def to_recorddict(parts: RecordParts, arrays: ArrayRecord | None = None) -> RecordDict:
    """``parts`` as a Flower ``RecordDict``; pass ``arrays`` to reuse an already-built ArrayRecord."""
    content = RecordDict()
    if arrays is not None or parts.arrays:
        content[ARRAYS] = arrays if arrays is not None else array_record(parts.arrays)
    if parts.config:
        content[CONFIG] = ConfigRecord(dict(parts.config))
    if parts.metrics:
        content[METRICS] = MetricRecord(dict(parts.metrics))
    return content


def from_recorddict(content: RecordDict) -> RecordParts:
    """Decode a ``RecordDict`` made by :func:`to_recorddict`; raise PayloadError if malformed."""
    from aggregators.base import PayloadError, RecordParts

    unexpected = set(content.keys()) - {ARRAYS, CONFIG, METRICS}
    if unexpected:
        raise PayloadError(f"unexpected record(s) {sorted(unexpected)}")
    parts = RecordParts()
    if ARRAYS in content:
        record = content[ARRAYS]
        if not isinstance(record, ArrayRecord):
            raise PayloadError(f"'{ARRAYS}' is a {type(record).__name__}, expected an ArrayRecord")
        try:
            parts.arrays = {key: array.numpy() for key, array in record.items()}
        except (TypeError, ValueError) as err:
            raise PayloadError(f"undecodable array: {err}") from err
    if CONFIG in content:
        parts.config = dict(content[CONFIG])
    if METRICS in content:
        record = content[METRICS]
        if not isinstance(record, MetricRecord):
            raise PayloadError(f"'{METRICS}' is a {type(record).__name__}, expected a MetricRecord")
        parts.metrics = dict(record)
    return parts


def message_wire_bytes(message: Message) -> int:
    """Bytes Flower serializes to transmit ``message``: every object of its content-addressed
    tree (message, records, arrays, 5 MiB array chunks), deflated as Flower pushes them."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())
