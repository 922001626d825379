"""The site's side of encrypted search as Flower ``query.search`` messages (thin adapter over
:mod:`privacy.vector_search`).

Where the site keeps things (node config, set by ``fedclient start``): ``search-index`` = the
directory indexed with ``fedclient index`` (the store, accepted key bundles, the query-budget
ledger and the encoded-plaintext cache live in its ``.fedtune-index/``); ``search-querier-key`` =
the querier public key (PEM) the site trusts; ``query-budget`` = queries that querier may ask.
In simulation, site *i* uses ``<search-index-root>/site-<i>`` and the run config's key and budget.

A message carries a ConfigRecord ``search`` with ``kind`` = ``keys`` (a signed key bundle),
``query`` (an encrypted query) or ``fetch`` (rows to resolve to document ids). Any refusal (unknown
querier, bad signature, unknown or expired keys, empty store, spent budget) is a ``refusal`` reply
naming the reason; nothing is computed for it.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict

from fedclient.vector_store import INDEX_DIR, VectorStore, VectorStoreError
from fedclient.wire import refusal_record
from privacy.vector_search import (
    DEFAULT_QUERY_BUDGET,
    EncryptedQuery,
    FetchRequest,
    QueryBudget,
    SearchError,
    SiteSearcher,
    load_trusted_key,
)

SEARCH = "search"
REPLY = "search-reply"


def _setting(name: str, node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> Any:
    if name in node_config:
        return node_config[name]
    if name == "search-index" and run_config.get("search-index-root"):
        return str(pathlib.Path(str(run_config["search-index-root"])) / f"site-{int(node_config['partition-id'])}")
    return run_config.get(name, "")


def site_searcher(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> SiteSearcher:
    """This site's searcher from its settings; SearchError naming what is missing."""
    directory = _setting("search-index", node_config, run_config)
    key_file = _setting("search-querier-key", node_config, run_config)
    if not directory:
        raise SearchError("this site has no vector store: start it with --search-index DIR (built with `fedclient index DIR`)")
    if not key_file:
        raise SearchError("this site trusts no querier: start it with --querier-key FILE (the coordinator's querier.key.pub)")
    store = VectorStore(str(directory))
    try:
        vectors, ids = store.load()
    except VectorStoreError as err:
        raise SearchError(str(err)) from err
    budget = int(_setting("query-budget", node_config, run_config) or DEFAULT_QUERY_BUDGET)
    state = store.source / INDEX_DIR
    return SiteSearcher(vectors, ids, [load_trusted_key(pathlib.Path(str(key_file)))],
                        QueryBudget(state / "budget.json", budget), key_dir=state / "keys", cache_dir=state)


def answer(msg: Message, node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> Message:
    """Reply to one ``query.search`` message."""
    try:
        request = msg.content.config_records[SEARCH]
        kind = str(request["kind"])
        searcher = site_searcher(node_config, run_config)
        if kind == "keys":
            reply = {"key-id": searcher.accept_keys(bytes(request["bundle"]))}
        elif kind == "query":
            query = EncryptedQuery.from_record(request)
            reply = {"query-id": query.query_id, "results": searcher.answer(query)}
        elif kind == "fetch":
            rows = tuple(int(r) for r in request["rows"])
            ids = searcher.fetch(FetchRequest(str(request["query-id"]), rows, bytes(request["querier"]),
                                              bytes(request["signature"])))
            reply = {"query-id": str(request["query-id"]), "ids": ids}
        else:
            raise SearchError(f"unknown search message kind '{kind}'")
    except (SearchError, KeyError, TypeError, ValueError) as err:
        return Message(refusal_record(f"search: {err}"), reply_to=msg)
    return Message(RecordDict({REPLY: ConfigRecord(reply)}), reply_to=msg)
