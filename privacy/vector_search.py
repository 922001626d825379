"""Encrypted top-k vector search across sites (federated retrieval; FRAG's setting, Zhao,
arXiv 2410.13272), following the protocol of ../shared/research/he.md §4, mode A.

Roles. The **querier** holds the only CKKS secret key and an Ed25519 identity the sites trust. Each
**site** holds plaintext, L2-normalised embeddings of its documents and never sees a query in the
clear. The coordinator only routes messages (Flower ``query.search`` messages through the SuperLink).

Flow.
1. Key epoch: the querier makes a CKKS context, secret key, public key and only the rotation keys the
   packing needs, and signs ``SHA-256(backend ‖ parameters ‖ epoch ‖ expiry ‖ public parts)``. A
   site accepts a bundle only if the signature verifies under a querier key it trusts and the epoch
   has not expired, and stores it by digest; later queries name the digest.
2. Query: the querier encrypts the normalised query once (replicated, padded layout; he.md §3.1),
   signs ``(query id, key digest, k, row bound, SHA-256(ciphertext))`` and sends it to every site.
3. Each site checks the signature, the key epoch and its **query budget for that querier** (charged
   before any computation; a refusal names the budget), scores every row with the baby-step/
   giant-step diagonal method (Pyfhel) or TenSEAL's product, adds a fresh encryption of zero, and
   pads its result to ``ceil(row bound / rows per ciphertext)`` ciphertexts so the number of
   ciphertexts does not reveal its row count.
4. The querier decrypts, merges the global top-k over (site, row) and asks **every** site for
   exactly k rows (its winners plus random other rows as padding), so a site cannot tell from the
   request how many of its rows won. Sites answer with document ids.

What leaks (stated plainly, he.md §4.4):
- To the querier: every score of every row of every site for each query, to ~1e-7. With about 384
  linearly independent queries a querier can solve for a site's vectors. The query budget is the
  only defence here and it must be far below 384 **in total** over the life of a site's data (the
  default is 64). Padding rows score exactly −2, so the querier also learns each site's row count.
- To each site: nothing about the query's content (IND-CPA of CKKS under the querier's key), but the
  querier's identity, when it queries, and which of its rows the querier fetched (k of them, winners
  hidden among padding rows, but a site that sees the documents' use elsewhere could tell).
- To the coordinator / network: message sizes and timing only; result sizes depend on the row bound,
  not on a site's row count.
- The fresh zero re-randomises each result but is not noise flooding: result noise still depends
  on the site's data (not circuit-private in the formal sense). Semi-honest model; a querier can
  craft queries (e.g. a basis vector reads one coordinate of every row).
FRAG's "multiplicative caching" is not used: it is not IND-CPA (he.md §1.4).
"""

from __future__ import annotations

import base64
import hashlib
import json
import pathlib
import secrets
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from privacy.he_backends import (
    PADDING_SCORE,
    BackendError,
    CkksBackend,
    CkksParameters,
    choose_backend,
    chunks_for,
)
from privacy.refusal import PolicyRefusal
from privacy.signing import KeyFileError, load_or_create_private_key, load_public_key, public_pem, raw_public
from privacy.state_file import locked, write_atomic

DEFAULT_QUERY_BUDGET = 64
DEFAULT_EPOCH_SECONDS = 24 * 3600
DEFAULT_ROW_BOUND = 10_000
_BUNDLE_MAGIC = b"FTKB1"


class SearchError(ValueError):
    """A search message cannot be used (bad signature, unknown or expired keys, empty store, ...)."""


class QueryRefused(SearchError):
    """The site refuses the query: the querier's budget at this site is spent."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode())


# ---- identities ------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuerierIdentity:
    """The querier's long-term Ed25519 signing key; sites pin its public key."""

    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> QuerierIdentity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: pathlib.Path) -> QuerierIdentity:
        """The identity in ``path`` (PEM), created with mode 0600 if absent; ``path``.pub gets the public key."""
        try:
            return cls(load_or_create_private_key(path))
        except KeyFileError as err:
            raise SearchError(str(err)) from err

    @property
    def public_bytes(self) -> bytes:
        return raw_public(self.private_key.public_key())

    def public_pem(self) -> bytes:
        return public_pem(self.private_key.public_key())

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_bytes)

    def sign(self, digest: bytes) -> bytes:
        return self.private_key.sign(digest)


