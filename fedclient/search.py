"""The site's side of encrypted search as Flower ``query.search`` messages (thin adapter over
:mod:`privacy.vector_search`).

Everything comes from the site's own policy (:mod:`fedclient.policy`, ``[search]``) and node config,
never from the run config: the document store (``search.index``, built with ``fedclient index``),
the querier public key it trusts (``search.querier-key``) and the limits it grants each querier
(queries, fetched ids, row bound, k). The search ledger and the accepted key bundles live in the
site's state directory (``STATE/search/``; a simulated site without one uses its index directory);
the encoded rows are cached in the index directory (``fedclient index`` writes them).

A message carries a ConfigRecord ``search`` with ``kind`` = ``keys`` (a signed key bundle),
``query`` (an encrypted query) or ``fetch`` (rows of an answered query to resolve to document ids).
Any refusal (unknown querier, bad signature, unknown or expired keys, empty store, spent budget, a
limit of the policy) is a ``refusal`` reply naming the reason, never the site's data; nothing is
computed for it. A query naming a key epoch the site lacks is refused with code
``unknown-key-epoch`` so the querier sends the bundle and asks again.
"""

from __future__ import annotations

import pathlib
from collections import OrderedDict

from flwr.app import ConfigRecord, Message, RecordDict

from fedclient.policy import SitePolicy
from fedclient.vector_store import INDEX_DIR, VectorStore, VectorStoreError
from fedclient.wire import refusal_record
from privacy.refusal import PolicyRefusal, site_log
from privacy.vector_search import (
    EncryptedQuery,
    FetchRequest,
    SearchError,
    SearchLedger,
    SiteSearcher,
    UnknownKeyEpoch,
    load_trusted_key,
)

SEARCH = "search"
REPLY = "search-reply"


_SEARCHERS: OrderedDict[tuple, SiteSearcher] = OrderedDict()
KEPT_SEARCHERS = 2  # a site runtime answers for one store; a simulation process may serve a few sites


def site_searcher(policy: SitePolicy, state_dir: str | None) -> SiteSearcher:
    """This site's searcher from its policy; PolicyRefusal or SearchError naming what is missing.

    A process that answers many messages (the site runtime) keeps it, with the key bundles it
    loaded and the rows it encoded for them, while the store's files, the trusted querier key's
    bytes, the state directory and the policy's limits are what they were; any change builds it
    again from the files. The ledger it charges is read and written on disk at every charge, and a
    key bundle deleted from the state directory is dropped at its next use (revoking an epoch)."""
    search = policy.search
    if not search.index:
        raise PolicyRefusal("search.index", "this site offers no encrypted search")
    if not search.querier_key:
        raise PolicyRefusal("search.querier-key", "this site trusts no querier")
    store = VectorStore(search.index)
    try:
        key = (str(store.source), _files_stamp(store.path, ("vectors.npy", "documents.json", "meta.json")),
               pathlib.Path(search.querier_key).read_bytes(), state_dir, repr(search.limits))
    except OSError:
        key = None  # what is missing is said below
    if key is not None and key in _SEARCHERS:
        _SEARCHERS.move_to_end(key)
        return _SEARCHERS[key]
    searcher = _build_searcher(policy, state_dir, store)
    if key is not None:
        _SEARCHERS[key] = searcher
        while len(_SEARCHERS) > KEPT_SEARCHERS:
            _SEARCHERS.popitem(last=False)
    return searcher


def _files_stamp(directory: pathlib.Path, names: tuple[str, ...]) -> tuple:
    """Size, times and inode of ``names`` in ``directory``: a store rebuilt in place differs. (A key
    bundle the site's operator deletes is noticed by the searcher itself, at its next use.)"""
    stamp = []
    for name in names:
        info = (directory / name).stat()
        stamp.append((name, info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino))
    return tuple(stamp)


def _build_searcher(policy: SitePolicy, state_dir: str | None, store: VectorStore) -> SiteSearcher:
    search = policy.search
    try:
        vectors, ids = store.load()
    except VectorStoreError as err:
        site_log(f"its vector store cannot be read: {err}")
        raise SearchError("this site's vector store cannot be read (its log says why)") from None
    try:
        trusted = load_trusted_key(pathlib.Path(search.querier_key))
    except SearchError as err:
        site_log(str(err))
        raise SearchError("this site's trusted querier key cannot be read (its log says why)") from None
    state = pathlib.Path(state_dir) / "search" if state_dir else store.source / INDEX_DIR
    return SiteSearcher(vectors, ids, [trusted],
                        SearchLedger(state / "search-ledger.json", search.limits), key_dir=state / "keys",
                        cache_dir=store.source / INDEX_DIR)


def answer(msg: Message, policy: SitePolicy, state_dir: str | None) -> Message:
    """Reply to one ``query.search`` message."""
    try:
        request = msg.content.config_records[SEARCH]
        kind = str(request["kind"])
        searcher = site_searcher(policy, state_dir)
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
    except UnknownKeyEpoch as err:
        return Message(refusal_record(f"search: {err}", code="unknown-key-epoch"), reply_to=msg)
    except PolicyRefusal as err:
        return Message(refusal_record(str(err)), reply_to=msg)
    except SearchError as err:
        return Message(refusal_record(f"search: {err}"), reply_to=msg)
    except (KeyError, TypeError, ValueError) as err:  # its text may quote a file of the site's: kept here
        site_log(f"a search message could not be used: {err!r}")
        return Message(refusal_record(f"search: malformed request ({type(err).__name__})"), reply_to=msg)
    return Message(RecordDict({REPLY: ConfigRecord(reply)}), reply_to=msg)
