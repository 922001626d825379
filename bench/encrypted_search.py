"""Encrypted federated top-k search: ``fedserver search`` end to end over a real loopback
deployment, against the protocol's compute run in one process.

**End to end** (the path users run; default 4 sites × 10,000 rows). A deployment on 127.0.0.1 as
the README runs it: ``fedserver init/start/enrol``, one ``fedclient start`` per site (TLS, node
authentication, the publisher key pinned, ``--search-index`` and ``--querier-key``; ``fedclient
start``'s default waits unless ``--poll-interval`` is given: a number, or ``flower`` for Flower's own), then ``fedserver search`` (:func:`fedserver.deployment.search`)
``--queries`` times. Each query's wall time covers everything: embedding and encrypting the query
in the querier process, ``flwr run``, the ServerApp's message rounds (key bundle to sites that lack
the epoch, query, fetch) with a fresh ClientApp process per message at every site, decrypting,
merging and fetching. The first query of a key epoch sends every site its 36 MB of public keys; the
later ones reuse the epoch (two message rounds). Hits are checked against exact plaintext search.
What is left out: the sites' stores hold seeded random unit vectors written in the store's format
(``VectorStore.save``) instead of ``fedclient index`` embeddings of 40,000 documents (HE cost does
not depend on the values); their rows are encoded ahead of time as ``fedclient index`` does.

**In process** (the baseline; what BENCHMARKS.md's earlier 0.60 s per query measured): the same
sites' compute run one after another in this process with the keys already sent, no Flower, no
process start-up, no disk; latency = encrypt + the slowest site + decrypt/merge + fetch.

Its last line reads ``search end-to-end: first X s, steady Y s``.

Usage::

    python bench/encrypted_search.py                           # 4 sites x 10,000 rows, 3 queries
    python bench/encrypted_search.py --sites 2 --rows 200 --queries 2 --poll-interval 0.2
    python bench/encrypted_search.py --in-process-only --rows 1000,10000 --backends pyfhel,tenseal
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script
from bench.common import LoopbackDeployment
from privacy.he_backends import BACKENDS
from privacy.vector_search import (
    KeyEpoch,
    Querier,
    QuerierIdentity,
    SearchLedger,
    SearchLimits,
    SiteSearcher,
    exact_top_k,
)

QUERIES = ("central bank lifts interest rates again", "new handset with a faster chip unveiled",
           "minister calls an early general election", "striker scores twice in the cup final",
           "oil prices fall as output rises", "film wins the top prize at the festival")

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


def run(backend: str, rows: int, queries: np.ndarray, k: int, count: int = SITES) -> dict:
    rng = np.random.default_rng(rows)
    sites = {f"site-{i}": unit_vectors(rng, rows) for i in range(count)}
    identity = QuerierIdentity.generate()
    started = time.perf_counter()
    epoch = KeyEpoch.create(identity, backend)
    keygen = time.perf_counter() - started
    bundle = epoch.bundle.to_bytes()
    searchers = {name: SiteSearcher(v, [f"{name}/{i}" for i in range(rows)], [identity.public_bytes],
                                    SearchLedger(None, SearchLimits(query_budget=1000, max_rows_per_query=rows)))
                 for name, v in sites.items()}
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
        scores = querier.scores(results, query.row_bound)
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


def end_to_end(args: argparse.Namespace, root: pathlib.Path) -> dict:
    """``fedserver search`` ``args.queries`` times over a loopback deployment of ``args.sites`` sites."""
    from fedclient.tasks.embedding import Embedder
    from fedclient.vector_store import VectorStore
    from fedserver import deployment as dep

    rng = np.random.default_rng(args.rows)
    vectors = {f"site-{i}": unit_vectors(rng, args.rows) for i in range(args.sites)}
    encode = []
    for name, v in vectors.items():  # each site's store, encoded for queries ahead (as `fedclient index` does)
        store = VectorStore(root / name / "docs")
        store.save(v, [(f"{name}/doc-{row}", "synthetic") for row in range(args.rows)], "random-unit-vectors")
        encode.append(store.encode_for_search(args.rows)[1])
    poll = ["--poll-interval", str(args.poll_interval)] if args.poll_interval else []

    def site_arguments(index: int) -> list[str]:
        return ["--search-index", str(root / f"site-{index}" / "docs"),
                "--querier-key", str(root / "coord" / "querier.key.pub"), *poll]

    embed = Embedder()
    out: dict = {"encode": statistics.mean(encode), "queries": []}
    with LoopbackDeployment(root, args.sites, site_arguments) as deployment:
        for number in range(args.queries):
            text = QUERIES[number % len(QUERIES)]
            started = time.perf_counter()
            result = dep.search(deployment.coord, text, k=args.k, row_bound=args.rows, timeout=1800)
            wall = time.perf_counter() - started
            if result["refusals"]:
                raise RuntimeError(f"sites refused the query: {result['refusals']}")
            exact = exact_top_k({f"site-{i}": vectors[f"site-{i}"] for i in range(args.sites)}, embed([text])[0],
                                args.k)
            found = {(h["site"], h["document_id"]) for h in result["hits"]}
            recall = len(found & {(h.site, f"{h.site}/doc-{h.row}") for h in exact}) / args.k
            out["queries"].append({"wall": wall, "server": result["seconds"], "new_epoch": result["new_key_epoch"],
                                   "rounds": result.get("exchange_seconds", []),
                                   "down": result["bytes_down"], "up": result["bytes_up"], "recall": recall})
            print(f"  query {number + 1}: {wall:.1f} s ({'new key epoch' if result['new_key_epoch'] else 'epoch reused'}"
                  f"; {result['bytes_down'] / 1e6:.1f} MB down, {result['bytes_up'] / 1e6:.2f} MB up; "
                  f"recall@{args.k} {recall:.2f}; message rounds "
                  f"{', '.join(f'{s:.2f}' for s in result.get('exchange_seconds', [])) or 'not reported'} s)", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=SITES, help="sites (end to end)")
    parser.add_argument("--rows", default="10000", help="rows per site (in process: comma-separated list)")
    parser.add_argument("--queries", type=int, default=3, help="queries per configuration (the first pays the keys)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--poll-interval", default=None, help="fedclient start --poll-interval for the sites "
                        "(seconds, or flower; default: fedclient start's adaptive waits)")
    parser.add_argument("--backends", default="", help="in process: comma-separated backends (default: the one "
                        "`auto` picks, as the deployment uses)")
    parser.add_argument("--in-process-only", action="store_true", help="only the in-process table")
    args = parser.parse_args(argv)
    rows_list = [int(r) for r in args.rows.split(",")]
    if args.queries < 2 or args.sites < 1 or any(r < args.k for r in rows_list):
        parser.error("need --queries >= 2 (a first and a steady query), --sites >= 1 and --rows >= --k")
    from privacy.he_backends import choose_backend

    backends = [b for b in args.backends.split(",") if b] or [choose_backend("auto").name]
    print(f"machine: {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}; {args.sites} sites, {DIM}-d, "
          f"k={args.k}")
    queries = unit_vectors(np.random.default_rng(99), args.queries)
    baseline = {}
    print("\nin process (keys sent ahead, no Flower):\n| backend | rows/site | keys → each site | site compute, 1st "
          "(s) | site compute, cached (s) | latency, cached (s) | recall@k | plaintext exact (ms) |\n"
          "|---|---|---|---|---|---|---|---|")
    for rows in rows_list:
        plain_name, plain = plaintext_baseline({f"site-{i}": unit_vectors(np.random.default_rng(rows), rows)
                                                for i in range(args.sites)}, queries, args.k)
        for backend in backends:
            if not BACKENDS[backend].available():
                print(f"| {backend} | {rows} | not installed |")
                continue
            r = run(backend, rows, queries, args.k, args.sites)
            later = r["queries"][1:]
            baseline[(backend, rows)] = statistics.median(q["latency"] for q in later)
            print(f"| {backend} | {rows:,} | {r['key_bytes'] / 1e6:.1f} MB | {r['queries'][0]['site_max']:.2f} | "
                  f"{statistics.median(q['site_max'] for q in later):.2f} | **{baseline[(backend, rows)]:.2f}** | "
                  f"{min(q['recall'] for q in r['queries']):.2f} | {plain * 1e3:.2f} |", flush=True)
    print(f"(in process: {args.sites} sites one after another; plaintext: {plain_name})")
    if args.in_process_only:
        return 0
    rows = rows_list[-1]
    args.rows = rows
    print(f"\nend to end: `fedserver search` over a loopback deployment, {args.sites} sites × {rows:,} rows"
          + (f", --poll-interval {args.poll_interval}" if args.poll_interval else ", fedclient start's default waits"),
          flush=True)
    with tempfile.TemporaryDirectory(prefix="fedtune-search-bench-") as tmp:
        result = end_to_end(args, pathlib.Path(tmp))
    first, steady = result["queries"][0], result["queries"][1:]
    steady_wall = statistics.mean(q["wall"] for q in steady)
    spread = statistics.stdev(q["wall"] for q in steady) if len(steady) > 1 else 0.0
    reference = baseline.get((backends[0], rows))
    print(f"\n| query | wall (s) | of which the ServerApp (s) | down | up | recall@{args.k} | vs in process |")
    print("|---|---|---|---|---|---|---|")
    for label, q in [("first (new key epoch)", first)] + [(f"steady {i + 1}", q) for i, q in enumerate(steady)]:
        ratio = f"{q['wall'] / reference:.0f}×" if reference else "–"
        print(f"| {label} | {q['wall']:.1f} | {q['server']:.1f} | {q['down'] / 1e6:.1f} MB | {q['up'] / 1e6:.2f} MB | "
              f"{q['recall']:.2f} | {ratio} |")
    print(f"(rows encoded ahead: {result['encode']:.1f} s per site; steady: mean ± sd over {len(steady)} queries "
          f"{steady_wall:.1f} ± {spread:.1f} s)")
    print(f"search end-to-end: first {first['wall']:.1f} s, steady {steady_wall:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
