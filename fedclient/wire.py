"""The wire format: algorithm :class:`~aggregators.base.RecordParts` <-> Flower ``RecordDict``.

Both the coordinator and the client package speak it, so it lives here and ``fedserver`` imports
it (``fedserver`` -> ``fedclient.tasks``/``fedclient.wire`` are the allowed arrows).
"""

from __future__ import annotations

import io
import json
import math
from typing import TYPE_CHECKING

import numpy as np
from numpy.lib import format as npy_format
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


PACKED_INDEX, PACKED_DATA = "fedtune.packed.index", "fedtune.packed.data"
PACKED_ALIGNMENT = 8  # bytes: every array starts at a multiple of this in the packed buffer
PACKABLE_DTYPES = frozenset(np.dtype(t).str for t in ("<f2", "<f4", "<f8", "<i1", "<i2", "<i4", "<i8", "|u1", "<u2",
                                                      "<u4", "<u8", "|b1"))
MAX_PACKED_ARRAYS = 1 << 16
MAX_PACKED_INDEX_BYTES = 16 << 20
MAX_DIMENSIONS = 32
MAX_NPY_HEADER = 10_000  # bytes of an .npy header (numpy's own default limit)
MAX_SIZE = 1 << 40  # elements in one array: numpy refuses shapes beyond, even empty ones


def _packed_offsets(dtypes: list[np.dtype], shapes: list[tuple[int, ...]]) -> tuple[list[int], int]:
    """Where each array starts and the buffer's total size, in Python integers (no overflow)."""
    offsets, end = [], 0
    for dtype, shape in zip(dtypes, shapes, strict=True):
        start = -(-end // PACKED_ALIGNMENT) * PACKED_ALIGNMENT
        offsets.append(start)
        end = start + math.prod(shape) * dtype.itemsize
    return offsets, end


def array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """``arrays`` as one Flower ``ArrayRecord`` of two Arrays: an index (JSON of each array's name,
    dtype and shape, in order) and every array's bytes, each starting at a multiple of
    :data:`PACKED_ALIGNMENT`. Flower moves each Array of a message as its own object through the
    ServerApp's, the SuperLink's and the SuperNode's object stores (a request, a hash check and a
    database write per object and hop); a model's 40 tensors were 40 objects, and those trips,
    not the bytes, were most of a deployment round (bench/deployment_latency.py). Packed, a
    message is a handful of objects whatever the number of tensors. :func:`unpack_array_record`
    reads it back and checks it."""
    if not arrays:
        return ArrayRecord()
    values = [np.asarray(value, order="C") for value in arrays.values()]
    for key, value in zip(arrays, values, strict=True):
        if value.dtype.str not in PACKABLE_DTYPES:
            raise TypeError(f"array '{key}' has dtype {value.dtype}, which the wire format does not carry")
    offsets, size = _packed_offsets([v.dtype for v in values], [v.shape for v in values])
    buffer = np.zeros(size, dtype=np.uint8)
    for offset, value in zip(offsets, values, strict=True):
        buffer[offset:offset + value.nbytes] = value.reshape(-1).view(np.uint8)
    index = json.dumps([[key, value.dtype.str, list(value.shape)] for key, value in zip(arrays, values, strict=True)])
    return ArrayRecord({PACKED_INDEX: Array(np.frombuffer(index.encode(), dtype=np.uint8)),
                        PACKED_DATA: Array(buffer)})


def _checked_shape(shape: object, what: str) -> tuple[int, ...]:
    from aggregators.base import PayloadError

    if not (isinstance(shape, list | tuple) and len(shape) <= MAX_DIMENSIONS
            and all(type(n) is int and 0 <= n < MAX_SIZE for n in shape)
            and math.prod(n for n in shape if n) < MAX_SIZE):
        raise PayloadError(f"{what}: bad shape {str(shape)[:80]} (at most {MAX_DIMENSIONS} whole sizes >= 0, "
                           f"fewer than {MAX_SIZE} elements even leaving out empty dimensions)")
    return tuple(shape)


def _decoded(array: Array, what: str, copy: bool = True) -> np.ndarray:
    """The values of a Flower ``Array``, read without ``np.load`` (which would open a zip file, or
    allocate whatever shape the header claims before reading any data): the ``.npy`` header is
    parsed and checked first (a dtype of :data:`PACKABLE_DTYPES`, at most :data:`MAX_DIMENSIONS`
    whole sizes, exactly as many bytes as they need). Raises PayloadError naming ``what``. With
    ``copy=False``, a read-only view of the Array's bytes (for a buffer only sliced and copied
    from)."""
    from aggregators.base import PayloadError

    if not isinstance(array, Array) or array.stype != "numpy.ndarray":
        raise PayloadError(f"{what}: not a numpy array")
    data = bytes(array.data)
    stream = io.BytesIO(data[:12 + MAX_NPY_HEADER])  # the header only: a v2 header may claim 4 GB
    try:
        version = npy_format.read_magic(stream)
        read_header = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}[version]
        shape, fortran_order, dtype = read_header(stream, max_header_size=MAX_NPY_HEADER)
    except Exception as err:  # noqa: BLE001 (whatever the bytes are, they are no array this format carries)
        raise PayloadError(f"{what}: not an .npy array ({type(err).__name__})") from None
    if not isinstance(dtype, np.dtype) or dtype.str not in PACKABLE_DTYPES:
        raise PayloadError(f"{what}: dtype {str(dtype)[:40]} is not one the wire format carries")
    shape = _checked_shape(shape, what)
    body = len(data) - stream.tell()
    if math.prod(shape) * dtype.itemsize != body:
        raise PayloadError(f"{what}: its header describes {math.prod(shape) * dtype.itemsize} bytes but {body} came")
    values = np.frombuffer(data, dtype=dtype, offset=stream.tell()).reshape(shape, order="F" if fortran_order else "C")
    return values.copy() if copy else values


