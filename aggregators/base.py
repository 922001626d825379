"""The algorithm contract every fedtune strategy implements.

An :class:`Algorithm` holds both halves of one federated method:

* server half: :meth:`Algorithm.init_state`, :meth:`Algorithm.plan` (what each sampled client does
  this round) and :meth:`Algorithm.aggregate` (fold the replies into the new global state);
* client half: :meth:`Algorithm.local` (what a client computes from its private data).

The two halves agree on a wire format made of an :class:`Instruction` (server → client) and a
:class:`Payload` (client → server). Both map onto :class:`RecordParts`, the plain-Python shape of a
Flower ``RecordDict`` (``arrays`` → ``ArrayRecord``, ``config`` → ``ConfigRecord``, ``metrics`` →
``MetricRecord``). This module never imports Flower; the adapters in ``fedclient/wire.py`` make
the Flower records.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar, Protocol, Union

import numpy as np
import torch

ClientId = int
"""A client's identity as the coordinator sees it (the Flower node id)."""

ConfigScalar = Union[int, float, str, bool, bytes]
ConfigValue = Union[ConfigScalar, list[int], list[float], list[str], list[bool], list[bytes]]
MetricValue = Union[int, float]
MAX_NUM_EXAMPLES = 2**53  # a reply's example count: larger ones overflow weighted sums (and no site holds that many)

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]
"""One mini-batch: model inputs (keyword arguments of ``model.forward``) and integer labels."""

GlobalState = dict[str, torch.Tensor]
"""The server's global state: fp32 master copies of the parameters the federation owns."""

NUM_EXAMPLES = "num-examples"


class FieldKind(str, Enum):
    """What one array of a client's payload is, declared by its algorithm
    (:meth:`Algorithm.payload_kind`), so that local DP, codecs and secure aggregation choose their
    treatment from the declaration instead of from the array's name."""

    MODEL_UPDATE = "model-update"
    """A tensor of the trained parameters, averaged by the server: new values or changes, as the
    algorithm's ``update_kind`` says (clipped and noised as one vector under DP; summable)."""
    SUMMED = "summed"
    """Coefficients or scalars of the method's own that the server averages position by position
    (Ferret's coefficients on shared bases; summable)."""
    SCALARS = "scalars"
    """Per-step scalars whose positions are the site's own (FedKSeed: which seeds it drew), so two
    sites' vectors do not line up: noised like a summed vector, but not summable."""
    ONE_BYTE_CODES = "one-byte-codes"
    """Scalars quantised to one byte each on the instruction's range (one-byte ZO); not summable."""
    LAYER_SCORES = "layer-scores"
    """Per-layer magnitudes a site reports about its own gradients; not summed."""
    RANKING = "ranking"
    """A packed ranking of edges (FRL); voted on, not summed."""
    PUBLIC_INDEX = "public-index"
    """Positions drawn from a shared seed, not from the data (FedKSeed's seed indices)."""


SUMMABLE = frozenset({FieldKind.MODEL_UPDATE, FieldKind.SUMMED})
"""The kinds secure aggregation may sum: every site's array lines up with every other's."""

SUM_CLIENT: int = 0
"""The client id of the one reply secure aggregation hands :meth:`Algorithm.aggregate`: the
example-weighted mean of the summed fields of all the sites that took part."""


class PayloadError(ValueError):
    """A client's reply that cannot be aggregated (wrong key, shape, dtype, non-finite value...)."""


class LocalData(Protocol):
    """A client's private training data, as an algorithm's :meth:`Algorithm.local` sees it."""

    @property
    def num_examples(self) -> int: ...

    def batches(self, batch_size: int, seed: int) -> Iterator[Batch]:
        """An endless stream of shuffled mini-batches; reshuffles after each pass."""
        ...