def fingerprint(public_key: bytes) -> str:
    return "ed25519:" + hashlib.sha256(public_key).hexdigest()[:16]


def load_trusted_key(path: pathlib.Path) -> bytes:
    """A querier public key (PEM, as ``QuerierIdentity`` writes it) as raw bytes."""
    try:
        return raw_public(load_public_key(path, "querier's public key"))
    except KeyFileError as err:
        raise SearchError(str(err)) from err


def _verify(public_key: bytes, signature: bytes, digest: bytes, what: str) -> None:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, digest)
    except (InvalidSignature, ValueError) as err:
        raise SearchError(f"{what}: the querier's signature does not verify (tampered or forged)") from err


# ---- key epochs --------------------------------------------------------------------------------
@dataclass(frozen=True)
class KeyBundle:
    """The public half of a querier's key epoch, signed: what a site stores and evaluates with."""

    backend: str
    params: CkksParameters
    epoch: str
    expires_at: float
    querier: bytes
    parts: Mapping[str, bytes]
    signature: bytes = b""

    def digest(self) -> bytes:
        header = json.dumps({"backend": self.backend, "params": self.params.as_dict(), "epoch": self.epoch,
                             "expires_at": self.expires_at, "querier": _b64(self.querier)}, sort_keys=True)
        h = hashlib.sha256(header.encode())
        for name in sorted(self.parts):
            h.update(name.encode() + struct.pack(">Q", len(self.parts[name])))
            h.update(hashlib.sha256(self.parts[name]).digest())
        return h.digest()

    @property
    def key_id(self) -> str:
        return self.digest().hex()

    def to_bytes(self) -> bytes:
        names = sorted(self.parts)
        header = json.dumps({"backend": self.backend, "params": self.params.as_dict(), "epoch": self.epoch,
                             "expires_at": self.expires_at, "querier": _b64(self.querier),
                             "signature": _b64(self.signature),
                             "parts": [[n, len(self.parts[n])] for n in names]}).encode()
        return b"".join([_BUNDLE_MAGIC, struct.pack(">I", len(header)), header, *(self.parts[n] for n in names)])

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyBundle:
        try:
            if data[:5] != _BUNDLE_MAGIC:
                raise ValueError("not a fedtune key bundle")
            (length,) = struct.unpack(">I", data[5:9])
            header = json.loads(data[9:9 + length])
            offset, parts = 9 + length, {}
            for name, size in header["parts"]:
                parts[str(name)] = data[offset:offset + int(size)]
                if len(parts[name]) != int(size):
                    raise ValueError("truncated")
                offset += int(size)
            if offset != len(data):
                raise ValueError("trailing bytes")
            return cls(str(header["backend"]), CkksParameters.from_dict(header["params"]), str(header["epoch"]),
                       float(header["expires_at"]), _unb64(header["querier"]), parts, _unb64(header["signature"]))
        except (ValueError, KeyError, TypeError, struct.error, json.JSONDecodeError) as err:
            raise SearchError(f"unreadable key bundle ({err})") from err

    def verify(self, trusted: Sequence[bytes], now: float | None = None, *, current: bool = True) -> None:
        """SearchError unless a trusted querier signed this bundle (and, with ``current``, it has
        not expired)."""
        if self.querier not in trusted:
            raise SearchError(f"key bundle from querier {fingerprint(self.querier)}, which this site does not trust")
        _verify(self.querier, self.signature, self.digest(), "key bundle")
        if current:
            self.check_current(now)

    def check_current(self, now: float | None = None) -> None:
        """SearchError once the epoch has expired."""
        if (now or time.time()) > self.expires_at:
            raise SearchError(f"key epoch {self.epoch} expired at {time.strftime('%Y-%m-%d %H:%M', time.gmtime(self.expires_at))} UTC")


