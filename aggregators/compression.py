r"""Update codecs: sparsification, stochastic quantization, scaled sign, their compositions, and
error feedback for the biased ones.

A codec maps a dense fp32 vector :math:`x \in \mathbb{R}^d` to a packed ``uint8`` buffer and back.
Its spec is a string: an optional sparsifier, then an optional value quantizer, joined by ``+``.

=============== ============================================================ =====================
spec            what is sent                                                 contract
=============== ============================================================ =====================
``none``        the d fp32 values                                            exact
``topk:R``      the k = ⌈R·d⌉ largest-magnitude entries: ⌈log₂ d⌉-bit         contractive,
                indices (ascending) and fp32 values                          δ = k/d
``randk:R``     k entries at positions drawn from a seed both sides know:    unbiased,
                fp32 values only, scaled by d/k                              ω = d/k − 1
``qB``          B ∈ {1, 2, 4, 8}: per bucket of 512 values an fp32 scale      unbiased,
                s = max|x| and B-bit levels on the uniform grid of 2^B        ω = min(512, d)/(2^B−1)²
                points in [−s, s], rounded stochastically (QSGD-style with
                max-norm buckets, Alistarh et al., NeurIPS 2017)
``sign``        per bucket of 512 values the scale ‖x_b‖₁/|b| and one sign    contractive,
                bit per value (scaled sign, Karimireddy et al., ICML 2019)   δ = 1/512
=============== ============================================================ =====================

A sparsifier followed by a quantizer quantizes the k kept values: ``topk:0.01+q8`` sends 1 % of
the entries as indices plus 8-bit levels. Contracts of the compositions (``Q`` the quantizer with
variance factor :math:`\omega_Q`, ``T`` the sparsifier):

* ``topk+qB``: :math:`\mathbb{E}\|Q(T(x)) - x\|^2 = \|x\|^2 - \|T(x)\|^2 + \mathbb{E}\|Q(T(x)) -
  T(x)\|^2 \le (1 - (1-\omega_Q)\,k/d)\,\|x\|^2`; contractive when :math:`\omega_Q < 1` (B = 8).
* ``randk+qB``: unbiased, :math:`\omega = (1+\omega_Q)\,d/k - 1`.
* ``topk+sign`` and ``randk+sign``: contractive (rand-k is then *not* rescaled by d/k: the d/k
  factor only belongs in unbiased codecs, pitfall 4 of SCALLION/SCAFCOM in the algorithm notes).

Unbiased codecs (:math:`\mathbb{E}\,C(x) = x`, :math:`\mathbb{E}\|C(x)-x\|^2 \le \omega\|x\|^2`) are
used as is; biased (contractive, :math:`\|C(x)-x\|^2 \le (1-\delta)\|x\|^2`) ones need error feedback
(Seide et al. 2014; Stich et al., NeurIPS 2018): the client adds the residual it failed to send
last time, :math:`u = \Delta + e`, sends :math:`C(u)` and keeps :math:`e \leftarrow u - C(u)`.

Wire format of one encoded vector (all little-endian)::

    header  16 B   b"FT", version, sparsifier, quantizer, bits, bucket (u16), d (u32), k (u32)
    floats         k fp32 values (no quantizer) or ⌈k/512⌉ fp32 bucket scales
    indices        k ascending indices, ⌈log₂ d⌉ bits each (top-k only)
    levels         k B-bit levels or sign bits

:meth:`Codec.decode` treats the buffer as hostile: it checks the header against the spec and the
expected length, the exact byte count, index order and range, and that every float is finite,
and raises :class:`CodecError` naming what is wrong.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from aggregators.base import (
    FieldKind,
    AggregateResult,
    Algorithm,
    ClientId,
    GlobalState,
    Instruction,
    Payload,
    PayloadError,
    Reply,
    WrappedAlgorithm,
)

BUCKET = 512
"""Values per quantization/sign bucket (each bucket carries one fp32 scale)."""

_HEADER = struct.Struct("<2sBBBBHII")
_MAGIC = b"FT"
_VERSION = 1
_SPARSIFIERS = ("none", "topk", "randk")
_QUANTIZERS = ("none", "q", "sign")
QUANTIZER_BITS = (1, 2, 4, 8)

RESIDUAL_PREFIX = "codec.residual/"
"""Client-state keys of the error-feedback residuals, one per parameter tensor."""


class CodecError(PayloadError):
    """An encoded buffer that does not decode under the run's codec."""


