"""CKKS backends for encrypted vector search: Microsoft SEAL through Pyfhel (fast path, rotations and
the baby-step/giant-step diagonal method) and through TenSEAL (fallback: no rotations in its Python
API, so it uses TenSEAL's own vector × matrix product, about 20× slower per site).

Both implement :class:`CkksBackend`, the small interface :mod:`privacy.vector_search` uses: the
querier creates keys (keeping the secret key) and encrypts queries; a site loads the *public* part
only, prepares its vectors once (encodes plaintexts it can cache) and scores an encrypted query;
the querier decrypts. Ciphertexts cross the interface as bytes.

Layout (he.md §3.1). Vectors of dimension d are padded to a block of ``P`` = 512 coordinates; the
last coordinate of the block carries a constant: 1 in the query, 0 in a real row and −2 in a padding
row, so padding rows score exactly −2 (below any cosine) without any extra homomorphic operation.
Pyfhel places ``S/P`` copies of the query in one ciphertext (S = N/2 slots) and, for a chunk of S
rows A, computes slot t = Σ_i D[t,i]·q[(t+i) mod P] with D[t,i] = A[t,(t+i) mod P] (Halevi–Shoup
diagonals of a tall matrix); splitting i = g·k + b (g baby steps, P/g giant steps) needs the g−1
baby rotations of the query once per query and P/g − 1 giant rotations per chunk, with the
plaintexts roll(D[:, gk+b], gk) encoded offline. Every result gets a fresh encryption of zero added
before it leaves the site (re-randomisation: the result is not the deterministic image of the
query); this is not noise flooding, so the result noise still depends on the site's data.
"""

from __future__ import annotations

import importlib.util
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

PADDING_SCORE = -2.0


class BackendError(RuntimeError):
    """A backend is missing or cannot read what it was given."""


@dataclass(frozen=True)
class CkksParameters:
    """CKKS parameters (128-bit security by SEAL's tables) and the packing (he.md §4.5)."""

    poly_modulus_degree: int = 8192
    coeff_bits: tuple[int, ...] = (60, 40, 60)
    scale_bits: int = 40
    block: int = 512
    baby_steps: int = 32

    def __post_init__(self) -> None:
        if self.slots % self.block or self.block % self.baby_steps:
            raise ValueError("block must divide N/2 and baby_steps must divide block")

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def giant_steps(self) -> int:
        return self.block // self.baby_steps

    def rotation_steps(self) -> list[int]:
        return list(range(1, self.baby_steps)) + [self.baby_steps * k for k in range(1, self.giant_steps)]

    def as_dict(self) -> dict[str, Any]:
        return {"poly_modulus_degree": self.poly_modulus_degree, "coeff_bits": list(self.coeff_bits),
                "scale_bits": self.scale_bits, "block": self.block, "baby_steps": self.baby_steps}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CkksParameters:
        return cls(int(data["poly_modulus_degree"]), tuple(int(b) for b in data["coeff_bits"]),
                   int(data["scale_bits"]), int(data["block"]), int(data["baby_steps"]))


def padded_rows(vectors: np.ndarray, block: int, rows: int) -> np.ndarray:
    """``vectors`` (n × d, d < block) as ``rows`` × block: real rows get 0 in the last coordinate,
    padding rows are zero with −2 there (they score exactly −2 against any query)."""
    n, d = vectors.shape
    if d >= block:
        raise ValueError(f"vectors of dimension {d} do not fit a block of {block} (one coordinate is reserved)")
    out = np.zeros((rows, block), dtype=np.float64)
    out[:n, :d] = vectors
    out[n:, block - 1] = PADDING_SCORE
    return out


def padded_query(query: np.ndarray, block: int) -> np.ndarray:
    out = np.zeros(block, dtype=np.float64)
    out[: len(query)] = query
    out[block - 1] = 1.0
    return out