@dataclass
class KeyEpoch:
    """The querier's side of an epoch: the private context (secret key) plus the signed bundle."""

    backend: CkksBackend
    private: Any
    bundle: KeyBundle

    @classmethod
    def create(cls, identity: QuerierIdentity, backend: CkksBackend | str = "auto",
               lifetime_seconds: float = DEFAULT_EPOCH_SECONDS) -> KeyEpoch:
        backend = choose_backend(backend) if isinstance(backend, str) else backend
        private = backend.create_keys()
        unsigned = KeyBundle(backend.name, backend.params, secrets.token_hex(8), time.time() + lifetime_seconds,
                             identity.public_bytes, backend.public_parts(private))
        bundle = KeyBundle(**{**unsigned.__dict__, "signature": identity.sign(unsigned.digest())})
        return cls(backend, private, bundle)

    # ---- keeping an epoch across searches (the querier's files only) -------------------------
    def save(self, directory: pathlib.Path) -> None:
        """``DIR/<epoch>.secret`` (mode 0600: the secret key) and ``DIR/<epoch>.bundle`` (public)."""
        parts = self.backend.dump_private(self.private)
        header = json.dumps({"backend": self.backend.name, "params": self.backend.params.as_dict(),
                             "parts": sorted(parts)}).encode()
        write_atomic(directory / f"{self.bundle.epoch}.bundle", self.bundle.to_bytes(), mode=0o644)
        write_atomic(directory / f"{self.bundle.epoch}.secret", _frame([header, *(parts[n] for n in sorted(parts))]))

    @classmethod
    def load(cls, directory: pathlib.Path, epoch: str) -> KeyEpoch:
        """The epoch :meth:`save` wrote; SearchError if it is missing or damaged."""
        try:
            header, *blobs = _unframe((directory / f"{epoch}.secret").read_bytes())
            meta = json.loads(header)
            backend = choose_backend(str(meta["backend"]), CkksParameters.from_dict(meta["params"]))
            private = backend.load_private(dict(zip(meta["parts"], blobs, strict=True)))
            bundle = KeyBundle.from_bytes((directory / f"{epoch}.bundle").read_bytes())
        except (OSError, ValueError, KeyError, TypeError, struct.error, BackendError) as err:
            raise SearchError(f"cannot load key epoch {epoch} from {directory} ({err})") from err
        return cls(backend, private, bundle)

    @classmethod
    def current(cls, identity: QuerierIdentity, directory: pathlib.Path, backend: CkksBackend | str = "auto",
                lifetime_seconds: float = DEFAULT_EPOCH_SECONDS, margin_seconds: float = 600.0) -> tuple[KeyEpoch, bool]:
        """The newest epoch in ``directory`` of this identity and backend that is still valid for
        ``margin_seconds`` (so sites keep one key transfer per epoch), else a new one, saved;
        expired epochs' files are deleted. Returns the epoch and whether it is new."""
        backend = choose_backend(backend) if isinstance(backend, str) else backend
        now, best = time.time(), None
        for secret in directory.glob("*.secret") if directory.is_dir() else ():
            try:
                epoch = cls.load(directory, secret.stem)
            except SearchError:
                continue
            if epoch.bundle.expires_at < now:
                for suffix in (".secret", ".bundle"):
                    (directory / f"{secret.stem}{suffix}").unlink(missing_ok=True)
            elif (epoch.bundle.querier == identity.public_bytes and epoch.backend.name == backend.name
                  and epoch.backend.params == backend.params and epoch.bundle.expires_at > now + margin_seconds
                  and (best is None or epoch.bundle.expires_at > best.bundle.expires_at)):
                best = epoch
        if best is not None:
            return best, False
        epoch = cls.create(identity, backend, lifetime_seconds)
        epoch.save(directory)
        return epoch, True


# ---- messages ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class EncryptedQuery:
    """One encrypted query, signed by the querier."""

    query_id: str
    key_id: str
    k: int
    row_bound: int
    ciphertext: bytes
    querier: bytes
    signature: bytes = b""

    def digest(self) -> bytes:
        return hashlib.sha256(b"|".join([b"query", self.query_id.encode(), self.key_id.encode(), str(self.k).encode(),
                                         str(self.row_bound).encode(), hashlib.sha256(self.ciphertext).digest()])).digest()

    def to_record(self) -> dict[str, Any]:
        return {"query-id": self.query_id, "key-id": self.key_id, "k": self.k, "row-bound": self.row_bound,
                "ciphertext": self.ciphertext, "querier": self.querier, "signature": self.signature}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> EncryptedQuery:
        try:
            return cls(str(record["query-id"]), str(record["key-id"]), int(record["k"]), int(record["row-bound"]),
                       bytes(record["ciphertext"]), bytes(record["querier"]), bytes(record["signature"]))
        except (KeyError, TypeError, ValueError) as err:
            raise SearchError(f"malformed query message ({err})") from err