@dataclass
class RecordParts:
    """The plain-Python shape of a Flower ``RecordDict``: one array, config and metric record."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    config: dict[str, ConfigValue] = field(default_factory=dict)
    metrics: dict[str, MetricValue] = field(default_factory=dict)


@dataclass
class Instruction:
    """What one client does in one round.

    ``arrays`` carries the tensors sent down (e.g. the global values of the parameters the
    client trains); ``config`` the hyper-parameters and the method's own fields (which layers,
    which seeds, the step budget, the codec).
    """

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    config: dict[str, ConfigValue] = field(default_factory=dict)

    def to_record(self) -> RecordParts:
        return RecordParts(arrays=dict(self.arrays), config=dict(self.config))

    @classmethod
    def from_record(cls, parts: RecordParts) -> Instruction:
        return cls(arrays=dict(parts.arrays), config=dict(parts.config))


@dataclass
class Payload:
    """What one client sends back: arrays for some subset of keys, its example count, metrics."""

    arrays: dict[str, np.ndarray]
    num_examples: int
    metrics: dict[str, MetricValue] = field(default_factory=dict)

    def to_record(self) -> RecordParts:
        return RecordParts(
            arrays=dict(self.arrays),
            metrics={**self.metrics, NUM_EXAMPLES: int(self.num_examples)},
        )

    @classmethod
    def from_record(cls, parts: RecordParts) -> Payload:
        metrics = dict(parts.metrics)
        if NUM_EXAMPLES not in metrics:
            raise PayloadError(f"reply has no '{NUM_EXAMPLES}' metric")
        num_examples = metrics.pop(NUM_EXAMPLES)
        if type(num_examples) not in (int, float) or (isinstance(num_examples, float) and not num_examples.is_integer()):
            raise PayloadError(f"'{NUM_EXAMPLES}' must be a whole number, got {str(num_examples)[:40]}")
        if not 0 <= num_examples <= MAX_NUM_EXAMPLES:
            raise PayloadError(f"'{NUM_EXAMPLES}' must be in 0..{MAX_NUM_EXAMPLES}, got {num_examples:g}")
        for name, value in metrics.items():
            if type(value) not in (int, float):
                raise PayloadError(f"metric '{str(name)[:80]}' must be a number, not {type(value).__name__}")
        return cls(arrays=dict(parts.arrays), num_examples=int(num_examples), metrics=metrics)


@dataclass
class Reply:
    """A decoded reply from one client."""

    client: ClientId
    payload: Payload


@dataclass
class AggregateResult:
    """The outcome of :meth:`Algorithm.aggregate`.

    ``rejected`` maps each client whose reply was refused to the reason; those replies left no
    trace in ``state``.
    """

    state: GlobalState
    accepted: list[ClientId] = field(default_factory=list)
    rejected: dict[ClientId, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    details: dict[ClientId, dict[str, Any]] = field(default_factory=dict)  # e.g. which layers each trained


class Algorithm(ABC):
    """One federated method: its server half and its client half.

    Implementations are registered by :data:`name` in :mod:`aggregators` and must be
    constructible from keyword arguments holding plain config values (the run config).
    """

    name: ClassVar[str]
    default_layers: ClassVar[str] = "task"
    """Which layers the federation trains when the run config names none: ``task`` (the task's
    own choice), ``above-embeddings`` (every layer but the embeddings) or ``output`` (the last)."""
    resumable: ClassVar[bool] = False
    """Whether a run can continue from a checkpoint of the global state alone (no other server
    state to restore): true for FedAvg and selective-layer."""
    releases_per_round: ClassVar[int] = 1
    """How many separately privatized messages a site sends per round at most (for LDP budgets)."""
    supports_local_dp: ClassVar[bool] = True
    """Whether local DP has a mechanism for everything this method's sites send."""
    adapter_incompatibility: ClassVar[str] = ""
    """Why this method cannot train a parameter-efficient adapter (LoRA), or "" when it can: a run
    asking for both is refused with this reason before it starts."""
    update_kind: ClassVar[str | None] = None
    """What a reply's parameter arrays hold, for the update codecs: ``weights`` (new values of
    global tensors), ``delta`` (changes to them), or ``None`` (a payload of the method's own:
    coefficients, seeds, rankings...; codecs do not apply)."""
    public_metrics: ClassVar[tuple[str, ...]] = ()
    """Reply metrics that are the site's configuration, not its data (sent as they are under local DP
    and secure aggregation; every other metric is withheld there)."""
    secure_aggregation_incompatibility: ClassVar[str] = "its aggregation is not a weighted mean of its replies"
    """Why this method's replies cannot be securely aggregated, or "" when they can: then
    :meth:`aggregate` given one reply (client :data:`SUM_CLIENT`) holding the example-weighted mean
    of every site's summed fields, with ``num_examples`` their total, gives the same state as given
    each site's reply (secure aggregation, :mod:`privacy.secure_aggregation`)."""

    def payload_kind(self, name: str, parameters: Collection[str]) -> FieldKind | None:
        """What the payload array ``name`` is (``None``: not one this method sends). ``parameters``
        are the model's parameter names; by default those are model updates when the method sends
        updates (``update_kind``)."""
        return FieldKind.MODEL_UPDATE if self.update_kind and name in parameters else None

    def summed_length(self, name: str) -> int:
        """How many entries the summed field ``name`` has (0: not known here; the coordinator then
        holds every site to the first site's length)."""
        return 0

    # ---- server half -------------------------------------------------------------------------
    def init_state(
        self, initial: Mapping[str, torch.Tensor], layers: Mapping[str, Sequence[str]] | None = None
    ) -> GlobalState:
        """The global state at round 0: fp32 CPU master copies of ``initial``.

        ``layers`` maps layer names (input side first) to the keys of ``initial`` they hold, for
        methods that work per layer; others ignore it.
        """
        return {k: v.detach().to("cpu", torch.float32).clone() for k, v in initial.items()}

    def probe(self, server_round: int, clients: Sequence[ClientId], state: GlobalState) -> dict[ClientId, Instruction]:
        """Optional first exchange of a round (e.g. layer scores); ``{}`` means none."""
        return {}

    def check_probe(self, client: ClientId, payload: Payload) -> None:
        """Validate (and take note of) a probe reply; raise PayloadError to drop the client."""
        return None

    def set_population(self, count: int) -> None:
        """How many sites the federation has this round, sampled or not (called before ``plan``)."""
        return None

    def forget(self, client: ClientId) -> None:
        """The coordinator lost track of ``client`` (it failed, timed out or was rejected)."""
        return None

    @abstractmethod
    def plan(
        self,
        server_round: int,
        clients: Sequence[ClientId],
        state: GlobalState,
        probes: Mapping[ClientId, Payload] | None = None,
    ) -> dict[ClientId, Instruction]:
        """The instruction for each sampled client of round ``server_round``; ``probes`` holds the
        replies to :meth:`probe` (clients whose probe failed are absent from ``clients``)."""

    @abstractmethod
    def aggregate(
        self, server_round: int, state: GlobalState, replies: Iterable[Reply]
    ) -> AggregateResult:
        """Fold ``replies`` (consumed one at a time) into the new global state.

        A reply that fails validation is recorded in ``AggregateResult.rejected`` and leaves the
        state untouched; the others are still aggregated.
        """

    # ---- client half -------------------------------------------------------------------------
    @abstractmethod
    def local(
        self,
        model: torch.nn.Module,
        data: LocalData,
        instruction: Instruction,
        client_state: dict[str, Any],
    ) -> Payload:
        """Run the client's local computation and return what it sends back.

        ``model`` is the task model on the client's device, already holding the pretrained
        weights; ``client_state`` persists across rounds for this client (the adapter also puts
        site settings there under ``site.*`` keys, e.g. ``site.layer-budget``).
        """

    def local_probe(
        self,
        model: torch.nn.Module,
        data: LocalData,
        instruction: Instruction,
        client_state: dict[str, Any],
    ) -> Payload:
        """The client half of :meth:`probe`."""
        raise NotImplementedError(f"{self.name} has no probe phase")