def unpack_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The arrays of an ``ArrayRecord``: one :func:`array_record` packed, or one holding an Array
    per name (Flower's own ``ArrayRecord(dict)`` layout). Nothing is allocated before it is
    checked: each Array's header (:func:`_decoded`), then a packed record's index (known dtypes
    only, whole shapes of at most :data:`MAX_DIMENSIONS` sizes, unique names, bytes that add up
    exactly). Raises PayloadError naming what is wrong."""
    from aggregators.base import PayloadError

    if PACKED_INDEX not in record and PACKED_DATA not in record:
        if len(record) > MAX_PACKED_ARRAYS:
            raise PayloadError(f"a record of {len(record)} arrays is over {MAX_PACKED_ARRAYS}")
        return {key: _decoded(array, f"array '{str(key)[:80]}'") for key, array in record.items()}
    if set(record.keys()) != {PACKED_INDEX, PACKED_DATA}:
        raise PayloadError(f"a packed array record holds exactly '{PACKED_INDEX}' and '{PACKED_DATA}', "
                           f"not {sorted(str(k)[:80] for k in record.keys())[:5]}")
    index_bytes = _decoded(record[PACKED_INDEX], "the packed index", copy=False)
    data = _decoded(record[PACKED_DATA], "the packed arrays", copy=False)  # each array is copied out below
    if index_bytes.dtype != np.uint8 or data.dtype != np.uint8 or index_bytes.ndim != 1 or data.ndim != 1:
        raise PayloadError("packed arrays must be two 1-D uint8 arrays")
    if index_bytes.size > MAX_PACKED_INDEX_BYTES:
        raise PayloadError(f"the packed index is {index_bytes.size} bytes, over {MAX_PACKED_INDEX_BYTES}")
    try:
        index = json.loads(index_bytes.tobytes())
    except (ValueError, RecursionError) as err:
        raise PayloadError(f"the packed index is not JSON ({type(err).__name__})") from None
    if not isinstance(index, list) or len(index) > MAX_PACKED_ARRAYS:
        raise PayloadError(f"the packed index must list at most {MAX_PACKED_ARRAYS} arrays")
    names, dtypes, shapes = [], [], []
    for entry in index:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str) and entry[0]
                and isinstance(entry[1], str) and entry[1] in PACKABLE_DTYPES):
            raise PayloadError(f"bad packed index entry {str(entry)[:120]} (want [name, dtype, shape])")
        names.append(entry[0])
        dtypes.append(np.dtype(entry[1]))
        shapes.append(_checked_shape(entry[2], f"packed array '{entry[0][:80]}'"))
    if len(set(names)) != len(names):
        raise PayloadError("the packed index names an array twice")
    offsets, size = _packed_offsets(dtypes, shapes)
    if size != data.size:
        raise PayloadError(f"the packed index describes {size} bytes but {data.size} came")
    return {name: data[offset:offset + math.prod(shape) * dtype.itemsize].view(dtype).reshape(shape).copy()
            for name, dtype, shape, offset in zip(names, dtypes, shapes, offsets, strict=True)}


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
        parts.arrays = unpack_array_record(record)
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
