"""Encrypted federated top-k search (privacy/vector_search.py) vs plaintext exact search.

For 4 sites × {1k, 10k} 384-d L2-normalised vectors per site and each installed CKKS backend, one
invocation measures: the one-time key bundle (bytes sent to each site, time to create), the query
(encryption time, bytes to each site), each site's compute (its rows scored under encryption, the
first query including the one-off encoding of its rows, later queries from the cache), the result
bytes, decryption + merge, the fetch round, and recall@10 against exact search. Sites run one after
another here (one 2-core machine), so the reported per-query latency is encrypt + the slowest site +
decrypt/merge + fetch, i.e. what a querier waits for when sites answer in parallel; the sum of all
sites' compute is printed too. The baseline is faiss ``IndexFlatIP`` (exact inner product) over the
same 4 × n vectors in one process (numpy if faiss is not installed: ``pip install faiss-cpu``).

Vectors are random unit vectors (seeded): HE cost does not depend on their values; the recall check
on real MiniLM embeddings of the BBC corpus is in tests/test_vector_search.py.

Usage::

    python bench/encrypted_search.py                      # 1k and 10k rows per site, every backend
    python bench/encrypted_search.py --rows 1000 --backends tenseal
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script
from privacy.he_backends import BACKENDS
from privacy.vector_search import (
    KeyEpoch,
    Querier,
    QuerierIdentity,
    QueryBudget,
    SiteSearcher,
    exact_top_k,
)

SITES = 4
DIM = 384


def unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def plaintext_baseline(sites: dict[str, np.ndarray], queries: np.ndarray, k: int) -> tuple[str, float]:
    stacked = np.concatenate(list(sites.values()))
    try:
        import faiss

        index = faiss.IndexFlatIP(DIM)
        index.add(stacked)
        name = f"faiss {faiss.__version__} IndexFlatIP"

        def search(q: np.ndarray) -> None:
            index.search(q[None, :].astype(np.float32), k)
    except ImportError:
        name = "numpy X@q + argpartition (faiss not installed)"

        def search(q: np.ndarray) -> None:
            np.argpartition(-(stacked @ q), k)[:k]
    times = []
    for q in queries:
        started = time.perf_counter()
        search(q)
        times.append(time.perf_counter() - started)
    return name, statistics.median(times)


def run(backend: str, rows: int, queries: np.ndarray, k: int) -> dict:
    rng = np.random.default_rng(rows)
    sites = {f"site-{i}": unit_vectors(rng, rows) for i in range(SITES)}
    identity = QuerierIdentity.generate()
    started = time.perf_counter()
    epoch = KeyEpoch.create(identity, backend)
    keygen = time.perf_counter() - started
    bundle = epoch.bundle.to_bytes()
    searchers = {name: SiteSearcher(v, [f"{name}/{i}" for i in range(rows)], [identity.public_bytes],
                                    QueryBudget(None, 1000)) for name, v in sites.items()}
    for searcher in searchers.values():
        searcher.accept_keys(bundle)
    querier = Querier(identity, epoch)
    out: dict = {"backend": backend, "rows": rows, "key_bytes": len(bundle), "keygen": keygen, "queries": []}
    for number, vector in enumerate(queries):
        t0 = time.perf_counter()
        query = querier.encrypt(vector, k=k, row_bound=rows)
        t_encrypt = time.perf_counter() - t0
        site_seconds, results = {}, {}
        for name, searcher in searchers.items():
            t = time.perf_counter()
            results[name] = searcher.answer(query)
            site_seconds[name] = time.perf_counter() - t
        t = time.perf_counter()
        scores = querier.scores(results)
        hits = querier.top_k(scores, k)
        t_merge = time.perf_counter() - t
        t = time.perf_counter()
        requests = querier.fetch_requests(query.query_id, hits, scores, k)
        replies = {name: searchers[name].fetch(r) for name, r in requests.items()}
        hits = Querier.resolve(hits, requests, replies)
        t_fetch = time.perf_counter() - t
        exact = exact_top_k(sites, vector, k)
        recall = len({(h.site, h.row) for h in hits} & {(h.site, h.row) for h in exact}) / k
        out["queries"].append({
            "first": number == 0, "encrypt": t_encrypt, "site_max": max(site_seconds.values()),
            "site_sum": sum(site_seconds.values()), "merge": t_merge, "fetch": t_fetch,
            "latency": t_encrypt + max(site_seconds.values()) + t_merge + t_fetch,
            "query_bytes": len(query.ciphertext), "result_bytes": sum(len(b) for r in results.values() for b in r),
            "recall": recall})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1000,10000", help="rows per site, comma-separated")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated subset of the backends")
    parser.add_argument("--queries", type=int, default=3, help="queries per configuration (the first pays encoding)")
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args(argv)
    queries = unit_vectors(np.random.default_rng(99), args.queries)
    print(f"machine: {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}; {SITES} sites, {DIM}-d, k={args.k}")
    print("\n| backend | rows/site | one-time keys → each site | keygen (s) | query → each site | site compute, 1st query (s) "
          "| site compute, cached (s) | results → querier | decrypt+merge (s) | latency, cached (s) | recall@10 | "
          "plaintext exact (ms) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for rows in (int(r) for r in args.rows.split(",")):
        baseline_name, baseline = plaintext_baseline(
            {f"site-{i}": v for i, v in enumerate(np.split(unit_vectors(np.random.default_rng(rows), SITES * rows),
                                                           SITES))}, queries, args.k)
        for backend in args.backends.split(","):
            if not BACKENDS[backend].available():
                print(f"| {backend} | {rows} | not installed |")
                continue
            r = run(backend, rows, queries, args.k)
            first = r["queries"][0]
            later = r["queries"][1:] or r["queries"]
            print(f"| {backend} | {rows:,} | {r['key_bytes'] / 1e6:.1f} MB | {r['keygen']:.2f} | "
                  f"{first['query_bytes'] / 1e3:.0f} KB | {first['site_max']:.2f} | "
                  f"{statistics.median(q['site_max'] for q in later):.2f} "
                  f"(all 4: {statistics.median(q['site_sum'] for q in later):.2f}) | "
                  f"{first['result_bytes'] / 1e3:.0f} KB | {statistics.median(q['merge'] for q in later):.3f} | "
                  f"**{statistics.median(q['latency'] for q in later):.2f}** | "
                  f"{min(q['recall'] for q in r['queries']):.2f} | {baseline * 1e3:.2f} |", flush=True)
    print(f"\nplaintext baseline: {baseline_name}, all {SITES} sites' vectors in one index, median of "
          f"{args.queries} queries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
