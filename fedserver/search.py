"""The querier's side of encrypted search: :func:`prepare_search` (the ``fedserver search``
process) and :func:`run_search` (the ServerApp run in ``mode="search"``), a thin adapter that moves
:mod:`privacy.vector_search` messages through the Grid and records each site's part in the store.

What stays on the coordinator host, and where (``base`` is the deployment directory, or the store's
directory in simulation): the querier's Ed25519 identity (``querier.key``, 0600; sites trust
``querier.key.pub``), its CKKS key epochs (``search-epochs/<epoch>.secret``, 0600, reused until
they expire, so a site receives the 36 MB of public keys once per epoch, not once per query) and the
secret salt of the stored text hashes (``search-salt``, 0600).

The query text and its embedding never leave the querier process: it embeds and encrypts the
query, signs it and writes the *encrypted* request to the run store (``search_requests``); the
run config carries only the request's id. Nothing the SuperLink stores, no process command line,
no log and no message holds the text; the store keeps an HMAC of it.

One run answers one request: send the key bundle to the sites that have not acknowledged this
epoch (and to any that answers ``unknown-key-epoch``), send the query, decrypt and merge the
global top-k, fetch exactly k rows from every site that answered, and log the hits (document ids
and scores only).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import pathlib
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from fedclient.wire import message_wire_bytes, refusal_code, refusal_reason
from fedserver.grid_waits import replies_due_by
from fedserver.store import RunStore, StoreError
from privacy.he_backends import CkksParameters, choose_backend
from privacy.state_file import write_atomic
from privacy.vector_search import (
    DEFAULT_ROW_BOUND,
    EncryptedQuery,
    Hit,
    KeyEpoch,
    Querier,
    QuerierIdentity,
    SearchError,
)

SEARCH, REPLY = "search", "search-reply"
EPOCHS = "search-epochs"


@dataclass
class SearchOutcome:
    query_id: str
    hits: list[Hit]
    refusals: dict[str, str]
    bytes_up: int
    bytes_down: int
    key_bytes: int
    seconds: float
    exchanges: int = 0
    keys_sent: int = 0
    exchange_seconds: list[float] = field(default_factory=list)  # each message round, push to last reply


def coordinator_directory(store_url: str) -> pathlib.Path:
    """Where the querier's secrets live: the deployment directory when this process belongs to one
    (``FEDTUNE_DEPLOYMENT``, set by ``fedserver start``), else the SQLite store's directory."""
    if os.environ.get("FEDTUNE_DEPLOYMENT"):
        return pathlib.Path(os.environ["FEDTUNE_DEPLOYMENT"])
    if store_url.startswith("sqlite:///"):
        return pathlib.Path(store_url.split("///", 1)[1]).resolve().parent
    raise SearchError("encrypted search keeps its keys next to a SQLite run store; use a sqlite:/// store")


