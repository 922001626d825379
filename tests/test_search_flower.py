"""Sites' vector stores (`fedclient index`) and an encrypted query answered across 3 sites in a real
Flower simulation (ServerApp in search mode, ClientApps answering ``query.search``)."""

from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np
import pytest

from fedclient.vector_store import VectorStore, VectorStoreError, read_documents


def _write_docs(directory: pathlib.Path, texts: list[str], as_jsonl: bool = False) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    if as_jsonl:
        (directory / "docs.jsonl").write_text("".join(json.dumps({"id": f"j{i}", "text": t}) + "\n"
                                                      for i, t in enumerate(texts)))
    else:
        for i, text in enumerate(texts):
            (directory / f"doc-{i:03d}.txt").write_text(text)


def test_index_embeds_new_documents_only_and_reports_changes(tmp_path: pathlib.Path) -> None:
    from fedclient.tasks.data import load_bbc_news

    texts = list(load_bbc_news().texts[:12])
    _write_docs(tmp_path, texts[:8])
    _write_docs(tmp_path, texts[8:10], as_jsonl=True)
    store = VectorStore(tmp_path)
    report = store.build()
    assert (report.added, report.total, report.unchanged) == (10, 10, 0)
    vectors, ids = store.load()
    assert vectors.shape == (10, 384) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert ids[:2] == ["doc-000", "doc-001"] and "j0" in ids
    (tmp_path / "doc-000.txt").write_text("A completely different article about rugby.")
    (tmp_path / "doc-007.txt").unlink()
    _write_docs(tmp_path / "more", texts[10:12])
    report = store.build()
    assert (report.added, report.changed, report.removed, report.unchanged, report.total) == (2, 1, 1, 8, 11)
    again, again_ids = store.load()
    kept = ids.index("doc-003")
    assert np.array_equal(again[again_ids.index("doc-003")], vectors[kept])  # not re-embedded


def test_bad_document_directories_are_named(tmp_path: pathlib.Path) -> None:
    with pytest.raises(VectorStoreError, match="not a directory"):
        read_documents(tmp_path / "missing")
    (tmp_path / "a.jsonl").write_text('{"id": "x", "text": "one"}\n{"id": "x", "text": "two"}\n{"text": "no id"}\n')
    (tmp_path / "empty.txt").write_text("   ")
    with pytest.raises(VectorStoreError) as err:
        read_documents(tmp_path)
    assert "duplicate id 'x'" in str(err.value) and "a.jsonl:3" in str(err.value) and "empty.txt: empty" in str(err.value)
    with pytest.raises(VectorStoreError, match="fedclient index"):
        VectorStore(tmp_path / "nothing-here").load()


@pytest.mark.simulation
def test_a_flower_simulation_answers_an_encrypted_query_across_3_sites(tmp_path: pathlib.Path) -> None:
    """Three honest sites and two hostile ones (undecryptable results; a short fetch reply): the
    query is answered exactly from the honest sites' rows, and each hostile site's part is recorded
    as unusable instead of ending the search."""
    from flwr.simulation import run_simulation

    from fedclient.app import build_client_app
    from fedclient.runconfig import resolve_run_config
    from fedclient.tasks.data import load_bbc_news
    from fedclient.tasks.embedding import Embedder
    from fedserver.app import build_server_app
    from fedserver.store import RunStore
    from privacy.vector_search import QuerierIdentity, exact_top_k
    from tests.test_simulation import BACKEND

    corpus = load_bbc_news()
    for site in range(5):
        _write_docs(tmp_path / "sites" / f"site-{site}", list(corpus.texts[site * 40:(site + 1) * 40]))
        VectorStore(tmp_path / "sites" / f"site-{site}").build()
    store_url = f"sqlite:///{tmp_path / 'coord' / 'store.db'}"
    identity_file = tmp_path / "coord" / "querier.key"
    QuerierIdentity.load_or_create(identity_file)
    text = "mobile phone makers unveil faster handsets"
    from fedserver.search import prepare_search

    request_id, new_epoch = prepare_search(RunStore(store_url), text, k=5, row_bound=1000)
    assert new_epoch
    config = resolve_run_config({}, {"mode": "search", "search-request": request_id, "store": store_url, "task": "tiny"})
    assert text not in json.dumps(config)  # the run config names the request, never the text

    def site_config(node: dict) -> dict:  # each simulated site's own settings (fedclient start's flags)
        return {"search-index": str(tmp_path / "sites" / f"site-{node['partition-id']}"),
                "search-querier-key": str(identity_file) + ".pub",
                "state-dir": str(tmp_path / "state" / f"site-{node['partition-id']}")}

    from tests.apps import hostile_search_client_app

    run_simulation(server_app=build_server_app(config, num_clients=5),
                   client_app=hostile_search_client_app(config, site_config),
                   num_supernodes=5, backend_config=BACKEND)
    every = RunStore(config["store"]).searches()
    assert sorted(r.site for r in every) == [f"partition-{s}" for s in range(5)]
    hostile = {r.site: r.status for r in every if r.site in ("partition-3", "partition-4")}
    assert hostile["partition-3"].startswith("unusable reply: results that do not decrypt"), hostile
    assert hostile["partition-4"].startswith("unusable fetch reply"), hostile
    rows = [r for r in every if r.site not in hostile]
    assert all(r.status == "ok" and r.k == 5 and len(r.text_sha256) == 64 for r in rows)
    assert all(r.text_sha256 != hashlib.sha256(text.encode()).hexdigest() for r in rows)  # keyed, not plain
    assert rows[0].bytes_down > 1_000_000 and rows[0].bytes_up > 0  # key bundles down, ciphertexts up
    found = sorted((r.site, h["row"], h["document_id"]) for r in every for h in r.hits)
    vectors = {f"partition-{s}": VectorStore(tmp_path / "sites" / f"site-{s}").load() for s in (0, 1, 2, 4)}
    exact = exact_top_k({name: v for name, (v, _) in vectors.items()}, Embedder()([text])[0], 5)
    assert found == sorted((h.site, h.row, vectors[h.site][1][h.row] if h.site != "partition-4" else "")
                           for h in exact)  # partition 4's rows rank, but its ids did not come back
    for site in range(3):  # each site spent one query of its budget, recorded in its state directory
        ledger = json.loads((tmp_path / "state" / f"site-{site}" / "search" / "search-ledger.json").read_text())
        assert [q["queries"] for q in ledger["queriers"].values()] == [1]
        assert all(record["fetched"] for record in ledger["answered"].values())
    with pytest.raises(Exception, match="runs once"):  # the request was consumed
        RunStore(store_url).take_search_request(request_id)