@dataclass(frozen=True)
class FetchRequest:
    """Exactly k rows asked of one site (winners and padding), signed by the querier."""

    query_id: str
    rows: tuple[int, ...]
    querier: bytes
    signature: bytes = b""

    def digest(self) -> bytes:
        return hashlib.sha256(b"fetch|" + self.query_id.encode() + b"|" + ",".join(map(str, self.rows)).encode()).digest()


@dataclass(frozen=True)
class Hit:
    site: str
    row: int
    score: float
    document_id: str = ""


# ---- the site ----------------------------------------------------------------------------------
ANSWERED_TTL_SECONDS = 24 * 3600
"""How long a site keeps the record of a query it answered: a fetch for it must come sooner."""


@dataclass(frozen=True)
class SearchLimits:
    """What a site grants each querier: the ``[search]`` table of its own policy.

    ``query_budget``: queries answered per querier over the life of the site's data (every answer
    reveals every score, so keep it far below the vectors' dimension, 384); ``fetch_budget``:
    document ids revealed per querier in total; ``max_rows_per_query``: the largest row bound it
    pads results to (bounds its memory and work); ``max_k``: the most rows one fetch may ask;
    ``max_key_epochs``: accepted key bundles kept per querier (expired ones are always deleted);
    ``max_key_days``: the longest a key bundle may stay valid from when it arrives (the querier
    chooses its expiry; a longer one is refused).
    """

    query_budget: int = DEFAULT_QUERY_BUDGET
    fetch_budget: int = DEFAULT_QUERY_BUDGET * 10
    max_rows_per_query: int = DEFAULT_ROW_BOUND
    max_k: int = 50
    max_key_epochs: int = 4
    max_key_days: float = 7.0

    def __post_init__(self) -> None:
        for name in ("query_budget", "fetch_budget"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"search.{name.replace('_', '-')} must be a whole number >= 0, got {getattr(self, name)!r}")
        for name in ("max_rows_per_query", "max_k", "max_key_epochs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"search.{name.replace('_', '-')} must be a whole number >= 1, got {getattr(self, name)!r}")
        if not (isinstance(self.max_key_days, (int, float)) and 0 < self.max_key_days <= 366):
            raise ValueError(f"search.max-key-days must be in (0, 366], got {self.max_key_days!r}")
        if self.max_rows_per_query > 1_000_000:
            raise ValueError(f"search.max-rows-per-query is at most 1000000, got {self.max_rows_per_query}")


class SearchLedger:
    """A site's record of what each querier was given, in one locked state file (or in memory):
    queries answered and document ids revealed per querier, and the queries answered and not yet
    fetched. Every change is made under the file's lock and written durably before the answer
    leaves the site (:mod:`privacy.state_file`)."""

    def __init__(self, path: pathlib.Path | None, limits: SearchLimits | None = None) -> None:
        self.path, self.limits = path, limits or SearchLimits()
        self._memory: dict[str, Any] = {"queriers": {}, "answered": {}}

    def _update(self, change) -> Any:
        """Apply ``change(data)`` to the ledger; nothing is written if it raises."""
        if self.path is None:
            data = json.loads(json.dumps(self._memory))
            result = change(data)
            self._memory = data
            return result
        with locked(self.path) as state:
            text = state.read_text()
            data = json.loads(text) if text else {"queriers": {}, "answered": {}}
            result = change(data)
            state.write_text(json.dumps(data))
            return result

    def used(self, querier: bytes) -> dict[str, int]:
        if self.path is None:
            data = self._memory
        else:
            with locked(self.path) as state:
                text = state.read_text()
            data = json.loads(text) if text else {"queriers": {}}
        return dict(data["queriers"].get(fingerprint(querier), {"queries": 0, "rows": 0}))

    def remaining(self, querier: bytes) -> int:
        return max(self.limits.query_budget - self.used(querier)["queries"], 0)

    def charge_query(self, query: EncryptedQuery, now: float | None = None) -> int:
        """Count one answered query and remember it for its fetch; QueryRefused (nothing
        recorded) when the querier's budget is spent, SearchError for a query answered before."""
        who, limit, moment = fingerprint(query.querier), self.limits.query_budget, now or time.time()

        def change(data: dict[str, Any]) -> int:
            answered = data["answered"]
            for old in [q for q, r in answered.items() if moment - r["at"] > ANSWERED_TTL_SECONDS]:
                del answered[old]
            if query.query_id in answered:
                raise SearchError(f"query {query.query_id} was answered already; a replayed query is not answered again")
            used = data["queriers"].setdefault(who, {"queries": 0, "rows": 0})
            if used["queries"] >= limit:
                raise QueryRefused(f"query budget exhausted: querier {who} has used all {limit} queries this site "
                                   "allows (each answer reveals every score; see the leakage note)")
            used["queries"] += 1
            answered[query.query_id] = {"querier": who, "k": query.k, "at": moment, "fetched": False}
            return limit - used["queries"]

        return self._update(change)

    def claim_fetch(self, query_id: str, querier: bytes, rows: int) -> None:
        """Allow one fetch of ``rows`` document ids for ``query_id``: only for a query this site
        answered for that querier, at most its k rows, once, within the querier's fetch budget."""
        who, limit = fingerprint(querier), self.limits.fetch_budget

        def change(data: dict[str, Any]) -> None:
            record = data["answered"].get(query_id)
            if record is None or record["querier"] != who:
                raise SearchError(f"fetch for query {query_id}, which this site did not answer for this querier")
            if record["fetched"]:
                raise SearchError(f"the rows of query {query_id} were fetched already; a fetch is answered once")
            if rows > int(record["k"]):
                raise SearchError(f"fetch asks for {rows} rows; query {query_id} asked for the top {record['k']}")
            used = data["queriers"].setdefault(who, {"queries": 0, "rows": 0})
            if used["rows"] + rows > limit:
                raise QueryRefused(f"fetch budget exhausted: querier {who} has been given {used['rows']} of the "
                                   f"{limit} document ids this site reveals")
            used["rows"] += rows
            record["fetched"] = True

        self._update(change)


class UnknownKeyEpoch(SearchError):
    """A query names a key epoch this site does not hold (send it the bundle, then ask again)."""


@dataclass
class SiteSearcher:
    """A site's side of the protocol over its vectors (n × d, L2-normalised) and document ids.
    Everything it allows comes from its own :class:`SearchLimits` (in ``ledger``)."""

    vectors: np.ndarray
    document_ids: Sequence[str]
    trusted_queriers: Sequence[bytes]
    ledger: SearchLedger
    key_dir: pathlib.Path | None = None
    cache_dir: pathlib.Path | None = None  # encoded plaintexts, reused across processes
    _bundles: dict[str, KeyBundle] = field(default_factory=dict)  # verified; by key id
    _contexts: dict[str, tuple[CkksBackend, Any]] = field(default_factory=dict)  # loaded public keys; by key id
    _prepared: dict[tuple[str, int], Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.vectors = np.asarray(self.vectors, dtype=np.float64)
        if self.vectors.ndim != 2 or len(self.vectors) != len(self.document_ids):
            raise SearchError("vectors must be n × d with one document id per row")

    @property
    def limits(self) -> SearchLimits:
        return self.ledger.limits

    def accept_keys(self, data: bytes) -> str:
        """Verify and store a key bundle; returns its id. Expired bundles are deleted, and at most
        ``max_key_epochs`` per querier are kept (the ones expiring last)."""
        bundle = KeyBundle.from_bytes(data)
        bundle.verify(self.trusted_queriers)
        if bundle.expires_at - time.time() > self.limits.max_key_days * 86400:
            raise PolicyRefusal("search.max-key-days", f"the key bundle stays valid for more than the "
                                f"{self.limits.max_key_days:g} days this site accepts")
        key_id = bundle.key_id  # a hash over ~36 MB of keys: computed once
        self._bundles[key_id] = bundle
        if self.key_dir is not None:
            if not (self.key_dir / f"{key_id}.bundle").exists():
                write_atomic(self.key_dir / f"{key_id}.bundle", data)
            write_atomic(self.key_dir / f"{key_id}.json", json.dumps(
                {"querier": fingerprint(bundle.querier), "expires_at": bundle.expires_at}).encode())
            self.prune_keys()
        return key_id

    def prune_keys(self, now: float | None = None) -> list[str]:
        """Delete expired bundles and those beyond ``max_key_epochs`` per querier; their ids."""
        if self.key_dir is None or not self.key_dir.is_dir():
            return []
        moment, kept, removed = now or time.time(), {}, []
        for meta in self.key_dir.glob("*.json"):
            try:
                info = json.loads(meta.read_text())
            except (OSError, ValueError):
                info = {"querier": "", "expires_at": 0}
            if float(info.get("expires_at", 0)) < moment:
                removed.append(meta.stem)
            else:
                kept.setdefault(str(info.get("querier")), []).append((float(info["expires_at"]), meta.stem))
        for epochs in kept.values():
            removed += [key_id for _, key_id in sorted(epochs, reverse=True)[self.limits.max_key_epochs:]]
        for key_id in removed:
            for suffix in (".bundle", ".json"):
                (self.key_dir / f"{key_id}{suffix}").unlink(missing_ok=True)
            self._bundles.pop(key_id, None)
            self._contexts.pop(key_id, None)
        return removed

    def _bundle(self, key_id: str) -> KeyBundle:
        """The accepted bundle ``key_id`` (verified once: when accepted, or when read back from disk by
        a new process); its expiry is checked on every use."""
        bundle = self._bundles.get(key_id)
        path = self.key_dir / f"{key_id}.bundle" if self.key_dir is not None and len(key_id) == 64 \
            and all(c in "0123456789abcdef" for c in key_id) else None
        if bundle is not None and self.key_dir is not None and (path is None or not path.exists()):
            self._bundles.pop(key_id, None)  # the site's operator deleted it (revoked the epoch): a searcher
            self._contexts.pop(key_id, None)  # kept across messages must not go on using it
            bundle = None
        if bundle is None and path is not None and path.exists():
            bundle = KeyBundle.from_bytes(path.read_bytes())
            bundle.verify(self.trusted_queriers, current=False)  # expiry: below, where it also prunes
            if bundle.key_id != key_id:
                raise SearchError(f"stored key bundle {key_id[:16]}… does not hash to its name; refusing it")
            self._bundles[key_id] = bundle
        if bundle is None:
            raise UnknownKeyEpoch(f"unknown key epoch {key_id[:16]}…: send this site the key bundle first")
        try:
            bundle.check_current()
        except SearchError:
            self.prune_keys()  # an expired bundle does not wait on disk for the next one to arrive
            raise
        return bundle

    def _context(self, key_id: str, bundle: KeyBundle) -> tuple[CkksBackend, Any]:
        """The backend and the site's evaluation context for a bundle, loaded once per key id."""
        if key_id not in self._contexts:
            backend = choose_backend(bundle.backend, bundle.params)
            context = backend.load_public(dict(bundle.parts))
            if backend.is_private(context):
                raise SearchError("the key bundle carries a secret key; refusing it")
            self._contexts = {key_id: (backend, context)}
        return self._contexts[key_id]

    def answer(self, query: EncryptedQuery) -> list[bytes]:
        """Encrypted scores of every row (padded to the query's row bound) for a valid query; the
        querier's budget is charged (durably) before anything that depends on the site's data, so a
        refusal that reveals something (e.g. more rows than the bound) costs a query too."""
        if query.querier not in self.trusted_queriers:
            raise SearchError(f"query from querier {fingerprint(query.querier)}, which this site does not trust")
        _verify(query.querier, query.signature, query.digest(), f"query {query.query_id}")
        if not 1 <= query.k <= self.limits.max_k:
            raise PolicyRefusal("search.max-k", f"the query asks for the top {query.k}; this site answers for at "
                                f"most {self.limits.max_k}")
        if not 1 <= query.row_bound <= self.limits.max_rows_per_query:
            raise PolicyRefusal("search.max-rows-per-query", f"the query's row bound is {query.row_bound}; this "
                                f"site pads results to at most {self.limits.max_rows_per_query} rows")
        bundle = self._bundle(query.key_id)
        self.ledger.charge_query(query)  # from here on any answer, a refusal included, says something of the data
        if len(self.vectors) == 0:
            raise SearchError("this site's vector store is empty: build it with `fedclient index DIR`")
        if len(self.vectors) > query.row_bound:
            raise SearchError(f"this site holds more rows than the query's row bound {query.row_bound}; ask with "
                              "a larger bound")
        if self.vectors.shape[1] >= bundle.params.block:
            raise SearchError("this site's vectors do not fit the epoch's block")
        try:
            backend, context = self._context(query.key_id, bundle)
            chunks = chunks_for(query.row_bound, backend.rows_per_ciphertext())
            prepared = self._prepared.get((query.key_id, chunks))
            if prepared is None:
                prepared = self._cached_preparation(backend, context, chunks)
                self._prepared = {(query.key_id, chunks): prepared}
            return backend.score(context, prepared, query.ciphertext)
        except BackendError as err:
            raise SearchError(f"query {query.query_id}: {err}") from err

    def _cached_preparation(self, backend: CkksBackend, context: Any, chunks: int) -> Any:
        if self.cache_dir is None:
            return backend.prepare(context, self.vectors, chunks)
        return cached_preparation(backend, context, self.vectors, chunks, self.cache_dir)

    def fetch(self, request: FetchRequest) -> list[str]:
        """Document ids for the requested rows (padding rows beyond the store give ""): answered
        only for a query this site answered, for at most its k rows, once, and charged."""
        if request.querier not in self.trusted_queriers:
            raise SearchError(f"fetch from querier {fingerprint(request.querier)}, which this site does not trust")
        _verify(request.querier, request.signature, request.digest(), f"fetch for {request.query_id}")
        if len(set(request.rows)) != len(request.rows) or any(r < 0 for r in request.rows):
            raise SearchError(f"fetch for {request.query_id} repeats a row or names a negative one")
        self.ledger.claim_fetch(request.query_id, request.querier, len(request.rows))
        return [str(self.document_ids[r]) if r < len(self.document_ids) else "" for r in request.rows]


def cached_preparation(backend: CkksBackend, context: Any, vectors: np.ndarray, chunks: int,
                       cache_dir: pathlib.Path) -> Any:
    """A site's encoded rows: from ``cache_dir`` when this backend, parameters, row bound and vectors
    were encoded before (encoding does not depend on the keys, so ``fedclient index`` can do it ahead
    of any query), else encoded and cached; a damaged cache file is encoded again, never trusted."""
    vectors = np.asarray(vectors, dtype=np.float64)
    key = hashlib.sha256(json.dumps([backend.name, backend.params.as_dict(), chunks]).encode()
                         + vectors.tobytes()).hexdigest()[:24]
    path = cache_dir / f"prepared-{key}.bin"
    if path.exists():
        try:
            return backend.load_prepared(context, _unframe(path.read_bytes()), chunks)
        except (BackendError, ValueError, struct.error):
            path.unlink(missing_ok=True)
    prepared = backend.prepare(context, vectors, chunks)
    cache_dir.mkdir(parents=True, exist_ok=True)
    for stale in cache_dir.glob("prepared-*.bin"):
        stale.unlink()
    write_atomic(path, _frame(backend.dump_prepared(prepared)))
    return prepared


def _frame(blobs: Sequence[bytes]) -> bytes:
    return struct.pack(">I", len(blobs)) + b"".join(struct.pack(">Q", len(b)) for b in blobs) + b"".join(blobs)


def _unframe(data: bytes) -> list[bytes]:
    (count,) = struct.unpack(">I", data[:4])
    sizes = struct.unpack(f">{count}Q", data[4:4 + 8 * count])
    blobs, offset = [], 4 + 8 * count
    for size in sizes:
        blobs.append(data[offset:offset + size])
        offset += size
    if offset != len(data):
        raise ValueError("cache file has trailing or missing bytes")
    return blobs


# ---- the querier -------------------------------------------------------------------------------
@dataclass
class Querier:
    """The querier's side: encrypt, merge, fetch. Holds the epoch's secret key."""

    identity: QuerierIdentity
    epoch: KeyEpoch

    def encrypt(self, query: np.ndarray, k: int = 10, row_bound: int = DEFAULT_ROW_BOUND) -> EncryptedQuery:
        query = np.asarray(query, dtype=np.float64)
        norm = float(np.linalg.norm(query))
        if query.ndim != 1 or norm == 0 or not np.isfinite(norm):
            raise SearchError("the query must be a non-zero finite vector")
        if not 1 <= k <= 1000:
            raise SearchError(f"k must be in 1..1000, got {k}")
        ciphertext = self.epoch.backend.encrypt_query(self.epoch.private, query / norm)
        unsigned = EncryptedQuery(secrets.token_hex(8), self.epoch.bundle.key_id, k, row_bound, ciphertext,
                                  self.identity.public_bytes)
        return EncryptedQuery(**{**unsigned.__dict__, "signature": self.identity.sign(unsigned.digest())})

    def site_scores(self, ciphertexts: Sequence[bytes], row_bound: int) -> np.ndarray:
        """One site's decrypted scores for its real rows (padding rows, at −2, dropped). SearchError
        for a reply no honest site sends (a site is not trusted either): more ciphertexts than the
        row bound needs, bytes that are no ciphertext of this epoch, or scores outside
        [−2, 1] beyond CKKS noise (cosines of unit vectors lie in [−1, 1], padding at −2)."""
        backend = self.epoch.backend
        if len(ciphertexts) > chunks_for(row_bound, backend.rows_per_ciphertext()):
            raise SearchError(f"{len(ciphertexts)} result ciphertexts for a row bound of {row_bound}")
        try:
            values = backend.decrypt_scores(self.epoch.private, list(ciphertexts))
        except Exception as err:  # noqa: BLE001 (the bytes are the site's: any failure is its reply's fault)
            raise SearchError(f"results that do not decrypt ({type(err).__name__}: {err})") from None
        if not (np.all(np.isfinite(values)) and np.all(values >= PADDING_SCORE - 0.01) and np.all(values <= 1.01)):
            raise SearchError("scores outside the range of cosines and padding")
        real = np.flatnonzero(values > PADDING_SCORE / 2)
        return values[: real[-1] + 1] if len(real) else values[:0]

    def scores(self, results: Mapping[str, Sequence[bytes]], row_bound: int) -> dict[str, np.ndarray]:
        """:meth:`site_scores` of every site (SearchError on the first unusable reply)."""
        return {site: self.site_scores(ciphertexts, row_bound) for site, ciphertexts in results.items()}

    def top_k(self, scores: Mapping[str, np.ndarray], k: int) -> list[Hit]:
        """The global top-k over (site, row), ties broken by site name then row."""
        candidates = [(-float(v), site, int(row)) for site, values in scores.items()
                      for row, v in zip(*_top(values, k), strict=True)]
        return [Hit(site, row, -neg) for neg, site, row in sorted(candidates)[:k]]

    def fetch_requests(self, query_id: str, hits: Sequence[Hit], scores: Mapping[str, np.ndarray],
                       k: int) -> dict[str, FetchRequest]:
        """Exactly k rows per site: its winning rows, then random other rows of it as padding
        (rows past its store when it has fewer than k), in shuffled order."""
        rng = np.random.default_rng()
        requests = {}
        for site, values in scores.items():
            wanted = [h.row for h in hits if h.site == site]
            others = [r for r in rng.permutation(max(len(values), k)).tolist() if r not in wanted]
            rows = wanted + others[: k - len(wanted)]
            rows = tuple(rows[i] for i in rng.permutation(len(rows)))
            unsigned = FetchRequest(query_id, rows, self.identity.public_bytes)
            requests[site] = FetchRequest(query_id, rows, unsigned.querier, self.identity.sign(unsigned.digest()))
        return requests

    @staticmethod
    def resolve(hits: Sequence[Hit], requests: Mapping[str, FetchRequest], replies: Mapping[str, Sequence[str]]) -> list[Hit]:
        """The hits with their document ids, from the sites' fetch replies (padding discarded)."""
        resolved = []
        for hit in hits:
            rows = requests[hit.site].rows
            ids = replies[hit.site]
            resolved.append(Hit(hit.site, hit.row, hit.score, ids[rows.index(hit.row)]))
        return resolved


def _top(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if len(values) == 0:
        return np.zeros(0, dtype=np.int64), values
    count = min(k, len(values))
    rows = np.argpartition(-values, count - 1)[:count]
    return rows, values[rows]


def exact_top_k(vectors_by_site: Mapping[str, np.ndarray], query: np.ndarray, k: int) -> list[Hit]:
    """The plaintext answer the encrypted search must reproduce (cosine on normalised vectors)."""
    query = np.asarray(query, dtype=np.float64) / np.linalg.norm(query)
    scores = {site: np.asarray(v, dtype=np.float64) @ query for site, v in vectors_by_site.items()}
    candidates = [(-float(s), site, int(r)) for site, values in scores.items() for r, s in enumerate(values)]
    return [Hit(site, row, -neg) for neg, site, row in sorted(candidates)[:k]]
