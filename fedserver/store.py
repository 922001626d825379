"""The run store: runs, rounds, per-client participation, metrics, bytes and checkpoints.

SQLite by default (one file per deployment), reached through SQLAlchemy so a PostgreSQL URL works
too. One schema, versioned in the ``meta`` table; a store written by another schema version is
refused rather than silently misread. Every round is written in one transaction, so a crash never
leaves half a round behind.
"""

from __future__ import annotations

import datetime as dt
import os
import pathlib
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    JSON,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    create_engine,
    delete,
    event,
    func,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

if TYPE_CHECKING:  # torch loads only where checkpoints are written or read: the CLI's other commands stay quick
    import torch

SCHEMA_VERSION = 2  # 2: sites, per-client details, the initial evaluation
FLOWER_RUN_ID = "flower-run-id"
"""The key under which a run's config records the id of the Flower run executing it."""

class StoreError(RuntimeError):
    """The store cannot be used (bad URL, other schema version, unknown run)."""


class Base(DeclarativeBase):
    pass


class Meta(Base):
    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class RunRow(Base):
    __tablename__ = "runs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    task: Mapped[str] = mapped_column(String(100))
    strategy: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(20), default="running")
    config: Mapped[dict] = mapped_column(JSON, default=dict)
    num_rounds: Mapped[int] = mapped_column(Integer)
    num_clients: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column()
    finished_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    initial_metrics: Mapped[dict] = mapped_column(JSON, default=dict)  # central eval before round 1


CENTRAL_COLUMNS = ("loss", "accuracy")


def central_extras(central: Mapping[str, float]) -> dict[str, float]:
    """A central evaluation's metrics beyond loss and accuracy (macro-F1; perplexity and exact
    match for a causal LM), as the round's ``metrics`` keep them: prefixed ``central-``."""
    return {f"central-{k}": v for k, v in central.items() if k not in CENTRAL_COLUMNS}


class RoundRow(Base):
    __tablename__ = "rounds"
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    started_at: Mapped[dt.datetime] = mapped_column()
    seconds: Mapped[float] = mapped_column(Float)
    num_sampled: Mapped[int] = mapped_column(Integer, default=0)
    num_accepted: Mapped[int] = mapped_column(Integer, default=0)
    num_rejected: Mapped[int] = mapped_column(Integer, default=0)
    num_failed: Mapped[int] = mapped_column(Integer, default=0)
    bytes_down: Mapped[int] = mapped_column(Integer, default=0)
    bytes_up: Mapped[int] = mapped_column(Integer, default=0)
    train_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    central_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    central_accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    federated_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    federated_accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)


class ClientRoundRow(Base):
    __tablename__ = "client_rounds"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    round: Mapped[int] = mapped_column(Integer)
    phase: Mapped[str] = mapped_column(String(16))  # probe | train | evaluate
    node_id: Mapped[str] = mapped_column(String(24))  # uint64 node ids exceed SQL BIGINT
    site: Mapped[str] = mapped_column(String(200), default="")
    status: Mapped[str] = mapped_column(String(16))  # ok | rejected | failed | timeout
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    num_examples: Mapped[int] = mapped_column(Integer, default=0)
    bytes_down: Mapped[int] = mapped_column(Integer, default=0)
    bytes_up: Mapped[int] = mapped_column(Integer, default=0)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    details: Mapped[dict] = mapped_column(JSON, default=dict)  # e.g. {"layers": [...]} it trained


class CheckpointRow(Base):
    __tablename__ = "checkpoints"
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column()
    sha256: Mapped[str] = mapped_column(String(64))
    num_bytes: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class RunRequestRow(Base):
    """An operator's request to a running run (``stop``), honoured by the coordinator at its next wait.
    A table of its own, so stores written before it existed gain it without a schema change."""

    __tablename__ = "run_requests"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    requested_at: Mapped[dt.datetime] = mapped_column()
    requested_by: Mapped[str] = mapped_column(String(200), default="")


class SearchRequestRow(Base):
    """An encrypted query waiting for its search run: the querier (``fedserver search``) writes it,
    the ServerApp takes it (and deletes it). It holds the ciphertext and a keyed hash of the text,
    never the text or its embedding; the run config names only the request id."""

    __tablename__ = "search_requests"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column()
    payload: Mapped[bytes] = mapped_column(LargeBinary)