def test_fedclient_index_encodes_the_rows_ahead_and_the_site_uses_that_cache(tmp_path: pathlib.Path) -> None:
    from fedclient.cli import index
    from privacy.he_backends import BACKENDS
    from privacy.vector_search import (
        KeyEpoch,
        Querier,
        QuerierIdentity,
        SearchLedger,
        SiteSearcher,
    )

    _write_docs(tmp_path, [f"report {i} on markets, rates and elections" for i in range(5)])
    assert index(str(tmp_path), "", row_bound=1000) == 0
    (cache,) = (tmp_path / ".fedtune-index").glob("prepared-*.bin")
    stamp = cache.stat().st_mtime_ns
    vectors, ids = VectorStore(tmp_path).load()
    identity = QuerierIdentity.generate()
    backend = "pyfhel" if BACKENDS["pyfhel"].available() else "tenseal"
    epoch = KeyEpoch.create(identity, backend)
    site = SiteSearcher(vectors, ids, [identity.public_bytes], SearchLedger(None),
                        cache_dir=tmp_path / ".fedtune-index")
    site.accept_keys(epoch.bundle.to_bytes())
    querier = Querier(identity, epoch)
    scores = querier.scores({"s": site.answer(querier.encrypt(vectors[2], k=1, row_bound=1000))}, 1000)
    assert int(np.argmax(scores["s"])) == 2
    assert cache.stat().st_mtime_ns == stamp  # the pre-encoded rows were used, not rewritten


def test_a_finished_runs_exported_encoder_can_embed_the_store(tmp_path: pathlib.Path) -> None:
    import torch
    from safetensors.torch import save_file

    from fedclient.tasks import get_task

    model = get_task("tiny").build_model()
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("bert.encoder.layer.0.")}
    for value in state.values():
        value.add_(0.05 * torch.randn_like(value))  # as if fine-tuned
    weights = tmp_path / "run.safetensors"
    save_file(state, str(weights), metadata={"run": "r1", "round": "3", "task": "tiny"})  # as `fedserver export` writes
    _write_docs(tmp_path / "docs", ["rates rise again", "the cup final went to penalties"])
    tuned = VectorStore(tmp_path / "docs").build(encoder_run=str(weights))
    assert tuned.encoder == "weights:run.safetensors"
    tuned_vectors, _ = VectorStore(tmp_path / "docs").load()
    plain = VectorStore(tmp_path / "docs").build()  # another encoder: every document is embedded again
    assert plain.changed == 0 and plain.added == 2
    assert not np.allclose(tuned_vectors, VectorStore(tmp_path / "docs").load()[0], atol=1e-3)
    save_file(state, str(tmp_path / "bare.safetensors"))
    with pytest.raises(VectorStoreError, match="does not name its task"):
        VectorStore(tmp_path / "docs").build(encoder_run=str(tmp_path / "bare.safetensors"))


def test_a_long_running_site_keeps_its_searcher_only_while_its_store_key_and_limits_are_unchanged(tmp_path) -> None:
    """The site runtime answers every search message in one process: it keeps the searcher (its
    loaded key bundles and encoded rows) across messages, and builds it again from the files when
    the store is rebuilt, the trusted querier key is replaced or the policy's limits change."""
    from fedclient.policy import SitePolicy
    from fedclient.search import site_searcher
    from privacy.vector_search import QuerierIdentity

    store = VectorStore(tmp_path / "docs")
    vectors = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    store.save(vectors, [(f"doc-{i}", "text") for i in range(4)], "random")
    key = tmp_path / "querier.pub"
    key.write_bytes(QuerierIdentity.generate().public_pem())

    def policy(max_k: int = 10) -> SitePolicy:
        return SitePolicy.from_toml(f'[search]\nindex = "{tmp_path / "docs"}"\nquerier-key = "{key}"\nmax-k = {max_k}\n')

    state = str(tmp_path / "state")
    first = site_searcher(policy(), state)
    assert site_searcher(policy(), state) is first
    store.save(vectors[:3], [(f"doc-{i}", "text") for i in range(3)], "random")  # rebuilt in place
    rebuilt = site_searcher(policy(), state)
    assert rebuilt is not first and len(rebuilt.document_ids) == 3
    key.write_bytes(QuerierIdentity.generate().public_pem())  # another querier is trusted now
    rekeyed = site_searcher(policy(), state)
    assert rekeyed is not rebuilt and rekeyed.trusted_queriers != rebuilt.trusted_queriers
    assert site_searcher(policy(max_k=5), state).limits.max_k == 5

    assert site_searcher(policy(), str(tmp_path / "other-state")) is not site_searcher(policy(), state)