# ---- bit packing ------------------------------------------------------------------------------
def pack_uint(values: np.ndarray, bits: int) -> np.ndarray:
    """Non-negative integers below ``2**bits`` as ``bits``-bit little-endian fields in uint8 bytes.

    Value ``i``'s bit ``j`` lands at bit ``i·bits + j`` of the stream (bit ``p`` is bit ``p % 8``
    of byte ``p // 8``); the last byte is zero-padded.
    """
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be in 1..32, got {bits}")
    values = np.asarray(values)
    if bits == 8:
        return values.astype(np.uint8)
    if 8 % bits == 0:
        per = 8 // bits
        padded = np.zeros(-(-len(values) // per) * per, dtype=np.uint8)
        padded[: len(values)] = values
        packed = padded[0::per].copy()
        for j in range(1, per):
            packed |= padded[j::per] << np.uint8(j * bits)
        return packed
    fields = ((values.astype(np.uint32)[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(fields.reshape(-1), bitorder="little")


def unpack_uint(packed: np.ndarray, count: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_uint`: the first ``count`` fields as uint32 (the caller checks sizes)."""
    if bits == 8:
        return packed[:count].astype(np.uint32)
    if 8 % bits == 0:
        per = 8 // bits
        shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
        fields = (packed[:, None] >> shifts) & np.uint8((1 << bits) - 1)
        return fields.reshape(-1)[:count].astype(np.uint32)
    fields = np.unpackbits(packed, count=count * bits, bitorder="little").reshape(count, bits).astype(np.uint32)
    return (fields << np.arange(bits, dtype=np.uint32)).sum(axis=1, dtype=np.uint64).astype(np.uint32)


def packed_size(count: int, bits: int) -> int:
    """Bytes :func:`pack_uint` uses for ``count`` fields of ``bits`` bits."""
    return -(-count * bits // 8)


def index_bits(d: int) -> int:
    """Bits per index into a vector of length ``d``: ⌈log₂ d⌉, at least 1."""
    return max(1, math.ceil(math.log2(d))) if d > 1 else 1


# ---- the shared random-k mask -----------------------------------------------------------------
def random_subset(d: int, k: int, seed: int) -> np.ndarray:
    """``k`` distinct indices of ``range(d)``, uniformly at random given ``seed``, ascending.

    Built only from the raw output of NumPy's PCG64 bit generator, whose stream NumPy keeps stable
    across versions (its ``Generator`` methods are not): the first ``k`` distinct values of the
    i.i.d. stream :math:`\\lfloor u_t d \\rfloor`, :math:`u_t` the top 53 bits of draw ``t``. Above
    ``d/2`` it draws the complement instead.
    """
    if not 0 <= k <= d:
        raise ValueError(f"cannot pick {k} of {d} indices")
    if 2 * k > d:
        return np.setdiff1d(np.arange(d, dtype=np.int64), random_subset(d, d - k, seed), assume_unique=True)
    bit_generator = np.random.PCG64(seed)
    drawn = np.empty(0, dtype=np.int64)
    while True:
        extra = bit_generator.random_raw(k - len(drawn) + k // 4 + 64 if len(drawn) < k else k // 4 + 64)
        uniform = (extra >> np.uint64(11)).astype(np.float64) * 2.0**-53
        drawn = np.concatenate([drawn, np.minimum((uniform * d).astype(np.int64), d - 1)])
        first_draw = np.full(d, len(drawn), dtype=np.int64)
        first_draw[drawn[::-1]] = np.arange(len(drawn) - 1, -1, -1)  # the earliest draw of each index wins
        distinct = drawn[first_draw[drawn] == np.arange(len(drawn))]  # first occurrences, in draw order
        if len(distinct) >= k:
            chosen = np.zeros(d, dtype=bool)
            chosen[distinct[:k]] = True
            return np.flatnonzero(chosen)


# ---- the codec --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Encoded:
    """An encoded vector and the dense vector the receiver will decode from it (bit for bit)."""

    buffer: np.ndarray
    decoded: np.ndarray


@dataclass(frozen=True)
class Codec:
    """A sparsifier (``none``/``topk``/``randk`` with keep ratio) then a quantizer
    (``none``/``q`` with ``bits``/``sign``); build it from a spec with :meth:`parse`."""

    sparsifier: str = "none"
    ratio: float = 1.0
    quantizer: str = "none"
    bits: int = 32

    SYNTAX: ClassVar[str] = (
        "none, or a sparsifier topk:R / randk:R (0 < R <= 1) and/or a quantizer q1/q2/q4/q8/sign "
        "joined by '+', e.g. topk:0.01+q8"
    )

    @classmethod
    def parse(cls, spec: str) -> Codec:
        """The codec a spec string names; ValueError with the syntax when it names none."""
        text = str(spec).strip().lower()
        if text in ("", "none"):
            return cls()
        sparsifier, ratio, quantizer, bits = "none", 1.0, "none", 32
        parts = text.split("+")
        if len(parts) > 2:
            raise ValueError(f"codec '{spec}' has {len(parts)} parts; expected {cls.SYNTAX}")
        for position, part in enumerate(parts):
            name, _, arg = part.partition(":")
            if name in ("topk", "randk") and position == 0:
                try:
                    ratio = float(arg)
                except ValueError:
                    raise ValueError(f"codec '{spec}': '{part}' needs a keep ratio, e.g. {name}:0.01") from None
                if not 0 < ratio <= 1:
                    raise ValueError(f"codec '{spec}': keep ratio must be in (0, 1], got {arg}")
                sparsifier = name
            elif name.startswith("q") and name[1:].isdigit() and not arg and (position == 1 or len(parts) == 1):
                bits = int(name[1:])
                if bits not in QUANTIZER_BITS:
                    raise ValueError(f"codec '{spec}': quantizer bits must be one of {QUANTIZER_BITS}, got {bits}")
                quantizer = "q"
            elif name == "sign" and not arg and (position == 1 or len(parts) == 1):
                quantizer, bits = "sign", 1
            else:
                raise ValueError(f"codec '{spec}': cannot read '{part}'; expected {cls.SYNTAX}")
        return cls(sparsifier, ratio, quantizer, bits)

    @property
    def spec(self) -> str:
        sparse = f"{self.sparsifier}:{self.ratio:g}" if self.sparsifier != "none" else ""
        quant = {"none": "", "q": f"q{self.bits}", "sign": "sign"}[self.quantizer]
        return "+".join(p for p in (sparse, quant) if p) or "none"

    @property
    def is_identity(self) -> bool:
        return self.sparsifier == "none" and self.quantizer == "none"

    @property
    def unbiased(self) -> bool:
        """E C(x) = x (random-k rescaled, stochastic quantization, or nothing)."""
        return self.sparsifier != "topk" and self.quantizer != "sign"

    def keep(self, d: int) -> int:
        """How many of ``d`` entries the sparsifier keeps: ⌈R·d⌉, at least 1."""
        if self.sparsifier == "none":
            return d
        return min(d, max(1, math.ceil(round(self.ratio * d, 6))))

    def omega(self, d: int) -> float | None:
        """ω of an unbiased codec on R^d (E‖C(x)−x‖² ≤ ω‖x‖²); None for a biased one."""
        if not self.unbiased:
            return None
        k = self.keep(d)
        omega_q = min(BUCKET, k) / (2**self.bits - 1) ** 2 if self.quantizer == "q" else 0.0
        return (1 + omega_q) * d / k - 1

    def contraction(self, d: int) -> float | None:
        """δ of a contractive codec (‖C(x)−x‖² ≤ (1−δ)‖x‖², in expectation for stochastic parts);
        None for an unbiased one or one with no such bound (top-k with 1–4-bit levels)."""
        if self.unbiased:
            return None
        k = self.keep(d)
        if self.quantizer == "sign":
            return (k / d) / min(BUCKET, k)
        omega_q = min(BUCKET, k) / (2**self.bits - 1) ** 2 if self.quantizer == "q" else 0.0
        return (1 - omega_q) * k / d if omega_q < 1 else None

    def encoded_size(self, d: int) -> int:
        """Exact bytes of an encoded vector of length ``d``."""
        k = self.keep(d)
        size = _HEADER.size
        if self.quantizer == "none":
            size += 4 * k
        else:
            size += 4 * -(-k // BUCKET) + packed_size(k, self.bits)
        if self.sparsifier == "topk":
            size += packed_size(k, index_bits(d))
        return size

    # ---- encode / decode ----------------------------------------------------------------------
    def _positions(self, x: np.ndarray, k: int, seed: int) -> np.ndarray | None:
        d = len(x)
        if self.sparsifier == "none" or k == d:
            return None
        if self.sparsifier == "randk":
            return random_subset(d, k, seed)
        return np.sort(np.argpartition(np.abs(x), d - k)[d - k:])

    def _rescale(self, d: int, k: int) -> float:
        return d / k if self.sparsifier == "randk" and self.unbiased else 1.0

    def encode(self, x: np.ndarray, seed: int) -> Encoded:
        """Encode the 1-D float vector ``x``; ``seed`` draws the random-k mask (the receiver needs
        the same seed) and the stochastic rounding (only the sender uses it)."""
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
        d = len(x)
        if d == 0 or d >= 2**32:
            raise ValueError(f"cannot encode a vector of length {d}")
        k = self.keep(d)
        positions = self._positions(x, k, seed)
        values = x if positions is None else x[positions]
        parts: list[np.ndarray] = []
        if self.quantizer == "none":
            floats, levels, approx = values, None, values.copy()
        elif self.quantizer == "q":
            floats, levels = _quantize(values, self.bits, np.random.default_rng([seed, 1]))
            approx = _dequantize(floats, levels, self.bits)
        else:
            floats, levels = _sign(values)
            approx = _unsign(floats, levels)
        parts.append(np.ascontiguousarray(floats, dtype="<f4").view(np.uint8))
        if self.sparsifier == "topk" and positions is not None:
            parts.append(pack_uint(positions, index_bits(d)))
        elif self.sparsifier == "topk":  # k == d: every index, kept for a fixed layout
            parts.append(pack_uint(np.arange(d), index_bits(d)))
        if levels is not None:
            parts.append(pack_uint(levels, self.bits))
        header = _HEADER.pack(_MAGIC, _VERSION, _SPARSIFIERS.index(self.sparsifier),
                              _QUANTIZERS.index(self.quantizer), self.bits % 256, BUCKET, d, k)
        buffer = np.concatenate([np.frombuffer(header, dtype=np.uint8), *parts])
        return Encoded(buffer, _scatter(d, positions, approx, self._rescale(d, k)))

    def decode(self, buffer: np.ndarray, d: int, seed: int) -> np.ndarray:
        """The dense fp32 vector of length ``d`` that ``buffer`` encodes; CodecError if it cannot be."""
        if not isinstance(buffer, np.ndarray) or buffer.dtype != np.uint8 or buffer.ndim != 1:
            got = f"{buffer.dtype} array of shape {buffer.shape}" if isinstance(buffer, np.ndarray) else type(buffer).__name__
            raise CodecError(f"expected a 1-D uint8 buffer encoded with {self.spec}, got a {got}")
        if len(buffer) < _HEADER.size:
            raise CodecError(f"truncated buffer: {len(buffer)} bytes, the header alone is {_HEADER.size}")
        magic, version, sparsifier, quantizer, bits, bucket, got_d, got_k = _HEADER.unpack(
            buffer[: _HEADER.size].tobytes()
        )
        if magic != _MAGIC or version != _VERSION:
            raise CodecError(f"not a fedtune v{_VERSION} encoded vector (magic {magic!r}, version {version})")
        k = self.keep(d)
        expected = (_SPARSIFIERS.index(self.sparsifier), _QUANTIZERS.index(self.quantizer), self.bits % 256, BUCKET)
        if (sparsifier, quantizer, bits, bucket) != expected:
            raise CodecError(f"buffer was not encoded with the run's codec {self.spec}")
        if (got_d, got_k) != (d, k):
            raise CodecError(f"buffer encodes {got_k} of {got_d} entries; expected {k} of {d}")
        size = self.encoded_size(d)
        if len(buffer) != size:
            raise CodecError(f"buffer is {len(buffer)} bytes; {self.spec} of {d} entries takes exactly {size}")
        offset = _HEADER.size
        n_floats = k if self.quantizer == "none" else -(-k // BUCKET)
        floats = buffer[offset: offset + 4 * n_floats].copy().view("<f4").astype(np.float32)
        offset += 4 * n_floats
        if not np.isfinite(floats).all():
            raise CodecError("buffer holds NaN or infinite values")
        positions = None
        if self.sparsifier == "randk" and k < d:
            positions = random_subset(d, k, seed)
        elif self.sparsifier == "topk":
            width = packed_size(k, index_bits(d))
            positions = unpack_uint(buffer[offset: offset + width], k, index_bits(d)).astype(np.int64)
            offset += width
            if k > 1 and not (np.diff(positions) > 0).all():
                raise CodecError("top-k indices are not strictly ascending (repeated or unordered)")
            if positions[-1] >= d:
                raise CodecError(f"top-k index {int(positions[-1])} is out of range for {d} entries")
        if self.quantizer == "none":
            approx = floats
        else:
            if (floats < 0).any():
                raise CodecError("buffer holds a negative bucket scale")
            levels = unpack_uint(buffer[offset:], k, self.bits)
            approx = _dequantize(floats, levels, self.bits) if self.quantizer == "q" else _unsign(floats, levels)
        return _scatter(d, positions, approx, self._rescale(d, k))


def _buckets(values: np.ndarray) -> np.ndarray:
    """``values`` zero-padded to whole buckets, one bucket per row."""
    n_buckets = -(-len(values) // BUCKET)
    padded = np.zeros(n_buckets * BUCKET, dtype=np.float32)
    padded[: len(values)] = values
    return padded.reshape(n_buckets, BUCKET)


def _quantize(values: np.ndarray, bits: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-bucket scales s = max|x| and stochastic levels j ∈ {0..L}, L = 2^bits − 1, with
    E[−s + 2sj/L] = x (unbiased rounding between the two nearest grid points)."""
    rows = _buckets(values)
    scales = np.abs(rows).max(axis=1)
    top = float(2**bits - 1)
    safe = np.where(scales > 0, scales, np.float32(1))[:, None]
    position = (rows / safe + np.float32(1)) * np.float32(top / 2)
    low = np.floor(position)
    levels = low + (rng.random(position.shape, dtype=np.float32) < position - low)
    return scales.astype(np.float32), np.clip(levels, 0, top).reshape(-1)[: len(values)].astype(np.uint32)


def _dequantize(scales: np.ndarray, levels: np.ndarray, bits: int) -> np.ndarray:
    step = np.float32(2.0 / (2**bits - 1))
    per_value = np.repeat(scales, BUCKET)[: len(levels)]
    return (levels.astype(np.float32) * step - np.float32(1)) * per_value


def _sign(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-bucket scales ‖x_b‖₁/|b| and sign bits (1 for x ≥ 0)."""
    rows = np.abs(_buckets(values)).sum(axis=1, dtype=np.float64)
    sizes = np.full(len(rows), BUCKET, dtype=np.float64)
    sizes[-1] = len(values) - BUCKET * (len(rows) - 1)
    return (rows / sizes).astype(np.float32), (values >= 0).astype(np.uint32)


def _unsign(scales: np.ndarray, bits: np.ndarray) -> np.ndarray:
    per_value = np.repeat(scales, BUCKET)[: len(bits)]
    return np.where(bits.astype(bool), per_value, -per_value).astype(np.float32)


def _scatter(d: int, positions: np.ndarray | None, values: np.ndarray, scale: float) -> np.ndarray:
    values = values.astype(np.float32, copy=False)
    if scale != 1.0:
        values = values * np.float32(scale)
    if positions is None:
        return values
    out = np.zeros(d, dtype=np.float32)
    out[positions] = values
    return out


def key_seed(seed: int, key: str) -> int:
    """The codec seed of one tensor ``key`` under a per-client, per-round ``seed``."""
    return int(np.random.SeedSequence([seed % 2**63, zlib.crc32(key.encode())]).generate_state(1)[0])


# ---- error feedback and the generic wrapper ---------------------------------------------------
def encode_with_feedback(
    codec: Codec, update: np.ndarray, seed: int, residual: np.ndarray | None
) -> tuple[Encoded, np.ndarray | None]:
    """Encode ``update`` (plus the residual, for a biased codec); return it and the new residual.

    For a biased codec :math:`u = \\Delta + e`, send :math:`C(u)`, keep :math:`e' = u - C(u)`. An
    unbiased codec keeps no residual (it needs none and ``None`` is returned).
    """
    flat = np.asarray(update, dtype=np.float32).reshape(-1)
    if codec.unbiased:
        return codec.encode(flat, seed), None
    if residual is not None:
        flat = flat + residual.reshape(-1)
    encoded = codec.encode(flat, seed)
    return encoded, flat - encoded.decoded


class CompressedUpdates(WrappedAlgorithm):
    """Any algorithm with dense updates (``update_kind`` ``weights`` or ``delta``), its replies
    compressed by a :class:`Codec` with error feedback for the biased codecs.

    Client half: run the inner ``local``; for each parameter tensor sent, form the update (the new
    value minus the global one for ``weights`` payloads), add the residual, encode. Server half:
    decode each tensor (a buffer that does not decode rejects the whole reply, naming the client),
    turn it back into what the inner algorithm expects, and let the inner algorithm aggregate.
    Arrays that are not parameters (e.g. selective-layer's layer scores) pass through unencoded.
    The residuals live in the client state under ``codec.residual/<key>`` and survive rounds the
    client skips.
    """

    def __init__(self, inner: Algorithm, codec: Codec, seed: int = 0) -> None:
        if inner.update_kind not in ("weights", "delta"):
            raise ValueError(
                f"codecs compress dense updates; '{inner.name}' sends {inner.update_kind or 'a payload of its own'}. "
                "Use a codec with fedavg or selective-layer (scallion/scafcom take theirs via --codec too)"
            )
        super().__init__(inner)
        self.codec = codec
        self.seed = seed
        self.secure_aggregation_incompatibility = (  # type: ignore[misc]
            f"codec '{codec.spec}' sends encoded buffers, and secure aggregation sums the dense update itself "
            "(top-k keeps a different set of positions at each site: those never line up); use codec none")

    def codec_seed(self, server_round: int, client: ClientId) -> int:
        return int(np.random.SeedSequence([self.seed, server_round, client % 2**63]).generate_state(1)[0])

    # ---- server half -------------------------------------------------------------------------
    def plan(self, server_round, clients, state, probes=None) -> dict[ClientId, Instruction]:
        plan = self.inner.plan(server_round, clients, state, probes)
        for client, instruction in plan.items():
            instruction.config = {**instruction.config, "codec": self.codec.spec,
                                  "codec-seed": self.codec_seed(server_round, client)}
        return plan

    def _decoded(self, server_round: int, state: GlobalState, reply: Reply) -> Reply:
        seed = self.codec_seed(server_round, reply.client)
        arrays = dict(reply.payload.arrays)
        for key, buffer in reply.payload.arrays.items():
            if key not in state:
                continue
            target = state[key]
            try:
                update = self.codec.decode(buffer, target.numel(), key_seed(seed, key))
            except CodecError as err:
                raise CodecError(f"client {reply.client}: '{key}': {err}") from None
            update = update.reshape(tuple(target.shape))
            arrays[key] = update + target.numpy() if self.update_kind == "weights" else update
        return Reply(reply.client, Payload(arrays, reply.payload.num_examples, dict(reply.payload.metrics)))

    def aggregate(self, server_round: int, state: GlobalState, replies: Iterable[Reply]) -> AggregateResult:
        refused: dict[ClientId, str] = {}

        def decoded() -> Iterable[Reply]:
            for reply in replies:
                try:
                    yield self._decoded(server_round, state, reply)
                except CodecError as err:
                    refused[reply.client] = str(err)
                    self.inner.forget(reply.client)

        result = self.inner.aggregate(server_round, state, decoded())
        result.rejected.update(refused)
        return result

    # ---- client half -------------------------------------------------------------------------
    def local(self, model, data, instruction, client_state) -> Payload:
        payload = self.inner.local(model, data, instruction, client_state)
        parameters = {name for name, _ in model.named_parameters()}
        updates = {key for key in payload.arrays if self.payload_kind(key, parameters) is FieldKind.MODEL_UPDATE}
        return compress_payload(payload, self.codec, instruction, client_state, updates=updates, kind=self.update_kind)


def compress_payload(
    payload: Payload,
    codec: Codec,
    instruction: Instruction,
    client_state: dict[str, Any],
    *,
    updates: Collection[str],
    kind: str,
) -> Payload:
    """Encode the arrays of ``payload`` its algorithm declares model updates (``updates``; see
    :class:`CompressedUpdates`); the others (e.g. layer scores) pass as they are."""
    seed = int(instruction.config["codec-seed"])
    arrays = dict(payload.arrays)
    sent_sq, error_sq = 0.0, 0.0
    for key, value in payload.arrays.items():
        if key not in updates:
            continue
        update = np.asarray(value, dtype=np.float32)
        if kind == "weights":
            update = update - np.asarray(instruction.arrays[key], dtype=np.float32)
        residual = client_state.get(RESIDUAL_PREFIX + key)
        encoded, new_residual = encode_with_feedback(codec, update, key_seed(seed, key), residual)
        if new_residual is not None:
            client_state[RESIDUAL_PREFIX + key] = new_residual.reshape(update.shape)
            error_sq += float(np.dot(new_residual, new_residual))
        else:
            error_sq += float(np.sum((encoded.decoded - update.reshape(-1)) ** 2))
        sent_sq += float(np.dot(encoded.decoded, encoded.decoded))
        arrays[key] = encoded.buffer
    metrics = {**payload.metrics, "codec-relative-error": math.sqrt(error_sq / sent_sq) if sent_sq > 0 else 0.0}
    return Payload(arrays, payload.num_examples, metrics)


__all__: Sequence[str] = (
    "BUCKET", "Codec", "CodecError", "CompressedUpdates", "Encoded", "compress_payload", "encode_with_feedback",
    "index_bits", "key_seed", "pack_uint", "packed_size", "random_subset", "unpack_uint",
)