class EnrolledSiteRow(Base):
    """A site the operator enrolled (``fedserver enrol``): its name is bound to the public key Flower
    registered and to the node id that key was given, so the coordinator names a node by its key,
    never by what the node says of itself."""

    __tablename__ = "enrolled_sites"
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    node_id: Mapped[str] = mapped_column(String(24), unique=True)
    fingerprint: Mapped[str] = mapped_column(String(100))
    public_key: Mapped[str] = mapped_column(Text)
    enrolled_at: Mapped[dt.datetime] = mapped_column()


class SearchRow(Base):
    """One site's part in one encrypted search query. The query text is kept only as a keyed hash
    (HMAC-SHA256 under the deployment's secret search salt, in ``text_sha256``): whoever holds the
    salt can check whether a given text was asked; a reader of the store alone cannot."""

    __tablename__ = "searches"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    query_id: Mapped[str] = mapped_column(String(32), index=True)
    querier: Mapped[str] = mapped_column(String(64))
    text_sha256: Mapped[str] = mapped_column(String(64))
    k: Mapped[int] = mapped_column(Integer)
    site: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(Text)  # "ok" or the site's refusal
    created_at: Mapped[dt.datetime] = mapped_column()
    hits: Mapped[list] = mapped_column(JSON, default=list)  # this site's hits: row, score, document id
    bytes_up: Mapped[int] = mapped_column(Integer, default=0)  # whole query, all sites
    bytes_down: Mapped[int] = mapped_column(Integer, default=0)
    seconds: Mapped[float] = mapped_column(Float, default=0.0)


@dataclass
class ClientRecord:
    """One client's part in one phase of a round."""

    node_id: int
    phase: str
    status: str
    site: str = ""
    num_examples: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class RoundRecord:
    """What one round did, as written to the store."""

    round: int
    started_at: dt.datetime
    seconds: float
    clients: list[ClientRecord] = field(default_factory=list)
    train_loss: float | None = None
    central: dict[str, float] = field(default_factory=dict)
    federated: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def bytes_down(self) -> int:
        return sum(c.bytes_down for c in self.clients)

    @property
    def bytes_up(self) -> int:
        return sum(c.bytes_up for c in self.clients)


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def _finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if value == value and abs(value) != float("inf") else None