class WrappedAlgorithm(Algorithm):
    """An algorithm that stands in for ``inner``: same name and class attributes, and every half
    delegated to it. Wrappers (update codecs, local DP) override only what they change."""

    def __init__(self, inner: Algorithm) -> None:
        self.inner = inner
        self.name = inner.name  # type: ignore[misc]
        self.default_layers = inner.default_layers  # type: ignore[misc]
        self.update_kind = inner.update_kind  # type: ignore[misc]
        self.releases_per_round = inner.releases_per_round  # type: ignore[misc]
        self.resumable = inner.resumable  # type: ignore[misc]
        self.supports_local_dp = inner.supports_local_dp  # type: ignore[misc]
        self.adapter_incompatibility = inner.adapter_incompatibility  # type: ignore[misc]
        self.secure_aggregation_incompatibility = inner.secure_aggregation_incompatibility  # type: ignore[misc]
        self.public_metrics = inner.public_metrics  # type: ignore[misc]

    def __getattr__(self, attribute: str) -> Any:  # the inner algorithm's own attributes (e.g. layers)
        if attribute == "inner":
            raise AttributeError(attribute)
        return getattr(self.inner, attribute)

    def init_state(self, initial, layers=None) -> GlobalState:
        return self.inner.init_state(initial, layers)

    def payload_kind(self, name: str, parameters: Collection[str]) -> FieldKind | None:
        return self.inner.payload_kind(name, parameters)

    def summed_length(self, name: str) -> int:
        return self.inner.summed_length(name)

    def set_population(self, count: int) -> None:
        self.inner.set_population(count)

    def probe(self, server_round, clients, state):
        return self.inner.probe(server_round, clients, state)

    def check_probe(self, client: ClientId, payload: Payload) -> None:
        self.inner.check_probe(client, payload)

    def forget(self, client: ClientId) -> None:
        self.inner.forget(client)

    def plan(self, server_round, clients, state, probes=None) -> dict[ClientId, Instruction]:
        return self.inner.plan(server_round, clients, state, probes)

    def aggregate(self, server_round: int, state: GlobalState, replies: Iterable[Reply]) -> AggregateResult:
        return self.inner.aggregate(server_round, state, replies)

    def local(self, model, data, instruction, client_state) -> Payload:
        return self.inner.local(model, data, instruction, client_state)

    def local_probe(self, model, data, instruction, client_state) -> Payload:
        return self.inner.local_probe(model, data, instruction, client_state)


