r"""Secure aggregation: the coordinator learns the sum of the sites' vectors and nothing else.

Bonawitz, Ivanov, Kreuter, Marcedone, McMahan, Patel, Ramage, Segal, Seth, "Practical Secure
Aggregation for Privacy-Preserving Machine Learning", CCS 2017 (arXiv 1611.04482), §4 (the
protocol) with its active-adversary variant's signatures on the advertised keys and its consistency
check. One aggregation is five exchanges between the coordinator (:class:`SecAggCoordinator`) and
each site (:class:`SecAggSite`):

0. **Advertise keys.** Site :math:`u` draws two X25519 key pairs for this aggregation only,
   :math:`(c_u^{pk}, c_u^{sk})` (to encrypt shares) and :math:`(s_u^{pk}, s_u^{sk})` (to agree
   masks), and signs :math:`(\text{session}, u, c_u^{pk}, s_u^{pk}, \text{layout}_u, \text{terms})`
   with its identity key (its enrolled key at a real site). The *layout* names the vectors the site
   will send and their lengths, so that masks can be per vector ("key") and partial replies still
   sum; *terms* is a digest of the round's training terms as the site received them, so every site
   can check the others were asked the same (a coordinator cannot give the others a zero learning
   rate and subtract their known updates from the sum). The coordinator keeps the set :math:`U_1`.
1. **Share keys.** Every site checks the roster (every signature; distinct identity keys; the same
   terms; one length per vector name; a threshold :math:`t` of at least a majority of the roster and
   of its policy's ``min-threshold``), draws a self-mask seed :math:`b_u`, Shamir-shares
   :math:`s_u^{sk}` and :math:`b_u` with threshold :math:`t` among :math:`U_1`, and sends share
   :math:`j` to site :math:`v` encrypted with AES-256-GCM under
   :math:`\mathrm{HKDF}(\mathrm{X25519}(c_u^{sk}, c_v^{pk}))`, the session, :math:`u` and :math:`v`
   bound as associated data (a share moved to another pair, round or run fails to decrypt). It
   also commits to :math:`b_u` (SHA-256). The coordinator keeps the set :math:`U_2` of senders.
2. **Masked input.** Site :math:`u` sends, per vector :math:`k` of its layout, in
   :math:`\mathbb Z_{2^m}`,

   .. math:: y_{u,k} = x_{u,k} + \mathrm{PRG}(b_u, k)
             + \sum_{v \in U_2,\, v > u,\, k \in v} \mathrm{PRG}(s_{u,v}, k)
             - \sum_{v \in U_2,\, v < u,\, k \in v} \mathrm{PRG}(s_{u,v}, k),

   :math:`s_{u,v} = \mathrm{HKDF}(\mathrm{X25519}(s_u^{sk}, s_v^{pk}))`, PRG = AES-256-CTR keyed by
   HKDF of the seed and the vector's name. One site's :math:`y_u` is uniform over
   :math:`\mathbb Z_{2^m}` to anyone without its seeds. The coordinator keeps the senders
   :math:`U_3` and sums their :math:`y`.
3. **Consistency check.** The coordinator sends :math:`U_3` to its sites; each signs it once
   (:func:`survivors_statement`). Since :math:`t` is more than half the roster, no two different
   survivor sets can both collect :math:`t` honest signatures.
4. **Unmask.** The coordinator asks the sites that confirmed for their shares of :math:`b_u` for
   :math:`u \in U_3` and of :math:`s_u^{sk}` for :math:`u \in U_2 \setminus U_3` (dropped after
   sharing, before masking), showing at least :math:`t` signatures of :math:`U_3`. A site answers
   once per aggregation and refuses a request for another survivor set than the one it signed, with
   fewer than :math:`t` valid signatures of it, asking for both kinds of share of one site, listing
   itself as dropped, or that is not a partition of :math:`U_2`: with both of a site's seeds the
   coordinator could unmask that site's own vector, and telling different sites different survivor
   sets is how it would get them. From any :math:`t` answers the coordinator rebuilds each
   :math:`b_u` (checked against its commitment) and each dropped :math:`s_u^{sk}` (checked against
   :math:`s_u^{pk}`), removes the self-masks and the pairwise masks the survivors still hold with
   dropped sites, and keeps :math:`\sum_{u \in U_3} x_u`.

Up to :math:`|U_2| - t` sites may drop after sharing; :math:`t` is at least a majority of
:math:`U_1` and a site's own policy sets the least :math:`t` and the fewest sites it masks with.

**Fixed point** (:class:`FixedPoint`). Values are scaled by :math:`s` and rounded *stochastically*
(:math:`\lfloor xs + U \rfloor`, unbiased) into :math:`\mathbb Z_{2^m}` (two's complement);
:meth:`FixedPoint.sized` picks the largest power-of-two :math:`s` such that the sum of ``sites``
vectors with entries in :math:`[-B, B]` (plus any noise margin) cannot wrap. The integer sum is
exact: decoding the unmasked sum gives :math:`\sum_u \mathrm{round}(x_u s)/s`.

**Trust.** The coordinator relays the roster; a site trusts an identity key in it only as far as
its ``verify_peer`` callback says (at a real site: the fingerprints its policy pins, else any key:
then a coordinator that adds sites of its own to the roster can isolate one honest site, which
pinning rules out, since every roster site must hold a distinct pinned key).
Secrets never leave the site unencrypted except the shares the unmask step asks for. This module
is pure (``cryptography``, numpy); the Flower messages are in :mod:`fedserver.strategy` and
:mod:`fedclient.local`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from aggregators.base import SUMMABLE, FieldKind, Payload

PROTOCOL = b"fedtune-secagg/v1"
FIELD_PRIME = 2**521 - 1
"""Shamir's field: a Mersenne prime above every 32-byte secret."""
MAX_BITS = 62
"""The largest modulus exponent: sums stay exact in uint64 arithmetic."""
MAX_SITES = 10_000
MAX_ADVERTISEMENT = 1 << 20
MAX_SUBSETS = 256
"""How many subsets of the unmask answers the coordinator tries when one holds a tampered share."""


class SecAggError(ValueError):
    """A secure-aggregation message that cannot be accepted; the message says which and why."""


class SecAggRefusal(SecAggError):
    """A site refuses a coordinator's request that could reveal what secure aggregation hides."""


