"""The site's side of secure aggregation over Flower messages (the protocol is
:mod:`privacy.secure_aggregation`; this module only moves it in and out of records).

A ``train`` instruction with ``secagg`` set: the site trains as usual, turns the payload into its
summable vectors (:func:`privacy.secure_aggregation.summed_fields`; a field that cannot be summed
is refused), clips, weights and encodes them (under distributed DP: noised with its share of the
discrete Gaussian and charged to its ledger first), keeps them in the node's context, and answers
with its signed key advertisement only. Four ``query.secagg`` messages follow (``share``,
``mask``, ``confirm``, ``unmask``); each is checked against the site's state for this aggregation (same
session, next step, once) and against its policy's ``[secure-aggregation]`` table (fewest sites,
lowest threshold, pinned peer keys). Nothing but the masked vectors and the shares the unmask step
may ask for ever leaves the site.

A real site signs its advertisement with its enrolled key (node config ``site-key``, the key its
SuperNode authenticates with); a virtual site of Flower's simulation engine draws an Ed25519 key
for each aggregation.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Context, Message, RecordDict

from aggregators.base import Algorithm, Instruction, Payload, RecordParts
from fedclient.policy import SitePolicy
from fedclient.wire import ARRAYS, array_record, from_recorddict, refusal_record, to_recorddict, unpack_array_record
from privacy.distributed_dp import DistributedGaussian
from privacy.refusal import PolicyRefusal, site_log
from privacy.secure_aggregation import (
    METRIC_PREFIX,
    Advertisement,
    FixedPoint,
    SecAggError,
    SecAggRefusal,
    SecAggSite,
    SecureSumSettings,
    UnmaskRequest,
    clipped,
    layout_of,
    session_id,
    summed_fields,
    contribution_factors,
    contribution_residues,
)

STATE = "fedtune.secagg"
PENDING = "fedtune.secagg.pending"  # this round's vectors until the mask step (encoded under distributed DP)
SHARE_BYTES = 66  # a share of GF(2^521 - 1)


def identity_fingerprint(identity_der: bytes) -> str:
    """A public key's SHA256 fingerprint as ``ssh-keygen -l`` (and ``fedclient keys``) print it."""
    key = serialization.load_der_public_key(identity_der)
    blob = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).split()[1]
    return "SHA256:" + base64.b64encode(hashlib.sha256(base64.b64decode(blob)).digest()).decode().rstrip("=")


def _identity_key(node: Mapping[str, Any], state: dict[str, Any]):
    """The key this site signs its advertisements with: its enrolled key, else (a virtual site) a
    fresh Ed25519 key kept for this aggregation."""
    if node.get("site-key"):
        path = pathlib.Path(str(node["site-key"]))
        return serialization.load_ssh_private_key(path.read_bytes(), password=None)
    if "identity" not in state:
        key = Ed25519PrivateKey.generate()
        state["identity"] = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                              serialization.NoEncryption()).hex()
    return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(state["identity"]))


def _site(state: dict[str, Any], node: Mapping[str, Any], policy: SitePolicy) -> SecAggSite:
    rules = policy.secure_aggregation
    pinned = set(rules.peers)

    def verify_peer(site: int, identity: bytes) -> bool:
        return not pinned or identity_fingerprint(identity) in pinned

    site = SecAggSite(int(state["site"]), _identity_key(node, state), bytes.fromhex(state["session"]),
                      verify_peer=verify_peer, min_threshold=max(rules.min_threshold, int(state["assumed-threshold"])),
                      min_sites=rules.min_sites, max_colluders=rules.max_colluders, max_sites=int(state["sites"]),
                      max_weight=int(state["max-weight"]))
    if "protocol" in state:
        site.load_state_dict(state["protocol"])
    return site


def _save(context: Context, state: dict[str, Any], site: SecAggSite, pending: Mapping[str, np.ndarray] | None = None
          ) -> None:
    state["protocol"] = site.state_dict()
    context.state[STATE] = ConfigRecord({"json": json.dumps(state)})
    if pending is not None:
        context.state[PENDING] = array_record({k: (v.astype(np.float32) if v.dtype.kind == "f" else v)
                                               for k, v in pending.items()})


def _load(context: Context) -> dict[str, Any] | None:
    if STATE not in context.state:
        return None
    return json.loads(str(context.state[STATE]["json"]))