class RunStore:
    """Access to one run store (see module docstring)."""

    def __init__(self, url: str) -> None:
        if "://" not in url:
            raise StoreError(f"store URL '{url}' is not a database URL; use e.g. sqlite:///runs.db")
        try:
            self.engine: Engine = create_engine(url)
        except Exception as err:  # SQLAlchemy raises several types for bad URLs/drivers
            raise StoreError(f"cannot open store '{url}': {err}") from err
        if self.engine.dialect.name == "sqlite":
            _owner_only(self.engine.url.database)
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self.url = url
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        Base.metadata.create_all(self.engine)
        self._check_schema()

    def _check_schema(self) -> None:
        with self._session.begin() as session:
            row = session.get(Meta, "schema_version")
            if row is None:
                session.add(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
            elif row.value != str(SCHEMA_VERSION):
                raise StoreError(
                    f"store {self.url} has schema version {row.value}; this fedtune reads version "
                    f"{SCHEMA_VERSION}. Use a fresh --store or the fedtune release that wrote it."
                )

    # ---- writing -----------------------------------------------------------------------------
    def create_run(
        self, *, task: str, strategy: str, num_rounds: int, config: Mapping[str, Any], name: str = "", num_clients: int = 0
    ) -> str:
        run_id = now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
        with self._session.begin() as session:
            session.add(
                RunRow(
                    id=run_id,
                    name=name or run_id,
                    task=task,
                    strategy=strategy,
                    num_rounds=num_rounds,
                    num_clients=num_clients,
                    config=dict(config),
                    created_at=now(),
                )
            )
        return run_id

    def record_round(self, run_id: str, record: RoundRecord) -> None:
        """Write a round and its client rows atomically."""
        phase_train = [c for c in record.clients if c.phase == "train"]  # probe/evaluate rows are extra
        with self._session.begin() as session:
            session.add(
                RoundRow(
                    run_id=run_id,
                    round=record.round,
                    started_at=record.started_at,
                    seconds=record.seconds,
                    num_sampled=len(phase_train),
                    num_accepted=sum(c.status == "ok" for c in phase_train),
                    num_rejected=sum(c.status == "rejected" for c in phase_train),
                    num_failed=sum(c.status in ("failed", "timeout") for c in phase_train),
                    bytes_down=record.bytes_down,
                    bytes_up=record.bytes_up,
                    train_loss=_finite_or_none(record.train_loss),
                    central_loss=_finite_or_none(record.central.get("loss")),
                    central_accuracy=_finite_or_none(record.central.get("accuracy")),
                    federated_loss=_finite_or_none(record.federated.get("loss")),
                    federated_accuracy=_finite_or_none(record.federated.get("accuracy")),
                    metrics={k: v for k, v in {**record.metrics, **central_extras(record.central)}.items()
                             if _finite_or_none(v) is not None},
                )
            )
            for c in record.clients:
                session.add(
                    ClientRoundRow(
                        run_id=run_id,
                        round=record.round,
                        phase=c.phase,
                        node_id=str(c.node_id),
                        site=c.site,
                        status=c.status,
                        error=c.error,
                        num_examples=c.num_examples,
                        bytes_down=c.bytes_down,
                        bytes_up=c.bytes_up,
                        metrics={k: float(v) for k, v in c.metrics.items() if _finite_or_none(v) is not None},
                        details=dict(c.details),
                    )
                )

    def save_checkpoint(self, run_id: str, server_round: int, state: Mapping[str, torch.Tensor],
                        keep: int = 0) -> str:
        """Store the global state after ``server_round`` as safetensors; return its checksum.
        ``keep`` > 0 deletes the run's older checkpoints beyond the latest ``keep``."""
        import torch
        from safetensors.torch import save

        from aggregators.shared_randomness import state_hash

        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
        blob = save(tensors, metadata={"run": run_id, "round": str(server_round)})
        checksum = state_hash(tensors)
        with self._session.begin() as session:
            session.merge(
                CheckpointRow(
                    run_id=run_id, round=server_round, created_at=now(), sha256=checksum, num_bytes=len(blob), data=blob
                )
            )
            if keep > 0:
                kept = select(CheckpointRow.round).where(CheckpointRow.run_id == run_id) \
                    .order_by(CheckpointRow.round.desc()).limit(keep)
                session.execute(delete(CheckpointRow).where(CheckpointRow.run_id == run_id,
                                                            CheckpointRow.round.not_in(kept)))
        return checksum

    def record_initial(self, run_id: str, metrics: Mapping[str, float]) -> None:
        """The central evaluation of the initial global model (round 0)."""
        with self._session.begin() as session:
            run = session.get(RunRow, run_id)
            if run is None:
                raise StoreError(f"no run '{run_id}' in {self.url}")
            run.initial_metrics = {k: v for k, v in metrics.items() if _finite_or_none(v) is not None}

    def finish_run(self, run_id: str, status: str, error: str | None = None) -> None:
        with self._session.begin() as session:
            run = session.get(RunRow, run_id)
            if run is None:
                raise StoreError(f"no run '{run_id}' in {self.url}")
            run.status, run.error, run.finished_at = status, error, now()

    def record_search(self, *, query_id: str, querier: str, text_digest: str, k: int, sites: Mapping[str, str],
                      hits: list[dict[str, Any]], bytes_up: int, bytes_down: int, seconds: float) -> None:
        """One encrypted query: a row per site with its status and its share of the hits.
        ``text_digest`` is the querier's keyed hash of the text (the store never sees the text)."""
        digest = text_digest
        with self._session.begin() as session:
            for site, status in sites.items():
                session.add(SearchRow(query_id=query_id, querier=querier, text_sha256=digest, k=k, site=site,
                                      status=status, created_at=now(), bytes_up=bytes_up, bytes_down=bytes_down,
                                      seconds=seconds, hits=[h for h in hits if h.get("site") == site]))

    def searches(self, query_id: str | None = None) -> list[SearchRow]:
        query = select(SearchRow)
        if query_id is not None:
            query = query.where(SearchRow.query_id == query_id)
        with self._session() as session:
            return list(session.scalars(query.order_by(SearchRow.id)))

    def add_search_request(self, request_id: str, payload: bytes) -> None:
        """Store an encrypted search request; requests nobody ran within a day are deleted."""
        with self._session.begin() as session:
            session.execute(delete(SearchRequestRow).where(SearchRequestRow.created_at < now() - dt.timedelta(days=1)))
            session.add(SearchRequestRow(id=request_id, created_at=now(), payload=payload))

    def take_search_request(self, request_id: str) -> bytes:
        """The payload of a waiting search request, deleted as it is read (a request runs once)."""
        with self._session.begin() as session:
            row = session.get(SearchRequestRow, request_id)
            if row is None:
                raise StoreError(f"no search request '{request_id}' in {self.url} (each request runs once)")
            payload = bytes(row.payload)
            session.delete(row)
        return payload

    # ---- enrolled sites ----------------------------------------------------------------------
    def enrol_site(self, name: str, node_id: int, fingerprint: str, public_key: str) -> None:
        with self._session.begin() as session:
            if session.get(EnrolledSiteRow, name) is not None:
                raise StoreError(f"a site named '{name}' is already enrolled")
            session.add(EnrolledSiteRow(name=name, node_id=str(node_id), fingerprint=fingerprint,
                                        public_key=public_key, enrolled_at=now()))

    def enrolled_sites(self) -> list[EnrolledSiteRow]:
        with self._session() as session:
            return list(session.scalars(select(EnrolledSiteRow).order_by(EnrolledSiteRow.name)))

    def annotate_run(self, run_id: str, values: Mapping[str, Any]) -> None:
        """Add ``values`` to a run's stored config (e.g. the Flower run id that now executes it)."""
        with self._session.begin() as session:
            run = session.get(RunRow, run_id)
            if run is None:
                raise StoreError(f"no run '{run_id}' in {self.url}")
            run.config = {**run.config, **values}

    def request_stop(self, run_ref: str, requested_by: str = "", exact: bool = False) -> RunRow:
        """Ask a running run to stop; its coordinator ends it within about a second of its next wait,
        keeping every finished round. Refused for a run that is not running."""
        run = self.get_run(run_ref, exact=exact)
        if run.status != "running":
            raise StoreError(f"run '{run.id}' is {run.status}, not running; nothing to stop")
        with self._session.begin() as session:
            session.add(RunRequestRow(run_id=run.id, kind="stop", requested_at=now(), requested_by=requested_by))
        return run

    def stop_requested(self, run_id: str) -> str | None:
        """Who asked ``run_id`` to stop (after it last (re)started), or None."""
        with self._session() as session:
            run = session.get(RunRow, run_id)
            if run is None:
                return None
            row = session.scalars(
                select(RunRequestRow).where(RunRequestRow.run_id == run_id, RunRequestRow.kind == "stop",
                                            RunRequestRow.requested_at >= run.created_at)
                .order_by(RunRequestRow.requested_at.desc())
            ).first()
            return None if row is None else (row.requested_by or "an operator")

    def resume_run(self, run_id: str, num_rounds: int) -> tuple[int, dict[str, torch.Tensor]]:
        """Reopen a run that stopped or failed (e.g. its coordinator was killed) from its latest
        checkpoint: the run is ``running`` again with ``num_rounds`` planned; rounds recorded after
        that checkpoint (they have no weights to continue from) are dropped. Returns the
        checkpoint's round and state."""
        run = self.get_run(run_id)
        if run.status == "completed" and num_rounds <= run.num_rounds:
            raise StoreError(f"run '{run.id}' already completed its {run.num_rounds} rounds; ask for more rounds "
                             "to extend it")
        done, state = self.load_checkpoint(run.id)
        if done >= num_rounds:
            raise StoreError(f"run '{run.id}' has a checkpoint at round {done}; num-server-rounds {num_rounds} "
                             "leaves nothing to do")
        with self._session.begin() as session:
            session.execute(delete(ClientRoundRow).where(ClientRoundRow.run_id == run.id, ClientRoundRow.round > done))
            session.execute(delete(RoundRow).where(RoundRow.run_id == run.id, RoundRow.round > done))
            row = session.get(RunRow, run.id)
            row.status, row.error, row.finished_at, row.num_rounds = "running", None, None, num_rounds
            session.execute(delete(RunRequestRow).where(RunRequestRow.run_id == run.id))
        return done, state

    # ---- reading -----------------------------------------------------------------------------
    def list_runs(self) -> list[RunRow]:
        with self._session() as session:
            return list(session.scalars(select(RunRow).order_by(RunRow.created_at.desc())))

    def get_run(self, run_ref: str, exact: bool = False) -> RunRow:
        """A run by id, unique id prefix, name or the id Flower gave the run that executes it
        (``exact``: by its whole id only, as the console and anything else acting on a run for
        someone else must). StoreError names the reference; the caller adds how to list runs."""
        with self._session() as session:
            run = session.get(RunRow, run_ref)
            if run is not None:
                return run
            if exact:
                raise StoreError(f"no run with id '{run_ref}' in {self.url}")
            matches = list(
                session.scalars(select(RunRow).where((RunRow.id.startswith(run_ref)) | (RunRow.name == run_ref)))
            )
        if not matches and run_ref.isdigit() and (by_flower := self.run_of_flower_run(run_ref)) is not None:
            matches = [by_flower]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise StoreError(f"no run '{run_ref}' in {self.url}")
        raise StoreError(f"'{run_ref}' matches {len(matches)} runs; give more of the id")

    def run_of_flower_run(self, flower_run_id: int | str) -> RunRow | None:
        """The run that Flower run ``flower_run_id`` executes (the ServerApp records it), if any."""
        with self._session() as session:
            return next((r for r in session.scalars(select(RunRow).order_by(RunRow.created_at.desc()))
                         if str(r.config.get(FLOWER_RUN_ID)) == str(flower_run_id)), None)

    def rounds(self, run_id: str) -> list[RoundRow]:
        with self._session() as session:
            return list(session.scalars(select(RoundRow).where(RoundRow.run_id == run_id).order_by(RoundRow.round)))

    def client_rounds(self, run_id: str, server_round: int | None = None) -> list[ClientRoundRow]:
        query = select(ClientRoundRow).where(ClientRoundRow.run_id == run_id)
        if server_round is not None:
            query = query.where(ClientRoundRow.round == server_round)
        with self._session() as session:
            return list(session.scalars(query.order_by(ClientRoundRow.round, ClientRoundRow.id)))

    def checkpoint_size(self, run_id: str) -> int | None:
        """Bytes of the run's latest checkpoint (fp32 safetensors), or None without one."""
        with self._session() as session:
            return session.scalars(select(CheckpointRow.num_bytes).where(CheckpointRow.run_id == run_id)
                                   .order_by(CheckpointRow.round.desc())).first()

    def checkpoint_rounds(self, run_id: str) -> list[int]:
        with self._session() as session:
            return list(
                session.scalars(select(CheckpointRow.round).where(CheckpointRow.run_id == run_id).order_by(CheckpointRow.round))
            )

    def load_checkpoint(self, run_id: str, server_round: int | None = None) -> tuple[int, dict[str, torch.Tensor]]:
        """The checkpoint of ``server_round`` (default: the latest), verified against its checksum."""
        with self._session() as session:
            query = select(CheckpointRow).where(CheckpointRow.run_id == run_id)
            if server_round is not None:
                query = query.where(CheckpointRow.round == server_round)
            row = session.scalars(query.order_by(CheckpointRow.round.desc()).limit(1)).first()
        if row is None:
            raise StoreError(f"run '{run_id}' has no checkpoint" + (f" for round {server_round}" if server_round else ""))
        from safetensors.torch import load

        from aggregators.shared_randomness import state_hash

        state = load(row.data)
        if state_hash(state) != row.sha256:
            raise StoreError(f"checkpoint of run '{run_id}' round {row.round} is corrupt (checksum mismatch)")
        return row.round, state

    def count_rows(self) -> dict[str, int]:
        """Row counts per table (used by integrity checks and tests)."""
        with self._session() as session:
            return {
                table.__tablename__: session.scalar(select(func.count()).select_from(table)) or 0
                for table in (RunRow, RoundRow, ClientRoundRow, CheckpointRow)
            }


def _owner_only(database: str | None) -> None:
    """Create an SQLite store file with mode 0600 (its -wal/-shm files follow the file's mode), or
    tighten an existing one the current user owns: checkpoints and per-site records are private."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = pathlib.Path(database)
    path.parent.mkdir(parents=True, exist_ok=True)
    # never open (and close) an existing store file here: closing any descriptor of a database file
    # drops every POSIX lock this process's SQLite connections hold on it
    if not path.exists():
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass
    for sibling in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            if sibling.stat().st_uid == os.getuid() and sibling.stat().st_mode & 0o077:
                os.chmod(sibling, 0o600)
        except FileNotFoundError:
            pass


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")  # readers (fedsim show, the console) never block the run
    cursor.close()