def check_array(client: ClientId, key: str, value: np.ndarray, expected: torch.Tensor) -> None:
    """Raise :class:`PayloadError` unless ``value`` can stand in for ``expected``.

    Checks the shape, that the dtype is a float type, and that every entry is finite.
    """
    if not isinstance(value, np.ndarray):
        raise PayloadError(f"client {client}: '{key}' is a {type(value).__name__}, not an array")
    if tuple(value.shape) != tuple(expected.shape):
        raise PayloadError(
            f"client {client}: '{key}' has shape {tuple(value.shape)}, "
            f"expected {tuple(expected.shape)}"
        )
    if value.dtype.kind != "f":
        raise PayloadError(f"client {client}: '{key}' has dtype {value.dtype}, expected a float")
    if not np.isfinite(value).all():
        raise PayloadError(f"client {client}: '{key}' contains NaN or infinite values")


def check_arrays(
    client: ClientId,
    arrays: Mapping[str, np.ndarray],
    state: GlobalState,
    *,
    allowed: set[str] | None = None,
    what: str = "arrays",
) -> None:
    """Raise :class:`PayloadError` unless ``arrays`` is non-empty, every key is in ``state`` (and
    in ``allowed`` when given), and every array can stand in for its state tensor."""
    if not arrays:
        raise PayloadError(f"client {client}: reply carries no {what}")
    for key, value in arrays.items():
        if key not in state:
            raise PayloadError(f"client {client}: unknown key '{key}'")
        if allowed is not None and key not in allowed:
            raise PayloadError(f"client {client}: sent '{key}', which is not in a layer it was assigned")
        check_array(client, key, value, state[key])


def check_max_site_weight(value: float) -> None:
    """``max-site-weight``, the largest share one site may have in a weighted mean, is in (0, 1]."""
    if not 0 < value <= 1:
        raise ValueError(f"max-site-weight must be in (0, 1], got {value}")


def check_weight(client: ClientId, num_examples: int) -> float:
    """The aggregation weight of a reply; refuses non-positive or non-finite counts."""
    weight = float(num_examples)
    if not math.isfinite(weight) or weight <= 0:
        raise PayloadError(f"client {client}: num-examples must be positive, got {num_examples}")
    return weight