def text_digest(base: pathlib.Path, text: str) -> str:
    """HMAC-SHA256 of ``text`` under the deployment's secret salt (``base/search-salt``, created 0600)."""
    salt_file = base / "search-salt"
    if not salt_file.exists():
        try:  # O_EXCL: two first searches at once end up with one salt
            descriptor = os.open(salt_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(secrets.token_bytes(32))
                handle.flush()
                os.fsync(handle.fileno())
        except FileExistsError:
            pass
    return hmac.new(salt_file.read_bytes(), text.encode(), hashlib.sha256).hexdigest()


def check_query(text: str, k: int, row_bound: int) -> str:
    """The query text, stripped; SearchError naming what is wrong with the request."""
    text = text.strip()
    if not text:
        raise SearchError("the query is empty")
    if not 1 <= k <= 1000:
        raise SearchError(f"k must be in 1..1000, got {k}")
    if not 1 <= row_bound <= 1_000_000:
        raise SearchError(f"the row bound must be in 1..1000000, got {row_bound}")
    return text


def current_epoch(base: pathlib.Path, backend: str = "auto") -> tuple[KeyEpoch, bool]:
    """The deployment's current key epoch for ``backend`` (a new one, saved, when none is valid:
    then every site receives its keys on the next search) and whether it is new."""
    identity = QuerierIdentity.load_or_create(base / "querier.key")
    return KeyEpoch.current(identity, base / EPOCHS, choose_backend(backend, CkksParameters()))


def encrypt_query(base: pathlib.Path, epoch: KeyEpoch, text: str, embed: Callable[[list[str]], Any], *,
                  k: int, row_bound: int) -> EncryptedQuery:
    """``text`` (checked by :func:`check_query`) embedded with ``embed``, encrypted under ``epoch`` and
    signed with the querier identity in ``base``."""
    identity = QuerierIdentity.load_or_create(base / "querier.key")
    return Querier(identity, epoch).encrypt(embed([text])[0], k=k, row_bound=row_bound)


def prepare_search(store: RunStore, text: str, *, k: int = 10, backend: str = "auto",
                   row_bound: int = DEFAULT_ROW_BOUND) -> tuple[str, bool]:
    """Embed, encrypt and sign ``text`` as a search request in ``store`` for a one-off search run
    (``mode="search"``); its id and whether a new key epoch was made. Runs in the querier's own
    process: the text and its embedding go no further."""
    from fedclient.tasks.embedding import Embedder

    text = check_query(text, k, row_bound)
    base = coordinator_directory(store.url)
    epoch, new = current_epoch(base, backend)
    query = encrypt_query(base, epoch, text, Embedder(), k=k, row_bound=row_bound)
    record = {key: base64.b64encode(value).decode() if isinstance(value, bytes) else value
              for key, value in query.to_record().items()}
    payload = {"epoch": epoch.bundle.epoch, "query": record, "text-digest": text_digest(base, text)}
    store.add_search_request(query.query_id, json.dumps(payload).encode())
    return query.query_id, new


def _take_request(store: RunStore, request_id: str) -> tuple[str, EncryptedQuery, str]:
    try:
        payload = json.loads(store.take_search_request(request_id))
        record = {key: base64.b64decode(value) if key in ("ciphertext", "querier", "signature") else value
                  for key, value in payload["query"].items()}
        return str(payload["epoch"]), EncryptedQuery.from_record(record), str(payload["text-digest"])
    except (StoreError, KeyError, ValueError, TypeError) as err:
        raise SearchError(f"search request '{request_id}' cannot be used ({err}); submit searches with "
                          "`fedserver search`") from err


class _Exchange:
    """Sends one kind of search message to sites and collects replies, counting bytes."""

    def __init__(self, grid: Grid, timeout: float) -> None:
        self.grid, self.timeout = grid, timeout
        self.bytes_up = self.bytes_down = self.rounds = 0
        self.seconds: list[float] = []

    def __call__(self, contents: Mapping[int, dict[str, Any]], message_type: str = "query.search") -> dict[int, Message]:
        if not contents:
            return {}
        self.rounds += 1
        started = time.monotonic()
        messages = [Message(RecordDict({SEARCH: ConfigRecord(dict(content))}), dst_node_id=node,
                            message_type=message_type) for node, content in contents.items()]
        self.bytes_down += sum(message_wire_bytes(m) for m in messages)
        ids = list(self.grid.push_messages(messages))
        recipient = dict(zip(ids, contents, strict=True))
        replies: dict[int, Message] = {}
        deadline = time.monotonic() + self.timeout
        pending = set(ids)
        while pending and time.monotonic() < deadline:
            with replies_due_by(deadline):
                arrived = list(self.grid.pull_messages(pending))
            for reply in arrived:
                pending.discard(reply.metadata.reply_to_message_id)
                self.bytes_up += message_wire_bytes(reply)
                replies[recipient[reply.metadata.reply_to_message_id]] = reply
            if pending:
                time.sleep(0.05)
        self.seconds.append(time.monotonic() - started)
        return replies


MAX_SITE_TEXT = 500  # characters kept of what a site says: a refusal reason, a document id


def _reason(reply: Message | None) -> str | None:
    """Why ``reply`` cannot be used (at most :data:`MAX_SITE_TEXT` characters: sites write it), or None."""
    reason = _unusable(reply)
    return None if reason is None else reason[:MAX_SITE_TEXT]


def _unusable(reply: Message | None) -> str | None:
    if reply is None:
        return "no reply within the timeout"
    if reply.has_error():
        return f"{reply.error.code}: {reply.error.reason}"
    refusal = refusal_reason(reply.content)
    if refusal is not None:
        return refusal
    if REPLY not in reply.content.config_records:
        return "malformed reply"
    return None


def _acknowledged(path: pathlib.Path) -> dict[str, str]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def run_search(grid: Grid, config: Mapping[str, Any], names: Mapping[int, str] | None = None,
               min_sites: int = 1, timeout: float = 600.0) -> SearchOutcome:
    """Answer the search request ``config["search-request"]`` (a one-off search run) across the
    connected sites: :func:`answer_query`."""
    store = RunStore(str(config["store"]))
    base = coordinator_directory(store.url)
    epoch_id, query, digest = _take_request(store, str(config["search-request"]))
    epoch = KeyEpoch.load(base / EPOCHS, epoch_id)
    return answer_query(grid, store, epoch, query, digest, names=names, min_sites=min_sites, timeout=timeout)


def answer_query(grid: Grid, store: RunStore, epoch: KeyEpoch, query: EncryptedQuery, digest: str, *,
                 names: Mapping[int, str] | None = None, min_sites: int = 1, timeout: float = 600.0) -> SearchOutcome:
    """Answer ``query`` (made under ``epoch``; ``digest`` is its text's HMAC) across the connected
    sites (named by ``names``, the enrolment registry, when given; else by their own
    ``query.identify`` answer); records every site's part in ``store``."""
    started = time.perf_counter()
    base = coordinator_directory(store.url)
    epoch_id = epoch.bundle.epoch
    epoch.bundle.check_current()
    identity = QuerierIdentity.load_or_create(base / "querier.key")
    if epoch.bundle.querier != identity.public_bytes or query.key_id != epoch.bundle.key_id:
        raise SearchError("the search request was not made with this coordinator's querier key and epoch")
    querier = Querier(identity, epoch)
    deadline = time.monotonic() + 120
    while len(nodes := sorted(grid.get_node_ids())) < min_sites:
        if time.monotonic() > deadline:
            raise SearchError(f"only {len(nodes)} of {min_sites} sites connected within 120 s")
        time.sleep(1)
    exchange = _Exchange(grid, timeout)
    if names is None:  # simulation: the sites' own names (fedclient's identify handler)
        named = exchange({n: {} for n in nodes}, "query.identify")
        names = {n: str(m.content["site"].get("name", "")) for n, m in named.items()
                 if not m.has_error() and "site" in m.content.config_records}
    else:  # a deployment: enrolled nodes only, under their enrolled names
        nodes = [n for n in nodes if n in names]
    site = {n: names.get(n) or f"node-{n}" for n in nodes}
    refusals: dict[str, str] = {}
    bundle = epoch.bundle.to_bytes()
    acks_file = base / EPOCHS / f"{epoch_id}.acks.json"
    acks = _acknowledged(acks_file)
    keys_sent = 0

    def send_keys(targets: list[int]) -> list[int]:
        nonlocal keys_sent
        if not targets:
            return []
        log(INFO, "search: key epoch %s (%.1f MB of public keys) to %d site(s)", epoch_id, len(bundle) / 1e6,
            len(targets))
        keys_sent += len(targets)
        replies = exchange({n: {"kind": "keys", "bundle": bundle} for n in targets})
        accepted = []
        for node in targets:
            reason = _reason(replies.get(node))
            if reason:
                refusals[site[node]] = reason
            else:
                acks[site[node]] = epoch.bundle.key_id
                accepted.append(node)
        write_atomic(acks_file, json.dumps(acks).encode())
        return accepted

    ready = [n for n in nodes if acks.get(site[n]) == epoch.bundle.key_id]
    ready += send_keys([n for n in nodes if n not in ready])
    results: dict[str, list[bytes]] = {}
    for attempt in (1, 2):
        answers = exchange({n: {"kind": "query", **query.to_record()} for n in ready})
        lost = []
        for node in ready:
            reply = answers.get(node)
            if attempt == 1 and reply is not None and not reply.has_error() \
                    and refusal_code(reply.content) == "unknown-key-epoch":
                acks.pop(site[node], None)  # the site lost or pruned the bundle: send it again
                lost.append(node)
                continue
            reason = _reason(reply)
            raw = None if reason else reply.content.config_records[REPLY].get("results")
            if not reason and not (isinstance(raw, list) and all(isinstance(b, bytes) for b in raw)):
                reason = "malformed reply"
            if reason:
                refusals[site[node]] = reason
            else:
                results[site[node]] = list(raw)
        ready = send_keys(lost)
        if not ready:
            break
    scores = {}
    for name, ciphertexts in results.items():  # a site's reply is as untrusted as the site
        try:
            scores[name] = querier.site_scores(ciphertexts, query.row_bound)
        except SearchError as err:
            refusals[name] = f"unusable reply: {err}"
    hits = querier.top_k(scores, query.k)
    by_name = {site[n]: n for n in nodes}
    requests = querier.fetch_requests(query.query_id, hits, scores, query.k)
    fetched = exchange({by_name[s]: {"kind": "fetch", "query-id": r.query_id, "rows": list(r.rows),
                                     "querier": r.querier, "signature": r.signature} for s, r in requests.items()})
    replies = {}
    for name in requests:
        reason = _reason(fetched.get(by_name[name]))
        ids = None if reason else fetched[by_name[name]].content.config_records[REPLY].get("ids")
        if not reason and not (isinstance(ids, list) and len(ids) == len(requests[name].rows)):
            reason = f"unusable fetch reply: not one id for each of the {len(requests[name].rows)} rows"
        if reason:
            refusals[name] = reason
            ids = [""] * len(requests[name].rows)
        replies[name] = [str(i)[:MAX_SITE_TEXT] for i in ids]
    hits = Querier.resolve(hits, requests, replies)
    for name, reason in refusals.items():
        log(WARNING, "search: site '%s' did not answer: %s", name, reason)
    for rank, hit in enumerate(hits, start=1):
        log(INFO, "search hit %d: %.4f  %s  %s", rank, hit.score, hit.site, hit.document_id)
    outcome = SearchOutcome(query.query_id, hits, refusals, exchange.bytes_up, exchange.bytes_down, len(bundle),
                            time.perf_counter() - started, exchange.rounds, keys_sent, exchange.seconds)
    store.record_search(query_id=query.query_id, querier=identity.fingerprint, text_digest=digest, k=query.k,
                        sites={s: refusals.get(s, "ok") for s in site.values()}, hits=[h.__dict__ for h in hits],
                        bytes_up=outcome.bytes_up, bytes_down=outcome.bytes_down, seconds=outcome.seconds)
    return outcome