TERMS = ("strategy", "server-round", "lr", "local-steps", "batch-size", "weight-decay", "grad-accumulation",
         "warmup-steps", "lr-schedule", "precision", "gradient-checkpointing", "schedule-step", "schedule-steps",
         "ferret-bases", "ferret-block-size", "noise-seed", "seed-pool", "zo-steps", "zo-lr", "zo-eps", "codec",
         "dp", "dp-epsilon", "dp-delta", "clip", "dp-noise-multiplier", "dp-releases", "secagg-sites", "secagg-bits",
         "secagg-clip", "secagg-max-weight", "secagg-threshold", "secagg-noise", "secagg-weighted", "secagg-nonce")
"""The instruction keys every site of one secure sum must have been given alike (how much each trains,
the privacy asked, the sum's settings); their digest is in each advertisement and compared by all.
What may differ per site and is left out: its training seed, its layers (selective-layer: each
site's vectors must still be sent by at least the threshold of sites), and the arrays it starts
from (replay catch-up and layer caches differ legitimately; see the README's threat model)."""


def terms_digest(config: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps({k: config.get(k) for k in TERMS}, sort_keys=True, default=str).encode()).hexdigest()


def check_new_round(context: Context, config: Mapping[str, Any]) -> None:
    """SecAggRefusal when this site already joined a secure sum for the instruction's round of this
    run (a replay, or the same round again to sum over another set of sites and difference the two):
    checked before the site trains or spends privacy budget."""
    server_round = int(config["server-round"])
    answered = (_load(context) or {}).get("rounds", [])
    if answered and server_round <= max(answered):
        raise SecAggRefusal(f"secure aggregation: round {server_round} of this run comes after round {max(answered)}, "
                            "which this site already joined (a replay, or a round again to sum over other sites)")


def begin(msg: Message, context: Context, node: Mapping[str, Any], policy: SitePolicy, algorithm: Algorithm,
          payload: Payload, instruction: Instruction, parameters: set[str], run: str,
          distributed: DistributedGaussian | None) -> Message:
    """Step 0 at the site: keep this round's encoded vectors, answer with the signed advertisement.
    ``distributed`` (already charged to the ledger by the caller) noises the vectors; then they are
    clipped to its clip (the site's own, which its noise is sized for), else to ``secagg-clip``."""
    config = instruction.config
    try:
        if algorithm.secure_aggregation_incompatibility:
            raise SecAggError(f"{algorithm.name} cannot be securely aggregated: "
                              f"{algorithm.secure_aggregation_incompatibility}")
        settings = SecureSumSettings.from_config(config)
        fixed = settings.fixed()
        server_round = int(config["server-round"])
        session = session_id(f"{run}|{str(config.get('secagg-nonce', ''))[:64]}", server_round)
        check_new_round(context, config)
        answered = [int(r) for r in (_load(context) or {}).get("rounds", [])]
        kinds = {name: algorithm.payload_kind(name, parameters) for name in payload.arrays}
        vectors = clipped(summed_fields(kinds, payload.arrays, instruction.arrays, algorithm.update_kind),
                          distributed.clip if distributed is not None else settings.clip)
        if distributed is not None:  # one release: the sensitivity is that of all vectors together
            if settings.weighted:
                raise SecAggError("distributed DP sums unweighted vectors (its noise is sized for them)")
            rng = np.random.default_rng()  # rounding and noise must be unpredictable: never seeded
            dimension = sum(v.size for v in vectors.values())
            pending = {name: fixed.encode_integers(distributed.noised_integers(vector, fixed.scale, rng, dimension))
                       for name, vector in vectors.items()}
            weight = 1
        else:  # encoded at the mask step, times this site's share of the roster's weight
            weight = max(1, min(policy.reported_examples(payload.num_examples), settings.max_weight)) \
                if settings.weighted else 1
            loss = payload.metrics.get("train-loss")  # summed too: the coordinator learns the mean loss only
            bound = max(settings.clip, 1.0)
            if isinstance(loss, (int, float)) and math.isfinite(loss):
                vectors[METRIC_PREFIX + "train-loss"] = np.array([min(max(float(loss), -bound), bound)])
            pending = vectors
        state = {"site": int(config["secagg-site"]), "session": session.hex(), "bits": fixed.bits,
                 "scale": fixed.scale, "rounds": (answered + [server_round])[-16:], "weighted": settings.weighted,
                 "sites": settings.sites, "max-weight": settings.max_weight,
                 "encoded": distributed is not None,
                 "assumed-threshold": distributed.threshold if distributed is not None else 0}
        site = _site(state, node, policy)
        advertisement = site.advertise(layout_of(vectors), terms_digest(config), weight)
    except (SecAggError, KeyError, ValueError) as err:
        return _refusal(msg, err)
    _save(context, state, site, pending)
    public = set(algorithm.public_metrics) | ({m for m in payload.metrics if m.startswith("dp-")}
                                              if distributed is not None else set())  # the site's own accounting
    metrics = {k: float(v) for k, v in payload.metrics.items() if k in public}
    return Message(to_recorddict(RecordParts(config={"secagg-advertisement": advertisement.to_json(),
                                                     "secagg-session": session.hex()},
                                             metrics=metrics)), reply_to=msg)


