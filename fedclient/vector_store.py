"""A site's document vector store for encrypted federated search (``fedclient index DIR``).

Documents are read from ``DIR``: ``*.txt`` (one document per file, id = the file's path relative to
DIR without suffix) and ``*.jsonl`` (objects with ``id`` and ``text``). They are embedded with the
MiniLM-L6 encoder (all-MiniLM-L6-v2 weights: mean pooling over real tokens, L2-normalised, 384-d),
or with the fine-tuned encoder of a finished run (``--encoder-weights FILE``, the file
``fedserver export RUN --out FILE.safetensors`` writes, loaded into the run's task model). The store lives in ``DIR/.fedtune-index/``: ``vectors.npy``
(float32), ``documents.json`` (id and SHA-256 of each text, row order) and ``meta.json`` (encoder,
dimension, count). Re-indexing embeds only new or changed documents and drops removed ones. The
encoded plaintext diagonals the encrypted search multiplies by are cached next to it
(``prepared-*.bin``) by :class:`privacy.vector_search.SiteSearcher`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np


INDEX_DIR = ".fedtune-index"


class VectorStoreError(ValueError):
    """The documents or the store cannot be used; the message says what to do."""


@dataclass(frozen=True)
class Document:
    id: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def read_documents(directory: pathlib.Path) -> list[Document]:
    """Every document under ``directory`` (``*.txt`` and ``*.jsonl``), sorted by id; ids must be unique."""
    if not directory.is_dir():
        raise VectorStoreError(f"{directory} is not a directory")
    documents: dict[str, Document] = {}
    problems = []
    for path in sorted(directory.rglob("*")):
        if INDEX_DIR in path.parts or not path.is_file():
            continue
        if path.suffix == ".txt":
            text = path.read_text(encoding="utf-8", errors="replace").strip()
            found: Iterator[tuple[str, str, str]] = iter([(str(path.relative_to(directory).with_suffix("")), text,
                                                            path.name)])
        elif path.suffix == ".jsonl":
            found = _jsonl(path, problems)
        else:
            continue
        for doc_id, text, where in found:
            if not text:
                problems.append(f"{where}: empty text")
            elif doc_id in documents:
                problems.append(f"{where}: duplicate id '{doc_id}'")
            else:
                documents[doc_id] = Document(doc_id, text)
    if problems:
        raise VectorStoreError(f"{len(problems)} problem(s) in {directory}:\n  " + "\n  ".join(problems[:20]))
    return [documents[k] for k in sorted(documents)]


def _jsonl(path: pathlib.Path, problems: list[str]) -> Iterator[tuple[str, str, str]]:
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            yield str(row["id"]), str(row["text"]).strip(), f"{path.name}:{number}"
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            problems.append(f"{path.name}:{number}: need an object with id and text ({err})")


@dataclass(frozen=True)
class IndexReport:
    added: int
    changed: int
    removed: int
    unchanged: int
    total: int
    encoder: str


class VectorStore:
    """``DIR/.fedtune-index``: the site's vectors and document ids."""

    def __init__(self, directory: str | pathlib.Path) -> None:
        self.source = pathlib.Path(directory).expanduser().resolve()
        self.path = self.source / INDEX_DIR

    def exists(self) -> bool:
        return (self.path / "meta.json").exists()

    def load(self) -> tuple[np.ndarray, list[str]]:
        if not self.exists():
            raise VectorStoreError(f"no vector store in {self.source}: build it with `fedclient index {self.source}`")
        vectors = np.load(self.path / "vectors.npy")
        ids = [d["id"] for d in json.loads((self.path / "documents.json").read_text())]
        if len(vectors) != len(ids):
            raise VectorStoreError(f"{self.path} is inconsistent ({len(vectors)} vectors, {len(ids)} ids); re-index")
        return vectors, ids

    def meta(self) -> dict:
        return json.loads((self.path / "meta.json").read_text()) if self.exists() else {}

    def build(self, encoder_run: str = "", progress: Callable[[int, int], None] | None = None) -> IndexReport:
        """Index (or update the index of) the documents in the source directory."""
        documents = read_documents(self.source)
        old_vectors, old_rows = np.zeros((0, 384), dtype=np.float32), {}
        meta = self.meta()
        encoder = "all-MiniLM-L6-v2" if not encoder_run else f"weights:{pathlib.Path(encoder_run).name}"
        if self.exists() and meta.get("encoder") == encoder:
            old_vectors, ids = self.load()
            hashes = [d["sha256"] for d in json.loads((self.path / "documents.json").read_text())]
            old_rows = {(i, h): row for row, (i, h) in enumerate(zip(ids, hashes, strict=True))}
        keep = [old_rows.get((d.id, d.sha256)) for d in documents]
        todo = [d for d, row in zip(documents, keep, strict=True) if row is None]
        fresh = np.zeros((0, 384), dtype=np.float32)
        if todo:
            from fedclient.tasks.embedding import Embedder, EmbeddingError  # torch: only when embedding

            try:
                embed = Embedder(encoder_run)
            except EmbeddingError as err:
                raise VectorStoreError(str(err)) from err
            done = [0]

            def advance(count: int) -> None:
                done[0] += count
                if progress:
                    progress(done[0], len(todo))

            fresh = embed([d.text for d in todo], progress=advance)
        vectors = np.zeros((len(documents), 384), dtype=np.float32)
        fresh_rows = iter(range(len(todo)))
        for row, old in enumerate(keep):
            vectors[row] = old_vectors[old] if old is not None else fresh[next(fresh_rows)]
        old_ids = {i for i, _ in old_rows}
        report = IndexReport(added=sum(d.id not in old_ids for d in todo), changed=sum(d.id in old_ids for d in todo),
                             removed=len(old_ids - {d.id for d in documents}), unchanged=len(documents) - len(todo),
                             total=len(documents), encoder=encoder)
        self.save(vectors, [(d.id, d.sha256) for d in documents], encoder, stale=bool(todo or report.removed))
        return report

    def save(self, vectors: np.ndarray, documents: list[tuple[str, str]], encoder: str, stale: bool = True) -> None:
        """Write the store: ``vectors`` (n × 384, L2-normalised) with each row's (document id, text
        SHA-256); ``stale`` drops the encodings made for the previous vectors."""
        from fedclient.tasks.embedding import MAX_TOKENS
        self.path.mkdir(parents=True, exist_ok=True)
        for old in self.path.glob("prepared-*.bin"):
            if stale:
                old.unlink()
        _atomic(self.path / "vectors.npy", lambda f: np.save(f, np.asarray(vectors, dtype=np.float32)))
        _atomic(self.path / "documents.json",
                lambda f: f.write(json.dumps([{"id": i, "sha256": h} for i, h in documents]).encode()))
        _atomic(self.path / "meta.json", lambda f: f.write(json.dumps(
            {"encoder": encoder, "dimension": 384, "count": len(documents), "max_tokens": MAX_TOKENS}).encode()))

    def encode_for_search(self, row_bound: int) -> tuple[str, float]:
        """Encode the rows for encrypted queries with ``row_bound`` ahead of any query (the encoding
        does not depend on the querier's keys); returns the backend used and the seconds it took."""
        import time

        from privacy.he_backends import choose_backend, chunks_for
        from privacy.vector_search import cached_preparation

        backend = choose_backend("auto")
        vectors, _ = self.load()
        if len(vectors) > row_bound:
            raise VectorStoreError(f"{len(vectors)} documents exceed the row bound {row_bound}; queries must use "
                                   "a larger bound")
        started = time.perf_counter()
        cached_preparation(backend, backend.encoding_context(), vectors,
                           chunks_for(row_bound, backend.rows_per_ciphertext()), self.path)
        return backend.name, time.perf_counter() - started


def _atomic(path: pathlib.Path, write: Callable) -> None:
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".tmp") as handle:
        write(handle)
    os.replace(handle.name, path)
