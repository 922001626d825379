"""The querier's side of encrypted search as a Flower ServerApp run (``mode="search"``): a thin
adapter that moves :mod:`privacy.vector_search` messages through the Grid and records each site's
part in the run store.

One run answers one query: it creates a key epoch (CKKS keys; the secret key never leaves this
process), sends the signed public bundle to every connected site, sends the encrypted query, decrypts
and merges the global top-k, fetches exactly k rows from every site and logs the hits. The querier's
Ed25519 identity is kept in ``search-identity`` (default: ``querier.key`` next to the run store);
sites must trust its public key (``querier.key.pub``).
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from fedclient.tasks.embedding import Embedder
from fedclient.wire import message_wire_bytes, refusal_reason
from fedserver.store import RunStore
from privacy.he_backends import CkksParameters, choose_backend
from privacy.vector_search import Hit, KeyEpoch, Querier, QuerierIdentity, SearchError

SEARCH, REPLY = "search", "search-reply"


@dataclass
class SearchOutcome:
    query_id: str
    hits: list[Hit]
    refusals: dict[str, str]
    bytes_up: int
    bytes_down: int
    key_bytes: int
    seconds: float


def identity_path(config: Mapping[str, Any]) -> pathlib.Path:
    if config.get("search-identity"):
        return pathlib.Path(str(config["search-identity"]))
    store = str(config["store"])
    base = pathlib.Path(store.split("///", 1)[1]).parent if store.startswith("sqlite:///") else pathlib.Path.cwd()
    return base / "querier.key"


class _Exchange:
    """Sends one kind of search message to sites and collects replies, counting bytes."""

    def __init__(self, grid: Grid, timeout: float) -> None:
        self.grid, self.timeout = grid, timeout
        self.bytes_up = self.bytes_down = 0

    def __call__(self, contents: Mapping[int, dict[str, Any]], message_type: str = "query.search") -> dict[int, Message]:
        messages = [Message(RecordDict({SEARCH: ConfigRecord(dict(content))}), dst_node_id=node,
                            message_type=message_type) for node, content in contents.items()]
        self.bytes_down += sum(message_wire_bytes(m) for m in messages)
        ids = list(self.grid.push_messages(messages))
        recipient = dict(zip(ids, contents, strict=True))
        replies: dict[int, Message] = {}
        deadline = time.monotonic() + self.timeout
        pending = set(ids)
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(pending):
                pending.discard(reply.metadata.reply_to_message_id)
                self.bytes_up += message_wire_bytes(reply)
                replies[recipient[reply.metadata.reply_to_message_id]] = reply
            if pending:
                time.sleep(0.05)
        return replies


def _reason(reply: Message | None) -> str | None:
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


def run_search(grid: Grid, config: Mapping[str, Any], names: Mapping[int, str] | None = None,
               min_sites: int = 1, timeout: float = 600.0) -> SearchOutcome:
    """Answer ``config["query"]`` across the connected sites; records every site's part in the store."""
    text, k = str(config["query"]).strip(), int(config["k"])
    if not text:
        raise SearchError("search mode needs a query: --run-config 'query=\"...\"'")
    started = time.perf_counter()
    deadline = time.monotonic() + 120
    while len(nodes := sorted(grid.get_node_ids())) < min_sites:
        if time.monotonic() > deadline:
            raise SearchError(f"only {len(nodes)} of {min_sites} sites connected within 120 s")
        time.sleep(1)
    exchange = _Exchange(grid, timeout)
    if names is None:  # the sites' own names (fedclient's identify handler)
        named = exchange({n: {} for n in nodes}, "query.identify")
        names = {n: str(m.content["site"].get("name", "")) for n, m in named.items()
                 if not m.has_error() and "site" in m.content.config_records}
    site = {n: names.get(n) or f"node-{n}" for n in nodes}
    identity = QuerierIdentity.load_or_create(identity_path(config))
    backend = choose_backend(str(config["he-backend"]), CkksParameters())
    epoch = KeyEpoch.create(identity, backend)
    querier = Querier(identity, epoch)
    refusals: dict[str, str] = {}
    bundle = epoch.bundle.to_bytes()
    log(INFO, "search: %s backend, key epoch %s (%.1f MB of public keys to each of %d sites)", backend.name,
        epoch.bundle.epoch, len(bundle) / 1e6, len(nodes))
    acks = exchange({n: {"kind": "keys", "bundle": bundle} for n in nodes})
    ready = []
    for node in nodes:
        reason = _reason(acks.get(node))
        if reason:
            refusals[site[node]] = reason
        else:
            ready.append(node)
    vector = Embedder()([text])[0]
    query = querier.encrypt(vector, k=k, row_bound=int(config["search-row-bound"]))
    answers = exchange({n: {"kind": "query", **query.to_record()} for n in ready})
    results = {}
    for node in ready:
        reason = _reason(answers.get(node))
        if reason:
            refusals[site[node]] = reason
        else:
            results[site[node]] = [bytes(b) for b in answers[node].content.config_records[REPLY]["results"]]
    scores = querier.scores(results)
    hits = querier.top_k(scores, k)
    by_name = {site[n]: n for n in ready}
    requests = querier.fetch_requests(query.query_id, hits, scores, k)
    fetched = exchange({by_name[s]: {"kind": "fetch", "query-id": r.query_id, "rows": list(r.rows),
                                     "querier": r.querier, "signature": r.signature} for s, r in requests.items()})
    replies = {}
    for name, node in by_name.items():
        if name not in requests:
            continue
        reason = _reason(fetched.get(node))
        if reason:
            refusals[name] = reason
            replies[name] = [""] * k
        else:
            replies[name] = [str(i) for i in fetched[node].content.config_records[REPLY]["ids"]]
    hits = Querier.resolve(hits, requests, replies)
    for name, reason in refusals.items():
        log(WARNING, "search: site '%s' did not answer: %s", name, reason)
    for rank, hit in enumerate(hits, start=1):
        log(INFO, "search hit %d: %.4f  %s  %s", rank, hit.score, hit.site, hit.document_id)
    outcome = SearchOutcome(query.query_id, hits, refusals, exchange.bytes_up, exchange.bytes_down, len(bundle),
                            time.perf_counter() - started)
    store = RunStore(str(config["store"]))
    store.record_search(query_id=query.query_id, querier=identity.fingerprint, text=text, k=k,
                        sites={s: refusals.get(s, "ok") for s in site.values()}, hits=[h.__dict__ for h in hits],
                        bytes_up=outcome.bytes_up, bytes_down=outcome.bytes_down, seconds=outcome.seconds)
    return outcome
