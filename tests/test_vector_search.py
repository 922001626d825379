"""Encrypted vector search (privacy/vector_search.py): recall against exact plaintext search on real
MiniLM embeddings of the BBC corpus split across 4 sites, for both CKKS backends; what a site
receives; and every refusal (untrusted, expired, tampered, unknown keys, spent budget, empty store)."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import struct
import time

import numpy as np
import pytest

from privacy.he_backends import BACKENDS, CkksParameters, choose_backend
from privacy.refusal import PolicyRefusal
from privacy.vector_search import (
    EncryptedQuery,
    KeyBundle,
    KeyEpoch,
    Querier,
    QuerierIdentity,
    QueryRefused,
    SearchError,
    SearchLedger,
    SearchLimits,
    SiteSearcher,
    UnknownKeyEpoch,
    exact_top_k,
)

SAMPLE = 600
QUERIES = ("shares fell on the stock market as oil prices rose", "a new mobile phone with a faster chip",
           "the prime minister called an early election", "the striker scored in the cup final")


@pytest.fixture(scope="module")
def bbc_sites() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """MiniLM embeddings of 600 BBC News articles (every topic; a seeded sample, to keep the suite
    short), dealt round-robin to 4 sites (cached on disk)."""
    from fedclient.tasks.cache import cache_key, cached
    from fedclient.tasks.data import load_bbc_news
    from fedclient.tasks.embedding import Embedder

    def compute() -> dict:
        embed = Embedder()
        corpus = load_bbc_news()
        rows = np.random.default_rng(0).choice(len(corpus.texts), size=SAMPLE, replace=False)
        return {"documents": embed([corpus.texts[r] for r in sorted(rows)]), "queries": embed(list(QUERIES))}

    import torch

    saved = cached(cache_key("bbc-minilm-embeddings", queries=QUERIES, sample=SAMPLE), lambda: {
        k: torch.as_tensor(v) for k, v in compute().items()})
    vectors = saved["documents"].numpy()
    sites = {f"site-{i}": vectors[i::4] for i in range(4)}
    return sites, saved["queries"].numpy()


def _federation(sites: dict[str, np.ndarray], backend: str, tmp_path: pathlib.Path | None = None, budget: int = 10):
    identity = QuerierIdentity.generate()
    epoch = KeyEpoch.create(identity, backend)
    searchers = {name: SiteSearcher(v, [f"{name}/doc-{i}" for i in range(len(v))], [identity.public_bytes],
                                    SearchLedger(None, SearchLimits(query_budget=budget)), cache_dir=(tmp_path / name) if tmp_path else None)
                 for name, v in sites.items()}
    data = epoch.bundle.to_bytes()
    for searcher in searchers.values():
        searcher.accept_keys(data)
    return Querier(identity, epoch), searchers


def _search(querier: Querier, searchers: dict[str, SiteSearcher], vector: np.ndarray, k: int = 10):
    query = querier.encrypt(vector, k=k, row_bound=1000)
    scores = querier.scores({name: s.answer(query) for name, s in searchers.items()}, query.row_bound)
    hits = querier.top_k(scores, k)
    requests = querier.fetch_requests(query.query_id, hits, scores, k)
    replies = {name: searchers[name].fetch(r) for name, r in requests.items()}
    assert all(len(r.rows) == k for r in requests.values())  # every site is asked for exactly k rows
    return Querier.resolve(hits, requests, replies)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_recall_at_10_is_exact_on_real_embeddings_across_4_sites(bbc_sites, backend: str) -> None:
    if not BACKENDS[backend].available():
        pytest.fail(f"the {backend} backend is not installed: run `make install`")
    sites, queries = bbc_sites
    querier, searchers = _federation(sites, backend)
    for vector in queries if backend == "pyfhel" else queries[:2]:  # TenSEAL: ~2 s per site and query
        hits = _search(querier, searchers, vector)
        exact = exact_top_k(sites, vector, 10)
        assert {(h.site, h.row) for h in hits} == {(h.site, h.row) for h in exact}  # recall@10 = 1.0
        assert np.allclose([h.score for h in hits], [h.score for h in exact], atol=1e-4)
        assert all(h.document_id == f"{h.site}/doc-{h.row}" for h in hits)


def test_auto_prefers_pyfhel_and_names_a_missing_backend() -> None:
    expected = "pyfhel" if BACKENDS["pyfhel"].available() else "tenseal"
    assert choose_backend("auto").name == expected
    with pytest.raises(Exception, match="unknown HE backend 'openfhe'"):
        choose_backend("openfhe")


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_a_site_never_holds_the_secret_key_nor_sees_the_query(bbc_sites, backend: str) -> None:
    sites, queries = bbc_sites
    querier, searchers = _federation({"site-0": sites["site-0"][:200]}, backend)
    bundle = KeyBundle.from_bytes(querier.epoch.bundle.to_bytes())
    impl = choose_backend(backend)
    context = impl.load_public(dict(bundle.parts))
    assert not impl.is_private(context) and impl.is_private(querier.epoch.private)
    seen: list[EncryptedQuery] = []
    site = searchers["site-0"]
    original = site.answer
    site.answer = lambda q: seen.append(q) or original(q)  # type: ignore[method-assign]
    vector = queries[0] / np.linalg.norm(queries[0])
    _search(querier, searchers, vector, k=5)
    (received,) = seen
    wire = json.dumps({k: v.hex() if isinstance(v, bytes) else v for k, v in received.to_record().items()}).encode()
    for value in vector[:64]:  # no coordinate of the query, in any float encoding, reaches the site
        for packed in (struct.pack("<d", value), struct.pack("<f", value), f"{value:.6f}".encode()):
            assert packed not in received.ciphertext and packed not in wire
    assert set(received.to_record()) == {"query-id", "key-id", "k", "row-bound", "ciphertext", "querier", "signature"}


def test_untrusted_expired_tampered_and_unknown_keys_are_refused(bbc_sites) -> None:
    sites, queries = bbc_sites
    vectors = sites["site-1"][:100]
    identity, stranger = QuerierIdentity.generate(), QuerierIdentity.generate()
    epoch = KeyEpoch.create(identity, "tenseal")
    site = SiteSearcher(vectors, [str(i) for i in range(100)], [identity.public_bytes], SearchLedger(None, SearchLimits(query_budget=5)))
    with pytest.raises(SearchError, match="does not trust"):
        SiteSearcher(vectors, [str(i) for i in range(100)], [stranger.public_bytes], SearchLedger(None, SearchLimits(query_budget=5))) \
            .accept_keys(epoch.bundle.to_bytes())
    data = bytearray(epoch.bundle.to_bytes())
    data[-100] ^= 1  # one bit of the public keys
    with pytest.raises(SearchError, match="signature does not verify"):
        site.accept_keys(bytes(data))
    with pytest.raises(SearchError, match="unreadable key bundle"):
        site.accept_keys(b"FTKB1garbage")
    expired = KeyEpoch.create(identity, "tenseal", lifetime_seconds=-1)
    with pytest.raises(SearchError, match="expired"):
        site.accept_keys(expired.bundle.to_bytes())
    querier = Querier(identity, epoch)
    with pytest.raises(SearchError, match="unknown key epoch"):
        site.answer(querier.encrypt(queries[0], row_bound=1000))  # keys never sent
    site.accept_keys(epoch.bundle.to_bytes())
    query = querier.encrypt(queries[0], row_bound=1000)
    flipped = bytearray(query.ciphertext)
    flipped[len(flipped) // 2] ^= 0xFF
    with pytest.raises(SearchError, match="signature does not verify"):
        site.answer(dataclasses.replace(query, ciphertext=bytes(flipped)))
    with pytest.raises(SearchError, match="does not trust"):
        site.answer(Querier(stranger, KeyEpoch.create(stranger, "tenseal")).encrypt(queries[0], row_bound=1000))
    assert site.ledger.remaining(identity.public_bytes) == 5  # refusals before the data is consulted cost nothing
    with pytest.raises(SearchError, match="more rows than the query's row bound"):
        site.answer(querier.encrypt(queries[0], row_bound=50))
    assert site.ledger.remaining(identity.public_bytes) == 4  # this one tells the querier about the site's rows


def test_an_exhausted_budget_is_refused_and_survives_a_restart(bbc_sites, tmp_path: pathlib.Path) -> None:
    sites, queries = bbc_sites
    identity = QuerierIdentity.generate()
    epoch = KeyEpoch.create(identity, "tenseal")
    querier = Querier(identity, epoch)

    def site() -> SiteSearcher:
        searcher = SiteSearcher(sites["site-2"][:50], [str(i) for i in range(50)], [identity.public_bytes],
                                SearchLedger(tmp_path / "ledger.json", SearchLimits(query_budget=2)),
                                key_dir=tmp_path / "keys")
        return searcher

    first = site()
    first.accept_keys(epoch.bundle.to_bytes())
    first.answer(querier.encrypt(queries[0], row_bound=1000))
    restarted = site()  # new process: keys and budget come from disk
    restarted.answer(querier.encrypt(queries[1], row_bound=1000))
    with pytest.raises(QueryRefused, match="query budget exhausted.*all 2 queries"):
        restarted.answer(querier.encrypt(queries[2], row_bound=1000))


def test_an_empty_store_is_a_clear_error(bbc_sites) -> None:
    identity = QuerierIdentity.generate()
    epoch = KeyEpoch.create(identity, "tenseal")
    site = SiteSearcher(np.zeros((0, 384)), [], [identity.public_bytes], SearchLedger(None, SearchLimits(query_budget=5)))
    site.accept_keys(epoch.bundle.to_bytes())
    with pytest.raises(SearchError, match="vector store is empty.*fedclient index"):
        site.answer(Querier(identity, epoch).encrypt(bbc_sites[1][0], row_bound=1000))


def test_encoded_rows_are_cached_on_disk_and_reused(bbc_sites, tmp_path: pathlib.Path) -> None:
    sites, queries = bbc_sites
    small = {"site-3": sites["site-3"][:300]}
    backend = "pyfhel" if BACKENDS["pyfhel"].available() else "tenseal"
    querier, searchers = _federation(small, backend, tmp_path)
    first = _search(querier, searchers, queries[3])
    (cache,) = (tmp_path / "site-3").glob("prepared-*.bin")
    stamp = cache.stat().st_mtime_ns
    querier2, searchers2 = _federation(small, backend, tmp_path)  # another process, another epoch
    started = time.perf_counter()
    assert [(h.site, h.row) for h in _search(querier2, searchers2, queries[3])] == [(h.site, h.row) for h in first]
    assert cache.stat().st_mtime_ns == stamp and time.perf_counter() - started < 60  # read, not rewritten
    cache.write_bytes(b"damaged")  # a damaged cache is encoded again, never trusted
    querier3, searchers3 = _federation(small, backend, tmp_path)
    assert [(h.site, h.row) for h in _search(querier3, searchers3, queries[3])] == [(h.site, h.row) for h in first]


def test_parameters_fix_the_rotation_keys_to_what_the_packing_needs() -> None:
    params = CkksParameters()
    assert params.slots == 4096 and params.giant_steps == 16
    assert len(params.rotation_steps()) == 46  # 31 baby + 15 giant (he.md §3.1)


def test_fetch_only_for_an_answered_query_at_most_k_rows_once_and_charged(bbc_sites) -> None:
    """A coordinator (or anyone replaying the querier's messages) cannot enumerate a site's document
    ids: a fetch must name a query this site answered for that querier, ask at most its k rows,
    come once, and fit the querier's fetch budget; a replayed query is not answered twice."""
    from privacy.vector_search import FetchRequest

    sites, queries = bbc_sites
    identity = QuerierIdentity.generate()
    epoch = KeyEpoch.create(identity, "tenseal")
    querier = Querier(identity, epoch)
    site = SiteSearcher(sites["site-0"][:100], [f"doc-{i}" for i in range(100)], [identity.public_bytes],
                        SearchLedger(None, SearchLimits(query_budget=5, fetch_budget=8)))
    site.accept_keys(epoch.bundle.to_bytes())

    def signed(query_id: str, rows) -> FetchRequest:
        unsigned = FetchRequest(query_id, tuple(rows), identity.public_bytes)
        return FetchRequest(query_id, tuple(rows), identity.public_bytes, identity.sign(unsigned.digest()))

    with pytest.raises(SearchError, match="did not answer"):
        site.fetch(signed("never-asked", range(100)))  # one signed fetch listing range(n)
    query = querier.encrypt(queries[0], k=3, row_bound=1000)
    site.answer(query)
    with pytest.raises(SearchError, match="answered already"):
        site.answer(query)  # a replay
    with pytest.raises(SearchError, match="asks for 100 rows.*top 3"):
        site.fetch(signed(query.query_id, range(100)))
    assert site.fetch(signed(query.query_id, [5, 1, 7])) == ["doc-5", "doc-1", "doc-7"]
    with pytest.raises(SearchError, match="fetched already"):
        site.fetch(signed(query.query_id, [2]))
    second = querier.encrypt(queries[1], k=10, row_bound=1000)
    with pytest.raises(Exception, match="max-k"):  # the querier asked for more than the policy's k
        SiteSearcher(sites["site-0"][:100], [f"doc-{i}" for i in range(100)], [identity.public_bytes],
                     SearchLedger(None, SearchLimits(max_k=5))).answer(second)
    site.answer(second)
    with pytest.raises(QueryRefused, match="fetch budget exhausted"):
        site.fetch(signed(second.query_id, range(10)))  # 3 + 10 > 8 ids
    assert site.ledger.used(identity.public_bytes) == {"queries": 2, "rows": 3}


def test_the_row_bound_is_capped_by_the_policy_and_expired_epochs_are_pruned(bbc_sites, tmp_path) -> None:
    sites, queries = bbc_sites
    identity = QuerierIdentity.generate()
    site = SiteSearcher(sites["site-1"][:40], [str(i) for i in range(40)], [identity.public_bytes],
                        SearchLedger(None, SearchLimits(max_rows_per_query=500, max_key_epochs=2)),
                        key_dir=tmp_path / "keys")
    epochs = [KeyEpoch.create(identity, "tenseal", lifetime_seconds=3600 * (i + 1)) for i in range(3)]
    for epoch in epochs:
        site.accept_keys(epoch.bundle.to_bytes())
    kept = sorted(p.stem for p in (tmp_path / "keys").glob("*.bundle"))
    assert kept == sorted(e.bundle.key_id for e in epochs[1:])  # at most 2 per querier: the longest-lived
    with pytest.raises(Exception, match="max-rows-per-query"):
        site.answer(Querier(identity, epochs[2]).encrypt(queries[0], row_bound=1_000_000))  # 1M rows: memory
    assert site.prune_keys(now=time.time() + 2.5 * 3600) == [epochs[1].bundle.key_id]
    assert [p.stem for p in (tmp_path / "keys").glob("*.bundle")] == [epochs[2].bundle.key_id]


def test_key_bundles_past_the_policy_lifetime_are_refused_and_expired_ones_deleted_when_used(bbc_sites, tmp_path) -> None:
    sites, _ = bbc_sites
    identity = QuerierIdentity.generate()

    def searcher() -> SiteSearcher:  # a fresh one per message, as the ClientApp builds it
        return SiteSearcher(sites["site-2"][:20], [str(i) for i in range(20)], [identity.public_bytes],
                            SearchLedger(None, SearchLimits(max_key_days=1.0)), key_dir=tmp_path / "keys")

    too_long = KeyEpoch.create(identity, "tenseal", lifetime_seconds=3 * 86400)
    with pytest.raises(PolicyRefusal, match="search.max-key-days"):
        searcher().accept_keys(too_long.bundle.to_bytes())
    assert not list(tmp_path.rglob("*.bundle"))  # refused before it was stored
    short = KeyEpoch.create(identity, "tenseal", lifetime_seconds=5)  # long enough to be stored on a loaded machine
    searcher().accept_keys(short.bundle.to_bytes())
    assert len(list((tmp_path / "keys").glob("*.bundle"))) == 1
    time.sleep(max(0.0, short.bundle.expires_at - time.time()) + 0.1)
    query = Querier(identity, short).encrypt(np.ones(384), k=1, row_bound=100)
    with pytest.raises(SearchError, match="expired"):
        searcher().answer(query)
    assert not list((tmp_path / "keys").glob("*")), "the expired bundle stays on disk"


def test_a_key_bundle_the_site_deletes_is_not_used_by_a_searcher_that_kept_it(bbc_sites, tmp_path) -> None:
    """The site runtime keeps its searcher across messages; an operator who deletes an accepted key
    bundle (revoking that epoch) is obeyed at the next query, not when the runtime restarts."""
    sites, _ = bbc_sites
    identity = QuerierIdentity.generate()
    kept = SiteSearcher(sites["site-2"][:20], [str(i) for i in range(20)], [identity.public_bytes],
                        SearchLedger(None), key_dir=tmp_path / "keys")
    epoch = KeyEpoch.create(identity, "tenseal")
    key_id = kept.accept_keys(epoch.bundle.to_bytes())
    query = Querier(identity, epoch).encrypt(np.ones(384), k=1, row_bound=100)
    assert len(kept.answer(query)) >= 1
    (tmp_path / "keys" / f"{key_id}.bundle").unlink()
    with pytest.raises(UnknownKeyEpoch):
        kept.answer(Querier(identity, epoch).encrypt(np.ones(384), k=1, row_bound=100))


def test_the_querier_refuses_a_sites_unusable_results(tmp_path) -> None:
    """A site is not trusted either: bytes that are no ciphertext, more ciphertexts than the row
    bound needs, or scores no cosine can have are refused (run_search records that site's part as
    unusable and goes on)."""
    identity = QuerierIdentity.generate()
    epoch = KeyEpoch.create(identity, "tenseal")
    querier = Querier(identity, epoch)
    backend = epoch.backend
    huge = backend.encrypt_query(epoch.private, np.full(384, 5.0) / np.sqrt(384) * 5)  # slots of 5, 1 and 0
    honest = backend.encrypt_query(epoch.private, np.full(384, 0.01))
    assert querier.site_scores([honest], row_bound=backend.rows_per_ciphertext()).size > 0
    with pytest.raises(SearchError, match="outside the range"):
        querier.site_scores([huge], row_bound=backend.rows_per_ciphertext())
    with pytest.raises(SearchError, match="result ciphertexts for a row bound"):
        querier.site_scores([honest, honest], row_bound=backend.rows_per_ciphertext())
    with pytest.raises(SearchError, match="do not decrypt"):
        querier.site_scores([b"\x00" * 64], row_bound=100)


def test_a_querier_keeps_its_key_epoch_across_searches_until_it_expires(tmp_path) -> None:
    identity = QuerierIdentity.generate()
    first, new = KeyEpoch.current(identity, tmp_path, "tenseal")
    again, new_again = KeyEpoch.current(identity, tmp_path, "tenseal")
    assert new and not new_again and again.bundle.key_id == first.bundle.key_id  # one key transfer per epoch
    assert (tmp_path / f"{first.bundle.epoch}.secret").stat().st_mode & 0o777 == 0o600
    vector = np.random.default_rng(0).normal(size=384)
    ciphertext = Querier(identity, first).encrypt(vector).ciphertext
    assert ciphertext != Querier(identity, again).encrypt(vector).ciphertext  # same key, fresh encryption
    stale = KeyEpoch.create(identity, "tenseal", lifetime_seconds=60)  # inside the 10-minute margin
    stale.save(tmp_path)
    chosen, _ = KeyEpoch.current(identity, tmp_path, "tenseal")
    assert chosen.bundle.key_id == first.bundle.key_id
    expired = KeyEpoch.create(identity, "tenseal", lifetime_seconds=-1)
    expired.save(tmp_path)
    KeyEpoch.current(identity, tmp_path, "tenseal")
    assert not (tmp_path / f"{expired.bundle.epoch}.secret").exists()  # expired epochs are deleted