class CkksBackend(ABC):
    """What the search protocol needs from a CKKS library."""

    name: ClassVar[str]

    def __init__(self, params: CkksParameters) -> None:
        self.params = params

    @classmethod
    def available(cls) -> bool:
        return importlib.util.find_spec(cls.module) is not None  # type: ignore[attr-defined]

    @abstractmethod
    def rows_per_ciphertext(self) -> int:
        """Database rows scored into one result ciphertext."""

    # ---- querier --------------------------------------------------------------------------
    @abstractmethod
    def create_keys(self) -> Any:
        """A private context (holding the secret key) for the querier."""

    @abstractmethod
    def public_parts(self, private: Any) -> dict[str, bytes]:
        """What a site needs: context, public key, rotation (Galois) keys. Never the secret key."""

    @abstractmethod
    def dump_private(self, private: Any) -> dict[str, bytes]:
        """The querier's own context (secret key included) as bytes, to keep a key epoch across
        searches in a file only the querier can read. Never sent anywhere."""

    @abstractmethod
    def load_private(self, parts: dict[str, bytes]) -> Any:
        """The inverse of :meth:`dump_private`."""

    @abstractmethod
    def encrypt_query(self, private: Any, query: np.ndarray) -> bytes: ...

    @abstractmethod
    def decrypt_scores(self, private: Any, results: list[bytes]) -> np.ndarray:
        """All slots of the result ciphertexts, in row order."""

    # ---- site -----------------------------------------------------------------------------
    @abstractmethod
    def load_public(self, parts: dict[str, bytes]) -> Any:
        """A site's evaluation context from the querier's public parts (no secret key)."""

    @abstractmethod
    def is_private(self, context: Any) -> bool:
        """Whether ``context`` holds a secret key (a site's never does)."""

    def encoding_context(self) -> Any:
        """A keyless context that can encode rows (for caching them before any key epoch)."""
        return None

    @abstractmethod
    def prepare(self, context: Any, vectors: np.ndarray, chunks: int) -> Any:
        """Encode the site's rows (padded to ``chunks`` result ciphertexts) for repeated queries."""

    @abstractmethod
    def score(self, context: Any, prepared: Any, query: bytes) -> list[bytes]:
        """Encrypted scores of every (padded) row against the encrypted query."""

    @abstractmethod
    def dump_prepared(self, prepared: Any) -> list[bytes]:
        """``prepared`` as byte strings, to cache on disk."""

    @abstractmethod
    def load_prepared(self, context: Any, blobs: list[bytes], chunks: int) -> Any:
        """The inverse of :meth:`dump_prepared`."""


