"""Which app code a site runs: only Flower App packages (FABs) signed by a publisher it trusts.

Flower installs and runs whatever FAB the coordinator's ``flwr run`` submitted, and a FAB is code:
its ClientApp runs at the site with the site's data, keys and policy within reach. fedtune therefore
has the coordinator's publisher key (Ed25519; ``fedserver init`` creates ``publisher.key``) sign the
SHA-256 of every FAB it submits (``fedserver run`` puts the signature in the run config as
``fab-signature``), and each site's SuperNode (``fedclient start --trusted-publisher FILE``, through
:mod:`fedclient.supernode_launcher`) checks it when the FAB arrives, before Flower stores it and
before any of its code runs. A FAB that is unsigned, signed by another key, or does not hash to the
run's ``fab_hash`` is refused with an ``INVALID_FAB`` error reply to the coordinator.

What the signature guarantees: the code is exactly what the holder of the publisher key built and
signed (``fedserver run`` builds it from the installed fedtune packages, code only). What it does
not: that this code is harmless. It moves the question "what code do I run?" from every run to
"whom do I trust to sign?": a site pins the key of whoever reviews releases (which may be a party
other than the coordinator's operator), and reviews the packages that key signs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import pathlib

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from privacy.signing import KeyFileError, load_public_key, verifies

SIGNATURE_KEY = "fab-signature"
"""The run-config key carrying the publisher's signature."""
_CONTEXT = b"fedtune-fab-signature-v1:"


class UntrustedApp(Exception):
    """A FAB this site must not run; the message says why (no data of the site's)."""


def fab_hash(fab: bytes) -> str:
    """The hash Flower names a FAB by: SHA-256 of its bytes, hex."""
    return hashlib.sha256(fab).hexdigest()


def sign_fab(key: Ed25519PrivateKey, digest: str) -> str:
    """The publisher's signature over a FAB's hash, base64 (what ``fab-signature`` carries)."""
    return base64.b64encode(key.sign(_CONTEXT + digest.encode())).decode()


def verify_fab(fab: bytes, claimed_hash: str, signature: str, publisher: Ed25519PublicKey) -> None:
    """UntrustedApp unless ``fab`` hashes to ``claimed_hash`` and ``signature`` is the publisher's
    signature over that hash."""
    digest = fab_hash(fab)
    if digest != claimed_hash:
        raise UntrustedApp(f"the app package does not hash to the run's fab hash {claimed_hash[:12]}…")
    if not signature:
        raise UntrustedApp(f"app {digest[:12]}… carries no publisher signature (fab-signature); this site runs "
                           "only apps signed by the publisher it trusts")
    try:
        raw = base64.b64decode(signature.encode(), validate=True)
    except (binascii.Error, ValueError):
        raise UntrustedApp(f"app {digest[:12]}…: its fab-signature is not base64") from None
    if not verifies(publisher, raw, _CONTEXT + digest.encode()):
        raise UntrustedApp(f"app {digest[:12]}… is not signed by the publisher this site trusts")


def load_publisher(path: pathlib.Path) -> Ed25519PublicKey:
    """The trusted publisher key (``publisher.key.pub`` from the coordinator's operator)."""
    try:
        return load_public_key(path, "trusted publisher key")
    except KeyFileError as err:
        raise ValueError(f"{err}; ask the coordinator's operator for publisher.key.pub") from err


__all__ = ["SIGNATURE_KEY", "UntrustedApp", "fab_hash", "load_publisher", "sign_fab", "verify_fab"]
