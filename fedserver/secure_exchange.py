"""Secure aggregation and central DP on the coordinator's side of a round: the Flower messages
around :class:`privacy.secure_aggregation.SecAggCoordinator`.

With ``secagg`` on, a round's train replies are key advertisements, not updates; four more
exchanges follow (``query.secagg`` steps ``share``, ``mask``, ``confirm``, ``unmask``) with the sites that
answered the step before, and the unmasked sums become one reply from
:data:`~aggregators.base.SUM_CLIENT`: per summed field, the total weight's mean (plus the global
value for ``weights`` payloads), which the algorithm aggregates as it would the sites' replies. A
site that fails or declines a step drops out of the round; the round goes on while at least the
threshold remain (its masks are removed from the others' vectors). Each site's bytes over all
steps count as its train traffic.

With ``dp = central`` (the trusted-coordinator reference) the replies arrive in the clear; the
coordinator clips each site's summed fields, adds Gaussian noise to the sum
(:func:`privacy.distributed_dp.central_noise`) and hands the algorithm the noisy mean the same way.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping
from logging import WARNING
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Message
from flwr.common import log

from aggregators.base import SUM_CLIENT, ClientId, FieldKind, Instruction, RecordParts, Reply
from fedclient.wire import from_recorddict, message_wire_bytes, to_recorddict
from privacy.distributed_dp import central_noise
from privacy.secure_aggregation import (
    METRIC_PREFIX,
    Advertisement,
    SecAggCoordinator,
    SecAggError,
    SecureSumSettings,
    check_summed_layout,
    clipped,
    federation_payload,
    summed_fields,
    weighted_means,
)

if TYPE_CHECKING:
    from fedserver.strategy import AlgorithmStrategy, Site

STEP = "query.secagg"


def secure_instructions(settings: Mapping[str, Any], plan: Mapping[ClientId, Instruction]
                        ) -> tuple[dict[ClientId, Instruction], SecureSumSettings]:
    """``plan`` with each instruction asking for secure aggregation among the round's sites, and the
    round's settings (the sites size their fixed point from the same)."""
    nonce = secrets.token_hex(16)  # a fresh session per round, even for a repeated round number
    sites = max(2, len(plan))  # the threshold is fixed here, once: sites noise for it (distributed DP)
    round_settings = SecureSumSettings(sites=sites, **{**settings, "threshold": settings["threshold"] or sites // 2 + 1})
    return {client: Instruction(instruction.arrays, {**instruction.config, "secagg": True, "secagg-site": int(client),
                                                     "secagg-nonce": nonce, **round_settings.to_config()})
            for client, instruction in plan.items()}, round_settings


def securely_summed(strategy: AlgorithmStrategy, server_round: int, replies: Iterable[Message]) -> Iterator[Reply]:
    """The secure-aggregation steps after the train replies (module docstring); yields the one
    summed reply, or nothing when too few sites took part."""
    coordinator: SecAggCoordinator | None = None
    sites: dict[ClientId, Site] = {}
    for message in replies:
        site, usable = strategy.screen(message, "train")
        if not usable:
            continue
        try:
            parts = from_recorddict(message.content)
            advertisement = Advertisement.from_json(str(parts.config["secagg-advertisement"]))
            session = bytes.fromhex(str(parts.config["secagg-session"]))
            if advertisement.site != site.client_id:
                raise SecAggError(f"it advertised keys as site {advertisement.site}")
        except (KeyError, ValueError, SecAggError) as err:
            _reject(strategy, site, f"malformed key advertisement ({str(err)[:200]})")
            continue
        sites[site.client_id] = site
        record = strategy._ledger.client("train", site)
        record.metrics = {k: float(v) for k, v in parts.metrics.items()}
        record.status = "pending"
        if coordinator is None:
            settings = strategy.secure_round
            coordinator = SecAggCoordinator(session, settings.fixed(), settings.threshold,
                                            functools.partial(check_summed_layout, sizes=_expected_size(strategy)))
        if session != coordinator.session:
            _reject(strategy, site, "its session is not the round's (another run, round or nonce)")
            continue
        try:
            coordinator.add_advertisement(advertisement)
        except SecAggError as err:
            _reject(strategy, site, str(err))
    if coordinator is None:
        return
    strategy.sum_parts = []
    try:
        roster, threshold = coordinator.roster()
        ads = [ad.to_json() for ad in roster]
        _step(strategy, server_round, coordinator, sites, "share", {s: {"roster": ads, "threshold": threshold}
                                                                     for s in coordinator.advertisements})
        sharers = coordinator.sharers()
        _step(strategy, server_round, coordinator, sites, "mask", {
            s: {"share-from": sorted(coordinator.shares_for(s)),
                "share-ct": [coordinator.shares_for(s)[f] for f in sorted(coordinator.shares_for(s))],
                "sharers": sharers} for s in sharers})
        survivors = coordinator.survivors()
        _step(strategy, server_round, coordinator, sites, "confirm", {s: {"survivors": survivors} for s in survivors})
        request = coordinator.unmask_request()
        signers = sorted(coordinator.confirmations)
        _step(strategy, server_round, coordinator, sites, "unmask", {
            s: {"survivors": list(request.survivors), "dropped": list(request.dropped), "signers": signers,
                "signatures": [coordinator.confirmations[c] for c in signers]} for s in signers})
        sums, survivors = coordinator.result()
        means, weight = weighted_means(sums, coordinator.fixed, coordinator.advertisements, survivors,
                                       strategy.secure_round.weighted)
        metrics = {name.removeprefix(METRIC_PREFIX): float(means.pop(name)[0])
                   for name in [n for n in means if n.startswith(METRIC_PREFIX)]}
        summed = federation_payload(strategy.algorithm, strategy.state, means, weight)
    except (SecAggError, KeyError, ValueError) as err:  # a sum that cannot be used costs the round, not the run
        log(WARNING, "round %s: secure aggregation failed: %s", server_round, err)
        for site in sites.values():
            record = strategy._ledger.client("train", site)
            if record.status == "pending":
                record.status, record.error = "failed", f"secure aggregation failed: {err}"
        return
    for client_id in set(sites) - set(survivors):
        record = strategy._ledger.client("train", sites[client_id])
        if record.status == "pending":
            record.status, record.error = "failed", "dropped out of secure aggregation"
    strategy.sum_parts = list(survivors)
    for client_id in survivors:  # each survivor's update is in the sum, whether or not it answered the unmask step
        record = strategy._ledger.client("train", sites[client_id])
        record.details["secagg-survivors"] = len(survivors)
        if record.status != "pending":
            record.details["secagg-note"] = (f"its update was counted; it did not finish the confirm and unmask "
                                             f"steps: {record.error}")[:500]
            record.status, record.error = "pending", None
    summed.metrics.update(metrics)  # the weighted mean training loss over the sites whose sum this is
    yield Reply(SUM_CLIENT, summed)


def _expected_size(strategy: AlgorithmStrategy) -> Callable[[str], int | None]:
    """How long each summed vector must be: a model tensor's size; a summed field, any length (the
    coordinator holds every site to the first one's); nothing the algorithm does not sum."""
    algorithm, state = strategy.algorithm, strategy.state

    def size(name: str) -> int | None:
        kind = algorithm.payload_kind(name, state.keys())
        if kind is FieldKind.MODEL_UPDATE:
            return int(state[name].numel())
        return algorithm.summed_length(name) if kind is FieldKind.SUMMED else None

    return size


def _reject(strategy: AlgorithmStrategy, site: Site, reason: str) -> None:
    record = strategy._ledger.client("train", site)
    record.status, record.error = "rejected", f"site '{site.name}' (node {site.node_id}): {reason}"
    log(WARNING, "rejected %s in secure aggregation: %s", site.name, reason)


def _step(strategy: AlgorithmStrategy, server_round: int, coordinator: SecAggCoordinator,
          sites: Mapping[ClientId, Site], step: str, configs: Mapping[ClientId, dict[str, Any]]) -> None:
    """One ``query.secagg`` exchange: send each site its part, fold each usable answer."""
    session = coordinator.session.hex()
    messages = []
    for client_id, config in configs.items():
        content = to_recorddict(RecordParts(config={**config, "secagg-step": step, "secagg-session": session}))
        message = Message(content, dst_node_id=sites[client_id].node_id, message_type=STEP, group_id=str(server_round))
        strategy._ledger.client("train", sites[client_id]).bytes_down += message_wire_bytes(message)
        messages.append(message)
    by_node = {site.node_id: client_id for client_id, site in sites.items()}
    for message in strategy.exchange(strategy.grid, messages, f"secagg-{step}", server_round):
        site, usable = strategy.screen(message, "train", retire_on_refusal=False)
        client_id = by_node.get(site.node_id)
        if not usable or client_id is None:
            continue
        try:
            parts = from_recorddict(message.content)
            if step == "share":
                receivers, texts = parts.config.get("share-to", []), parts.config.get("share-ct", [])
                if not isinstance(receivers, list) or not isinstance(texts, list) or len(receivers) != len(texts):
                    raise SecAggError("its shares do not pair up with their receivers")
                coordinator.add_shares(client_id, dict(zip(receivers, texts, strict=True)),
                                       parts.config.get("commitment", b""))
            elif step == "mask":
                coordinator.add_masked_input(client_id, parts.arrays)
            elif step == "confirm":
                coordinator.add_confirmation(client_id, parts.config.get("signature", b""))
            else:
                answer = {}
                for kind in ("self-seed", "mask-key"):
                    owners, shares = parts.config.get(f"{kind}-sites", []), parts.config.get(f"{kind}-shares", [])
                    if not isinstance(owners, list) or not isinstance(shares, list) or len(owners) != len(shares):
                        raise SecAggError("its shares do not pair up with their owners")
                    if not all(type(u) is int for u in owners) or not all(type(v) is bytes and len(v) <= 66
                                                                          for v in shares):
                        raise SecAggError("its shares are not 66-byte field elements of roster sites")
                    answer[kind] = {u: int.from_bytes(v, "big") for u, v in zip(owners, shares, strict=True)}
                coordinator.add_unmask_reply(client_id, answer)
        except (SecAggError, ValueError, TypeError) as err:
            _reject(strategy, site, str(err)[:300])


def centrally_noised(strategy: AlgorithmStrategy, server_round: int, replies: Iterable[Reply]) -> Iterator[Reply]:
    """Central DP: clip each reply's summed fields to C here, sum, add the noise, yield the mean."""
    settings = strategy.settings.central_dp
    clip, multiplier = float(settings["clip"]), float(settings["noise-multiplier"])
    algorithm = strategy.algorithm
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    parts: list[ClientId] = []
    base = {k: v.numpy() for k, v in strategy.state.items()}
    for reply in replies:
        try:
            payload = reply.payload
            kinds = {name: algorithm.payload_kind(name, strategy.state.keys()) for name in payload.arrays}
            vectors = clipped(summed_fields(kinds, payload.arrays, base, algorithm.update_kind), clip)
            expected = {name: int(np.prod(strategy.state[name].shape)) if name in strategy.state else None
                        for name in vectors}
            if any(size is not None and vectors[name].size != size for name, size in expected.items()) or any(
                    name in sums and sums[name].size != v.size for name, v in vectors.items()):
                raise SecAggError("a field's size does not match")
            if not all(np.isfinite(v).all() for v in vectors.values()):
                raise SecAggError("NaN or infinite values")
        except (SecAggError, KeyError, ValueError) as err:
            site = strategy._by_client[reply.client]
            _reject(strategy, site, str(err)[:300])
            continue
        for name, vector in vectors.items():
            sums[name] = sums[name] + vector if name in sums else vector.copy()
            counts[name] = counts.get(name, 0) + 1
        parts.append(reply.client)
    if not parts:
        return
    noisy = central_noise(sums, clip, multiplier, np.random.default_rng())
    from privacy.accounting import Release, epsilon

    strategy.central_releases += 1
    strategy.sum_metrics = {"dp-central-epsilon": epsilon([Release("gaussian", multiplier)] * strategy.central_releases,
                                                          float(settings["delta"])),
                            "dp-noise-multiplier": 2 * multiplier}
    strategy.sum_parts = parts
    yield Reply(SUM_CLIENT, federation_payload(strategy.algorithm, strategy.state,
                                                     {n: v / counts[n] for n, v in noisy.items()}, len(parts)))


__all__ = ["centrally_noised", "secure_instructions", "securely_summed"]