class PyfhelBackend(CkksBackend):
    """Microsoft SEAL through Pyfhel: rotations with chosen steps, BSGS diagonal method."""

    name = "pyfhel"
    module = "Pyfhel"

    def rows_per_ciphertext(self) -> int:
        return self.params.slots

    def _context(self) -> Any:
        from Pyfhel import Pyfhel

        he = Pyfhel()
        p = self.params
        he.contextGen(scheme="ckks", n=p.poly_modulus_degree, scale=2.0**p.scale_bits, qi_sizes=list(p.coeff_bits))
        return he

    def encoding_context(self) -> Any:
        return self._context()

    def create_keys(self) -> Any:
        he = self._context()
        he.keyGen()
        he.rotateKeyGen(rot_steps=self.params.rotation_steps())
        return he

    def public_parts(self, private: Any) -> dict[str, bytes]:
        return {"context": private.to_bytes_context(), "public_key": private.to_bytes_public_key(),
                "rotation_keys": private.to_bytes_rotate_key(compr_mode="none")}

    def dump_private(self, private: Any) -> dict[str, bytes]:
        return {"context": private.to_bytes_context(), "public_key": private.to_bytes_public_key(),
                "secret_key": private.to_bytes_secret_key()}

    def load_private(self, parts: dict[str, bytes]) -> Any:
        return self._loaded(parts, ("context", "public_key", "secret_key"), "key epoch")

    @staticmethod
    def _loaded(parts: dict[str, bytes], names: tuple[str, ...], what: str) -> Any:
        """A Pyfhel context with the serialized ``names`` of ``parts`` loaded in order."""
        from Pyfhel import Pyfhel

        he = Pyfhel()
        loaders = {"context": he.from_bytes_context, "public_key": he.from_bytes_public_key,
                   "secret_key": he.from_bytes_secret_key, "rotation_keys": he.from_bytes_rotate_key}
        try:
            for name in names:
                loaders[name](parts[name])
        except (KeyError, RuntimeError, ValueError) as err:
            raise BackendError(f"cannot load the querier's {what} ({err})") from err
        return he

    def encrypt_query(self, private: Any, query: np.ndarray) -> bytes:
        p = self.params
        tiled = np.tile(padded_query(query, p.block), p.slots // p.block)
        return private.encryptFrac(tiled).to_bytes(compr_mode="none")

    def decrypt_scores(self, private: Any, results: list[bytes]) -> np.ndarray:
        return np.concatenate([private.decryptFrac(self._ciphertext(private, r)) for r in results]) if results \
            else np.zeros(0)

    def load_public(self, parts: dict[str, bytes]) -> Any:
        return self._loaded(parts, ("context", "public_key", "rotation_keys"), "public keys")

    def is_private(self, context: Any) -> bool:
        return not context.is_secret_key_empty()

    @staticmethod
    def _ciphertext(he: Any, data: bytes) -> Any:
        from Pyfhel import PyCtxt

        try:
            return PyCtxt(pyfhel=he, bytestring=data)
        except (RuntimeError, ValueError, TypeError) as err:
            raise BackendError(f"not a ciphertext of this key epoch ({err})") from err

    def prepare(self, context: Any, vectors: np.ndarray, chunks: int) -> list[list[list[Any]]]:
        p = self.params
        rows = padded_rows(vectors, p.block, chunks * p.slots)
        prepared = []
        columns = np.arange(p.block)
        for chunk in range(chunks):
            block_rows = rows[chunk * p.slots:(chunk + 1) * p.slots]
            t = np.arange(p.slots)[:, None]
            diagonals = block_rows[t, (t + columns[None, :]) % p.block]  # D[t, i] = A[t, (t+i) mod P]
            prepared.append([[context.encodeFrac(np.ascontiguousarray(np.roll(diagonals[:, g * p.baby_steps + b],
                                                                              g * p.baby_steps)))
                              for b in range(p.baby_steps)] for g in range(p.giant_steps)])
        return prepared

    def score(self, context: Any, prepared: list[list[list[Any]]], query: bytes) -> list[bytes]:
        p = self.params
        ct_query = self._ciphertext(context, query)
        baby = [ct_query] + [context.rotate(ct_query, b, in_new_ctxt=True) for b in range(1, p.baby_steps)]
        results = []
        for chunk in prepared:
            total = None
            for g, plaintexts in enumerate(chunk):
                inner = None
                for b, plaintext in enumerate(plaintexts):
                    term = context.multiply_plain(baby[b], plaintext, in_new_ctxt=True)
                    inner = term if inner is None else context.add(inner, term)
                if g:
                    context.rotate(inner, g * p.baby_steps)
                total = inner if total is None else context.add(total, inner)
            zero = context.encryptFrac(np.zeros(p.slots), scale=total.scale)  # fresh randomness
            context.add(total, zero)
            context.rescale_to_next(total)
            results.append(total.to_bytes(compr_mode="none"))
        return results


    def dump_prepared(self, prepared: list[list[list[Any]]]) -> list[bytes]:
        return [pt.to_bytes(compr_mode="none") for chunk in prepared for row in chunk for pt in row]

    def load_prepared(self, context: Any, blobs: list[bytes], chunks: int) -> list[list[list[Any]]]:
        from Pyfhel import PyPtxt

        p = self.params
        if len(blobs) != chunks * p.giant_steps * p.baby_steps:
            raise BackendError("cached encodings do not match the parameters")
        plaintexts = iter(blobs)
        return [[[PyPtxt(pyfhel=context, bytestring=next(plaintexts)) for _ in range(p.baby_steps)]
                 for _ in range(p.giant_steps)] for _ in range(chunks)]


class TensealBackend(CkksBackend):
    """Microsoft SEAL through TenSEAL: its vector × plain-matrix product (no custom rotations)."""

    name = "tenseal"
    module = "tenseal"
    ROWS = 2048

    def rows_per_ciphertext(self) -> int:
        return self.ROWS

    def create_keys(self) -> Any:
        import tenseal as ts

        p = self.params
        context = ts.context(ts.SCHEME_TYPE.CKKS, p.poly_modulus_degree, coeff_mod_bit_sizes=list(p.coeff_bits))
        context.global_scale = 2.0**p.scale_bits
        context.generate_galois_keys()
        return context

    def public_parts(self, private: Any) -> dict[str, bytes]:
        public = private.copy()
        public.make_context_public()
        return {"context": public.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=True,
                                            save_relin_keys=False)}

    def dump_private(self, private: Any) -> dict[str, bytes]:
        return {"context": private.serialize(save_public_key=True, save_secret_key=True, save_galois_keys=False,
                                             save_relin_keys=False)}

    def load_private(self, parts: dict[str, bytes]) -> Any:
        import tenseal as ts

        try:
            return ts.context_from(parts["context"])
        except (KeyError, ValueError, RuntimeError, TypeError) as err:
            raise BackendError(f"cannot load the querier's key epoch ({err})") from err

    def encrypt_query(self, private: Any, query: np.ndarray) -> bytes:
        import tenseal as ts

        return ts.ckks_vector(private, padded_query(query, self.params.block)).serialize()

    def decrypt_scores(self, private: Any, results: list[bytes]) -> np.ndarray:
        return np.concatenate([np.asarray(self._vector(private, r).decrypt()) for r in results]) if results \
            else np.zeros(0)

    def load_public(self, parts: dict[str, bytes]) -> Any:
        import tenseal as ts

        try:
            return ts.context_from(parts["context"])
        except (KeyError, ValueError, RuntimeError, TypeError) as err:
            raise BackendError(f"cannot load the querier's public keys ({err})") from err

    def is_private(self, context: Any) -> bool:
        return bool(context.is_private())

    @staticmethod
    def _vector(context: Any, data: bytes) -> Any:
        import tenseal as ts

        try:
            return ts.ckks_vector_from(context, data)
        except (ValueError, RuntimeError, TypeError) as err:
            raise BackendError(f"not a ciphertext of this key epoch ({err})") from err

    def prepare(self, context: Any, vectors: np.ndarray, chunks: int) -> list[np.ndarray]:
        rows = padded_rows(vectors, self.params.block, chunks * self.ROWS)
        return [np.ascontiguousarray(rows[c * self.ROWS:(c + 1) * self.ROWS].T) for c in range(chunks)]

    def score(self, context: Any, prepared: list[np.ndarray], query: bytes) -> list[bytes]:
        import tenseal as ts

        encrypted = self._vector(context, query)
        results = []
        for matrix in prepared:
            scores = encrypted.matmul(matrix)
            scores = scores + ts.ckks_vector(context, [0.0] * self.ROWS)  # fresh randomness
            results.append(scores.serialize())
        return results


    def dump_prepared(self, prepared: list[np.ndarray]) -> list[bytes]:
        return [np.ascontiguousarray(m, dtype=np.float64).tobytes() for m in prepared]

    def load_prepared(self, context: Any, blobs: list[bytes], chunks: int) -> list[np.ndarray]:
        if len(blobs) != chunks:
            raise BackendError("cached encodings do not match the parameters")
        return [np.frombuffer(b, dtype=np.float64).reshape(self.params.block, self.ROWS) for b in blobs]


BACKENDS: dict[str, type[CkksBackend]] = {"pyfhel": PyfhelBackend, "tenseal": TensealBackend}


def choose_backend(name: str = "auto", params: CkksParameters | None = None) -> CkksBackend:
    """``name`` ("auto": Pyfhel when installed, else TenSEAL), or a clear error saying what to install."""
    params = params or CkksParameters()
    if name == "auto":
        for candidate in BACKENDS.values():
            if candidate.available():
                return candidate(params)
        raise BackendError("no CKKS library installed: `make install` builds Pyfhel (SEAL); `pip install tenseal` "
                           "gives the slower fallback")
    if name not in BACKENDS:
        raise BackendError(f"unknown HE backend '{name}'; choose auto, {', '.join(BACKENDS)}")
    backend = BACKENDS[name]
    if not backend.available():
        raise BackendError(f"the {name} backend is not installed (module '{backend.module}')")
    return backend(params)


def chunks_for(rows: int, per_ciphertext: int) -> int:
    return max(1, math.ceil(rows / per_ciphertext))


__all__ = [
    "BACKENDS",
    "BackendError",
    "CkksBackend",
    "CkksParameters",
    "PyfhelBackend",
    "TensealBackend",
    "choose_backend",
    "chunks_for",
]