def _refusal(msg: Message, err: Exception) -> Message:
    site_log(f"secure aggregation: {err}")
    if isinstance(err, PolicyRefusal):
        return Message(refusal_record(str(err)), reply_to=msg)
    text = str(err).removeprefix("secure aggregation: ")
    return Message(refusal_record(f"site policy secure-aggregation: {text[:300]}"), reply_to=msg)


def step(msg: Message, context: Context, node: Mapping[str, Any], policy: SitePolicy) -> Message:
    """Steps 1-4 (``secagg-step`` = ``share``, ``mask``, ``confirm``, ``unmask``) at the site."""
    try:
        parts = from_recorddict(msg.content)
        config = parts.config
        state = _load(context)
        if state is None or str(config.get("secagg-session", "")) != state["session"]:
            raise SecAggRefusal("secure aggregation: a step for an aggregation this site is not part of")
        site = _site(state, node, policy)
        fixed = FixedPoint(int(state["bits"]), float(state["scale"]))
        kind = str(config.get("secagg-step", ""))
        if kind == "share":
            roster = [Advertisement.from_json(text) for text in _list_of(config, "roster", str)]
            ciphertexts, commitment = site.share_keys(roster, int(config["threshold"]))
            receivers = sorted(ciphertexts)
            reply = RecordParts(config={"share-to": receivers, "share-ct": [ciphertexts[r] for r in receivers],
                                        "commitment": commitment})
        elif kind == "mask":
            senders, texts = _list_of(config, "share-from", int), _list_of(config, "share-ct", bytes)
            if len(senders) != len(texts):
                raise SecAggError("the relayed shares do not pair up with their senders")
            pending = unpack_array_record(context.state[PENDING])
            if state["encoded"]:
                residues = pending
            else:  # this site's share of the roster's weight, now that it holds the signed roster
                factor = contribution_factors(site.roster, bool(state["weighted"]))[site.site]
                residues = contribution_residues(pending, factor, fixed, np.random.default_rng())
            masked = site.masked_input(dict(zip(senders, texts, strict=True)), _list_of(config, "sharers", int), residues,
                                       fixed)
            del context.state[PENDING]
            reply = RecordParts(arrays=masked)
        elif kind == "confirm":
            reply = RecordParts(config={"signature": site.confirm(_list_of(config, "survivors", int))})
        elif kind == "unmask":
            signers, signatures = _list_of(config, "signers", int), _list_of(config, "signatures", bytes)
            if len(signers) != len(signatures):
                raise SecAggError("the survivors' signatures do not pair up with their signers")
            answer = site.unmask(UnmaskRequest(tuple(_list_of(config, "survivors", int)), tuple(_list_of(config, "dropped", int))),
                                 dict(zip(signers, signatures, strict=True)))
            reply = RecordParts(config={
                "self-seed-sites": sorted(answer["self-seed"]),
                "self-seed-shares": [answer["self-seed"][u].to_bytes(SHARE_BYTES, "big")
                                     for u in sorted(answer["self-seed"])],
                "mask-key-sites": sorted(answer["mask-key"]),
                "mask-key-shares": [answer["mask-key"][u].to_bytes(SHARE_BYTES, "big")
                                    for u in sorted(answer["mask-key"])]})
        else:
            raise SecAggError(f"unknown secure-aggregation step '{kind[:40]}'")
    except (SecAggError, KeyError, ValueError, TypeError) as err:
        return _refusal(msg, err)
    _save(context, state, site)
    return Message(to_recorddict(reply), reply_to=msg)


def _list_of(config: Mapping[str, Any], key: str, kind: type) -> list:
    """The list of ``kind`` values under ``key`` (none: empty); SecAggError naming the key otherwise."""
    value = config.get(key, [])
    if not isinstance(value, list) or not all(type(v) is kind for v in value):
        raise SecAggError(f"'{key}' must be a list of {kind.__name__} values")
    return value


__all__ = ["begin", "identity_fingerprint", "step"]