# ---- fixed-point encoding ------------------------------------------------------------------------
@dataclass(frozen=True)
class FixedPoint:
    """Values :math:`x` as integers :math:`\\lfloor x\\cdot\\text{scale} + U\\rfloor \\bmod 2^{\\text{bits}}`."""

    bits: int
    scale: float

    def __post_init__(self) -> None:
        if not 8 <= self.bits <= MAX_BITS:
            raise SecAggError(f"secure aggregation's modulus must be 2^8..2^{MAX_BITS}, got 2^{self.bits}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise SecAggError(f"fixed-point scale must be positive and finite, got {self.scale}")

    @classmethod
    def sized(cls, sites: int, bound: float, bits: int = 32, margin: float = 0.0) -> FixedPoint:
        """The finest power-of-two scale at which ``sites`` vectors with entries in ``[-bound, bound]``,
        plus ``margin`` (e.g. a multiple of the summed noise's standard deviation, in value units),
        sum without wrapping around ``2^bits`` (one bit for the sign, one for the rounding)."""
        if sites < 1 or not (bound > 0 and math.isfinite(bound)) or margin < 0:
            raise SecAggError(f"cannot size a modulus for {sites} sites, bound {bound}, margin {margin}")
        room = 2 ** (bits - 1) - 1 - sites  # each site's rounding adds at most 1
        if room <= 0:
            raise SecAggError(f"2^{bits} is too small for {sites} sites; use more bits")
        exponent = math.floor(math.log2(room / (sites * bound + margin)))
        return cls(bits, math.ldexp(1.0, exponent))

    @property
    def modulus(self) -> int:
        return 1 << self.bits

    @property
    def wire_dtype(self) -> np.dtype:
        """The residues' dtype, in arithmetic and on the wire: uint32 up to 2^32 (unsigned
        arithmetic wraps modulo 2^32 by itself), else uint64."""
        return np.dtype(np.uint32) if self.bits <= 32 else np.dtype(np.uint64)

    def encode(self, values: np.ndarray, rng: np.random.Generator, bound: float | None = None) -> np.ndarray:
        """``values`` (clipped to ``[-bound, bound]`` when given) as residues, rounded stochastically."""
        x = np.asarray(values, dtype=np.float64).reshape(-1)
        if not np.isfinite(x).all():
            raise SecAggError("cannot encode NaN or infinite values")
        if bound is not None:
            x = np.clip(x, -bound, bound)
        scaled = x * self.scale
        integers = np.floor(scaled + rng.random(scaled.shape)).astype(np.int64)
        return self.reduce(integers.view(np.uint64))

    def encode_integers(self, values: np.ndarray) -> np.ndarray:
        """Integers already in fixed point (e.g. noised), as residues."""
        return self.reduce(np.asarray(values, dtype=np.int64).reshape(-1).view(np.uint64))

    def reduce(self, residues: np.ndarray) -> np.ndarray:
        residues = np.asarray(residues).astype(self.wire_dtype, copy=False)  # mod 2^32 or 2^64: both multiples
        if self.bits == 8 * self.wire_dtype.itemsize:
            return residues
        return np.bitwise_and(residues, self.wire_dtype.type(self.modulus - 1))

    def decode(self, residues: np.ndarray) -> np.ndarray:
        """Signed integers from residues (two's complement in ``bits``), divided by the scale."""
        return self.signed(residues).astype(np.float64) / self.scale

    def signed(self, residues: np.ndarray) -> np.ndarray:
        r = self.reduce(residues).astype(np.int64)
        return np.where(r >= (1 << (self.bits - 1)), r - self.modulus, r)


# ---- primitives ----------------------------------------------------------------------------------
def _hkdf(secret: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(hashes.SHA256(), length, salt=PROTOCOL, info=info).derive(secret)


def mask_stream(seed: bytes, label: str, count: int, fixed: FixedPoint) -> np.ndarray:
    """``count`` pseudo-random residues mod ``2^bits``: AES-256-CTR keyed by HKDF(seed, label)."""
    key = _hkdf(seed, b"mask|" + label.encode())
    width = 4 if fixed.bits <= 32 else 8
    stream = Cipher(algorithms.AES(key), modes.CTR(b"\0" * 16)).encryptor().update(b"\0" * (width * count))
    return fixed.reduce(np.frombuffer(stream, dtype=fixed.wire_dtype))


def shamir_split(secret: int, threshold: int, holders: Sequence[int]) -> dict[int, int]:
    """Shares :math:`f(x_j)` of a random polynomial of degree ``threshold - 1`` with :math:`f(0)` =
    ``secret`` over GF(2^521 − 1), one per holder :math:`x_j` (distinct, non-zero)."""
    if not 0 <= secret < FIELD_PRIME:
        raise SecAggError("a Shamir secret must lie in the field")
    if not 1 <= threshold <= len(holders) or len(set(holders)) != len(holders) or 0 in holders:
        raise SecAggError(f"cannot share with threshold {threshold} among {len(holders)} holders")
    coefficients = [secret] + [secrets.randbelow(FIELD_PRIME) for _ in range(threshold - 1)]

    def f(x: int) -> int:
        y = 0
        for c in reversed(coefficients):
            y = (y * x + c) % FIELD_PRIME
        return y

    return {x: f(x) for x in holders}


def shamir_combine(shares: Mapping[int, int]) -> int:
    """:math:`f(0)` by Lagrange interpolation from ``shares`` (exactly ``threshold`` of them give the
    secret; a wrong share gives a wrong value, which callers check against a commitment)."""
    points = list(shares.items())
    secret = 0
    for i, (xi, yi) in enumerate(points):
        numerator, denominator = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                numerator = numerator * (-xj) % FIELD_PRIME
                denominator = denominator * (xi - xj) % FIELD_PRIME
        secret = (secret + yi * numerator * pow(denominator, -1, FIELD_PRIME)) % FIELD_PRIME
    return secret


def _canonical(kind: str, session: bytes, *fields: Any) -> bytes:
    """What a site signs: the protocol, the kind of statement, the session and the fields, as one
    unambiguous JSON text."""
    return PROTOCOL + b"|" + json.dumps([kind, session.hex(), *fields], sort_keys=True).encode()


def survivors_statement(session: bytes, survivors: Iterable[int], roster: str) -> bytes:
    """What a site signs to confirm the set of sites whose masked inputs the coordinator holds
    (Bonawitz et al.'s consistency check), with the digest of the roster it was shown."""
    return _canonical("survivors", session, sorted(int(s) for s in survivors), roster)


def roster_digest(roster: Iterable[Advertisement]) -> str:
    """One roster, whatever order it came in: every site must have been shown the same (a site's
    weight share and which sites it masks with depend on it)."""
    return hashlib.sha256(json.dumps(sorted(ad.to_json() for ad in roster)).encode()).hexdigest()


def session_id(run: str, server_round: int, phase: str = "train") -> bytes:
    """What binds every signature, share and mask of one aggregation: the run, round and phase."""
    return hashlib.sha256(b"|".join([PROTOCOL, run.encode(), str(int(server_round)).encode(),
                                     phase.encode()])).digest()


def _raw(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def _x25519_public(data: bytes, what: str) -> X25519PublicKey:
    try:
        return X25519PublicKey.from_public_bytes(bytes(data))
    except ValueError as err:
        raise SecAggError(f"{what} is not an X25519 public key") from err


def identity_public_bytes(key: Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    """A site identity key's public half as DER (SubjectPublicKeyInfo): Ed25519 or ECDSA."""
    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def identity_sign(key: Ed25519PrivateKey | ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    if isinstance(key, Ed25519PrivateKey):
        return key.sign(data)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    raise SecAggError(f"a site identity key must be Ed25519 or ECDSA, not {type(key).__name__}")


def identity_verifies(public_der: bytes, signature: bytes, data: bytes) -> bool:
    try:
        key = serialization.load_der_public_key(bytes(public_der))
        if isinstance(key, Ed25519PublicKey):
            key.verify(bytes(signature), data)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(bytes(signature), data, ec.ECDSA(hashes.SHA256()))
        else:
            return False
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


# ---- messages ------------------------------------------------------------------------------------
Layout = dict[str, int]
"""The vectors a site sends: name → number of entries."""


@dataclass(frozen=True)
class Advertisement:
    """Step 0: a site's per-aggregation public keys and layout, signed by its identity key."""

    site: int
    encryption_key: bytes  # c_u^pk
    mask_key: bytes  # s_u^pk
    layout: Layout
    identity: bytes  # DER public key
    signature: bytes
    terms: str = ""  # a digest of the round's common training terms (every site must have the same)
    weight: int = 1  # the site's weight in the mean (its capped example count; 1 unweighted)

    def signed_bytes(self, session: bytes) -> bytes:
        return _canonical("advertise", session, self.site, self.encryption_key.hex(), self.mask_key.hex(),
                          self.layout, self.identity.hex(), self.terms, self.weight)

    def to_json(self) -> str:
        return json.dumps({"site": self.site, "encryption-key": self.encryption_key.hex(),
                           "mask-key": self.mask_key.hex(), "layout": self.layout, "identity": self.identity.hex(),
                           "signature": self.signature.hex(), "terms": self.terms, "weight": self.weight},
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Advertisement:
        if not isinstance(text, str) or len(text) > MAX_ADVERTISEMENT:
            raise SecAggError("a key advertisement must be a JSON text of at most "
                              f"{MAX_ADVERTISEMENT} characters")
        try:
            data = json.loads(text)
            layout = data["layout"]
            if not isinstance(layout, dict) or not all(isinstance(k, str) and type(v) is int and 0 < v <= 2**31
                                                       for k, v in layout.items()):
                raise SecAggError("a layout maps vector names to positive lengths")
            if type(data["site"]) is not int or not 0 < data["site"] < 2**63:
                raise SecAggError("a site id is a positive 63-bit integer")
            if not isinstance(data.get("terms", ""), str) or len(data.get("terms", "")) > 128:
                raise SecAggError("terms are a digest")
            if type(data.get("weight", 1)) is not int or not 1 <= data.get("weight", 1) <= 2**31:
                raise SecAggError("a weight is a whole number in 1..2^31")
            return cls(data["site"], bytes.fromhex(data["encryption-key"]), bytes.fromhex(data["mask-key"]), layout,
                       bytes.fromhex(data["identity"]), bytes.fromhex(data["signature"]), data.get("terms", ""),
                       data.get("weight", 1))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            if isinstance(err, SecAggError):
                raise SecAggError(f"malformed key advertisement: {err}") from None
            raise SecAggError(f"malformed key advertisement ({type(err).__name__}: {str(err)[:80]})") from None


@dataclass(frozen=True)
class UnmaskRequest:
    """Step 3: whose self-mask seeds (``survivors``) and whose mask keys (``dropped``) to reveal."""

    survivors: tuple[int, ...]
    dropped: tuple[int, ...]


# ---- the site's half -----------------------------------------------------------------------------
PeerCheck = Callable[[int, bytes], bool]
"""``verify_peer(site, identity_der)``: whether this site trusts ``identity_der`` as ``site``'s key."""


class SecAggSite:
    """One site's side of one aggregation (module docstring), a state machine that accepts each
    step once and in order; every refusal raises :class:`SecAggRefusal` naming what was wrong."""

    STEPS = ("new", "advertised", "shared", "masked", "confirmed", "unmasked")

    def __init__(self, site: int, identity_key: Ed25519PrivateKey | ec.EllipticCurvePrivateKey, session: bytes,
                 *, verify_peer: PeerCheck, min_threshold: int = 2, min_sites: int = 2, max_colluders: int = 0,
                 max_sites: int = MAX_SITES, max_weight: int = 2**31) -> None:
        self.site, self.identity_key, self.session = int(site), identity_key, bytes(session)
        self.verify_peer, self.min_threshold, self.min_sites = verify_peer, int(min_threshold), int(min_sites)
        self.max_colluders, self.max_sites, self.max_weight = int(max_colluders), int(max_sites), int(max_weight)
        self.roster_digest = ""
        self.step = "new"
        self._encryption = X25519PrivateKey.generate()
        self._masking = X25519PrivateKey.generate()
        self._self_seed = os.urandom(32)
        self.layout: Layout = {}
        self.roster: dict[int, Advertisement] = {}
        self.threshold = 0
        self.received: dict[int, tuple[int, int]] = {}  # sender -> (its mask-key share, its self-seed share)
        self.own_shares: tuple[int, int] = (0, 0)
        self.masked_with: tuple[int, ...] = ()
        self.survivors: tuple[int, ...] = ()
        self.terms = ""

    def _advance(self, expected: str, to: str) -> None:
        if self.step != expected:
            raise SecAggRefusal(f"secure aggregation: a '{to}' request arrived at step '{self.step}' "
                                "(each step is answered once, in order; a replayed or out-of-order request)")
        self.step = to

    # step 0
    def advertise(self, layout: Mapping[str, int], terms: str = "", weight: int = 1) -> Advertisement:
        """Step 0: ``layout`` the vectors this site will send, ``terms`` a digest of the round's
        training terms as this site received them (every roster site must show the same: a
        coordinator cannot set the others' learning rate to 0 and subtract known updates); ``weight``
        is its public weight in the mean."""
        self._advance("new", "advertised")
        self.layout = {str(k): int(v) for k, v in layout.items()}
        self.terms = str(terms)
        unsigned = Advertisement(self.site, _raw(self._encryption.public_key()), _raw(self._masking.public_key()),
                                 self.layout, identity_public_bytes(self.identity_key), b"", self.terms, int(weight))
        return Advertisement(**{**unsigned.__dict__,
                                "signature": identity_sign(self.identity_key, unsigned.signed_bytes(self.session))})

    # step 1
    def share_keys(self, roster: Iterable[Advertisement], threshold: int) -> tuple[dict[int, bytes], bytes]:
        """Encrypted shares for every other site of the roster, and the commitment to the self-mask seed."""
        self._advance("advertised", "shared")
        ads = list(roster)
        by_site = {ad.site: ad for ad in ads}
        if len(by_site) != len(ads):
            raise SecAggRefusal("secure aggregation: the roster names a site twice")
        if len({ad.mask_key for ad in ads}) != len(ads) or len({ad.encryption_key for ad in ads}) != len(ads):
            raise SecAggRefusal("secure aggregation: two sites of the roster advertise the same key")
        if len({ad.identity for ad in ads}) != len(ads):
            raise SecAggRefusal("secure aggregation: two sites of the roster share one identity key")
        if any(ad.terms != self.terms for ad in ads):
            raise SecAggRefusal("secure aggregation: the roster's sites were not given the same training terms")
        sizes: dict[str, int] = {}
        for ad in ads:
            for name, count in ad.layout.items():
                if sizes.setdefault(name, count) != count:
                    raise SecAggRefusal(f"secure aggregation: the roster's sites send '{name[:80]}' with different "
                                        "lengths")
        mine = by_site.get(self.site)
        if mine is None or mine.encryption_key != _raw(self._encryption.public_key()) \
                or mine.mask_key != _raw(self._masking.public_key()) or mine.layout != self.layout \
                or mine.terms != self.terms:
            raise SecAggRefusal("secure aggregation: the roster does not hold this site's own advertisement")
        if not self.min_sites <= len(ads) <= self.max_sites:
            raise SecAggRefusal(f"secure aggregation: {len(ads)} sites in the roster; this site masks only among "
                                f"{self.min_sites} to {self.max_sites} (its policy, the round's settings)")
        if any(not 1 <= ad.weight <= self.max_weight for ad in ads):
            raise SecAggRefusal(f"secure aggregation: a roster site claims a weight above the round's "
                                f"{self.max_weight}")
        # t > (n + c) / 2: two survivor sets that c colluding sites both sign cannot both reach t
        least = max(self.min_threshold, (len(ads) + self.max_colluders) // 2 + 1)
        if not least <= threshold <= len(ads):
            raise SecAggRefusal(f"secure aggregation: threshold {threshold} for {len(ads)} sites; this site needs "
                                f"at least {least} (more than half of the sites and the colluders its policy "
                                "allows for, and its policy's min-threshold)")
        for name in self.layout:  # a vector only a few sites send is their sum: theirs alone
            senders = sum(1 for ad in ads if name in ad.layout)
            if senders < threshold:
                raise SecAggRefusal(f"secure aggregation: only {senders} roster sites send '{name[:80]}', fewer than "
                                    f"the threshold {threshold}: its sum would reveal theirs")
        for ad in ads:
            if ad.site <= 0:
                raise SecAggRefusal("secure aggregation: site ids must be positive")
            if not identity_verifies(ad.identity, ad.signature, ad.signed_bytes(self.session)):
                raise SecAggRefusal(f"secure aggregation: site {ad.site}'s key advertisement is not signed by "
                                    "the identity key it names (tampered or replayed from another round)")
            if ad.site != self.site and not self.verify_peer(ad.site, ad.identity):
                raise SecAggRefusal(f"secure aggregation: site {ad.site}'s identity key is not one this site trusts")
            _x25519_public(ad.encryption_key, f"site {ad.site}'s encryption key")
            _x25519_public(ad.mask_key, f"site {ad.site}'s mask key")
        self.roster, self.threshold = by_site, int(threshold)
        self.roster_digest = roster_digest(ads)
        holders = self._share_points()
        mask_shares = shamir_split(int.from_bytes(_raw_private(self._masking), "big"), threshold, list(holders.values()))
        seed_shares = shamir_split(int.from_bytes(self._self_seed, "big"), threshold, list(holders.values()))
        ciphertexts = {}
        for peer, x in holders.items():
            if peer == self.site:
                self.own_shares = (mask_shares[x], seed_shares[x])
                continue
            plaintext = json.dumps({"mask-key": hex(mask_shares[x]), "self-seed": hex(seed_shares[x]),
                                    "roster": self.roster_digest}).encode()
            nonce = os.urandom(12)
            ciphertexts[peer] = nonce + AESGCM(self._share_key(peer)).encrypt(
                nonce, plaintext, self._share_context(self.site, peer))
        return ciphertexts, self_seed_commitment(self._self_seed, self.site, self.session)

    def _share_points(self) -> dict[int, int]:
        return {site: index + 1 for index, site in enumerate(sorted(self.roster))}

    def _share_key(self, peer: int) -> bytes:
        agreed = self._encryption.exchange(_x25519_public(self.roster[peer].encryption_key, "encryption key"))
        return _hkdf(agreed, b"share-key|" + self.session)

    def _share_context(self, sender: int, receiver: int) -> bytes:
        return b"|".join([PROTOCOL, b"share", self.session, str(sender).encode(), str(receiver).encode()])

    # step 2
    def masked_input(self, shares: Mapping[int, bytes], sharers: Iterable[int],
                     vectors: Mapping[str, np.ndarray], fixed: FixedPoint) -> dict[str, np.ndarray]:
        """This site's masked vectors (``vectors`` already encoded as residues of ``fixed``)."""
        self._advance("shared", "masked")
        sharers = tuple(sorted(set(int(s) for s in sharers)))
        if self.site not in sharers or not set(sharers) <= set(self.roster):
            raise SecAggRefusal("secure aggregation: the sharing sites must be sites of the roster, this one included")
        if len(sharers) < self.threshold:
            raise SecAggRefusal(f"secure aggregation: only {len(sharers)} sites shared their keys, fewer than the "
                                f"threshold {self.threshold}")
        if set(shares) != set(sharers) - {self.site}:
            raise SecAggRefusal("secure aggregation: the shares relayed are not one from each sharing site")
        for sender, ciphertext in shares.items():
            self.received[sender] = self._open_share(sender, bytes(ciphertext))
        if set(vectors) != set(self.layout) or any(np.asarray(vectors[k]).size != n for k, n in self.layout.items()):
            raise SecAggError("the vectors to mask do not match the layout this site advertised")
        self.masked_with = sharers
        masked = {}
        for name, count in self.layout.items():
            y = fixed.reduce(vectors[name]).reshape(-1) + mask_stream(self._self_seed, name, count, fixed)
            for peer in sharers:
                if peer == self.site or name not in self.roster[peer].layout:
                    continue
                stream = mask_stream(self.pair_seed(self._masking, self.roster[peer].mask_key, self.site, peer,
                                                    self.session), name, count, fixed)
                y = fixed.reduce(y + stream if self.site < peer else y - stream)
            masked[name] = fixed.reduce(y)
        return masked

    @staticmethod
    def pair_seed(private: X25519PrivateKey, peer_public: bytes, site: int, peer: int, session: bytes) -> bytes:
        """:math:`s_{u,v}`: the same bytes at both ends of the pair."""
        agreed = private.exchange(_x25519_public(peer_public, "mask key"))
        low, high = sorted((site, peer))
        return _hkdf(agreed, b"|".join([b"pair-seed", session, str(low).encode(), str(high).encode()]))

    def _open_share(self, sender: int, ciphertext: bytes) -> tuple[int, int]:
        if sender not in self.roster or sender == self.site:
            raise SecAggRefusal(f"secure aggregation: a share from site {sender}, which is not another roster site")
        try:
            plaintext = AESGCM(self._share_key(sender)).decrypt(ciphertext[:12], ciphertext[12:],
                                                               self._share_context(sender, self.site))
            data = json.loads(plaintext)
            shares, shown = (int(data["mask-key"], 16), int(data["self-seed"], 16)), data["roster"]
        except (InvalidTag, ValueError, KeyError, TypeError):
            raise SecAggRefusal(f"secure aggregation: the share from site {sender} does not decrypt "
                                "(tampered, or not meant for this site, round or run)") from None
        if shown != self.roster_digest:
            raise SecAggRefusal(f"secure aggregation: site {sender} was shown another roster than this site")
        return shares

    # step 3: the consistency check
    def confirm(self, survivors: Iterable[int]) -> bytes:
        """Sign the set of sites whose masked inputs the coordinator says it holds; this site will
        reveal shares only for that set, and only once enough sites signed the same one."""
        self._advance("masked", "confirmed")
        chosen = tuple(sorted(set(int(s) for s in survivors)))
        if self.site not in chosen or not set(chosen) <= set(self.masked_with):
            raise SecAggRefusal("secure aggregation: the survivors must be sites that shared keys, this one included")
        if len(chosen) < self.threshold:
            raise SecAggRefusal(f"secure aggregation: {len(chosen)} survivors, fewer than the threshold "
                                f"{self.threshold}")
        for name in self.layout:
            senders = sum(1 for s in chosen if name in self.roster[s].layout)
            if senders < self.threshold:
                raise SecAggRefusal(f"secure aggregation: only {senders} survivors sent '{name[:80]}', fewer than the "
                                    f"threshold {self.threshold}: its sum would reveal theirs")
        self.survivors = chosen
        return identity_sign(self.identity_key, survivors_statement(self.session, chosen, self.roster_digest))

    # step 4
    def unmask(self, request: UnmaskRequest, confirmations: Mapping[int, bytes]) -> dict[str, dict[int, int]]:
        """The shares the coordinator may have: of the survivors' self-mask seeds and of the dropped
        sites' mask keys (never both for one site), once at least the threshold of roster sites
        signed the very survivor set this site confirmed (``confirmations``: site → signature)."""
        self._advance("confirmed", "unmasked")
        survivors, dropped = set(request.survivors), set(request.dropped)
        if tuple(sorted(survivors)) != self.survivors:
            raise SecAggRefusal("secure aggregation: the unmask request's survivors are not the ones this site "
                                "confirmed")
        statement = survivors_statement(self.session, self.survivors, self.roster_digest)
        signed = {site for site, signature in confirmations.items()
                  if site in survivors and identity_verifies(self.roster[site].identity, bytes(signature), statement)}
        if len(signed) < self.threshold:
            raise SecAggRefusal(f"secure aggregation: only {len(signed)} sites signed the survivors; the threshold "
                                f"is {self.threshold}")
        if survivors & dropped:
            raise SecAggRefusal(f"secure aggregation: the coordinator asked for both the self-mask and the "
                                f"mask-key shares of site(s) {sorted(survivors & dropped)}; refused")
        if survivors | dropped != set(self.masked_with) or len(survivors) + len(dropped) != len(self.masked_with):
            raise SecAggRefusal("secure aggregation: the unmask request is not a split of the sites that shared keys")
        if self.site not in survivors:
            raise SecAggRefusal("secure aggregation: the unmask request lists this site as dropped")
        if len(survivors) < self.threshold:
            raise SecAggRefusal(f"secure aggregation: {len(survivors)} survivors, fewer than the threshold "
                                f"{self.threshold}")
        shares = {**self.received, self.site: self.own_shares}
        return {"self-seed": {u: shares[u][1] for u in survivors},
                "mask-key": {u: shares[u][0] for u in dropped}}

    def state_dict(self) -> dict[str, Any]:
        """Everything this site's side holds (JSON-ready; secrets included: keep it at the site)."""
        return {"site": self.site, "session": self.session.hex(), "step": self.step,
                "encryption": _raw_private(self._encryption).hex(), "masking": _raw_private(self._masking).hex(),
                "self-seed": self._self_seed.hex(), "layout": dict(self.layout),
                "roster": [ad.to_json() for ad in self.roster.values()], "threshold": self.threshold,
                "received": {str(s): [hex(v[0]), hex(v[1])] for s, v in self.received.items()},
                "own-shares": [hex(self.own_shares[0]), hex(self.own_shares[1])],
                "masked-with": list(self.masked_with), "survivors": list(self.survivors), "terms": self.terms,
                "roster-digest": self.roster_digest}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["site"]) != self.site or bytes.fromhex(state["session"]) != self.session:
            raise SecAggError("this state belongs to another site or aggregation")
        self.step = str(state["step"])
        self._encryption = X25519PrivateKey.from_private_bytes(bytes.fromhex(state["encryption"]))
        self._masking = X25519PrivateKey.from_private_bytes(bytes.fromhex(state["masking"]))
        self._self_seed = bytes.fromhex(state["self-seed"])
        self.layout = {str(k): int(v) for k, v in state["layout"].items()}
        self.roster = {ad.site: ad for ad in map(Advertisement.from_json, state["roster"])}
        self.threshold = int(state["threshold"])
        self.received = {int(s): (int(v[0], 16), int(v[1], 16)) for s, v in state["received"].items()}
        self.own_shares = (int(state["own-shares"][0], 16), int(state["own-shares"][1], 16))
        self.masked_with = tuple(int(s) for s in state["masked-with"])
        self.survivors = tuple(int(s) for s in state["survivors"])
        self.terms = str(state["terms"])
        self.roster_digest = str(state["roster-digest"])


def self_seed_commitment(seed: bytes, site: int, session: bytes) -> bytes:
    return hashlib.sha256(b"|".join([PROTOCOL, b"self-seed", session, str(site).encode(), seed])).digest()


# ---- the coordinator's half ----------------------------------------------------------------------
@dataclass
class SecAggCoordinator:
    """The coordinator's side of one aggregation: collects, relays and unmasks; sees only the sum.

    Call in order: :meth:`add_advertisement` for each reply, :meth:`roster`; :meth:`add_shares`,
    :meth:`shares_for`; :meth:`add_masked_input`; :meth:`survivors`, :meth:`add_confirmation`;
    :meth:`unmask_request`; :meth:`add_unmask_reply`; :meth:`result`. Each ``add_*`` raises
    :class:`SecAggError` naming the site when its message cannot be used; the caller drops that site.
    ``check_layout`` (optional) refuses a layout the caller knows to be wrong (names, lengths).
    """

    session: bytes
    fixed: FixedPoint
    threshold: int = 0  # 0: a majority of the roster
    check_layout: Callable[[Layout], None] | None = None
    advertisements: dict[int, Advertisement] = field(default_factory=dict)
    shares: dict[int, dict[int, bytes]] = field(default_factory=dict)  # sender -> receiver -> ciphertext
    commitments: dict[int, bytes] = field(default_factory=dict)
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    masked_from: set[int] = field(default_factory=set)
    confirmations: dict[int, bytes] = field(default_factory=dict)
    answers: dict[int, dict[str, dict[int, int]]] = field(default_factory=dict)

    def add_advertisement(self, ad: Advertisement) -> None:
        if ad.site in self.advertisements:
            raise SecAggError(f"site {ad.site} advertised twice")
        if not identity_verifies(ad.identity, ad.signature, ad.signed_bytes(self.session)):
            raise SecAggError(f"site {ad.site}'s key advertisement has a bad signature")
        if self.check_layout is not None:
            try:
                self.check_layout(ad.layout)
            except SecAggError as err:
                raise SecAggError(f"site {ad.site}'s layout: {err}") from None
        for other in self.advertisements.values():
            if other.identity == ad.identity or other.terms != ad.terms:
                raise SecAggError(f"site {ad.site} shares an identity key with site {other.site} or was given other "
                                  "training terms")
            if any(other.layout.get(name, count) != count for name, count in ad.layout.items()):
                raise SecAggError(f"site {ad.site}'s vectors differ in length from site {other.site}'s")
        self.advertisements[ad.site] = ad

    def roster(self) -> tuple[list[Advertisement], int]:
        count = len(self.advertisements)
        threshold = max(self.threshold, count // 2 + 1)  # what every site insists on: a majority at least
        if count < 2 or threshold > count:
            raise SecAggError(f"secure aggregation needs at least {max(2, threshold)} sites; {count} advertised keys")
        self.threshold = threshold
        return [self.advertisements[s] for s in sorted(self.advertisements)], threshold

    def add_shares(self, site: int, ciphertexts: Mapping[int, bytes], commitment: bytes) -> None:
        expected = set(self.advertisements) - {site}
        if site not in self.advertisements or set(ciphertexts) != expected or type(commitment) is not bytes \
                or len(commitment) != 32:
            raise SecAggError(f"site {site}'s shares are not one for each other site of the roster")
        if not all(type(c) is bytes and 28 <= len(c) <= 1024 for c in ciphertexts.values()):
            raise SecAggError(f"site {site}'s shares are not AES-GCM ciphertexts")
        self.shares[site], self.commitments[site] = dict(ciphertexts), bytes(commitment)

    def sharers(self) -> list[int]:
        if len(self.shares) < self.threshold:
            raise SecAggError(f"only {len(self.shares)} sites shared their keys; secure aggregation needs "
                              f"{self.threshold}")
        return sorted(self.shares)

    def shares_for(self, site: int) -> dict[int, bytes]:
        return {sender: by_receiver[site] for sender, by_receiver in self.shares.items() if sender != site}

    def add_masked_input(self, site: int, vectors: Mapping[str, np.ndarray]) -> None:
        """Fold one site's masked vectors into the running sums (checked whole first)."""
        if site not in self.shares or site in self.masked_from:
            raise SecAggError(f"site {site} sent a masked input it was not asked for")
        layout = self.advertisements[site].layout
        if set(vectors) != set(layout):
            raise SecAggError(f"site {site}'s masked input does not match the layout it advertised")
        for name, count in layout.items():
            v = np.asarray(vectors[name])
            if v.dtype != self.fixed.wire_dtype or v.size != count or (name in self.sums and self.sums[name].size != count):
                raise SecAggError(f"site {site}'s masked '{name[:80]}' is not {count} {self.fixed.wire_dtype} residues")
        for name in layout:
            folded = np.asarray(vectors[name]).reshape(-1)
            self.sums[name] = self.fixed.reduce(self.sums[name] + folded) if name in self.sums else self.fixed.reduce(folded)
        self.masked_from.add(site)

    def survivors(self) -> list[int]:
        """The sites whose masked inputs are in the sum: what each is asked to confirm."""
        if len(self.masked_from) < self.threshold:
            raise SecAggError(f"only {len(self.masked_from)} sites sent masked inputs; secure aggregation needs "
                              f"{self.threshold} to unmask")
        return sorted(self.masked_from)

    def add_confirmation(self, site: int, signature: bytes) -> None:
        """A survivor's signature over the survivor set (the consistency check)."""
        statement = survivors_statement(self.session, self.survivors(), roster_digest(self.advertisements.values()))
        if site not in self.masked_from or site in self.confirmations or not isinstance(signature, bytes) \
                or not identity_verifies(self.advertisements[site].identity, signature, statement):
            raise SecAggError(f"site {site}'s confirmation of the survivors is not a valid signature")
        self.confirmations[site] = signature

    def unmask_request(self) -> UnmaskRequest:
        survivors = tuple(self.survivors())
        if len(self.confirmations) < self.threshold:
            raise SecAggError(f"only {len(self.confirmations)} sites confirmed the survivors; secure aggregation "
                              f"needs {self.threshold}")
        return UnmaskRequest(survivors, tuple(sorted(set(self.shares) - self.masked_from)))

    def add_unmask_reply(self, site: int, answer: Mapping[str, Mapping[int, int]]) -> None:
        request = self.unmask_request()
        if site not in self.confirmations or site in self.answers:
            raise SecAggError(f"site {site} sent unmask shares it was not asked for")
        try:
            seeds = {int(u): int(v) for u, v in answer["self-seed"].items()}
            keys = {int(u): int(v) for u, v in answer["mask-key"].items()}
        except (KeyError, TypeError, ValueError, AttributeError):
            raise SecAggError(f"site {site}'s unmask reply is malformed") from None
        if set(seeds) != set(request.survivors) or set(keys) != set(request.dropped):
            raise SecAggError(f"site {site}'s unmask reply does not answer the request")
        if not all(0 <= v < FIELD_PRIME for v in (*seeds.values(), *keys.values())):
            raise SecAggError(f"site {site}'s unmask reply holds values outside Shamir's field")
        self.answers[site] = {"self-seed": seeds, "mask-key": keys}

    def result(self) -> tuple[dict[str, np.ndarray], list[int]]:
        """The unmasked sums as residues (per vector: the sum over the survivors that sent it), and the
        survivors. Raises :class:`SecAggError` when a secret cannot be rebuilt from the answers."""
        request = self.unmask_request()
        if len(self.answers) < self.threshold:
            raise SecAggError(f"only {len(self.answers)} sites answered the unmask request; {self.threshold} needed")
        points = {site: index + 1 for index, site in enumerate(sorted(self.advertisements))}
        answering = sorted(self.answers)
        sums = {name: value.copy() for name, value in self.sums.items()}

        def rebuild(kind: str, owner: int, check: Callable[[bytes], bool]) -> bytes:
            # any t answers determine the secret; if a share is bad, random other subsets (at most MAX_SUBSETS)
            # miss its holder with probability 1 - t/answers each
            subsets = [answering[:self.threshold]] + [sorted(random.sample(answering, self.threshold))
                                                      for _ in range(MAX_SUBSETS - 1)]
            for chosen in subsets:
                value = shamir_combine({points[s]: self.answers[s][kind][owner] for s in chosen})
                if value < 2**256 and check(secret := value.to_bytes(32, "big")):
                    return secret
            raise SecAggError(f"site {owner}'s {kind} could not be rebuilt from the shares returned "
                              "(a tampered share)")

        for owner in request.survivors:
            seed = rebuild("self-seed", owner, lambda s, o=owner: self_seed_commitment(s, o, self.session)
                           == self.commitments[o])
            for name, count in self.advertisements[owner].layout.items():
                sums[name] = self.fixed.reduce(sums[name] - mask_stream(seed, name, count, self.fixed))
        for owner in request.dropped:
            mask_key = rebuild("mask-key", owner, lambda s, o=owner: _raw(
                X25519PrivateKey.from_private_bytes(s).public_key()) == self.advertisements[o].mask_key)
            private = X25519PrivateKey.from_private_bytes(mask_key)
            for survivor in request.survivors:
                pair = SecAggSite.pair_seed(private, self.advertisements[survivor].mask_key, owner, survivor,
                                            self.session)
                for name, count in self.advertisements[survivor].layout.items():
                    if name not in self.advertisements[owner].layout:
                        continue
                    stream = mask_stream(pair, name, count, self.fixed)
                    # the survivor added +stream when it is the lower id of the pair
                    sums[name] = self.fixed.reduce(sums[name] - stream if survivor < owner else sums[name] + stream)
        return sums, list(request.survivors)


# ---- payloads as summable vectors ----------------------------------------------------------------
METRIC_PREFIX = "metric/"
"""A site's vector ``metric/NAME`` (one entry) holds a reply metric summed with its update (the
training loss): the coordinator learns its weighted mean only."""


@dataclass(frozen=True)
class SecureSumSettings:
    r"""What the coordinator asks of one securely aggregated round (the instruction's ``secagg-*``).

    A site clips the concatenation of its summed fields to ℓ₂ norm ``clip``. ``weighted``: it
    advertises its weight ``min(examples, max_weight)`` (public, signed, like FedAvg's example
    count) and, once it holds the roster, sends its vectors times its share
    :math:`p_u = w_u / \sum_{v} w_v` of the roster's weight, so the sum is at most ``clip`` in norm
    whatever the weights; unweighted (distributed DP), each site sends its vector as it is (its noise
    is sized for that). The fixed point is sized for ``sites`` such contributions plus ``8 × noise``
    (the summed noise's standard deviation in value units, under distributed DP) in ``2^bits``.
    ``threshold`` is the recovery threshold (0: a majority of the sites that advertise keys)."""

    sites: int
    bits: int = 32
    clip: float = 1000.0
    max_weight: int = 10_000
    threshold: int = 0
    noise: float = 0.0
    weighted: bool = True

    def __post_init__(self) -> None:
        if not 2 <= self.sites <= MAX_SITES:
            raise SecAggError(f"secure aggregation needs 2..{MAX_SITES} sites, got {self.sites}")
        if not (self.clip > 0 and math.isfinite(self.clip)) or not 1 <= self.max_weight <= 2**31:
            raise SecAggError(f"secagg-clip must be positive and secagg-max-weight in 1..2^31, got {self.clip}, "
                              f"{self.max_weight}")
        if self.threshold and not 2 <= self.threshold <= self.sites:
            raise SecAggError(f"secagg-threshold must be 0 (a majority) or 2..{self.sites}, got {self.threshold}")
        if not (self.noise >= 0 and math.isfinite(self.noise)):
            raise SecAggError(f"the distributed noise must be >= 0, got {self.noise}")
        self.fixed()  # the modulus must fit

    def fixed(self) -> FixedPoint:
        bound = max(self.clip, 1.0)  # a metric (the training loss) is clipped to the same
        return FixedPoint.sized(self.sites, bound / self.sites if self.weighted else bound, self.bits, 8 * self.noise)

    def to_config(self) -> dict[str, Any]:
        return {"secagg-sites": self.sites, "secagg-bits": self.bits, "secagg-clip": self.clip,
                "secagg-max-weight": self.max_weight, "secagg-threshold": self.threshold,
                "secagg-noise": self.noise, "secagg-weighted": self.weighted}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> SecureSumSettings:
        try:
            return cls(int(config["secagg-sites"]), int(config["secagg-bits"]), float(config["secagg-clip"]),
                       int(config["secagg-max-weight"]), int(config["secagg-threshold"]),
                       float(config.get("secagg-noise", 0.0)), bool(config.get("secagg-weighted", True)))
        except (KeyError, TypeError, ValueError) as err:
            if isinstance(err, SecAggError):
                raise
            raise SecAggError(f"malformed secure-aggregation settings ({type(err).__name__}: {str(err)[:80]})") from None


def contribution_factors(roster: Mapping[int, Advertisement], weighted: bool) -> dict[int, float]:
    """What each roster site multiplies its vectors by: its share of the roster's advertised weight
    (weighted), else 1. Every site and the coordinator compute the same from the signed roster."""
    total = sum(ad.weight for ad in roster.values())
    return {site: (ad.weight / total if weighted else 1.0) for site, ad in roster.items()}


def summed_fields(kinds: Mapping[str, Any], arrays: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray],
                  update_kind: str | None) -> dict[str, np.ndarray]:
    """A payload's summable fields as flat float64 vectors: model updates as changes (new values
    minus ``base``, the instruction's, for ``weights`` payloads), summed fields as they are.
    :class:`SecAggError` naming the first field that cannot be summed."""
    vectors = {}
    for name in sorted(arrays):
        kind = kinds.get(name)
        if kind not in SUMMABLE:
            raise SecAggError(f"payload field '{name[:80]}' is {getattr(kind, 'value', 'undeclared')}, "
                              "which secure aggregation cannot sum")
        value = np.asarray(arrays[name], dtype=np.float64).reshape(-1)
        if kind is FieldKind.MODEL_UPDATE and update_kind == "weights":
            value = value - np.asarray(base[name], dtype=np.float64).reshape(-1)
        vectors[name] = value
    return vectors


def clipped(vectors: Mapping[str, np.ndarray], bound: float) -> dict[str, np.ndarray]:
    """``vectors`` scaled together (never up) to joint ℓ₂ norm ≤ ``bound``."""
    norm = math.sqrt(sum(float(np.dot(v, v)) for v in vectors.values()))
    factor = min(1.0, bound / norm) if norm > 0 else 1.0
    return {name: v * factor for name, v in vectors.items()}


def contribution_residues(vectors: Mapping[str, np.ndarray], factor: float, fixed: FixedPoint,
                          rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The residues a site masks: ``factor × vector`` (its :func:`contribution_factors` entry)."""
    return {name: fixed.encode(np.asarray(vector, dtype=np.float64) * factor, rng) for name, vector in vectors.items()}


def check_summed_layout(layout: Layout, sizes: Callable[[str], int | None]) -> None:
    """:class:`SecAggError` unless every vector of ``layout`` has the length ``sizes(name)`` gives
    (``None``: a name the caller does not accept; 0: any length, which the coordinator holds every
    other site to), ``metric/NAME`` one entry."""
    for name, count in layout.items():
        expected = 1 if name.startswith(METRIC_PREFIX) else sizes(name)
        if expected is None or (expected and expected != count):
            raise SecAggError(f"'{name[:80]}' has {count} entries; expected {expected or 'no such vector'}")


def layout_of(vectors: Mapping[str, np.ndarray]) -> Layout:
    return {name: int(np.asarray(v).size) for name, v in vectors.items()}


def weighted_means(sums: Mapping[str, np.ndarray], fixed: FixedPoint, roster: Mapping[int, Advertisement],
                   survivors: Iterable[int], weighted: bool) -> tuple[dict[str, np.ndarray], float]:
    """Per vector, the unmasked sum divided by the contribution factors of the survivors that sent
    it (partial replies: each vector's own), and the survivors' total advertised weight (the
    reply's example count; their number when unweighted)."""
    factors = contribution_factors(roster, weighted)
    survivors = list(survivors)
    means = {}
    for name, total in sums.items():
        share = sum(factors[u] for u in survivors if name in roster[u].layout)
        if not share > 0:
            raise SecAggError(f"no survivor sent '{name[:80]}'")
        means[name] = fixed.decode(total) / share
    return means, float(sum(roster[u].weight if weighted else 1 for u in survivors))


def federation_payload(algorithm: Any, state: Mapping[str, Any], means: Mapping[str, np.ndarray],
                       weight: float) -> Payload:
    """The one reply (from :data:`~aggregators.base.SUM_CLIENT`) an algorithm aggregates in place of
    its sites' replies: each summed field's mean, shaped like its state tensor, with the global value
    added back for ``weights`` payloads (sites sent changes), and the total weight as its count."""
    arrays = {}
    for name, mean in means.items():
        value = np.asarray(mean, dtype=np.float64)
        if algorithm.payload_kind(name, state.keys()) is FieldKind.MODEL_UPDATE:
            target = state[name].detach().cpu().double().numpy()
            value = value.reshape(target.shape) + (target if algorithm.update_kind == "weights" else 0.0)
        arrays[name] = value.astype(np.float32)
    return Payload(arrays, max(1, round(weight)), {})


__all__ = ["Advertisement", "FixedPoint", "SecAggCoordinator", "SecAggError", "SecAggRefusal", "SecAggSite",
           "METRIC_PREFIX", "SecureSumSettings", "UnmaskRequest", "check_summed_layout", "clipped",
           "contribution_factors", "contribution_residues", "federation_payload", "layout_of", "mask_stream",
           "roster_digest", "session_id", "survivors_statement", "shamir_combine", "shamir_split", "summed_fields", "weighted_means"]
