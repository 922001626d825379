"""The one Flower Strategy that drives any fedtune algorithm.

``configure_train`` samples clients and turns :meth:`Algorithm.plan` into one message per client;
``aggregate_train`` decodes replies one at a time and hands them to :meth:`Algorithm.aggregate`,
which folds them into the global state as they arrive (replies are pulled from the grid as they
come in and dropped once folded, so server memory stays O(model)). Every round is measured (bytes
actually serialized per message, per client) and written to the run store in one transaction.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any, Protocol

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from aggregators.base import (
    SUM_CLIENT,
    Algorithm,
    ClientId,
    GlobalState,
    Instruction,
    Payload,
    PayloadError,
    Reply,
)
from fedclient.wire import (
    ARRAYS,
    CONFIG,
    array_record,
    fatal_reason,
    from_recorddict,
    message_wire_bytes,
    refusal_reason,
    to_recorddict,
)
from fedserver.grid_waits import replies_due_by
from fedserver.store import ClientRecord, RoundRecord, RunStore, now

CentralEvaluate = Callable[[int, GlobalState], dict[str, float]]


class RunStopped(RuntimeError):
    """The run was asked to stop (``AlgorithmStrategy.stop_event``) before it finished."""


class NoEligibleSites(RuntimeError):
    """No connected site will train any more (all declined, e.g. their privacy budgets are spent)."""


class RunAborted(RuntimeError):
    """A client reported a condition under which the run must not go on (e.g. its copy of the
    global weights diverged from the coordinator's)."""


class RoundObserver(Protocol):
    """Receives progress events (used by ``fedsim`` for its progress bar)."""

    def round_started(self, server_round: int, num_rounds: int) -> None: ...

    def phase_progress(self, server_round: int, phase: str, done: int, total: int) -> None: ...

    def round_finished(self, record: RoundRecord) -> None: ...


@dataclass
class StrategySettings:
    """How clients are sampled and how long the coordinator waits for them."""

    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0
    min_train_nodes: int = 1
    min_available_nodes: int = 1
    round_timeout: float = 3600.0
    wait_for_nodes: float = 120.0
    checkpoint_every: int = 1
    keep_checkpoints: int = 3  # per run, the latest ones (0: all)
    seed: int = 0
    message_config: dict[str, Any] = field(default_factory=dict)
    """Run-wide settings every message carries (e.g. the local-DP settings sites apply)."""
    secure_aggregation: dict[str, Any] = field(default_factory=dict)
    """Secure aggregation's ``secagg-*`` settings for every round ({}: off); the number of sites is
    the round's (:mod:`fedserver.secure_exchange`)."""
    central_dp: dict[str, float] = field(default_factory=dict)
    """Central DP (``clip``, ``noise-multiplier``; {}: off): the coordinator clips each reply and noises the sum."""

    def __post_init__(self) -> None:
        for name in ("fraction_train", "fraction_evaluate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name.replace('_', '-')} must be between 0 and 1, got {value}")
        if self.fraction_train == 0.0:
            raise ValueError("fraction-train must be above 0: no client would train")
        if self.min_train_nodes < 1:
            raise ValueError(f"min-train-nodes must be at least 1, got {self.min_train_nodes}")
        if self.round_timeout <= 0:
            raise ValueError(f"round-timeout must be positive, got {self.round_timeout}")
        if self.keep_checkpoints < 0:
            raise ValueError(f"keep-checkpoints must be >= 0 (0 keeps all), got {self.keep_checkpoints}")


@dataclass(frozen=True)
class Site:
    """A connected client as the coordinator knows it.

    ``node_id`` is Flower's transport id (random per simulation, per SuperNode registration in a
    deployment); ``client_id`` is stable across runs, derived from the site's ``name`` (its
    ``site-name`` node config, else ``partition-<id>``), so sampling and the seeds an algorithm
    derives from client ids reproduce from run to run.
    """

    node_id: int
    client_id: ClientId
    name: str
    device: str = ""  # what the site trains on, as it reported it (e.g. "cuda:0 NVIDIA H100")


def stable_client_id(name: str) -> ClientId:
    """A 63-bit id determined by a site's name."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") >> 1


@dataclass
class _RoundLedger:
    """Per-client bookkeeping of the round in progress."""

    clients: dict[tuple[str, int], ClientRecord] = field(default_factory=dict)

    def client(self, phase: str, site: Site) -> ClientRecord:
        """The record of ``site`` in ``phase``; "timeout" until its reply arrives."""
        key = (phase, site.node_id)
        if key not in self.clients:
            self.clients[key] = ClientRecord(node_id=site.node_id, site=site.name, phase=phase, status="timeout",
                                             details={"device": site.device} if site.device else {})
        return self.clients[key]


class AlgorithmStrategy(Strategy):
    """A Flower ``Strategy`` whose planning and aggregation come from an :class:`Algorithm`."""

    def __init__(
        self,
        algorithm: Algorithm,
        settings: StrategySettings | None = None,
        *,
        store: RunStore | None = None,
        run_id: str | None = None,
        central_evaluate: CentralEvaluate | None = None,
        observer: RoundObserver | None = None,
        layers: Mapping[str, Sequence[str]] | None = None,
        enrolled: Mapping[int, str] | None = None,
    ) -> None:
        self.algorithm = algorithm
        self.enrolled = dict(enrolled) if enrolled is not None else None  # node id -> enrolled site name
        self.layers = dict(layers) if layers else None
        self.settings = settings or StrategySettings()
        self.store = store
        self.run_id = run_id
        self.central_evaluate = central_evaluate
        self.observer = observer
        self.state: GlobalState = {}
        self.population = 0  # sites connected at the last sampling
        self.retired: dict[ClientId, str] = {}  # sites that declined for good (e.g. privacy budget spent)
        self.ended_early: str | None = None
        self.history: list[RoundRecord] = []
        self._ledger = _RoundLedger()
        self._sites: dict[int, Site] = {}  # by node id
        self._by_client: dict[ClientId, Site] = {}
        # who each message in flight went to: a reply the SuperLink writes itself (the node went
        # offline) comes from the SuperLink's node id, not the site's
        self._recipients: dict[str, int] = {}
        self.stop_event = threading.Event()  # set it to end the run at the next wait
        self.central_releases = 0  # central DP: noised sums released so far
        self._next_stop_check = 0.0

    def _train_loss_text(self, train_loss: float | None) -> str:
        return train_loss_text(train_loss, bool(self.settings.message_config.get("dp")))

    def _pause(self, seconds: float) -> None:
        """Sleep while waiting on clients; raise RunStopped as soon as a stop is requested, here
        (``stop_event``) or through the store (``RunStore.request_stop``, checked at most once a second)."""
        if self.stop_event.wait(seconds):
            raise RunStopped("the run was stopped before it finished")
        self._check_stop_request()

    def _check_stop_request(self) -> None:
        if self.store is None or not self.run_id or time.monotonic() < self._next_stop_check:
            return
        self._next_stop_check = time.monotonic() + 1.0
        requested_by = self.store.stop_requested(self.run_id)
        if requested_by is not None:
            self.stop_event.set()
            raise RunStopped(f"stopped by {requested_by} before it finished")

    # ---- sites and sampling ------------------------------------------------------------------
    def _identify(self, grid: Grid, node_ids: list[int]) -> None:
        """Ask nodes not seen before who they are (``query.identify``); bounded wait."""
        unknown = [n for n in node_ids if n not in self._sites]
        if not unknown:
            return
        queries = [Message(RecordDict(), dst_node_id=n, message_type="query.identify") for n in unknown]
        names: dict[int, str] = {}
        devices: dict[int, str] = {}
        refused_app: dict[int, str] = {}
        deadline = time.monotonic() + min(self.settings.round_timeout, self.settings.wait_for_nodes)
        message_ids = list(grid.push_messages(queries))
        asked = dict(zip(message_ids, unknown, strict=True))
        pending = set(message_ids)
        while pending and time.monotonic() < deadline:
            for reply in grid.pull_messages(pending):
                pending.discard(reply.metadata.reply_to_message_id)
                if reply.has_error() and reply.error.code == ErrorCode.INVALID_FAB:
                    refused_app[asked[reply.metadata.reply_to_message_id]] = reply.error.reason
                if reply.has_content() and "site" in reply.content.config_records:
                    names[reply.metadata.src_node_id] = str(reply.content["site"].get("name", ""))
                    devices[reply.metadata.src_node_id] = str(reply.content["site"].get("device", ""))[:200]
            if pending:
                self._pause(0.05)
        for node_id in unknown:
            name, refusal = self._name(node_id, names.get(node_id, ""))
            refusal = refusal or refused_app.get(node_id)
            client_id = stable_client_id(name)
            if client_id in self._by_client:
                log(WARNING, "two clients call themselves '%s'; node %s keeps its node id", name, node_id)
                name, client_id = f"{name}@node-{node_id}", stable_client_id(f"{name}@node-{node_id}")
            site = Site(node_id, client_id, name, devices.get(node_id, ""))
            self._sites[node_id] = site
            self._by_client[client_id] = site
            if refusal:
                self.retired[client_id] = refusal
                log(WARNING, "%s is not used: %s", _who(site), refusal)

    def _name(self, node_id: int, claimed: str) -> tuple[str, str | None]:
        """A node's site name and, if it must not take part, why. With an enrolment registry (a
        deployment) the name is the one enrolled with the node's key: a node that claims another
        name, or whose key nobody enrolled, is refused. Without one (simulation) it is the name the
        node gives, else ``node-<id>``."""
        if self.enrolled is None:
            return claimed or f"node-{node_id}", None
        enrolled = self.enrolled.get(node_id)
        if enrolled is None:
            return f"node-{node_id}", "its key is not enrolled with this coordinator (`fedserver enrol`)"
        if claimed and claimed != enrolled:
            return enrolled, f"it claims to be '{claimed}' but its key is enrolled as '{enrolled}'"
        return enrolled, None

    def _sample(self, grid: Grid, server_round: int, fraction: float, phase: str) -> list[Site]:
        deadline = time.monotonic() + self.settings.wait_for_nodes
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= self.settings.min_available_nodes:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {len(nodes)} of the {self.settings.min_available_nodes} required clients "
                    f"connected within {self.settings.wait_for_nodes:.0f} s"
                )
            self._pause(1.0)
        self._identify(grid, nodes)
        self.population = len(nodes)
        sites = sorted((self._sites[n] for n in nodes if self._sites[n].client_id not in self.retired),
                       key=lambda site: site.client_id)
        if not sites:
            raise NoEligibleSites(
                f"every connected site has declined to train ({'; '.join(sorted(set(self.retired.values())))[:300]})"
            )
        wanted = max(round(len(sites) * fraction), self.settings.min_train_nodes if phase == "train" else 1, 1)
        rng = random.Random(f"{self.settings.seed}:{server_round}:{phase}")
        return sorted(rng.sample(sites, min(wanted, len(sites))), key=lambda site: site.name)

    # ---- Strategy API ------------------------------------------------------------------------
    def _messages(
        self, plan: Mapping[ClientId, Instruction], config: ConfigRecord, message_type: str, server_round: int
    ) -> list[Message]:
        """One message per planned client; instructions sharing one arrays dict share one record."""
        phase = message_type.split(".")[-1]
        encoded: dict[int, ArrayRecord] = {}
        messages = []
        for client_id, instruction in plan.items():
            site = self._by_client[client_id]
            parts = instruction.to_record()
            parts.config = {**config, **self.settings.message_config, **parts.config,
                            "strategy": self.algorithm.name, "server-round": server_round}
            key = id(instruction.arrays)
            if instruction.arrays and key not in encoded:
                encoded[key] = array_record(instruction.arrays)
            message = Message(
                to_recorddict(parts, encoded.get(key)),
                dst_node_id=site.node_id,
                message_type=message_type,
                group_id=str(server_round),
            )
            self._ledger.client(phase, site).bytes_down = message_wire_bytes(message)
            messages.append(message)
        return messages

    def screen(self, message: Message, phase: str, *, retire_on_refusal: bool = True) -> tuple[Site, bool]:
        """Account a reply's bytes (added to its site's record of ``phase``) and whether its content
        is usable; on an error, a refusal or a refused app, record why (a refusal retires the site
        unless ``retire_on_refusal`` is false); a fatal reply stops the run."""
        site = self._sites[self._recipients.pop(message.metadata.reply_to_message_id, message.metadata.src_node_id)]
        record = self._ledger.client(phase, site)
        record.bytes_up += message_wire_bytes(message)
        if message.has_error() and message.error.code == ErrorCode.INVALID_FAB:  # the site will not run this app
            record.status, record.error = "refused", f"{_who(site)}: {message.error.reason}"
            self.retired[site.client_id] = message.error.reason
            log(WARNING, "%s refused the app and will not be asked again: %s", _who(site), message.error.reason)
            return site, False
        if message.has_error():
            record.status, record.error = "failed", f"{_who(site)}: {message.error.code}: {message.error.reason}"
            log(WARNING, "%s failed: %s", _who(site), record.error)
            return site, False
        reason = fatal_reason(message.content)
        if reason is not None:
            record.status, record.error = "failed", f"{_who(site)}: {reason}"
            raise RunAborted(f"{_who(site)} stopped the run: {reason}")
        refusal = refusal_reason(message.content)
        if refusal is not None:
            record.status, record.error = "refused", f"{_who(site)}: {refusal}"
            if retire_on_refusal:
                self.retired[site.client_id] = refusal
                log(WARNING, "%s declined and will not be asked again: %s", _who(site), refusal)
            else:
                log(WARNING, "%s declined: %s", _who(site), refusal)
            return site, False
        return site, True

    def _decode(self, message: Message, phase: str) -> tuple[Site, Payload | None]:
        """Account a reply's bytes and decode it; on error or a malformed reply, record why."""
        site, usable = self.screen(message, phase)
        if not usable:
            return site, None
        record = self._ledger.client(phase, site)
        try:
            payload = Payload.from_record(from_recorddict(message.content))
            record.num_examples = payload.num_examples
            record.metrics = {k: float(v) for k, v in payload.metrics.items()}
        except PayloadError as err:
            record.status, record.error = "rejected", f"{_who(site)}: {err}"
            log(WARNING, "round %s: rejected the reply of %s: %s", message.metadata.group_id, _who(site), err)
            return site, None
        except Exception as err:  # noqa: BLE001 (a reply no check foresaw costs its site the round, not the run)
            record.status, record.error = "rejected", f"{_who(site)}: undecodable reply ({type(err).__name__})"
            log(WARNING, "round %s: rejected the reply of %s: %s", message.metadata.group_id, _who(site),
                repr(err)[:200])
            return site, None
        return site, payload

    def _probe(
        self, grid: Grid, server_round: int, sites: list[Site], config: ConfigRecord
    ) -> tuple[set[ClientId], dict[ClientId, Payload]]:
        """The algorithm's optional probe exchange (e.g. layer scores): who was asked, usable replies."""
        plan = self.algorithm.probe(server_round, [site.client_id for site in sites], self.state)
        if not plan:
            return set(), {}
        probes: dict[ClientId, Payload] = {}
        messages = self._messages(plan, config, "query.probe", server_round)
        for message in self.exchange(grid, messages, "probe", server_round):
            site, payload = self._decode(message, "probe")
            if payload is None:
                continue
            record = self._ledger.client("probe", site)
            try:
                self.algorithm.check_probe(site.client_id, payload)
            except PayloadError as err:
                record.status, record.error = "rejected", f"{_who(site)}: {err}"
                continue
            record.status = "ok"
            probes[site.client_id] = payload
        for client_id in plan:
            if client_id not in probes:
                self.algorithm.forget(client_id)
        return set(plan), probes

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if not self.state:
            self.state = self.algorithm.init_state(arrays.to_torch_state_dict(), self.layers)
        sites = self._sample(grid, server_round, self.settings.fraction_train, "train")
        self.algorithm.set_population(self.population)
        asked, probes = self._probe(grid, server_round, sites, config)
        clients = [s.client_id for s in sites if s.client_id in probes or s.client_id not in asked]  # drop failed
        plan = self.algorithm.plan(server_round, clients, self.state, probes)
        if self.settings.secure_aggregation:
            from fedserver.secure_exchange import secure_instructions

            plan, self.secure_round = secure_instructions(self.settings.secure_aggregation, plan)
        return self._messages(plan, config, "train", server_round)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.settings.secure_aggregation:
            from fedserver.secure_exchange import securely_summed

            return self.fold(server_round, securely_summed(self, server_round, replies))
        if self.settings.central_dp:
            from fedserver.secure_exchange import centrally_noised

            return self.fold(server_round, centrally_noised(self, server_round, self._decode_train(replies)))
        return self.fold(server_round, self._decode_train(replies))

    def fold(self, server_round: int, replies: Iterable[Reply]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Let the algorithm aggregate ``replies`` and record each site's outcome. A reply from
        :data:`~aggregators.base.SUM_CLIENT` (a sum) stands for every site ``sum_parts`` names."""
        self.sum_parts: list[ClientId] = []
        self.sum_metrics: dict[str, float] = {}
        result = self.algorithm.aggregate(server_round, self.state, replies)
        result.metrics.update(self.sum_metrics)

        def sites_of(client_id: ClientId) -> list[Site]:
            return [self._by_client[c] for c in self.sum_parts] if client_id == SUM_CLIENT else \
                [self._by_client[client_id]]

        for client_id, reason in result.rejected.items():
            for site in sites_of(client_id):
                record = self._ledger.client("train", site)
                record.status, record.error = "rejected", f"{_who(site)}: {reason}"
                log(WARNING, "round %s: rejected the reply of %s: %s", server_round, _who(site), reason)
        for client_id in result.accepted:
            for site in sites_of(client_id):
                self._ledger.client("train", site).status = "ok"
        for client_id, detail in result.details.items():
            for site in sites_of(client_id):
                self._ledger.client("train", site).details.update(detail)
        for (phase, node_id), record in self._ledger.clients.items():
            if phase == "train" and record.status != "ok":
                self.algorithm.forget(self._sites[node_id].client_id)
        if not result.accepted:
            log(WARNING, "round %s: no usable reply; the global model is unchanged", server_round)
            return None, MetricRecord(dict(result.metrics)) if result.metrics else None
        self.state = result.state
        return ArrayRecord(self.state), MetricRecord(dict(result.metrics)) if result.metrics else None

    def _decode_train(self, replies: Iterable[Message]) -> Iterator[Reply]:
        for message in replies:
            site, payload = self._decode(message, "train")
            if payload is not None:
                self._ledger.client("train", site).status = "pending"
                yield Reply(site.client_id, payload)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.settings.fraction_evaluate == 0.0:
            return []
        sites = self._sample(grid, server_round, self.settings.fraction_evaluate, "evaluate")
        messages = []
        packed = array_record({key: array.numpy() for key, array in arrays.items()})  # the wire's layout
        for site in sites:
            content = RecordDict(
                {ARRAYS: packed, CONFIG: ConfigRecord({**config, "server-round": server_round})}
            )
            message = Message(content, dst_node_id=site.node_id, message_type="evaluate", group_id=str(server_round))
            self._ledger.client("evaluate", site).bytes_down = message_wire_bytes(message)
            messages.append(message)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        sums: dict[str, float] = {}
        total = 0
        for message in replies:
            site, payload = self._decode(message, "evaluate")
            if payload is None:
                continue
            record = self._ledger.client("evaluate", site)
            try:
                values = {k: float(payload.metrics[k]) for k in ("loss", "accuracy")}
            except (KeyError, TypeError, ValueError) as err:
                record.status, record.error = "rejected", f"{_who(site)}: malformed evaluation reply ({err!r})"
                continue
            record.status, record.metrics = "ok", values
            if payload.num_examples > 0:
                total += payload.num_examples
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + payload.num_examples * v
        if not total:
            return None
        return MetricRecord({k: v / total for k, v in sums.items()})

    def summary(self) -> None:
        s = self.settings
        log(INFO, "\t├── algorithm: %s %s", self.algorithm.name, getattr(self.algorithm, "config", ""))
        log(INFO, "\t├── fraction-train %.2f, fraction-evaluate %.2f, min-train-nodes %d", s.fraction_train,
            s.fraction_evaluate, s.min_train_nodes)
        log(INFO, "\t└── round timeout %.0f s, checkpoint every %d rounds", s.round_timeout, s.checkpoint_every)

    # ---- the round loop ----------------------------------------------------------------------
    def exchange(self, grid: Grid, messages: list[Message], phase: str, server_round: int) -> Iterator[Message]:
        """Push ``messages`` and yield replies as they arrive, until all came or the timeout."""
        if not messages:
            return
        message_ids = list(grid.push_messages(messages))
        self._recipients.update(zip(message_ids, (m.metadata.dst_node_id for m in messages), strict=True))
        pending = set(message_ids)
        total = len(pending)
        del messages
        deadline = time.monotonic() + self.settings.round_timeout
        while pending and time.monotonic() < deadline:
            with replies_due_by(deadline):
                arrived = list(grid.pull_messages(pending))
            for reply in arrived:
                pending.discard(reply.metadata.reply_to_message_id)
            while arrived:
                yield arrived.pop(0)  # hand over one at a time; the consumer folds and drops it
                if self.observer:
                    self.observer.phase_progress(server_round, phase, total - len(pending) - len(arrived), total)
            if pending:
                self._pause(0.05)
        if pending:
            log(WARNING, "round %s: %d %s replies missing after %.0f s", server_round, len(pending), phase,
                self.settings.round_timeout)
        for message_id in pending:
            self._recipients.pop(message_id, None)

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        first_round: int = 1,
    ) -> Result:
        """Run rounds ``first_round``..``num_rounds``; record each in the store. ``timeout`` is per
        phase. A resumed run passes its checkpoint as ``initial_arrays`` and the next round."""
        self.settings.round_timeout = timeout
        self.grid = grid
        log(INFO, "Starting %s on fedtune's AlgorithmStrategy:", self.algorithm.name)
        self.summary()
        train_config = train_config or ConfigRecord()
        evaluate_config = evaluate_config or ConfigRecord()
        self.state = self.algorithm.init_state(initial_arrays.to_torch_state_dict(), self.layers)
        arrays = initial_arrays
        result = Result()
        if self.central_evaluate and first_round == 1:
            central = self.central_evaluate(0, self.state)
            result.evaluate_metrics_serverapp[0] = MetricRecord(central)
            if self.store and self.run_id:
                self.store.record_initial(self.run_id, central)
            log(INFO, "round 0: central evaluation %s", _fmt(central))
        for server_round in range(first_round, num_rounds + 1):
            started, t0 = now(), time.perf_counter()
            self._ledger = _RoundLedger()
            self._next_stop_check = 0.0
            self._check_stop_request()
            if self.observer:
                self.observer.round_started(server_round, num_rounds)
            try:
                messages = list(self.configure_train(server_round, arrays, ConfigRecord(dict(train_config)), grid))
            except NoEligibleSites as err:
                self.ended_early = f"ended after round {server_round - 1} of {num_rounds}: {err}"
                log(WARNING, "%s", self.ended_early)
                break
            new_arrays, train_metrics = self.aggregate_train(
                server_round, self.exchange(grid, messages, "train", server_round)
            )
            if new_arrays is not None:
                arrays = new_arrays
            if train_metrics is not None:
                result.train_metrics_clientapp[server_round] = train_metrics
            messages = list(self.configure_evaluate(server_round, arrays, ConfigRecord(dict(evaluate_config)), grid))
            federated = self.aggregate_evaluate(server_round, self.exchange(grid, messages, "evaluate", server_round))
            if federated is not None:
                result.evaluate_metrics_clientapp[server_round] = federated
            central = self.central_evaluate(server_round, self.state) if self.central_evaluate else {}
            if central:
                result.evaluate_metrics_serverapp[server_round] = MetricRecord(central)
            record = RoundRecord(
                round=server_round,
                started_at=started,
                seconds=time.perf_counter() - t0,
                clients=list(self._ledger.clients.values()),
                train_loss=(dict(train_metrics).get("train-loss") if train_metrics else None),
                metrics=dict(train_metrics) if train_metrics else {},
                central=central,
                federated=dict(federated) if federated else {},
            )
            for client in record.clients:
                if client.status == "pending":  # decoded, but the algorithm neither used nor refused it
                    client.status, client.error = "failed", "reply was not aggregated"
            self.history.append(record)
            if self.store and self.run_id:
                self.store.record_round(self.run_id, record)
                every = self.settings.checkpoint_every
                if every > 0 and (server_round % every == 0 or server_round == num_rounds):
                    self.store.save_checkpoint(self.run_id, server_round, self.state,
                                               keep=self.settings.keep_checkpoints)
            log(INFO, "round %d/%d: %s, %.1f s, %.2f MB down, %.2f MB up", server_round, num_rounds,
                ", ".join(filter(None, (_fmt(central), self._train_loss_text(record.train_loss)))), record.seconds,
                record.bytes_down / 1e6, record.bytes_up / 1e6)
            if self.observer:
                self.observer.round_finished(record)
        result.arrays = ArrayRecord({k: v for k, v in self.state.items()})
        return result


def train_loss_text(train_loss: float | None, local_dp: bool) -> str:
    """How a round's mean training loss reads in logs and tables: under local DP sites withhold
    it (it depends on their data), which is not the same as a loss that is not a number."""
    if train_loss is not None:
        return f"train-loss {train_loss:.4f}"
    return "train-loss withheld (local DP)" if local_dp else "no train-loss reported"


def _who(site: Site) -> str:
    return f"site '{site.name}' (node {site.node_id})"


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float)))

