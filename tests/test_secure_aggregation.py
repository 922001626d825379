"""Secure aggregation (privacy/secure_aggregation.py): exact sums, uniform masked inputs, dropout
recovery, and the requests a site refuses."""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import RecordDict
from scipy import stats

from privacy.secure_aggregation import (
    FixedPoint,
    SecAggCoordinator,
    SecAggError,
    SecAggRefusal,
    SecAggSite,
    UnmaskRequest,
    session_id,
    shamir_combine,
    shamir_split,
)


def trust_everyone(site: int, identity: bytes) -> bool:
    return True


def make_sites(count: int, session: bytes, **options) -> dict[int, SecAggSite]:
    keys = [Ed25519PrivateKey.generate() if i % 2 else ec.generate_private_key(ec.SECP384R1()) for i in range(count)]
    return {10 + 7 * i: SecAggSite(10 + 7 * i, keys[i], session, verify_peer=trust_everyone, **options)
            for i in range(count)}


def run_protocol(vectors: dict[int, dict[str, np.ndarray]], fixed: FixedPoint, *, threshold: int = 0,
                 drop_before_masking: set[int] = frozenset(), drop_before_unmask: set[int] = frozenset(),
                 session: bytes | None = None, sites: dict[int, SecAggSite] | None = None):
    session = session or session_id("run-1", 3)
    sites = sites or make_sites(len(vectors), session)
    assert set(sites) == set(vectors)
    coordinator = SecAggCoordinator(session, fixed, threshold)
    for site_id, site in sites.items():
        coordinator.add_advertisement(site.advertise({k: v.size for k, v in vectors[site_id].items()}))
    roster, t = coordinator.roster()
    for site_id, site in sites.items():
        coordinator.add_shares(site_id, *site.share_keys(roster, t))
    sharers = coordinator.sharers()
    rng = np.random.default_rng(0)
    for site_id, site in sites.items():
        if site_id in drop_before_masking:
            continue
        encoded = {k: fixed.encode(v, rng) for k, v in vectors[site_id].items()}
        coordinator.add_masked_input(site_id, site.masked_input(coordinator.shares_for(site_id), sharers, encoded,
                                                                fixed))
    confirm_all(sites, coordinator, skip=drop_before_unmask)
    request = coordinator.unmask_request()
    for site_id in coordinator.confirmations:
        coordinator.add_unmask_reply(site_id, sites[site_id].unmask(request, coordinator.confirmations))
    sums, survivors = coordinator.result()
    return sums, survivors, sites, coordinator


def confirm_all(sites, coordinator, skip=frozenset()):
    """Step 3: every survivor (but those in ``skip``) signs the survivor set."""
    survivors = coordinator.survivors()
    for site_id in survivors:
        if site_id not in skip:
            coordinator.add_confirmation(site_id, sites[site_id].confirm(survivors))


def keys_shared(count: int, run: str, size: int, threshold: int = 0, bits: int = 32):
    """Steps 0 and 1 done for ``count`` sites each with one vector ``x`` of ``size`` entries."""
    fixed = FixedPoint.sized(sites=count, bound=1.0, bits=bits)
    session = session_id(run, 1)
    sites = make_sites(count, session)
    coordinator = SecAggCoordinator(session, fixed, threshold)
    for site in sites.values():
        coordinator.add_advertisement(site.advertise({"x": size}))
    roster, t = coordinator.roster()
    for site_id, site in sites.items():
        coordinator.add_shares(site_id, *site.share_keys(roster, t))
    return sites, coordinator, fixed


def test_shamir_any_threshold_subset_rebuilds_the_secret():
    secret = int.from_bytes(b"\x7f" * 32, "big")
    shares = shamir_split(secret, 3, [1, 2, 3, 4, 5])
    for subset in itertools.combinations(shares, 3):
        assert shamir_combine({x: shares[x] for x in subset}) == secret
    assert shamir_combine({x: shares[x] for x in (1, 2)}) != secret  # fewer than t: unrelated


def test_the_unmasked_sum_equals_the_plain_sum_exactly():
    rng = np.random.default_rng(1)
    fixed = FixedPoint.sized(sites=5, bound=4.0, bits=32)
    vectors = {10 + 7 * i: {"layer.weight": rng.uniform(-4, 4, 1000).astype(np.float32),
                            "weight": np.array([float(i + 1)])} for i in range(5)}
    sums, survivors, _, _ = run_protocol(vectors, fixed)
    assert survivors == sorted(vectors)
    # the same stochastic rounding, redone: the integer sum is exact
    rounding = np.random.default_rng(0)
    expected = {"layer.weight": np.zeros(1000, dtype=np.int64), "weight": np.zeros(1, dtype=np.int64)}
    for site_id in vectors:
        for name, value in vectors[site_id].items():
            expected[name] += fixed.signed(fixed.encode(value, rounding))
    for name in expected:
        assert np.array_equal(fixed.signed(sums[name]), expected[name])
    assert np.allclose(fixed.decode(sums["layer.weight"]),
                       sum(v["layer.weight"].astype(np.float64) for v in vectors.values()), atol=5 / fixed.scale)
    assert fixed.decode(sums["weight"])[0] == 15.0


def test_fixed_point_sized_for_the_sites_never_wraps():
    fixed = FixedPoint.sized(sites=10, bound=2.0, bits=20, margin=3.0)
    extreme = np.full(64, 2.0)
    total = sum(fixed.signed(fixed.encode(extreme, np.random.default_rng(i))) for i in range(10))
    assert (total > 0).all() and np.allclose(fixed.decode(fixed.reduce(total.view(np.uint64))), 20.0, atol=1e-3)
    with pytest.raises(SecAggError, match="too small"):
        FixedPoint.sized(sites=10**5, bound=1.0, bits=16)


def test_one_masked_input_is_uniform_over_the_modulus():
    size = 1 << 17
    sites, coordinator, fixed = keys_shared(3, "run-u", size, bits=16)
    first = min(sites)
    zeros = fixed.encode(np.zeros(size), np.random.default_rng(0))  # the most structured input there is
    masked = sites[first].masked_input(coordinator.shares_for(first), coordinator.sharers(), {"x": zeros}, fixed)["x"]
    counts = np.bincount(masked.astype(np.int64) >> 8, minlength=256)  # 256 bins of the top 8 bits
    assert stats.chisquare(counts).pvalue > 1e-4
    low = np.bincount(masked.astype(np.int64) & 0xFF, minlength=256)
    assert stats.chisquare(low).pvalue > 1e-4


@pytest.mark.parametrize("when", ["before masking", "before unmasking"])
def test_any_n_minus_t_sites_dropping_are_recovered(when):
    rng = np.random.default_rng(2)
    fixed = FixedPoint.sized(sites=7, bound=1.0, bits=32)
    vectors = {10 + 7 * i: {"a": rng.uniform(-1, 1, 50), "b": rng.uniform(-1, 1, 3)} for i in range(7)}
    ids = sorted(vectors)
    threshold = 4
    for dropped in itertools.combinations(ids, len(ids) - threshold):
        drop = set(dropped)
        sums, survivors, _, _ = run_protocol(
            vectors, fixed, threshold=threshold,
            drop_before_masking=drop if when == "before masking" else set(),
            drop_before_unmask=drop if when == "before unmasking" else set())
        counted = [s for s in ids if s not in drop] if when == "before masking" else ids
        assert survivors == counted
        for name in ("a", "b"):
            expected = sum(vectors[s][name] for s in counted)
            assert np.allclose(fixed.decode(sums[name]), expected, atol=len(counted) / fixed.scale)


def test_partial_key_replies_sum_per_key():
    rng = np.random.default_rng(3)
    fixed = FixedPoint.sized(sites=5, bound=1.0, bits=32)
    a, b = (lambda: rng.uniform(-1, 1, 8)), (lambda: rng.uniform(-1, 1, 5))
    vectors = {10: {"a": a()}, 17: {"a": a(), "b": b()}, 24: {"b": b(), "a": a()}, 31: {"a": a(), "b": b()},
               38: {"b": b()}}
    sums, _, _, _ = run_protocol(vectors, fixed, drop_before_masking={31})  # t = 3: each vector keeps 3 senders
    assert np.allclose(fixed.decode(sums["a"]), vectors[10]["a"] + vectors[17]["a"] + vectors[24]["a"],
                       atol=3 / fixed.scale)
    assert np.allclose(fixed.decode(sums["b"]), vectors[17]["b"] + vectors[24]["b"] + vectors[38]["b"],
                       atol=3 / fixed.scale)


def test_a_vector_too_few_sites_send_is_refused_before_its_sum_could_reveal_them():
    """The coordinator asks one site alone for a tensor (fedavg: the instruction's keys; selective-layer:
    its layers): that tensor's sum would be the site's own. Refused at the share step, and again at the
    confirm step when dropped sites leave a vector with fewer than t senders."""
    session = session_id("run-k", 1)
    sites = make_sites(4, session)
    layouts = {s: {"a": 3, **({"k": 2} if i == 0 else {})} for i, s in enumerate(sorted(sites))}
    ads = [sites[s].advertise(layouts[s]) for s in sorted(sites)]
    victim = min(sites)
    with pytest.raises(SecAggRefusal, match="only 1 roster sites send 'k'"):
        sites[victim].share_keys(ads, 3)
    rng = np.random.default_rng(5)
    vectors = {10 + 7 * i: {"a": rng.uniform(-1, 1, 3), **({"k": rng.uniform(-1, 1, 2)} if i < 3 else {})}
               for i in range(5)}  # 'k' from 3 of 5 sites: t = 3 at the share step
    with pytest.raises(SecAggRefusal, match="only 2 survivors sent 'k'"):  # one of them drops before masking
        run_protocol(vectors, FixedPoint.sized(5, 1.0), drop_before_masking={24})


def _masked_round(count: int = 4, threshold: int = 3):
    sites, coordinator, fixed = keys_shared(count, "run-r", 4, threshold)
    for site_id, site in list(sites.items())[:-1]:  # the last one drops before masking
        coordinator.add_masked_input(site_id, site.masked_input(
            coordinator.shares_for(site_id), coordinator.sharers(), {"x": fixed.encode(np.ones(4), np.random.default_rng())},
            fixed))
    return sites, coordinator


def test_a_coordinator_asking_for_both_shares_of_a_site_is_refused():
    sites, coordinator = _masked_round()
    confirm_all(sites, coordinator)
    honest = coordinator.unmask_request()
    survivor = honest.survivors[0]
    asker = honest.survivors[1]
    with pytest.raises(SecAggRefusal, match="both"):
        sites[asker].unmask(UnmaskRequest(honest.survivors, honest.dropped + (survivor,)), coordinator.confirmations)
    # a second request (a replay, or another try with a different split) is refused too
    with pytest.raises(SecAggRefusal, match="once"):
        sites[asker].unmask(honest, coordinator.confirmations)


def test_telling_sites_different_survivors_gets_no_site_to_answer_for_both():
    """Bonawitz et al.'s attack on a coordinator that skips the consistency check: some sites are told
    the victim survived (they reveal its self-mask seed), others that it dropped (its mask key).
    Each site signs one survivor set and answers only for a set the threshold of sites signed."""
    sites, coordinator = _masked_round(count=5, threshold=3)
    everyone = coordinator.survivors()  # 4 survivors; the fifth site dropped before masking
    victim, *others = everyone
    without_victim = [s for s in everyone if s != victim]
    signed_all = {s: sites[s].confirm(everyone) for s in others[:2]}
    signed_without = {s: sites[s].confirm(without_victim) for s in others[2:]}
    honest_dropped = tuple(sorted(set(coordinator.shares) - set(everyone)))
    with pytest.raises(SecAggRefusal, match="only 2 sites signed"):  # a majority never signed either set
        sites[others[0]].unmask(UnmaskRequest(tuple(everyone), honest_dropped), signed_all)
    with pytest.raises(SecAggRefusal, match="not the ones this site confirmed"):
        sites[others[1]].unmask(UnmaskRequest(tuple(without_victim), honest_dropped + (victim,)),
                                {**signed_all, **signed_without})
    with pytest.raises(SecAggRefusal, match="only 1 sites signed"):
        sites[others[2]].unmask(UnmaskRequest(tuple(without_victim), honest_dropped + (victim,)), signed_without)


def test_a_site_refuses_being_listed_as_dropped_or_a_split_that_is_not_the_sharers():
    sites, coordinator = _masked_round()
    everyone = coordinator.survivors()
    me = everyone[0]
    others = [s for s in everyone if s != me]
    with pytest.raises(SecAggRefusal, match="this one included"):
        sites[me].confirm(others)  # a survivor set without the site itself
    sites, coordinator = _masked_round()
    confirm_all(sites, coordinator)
    honest = coordinator.unmask_request()
    with pytest.raises(SecAggRefusal, match="split"):  # hides the dropped site
        sites[honest.survivors[0]].unmask(UnmaskRequest(honest.survivors, ()), coordinator.confirmations)


def test_a_tampered_or_replayed_share_is_detected():
    sites, coordinator, fixed = keys_shared(3, "run-t", 2)
    session = coordinator.session
    a, b, c = sorted(sites)
    relayed = coordinator.shares_for(b)
    tampered = dict(relayed)
    tampered[a] = tampered[a][:20] + bytes([tampered[a][20] ^ 1]) + tampered[a][21:]
    with pytest.raises(SecAggRefusal, match=f"site {a} does not decrypt"):
        sites[b].masked_input(tampered, coordinator.sharers(), {"x": np.zeros(2, np.uint64)}, fixed)
    # the share a sent to c, relayed to b as if it were b's: bound to the pair, refused
    swapped = {a: coordinator.shares[a][c], c: relayed[c]}
    fresh = make_sites(3, session)  # new state machines (the old one refused and stopped)
    with pytest.raises(SecAggRefusal):
        fresh[b].masked_input(swapped, coordinator.sharers(), {"x": np.zeros(2, np.uint64)}, fixed)


def test_a_replayed_request_or_a_roster_from_another_round_is_refused():
    fixed = FixedPoint.sized(sites=3, bound=1.0)
    old_session, new_session = session_id("run-p", 1), session_id("run-p", 2)
    old_sites = make_sites(3, old_session)
    old_roster = [site.advertise({"x": 2}) for site in old_sites.values()]
    new_sites = make_sites(3, new_session)
    mine = min(new_sites)
    ad = new_sites[mine].advertise({"x": 2})
    with pytest.raises(SecAggRefusal, match="once"):
        new_sites[mine].advertise({"x": 2})
    replayed_roster = [ad] + [old for old in old_roster if old.site != mine]
    with pytest.raises(SecAggRefusal, match="not signed"):
        new_sites[mine].share_keys(replayed_roster, 2)
    # a distrusted identity key is refused even when its signature is fine
    sites = {s: SecAggSite(s, Ed25519PrivateKey.generate(), new_session, verify_peer=lambda site, key: False)
             for s in (1, 2)}
    ads = [site.advertise({"x": 1}) for site in sites.values()]
    with pytest.raises(SecAggRefusal, match="not one this site trusts"):
        sites[1].share_keys(ads, 2)


def test_a_site_refuses_fewer_sites_or_a_lower_threshold_than_its_policy():
    session = session_id("run-m", 1)
    sites = make_sites(3, session, min_sites=4, min_threshold=2)
    ads = [site.advertise({"x": 1}) for site in sites.values()]
    with pytest.raises(SecAggRefusal, match="masks only among 4"):
        sites[min(sites)].share_keys(ads, 2)
    sites = make_sites(3, session, min_threshold=3)
    ads = [site.advertise({"x": 1}) for site in sites.values()]
    with pytest.raises(SecAggRefusal, match="threshold 2"):
        sites[min(sites)].share_keys(ads, 2)


def test_a_tampered_unmask_share_is_detected_and_spare_answers_recover():
    sites, coordinator = _masked_round(count=5, threshold=3)
    confirm_all(sites, coordinator)
    request = coordinator.unmask_request()
    answers = {s: sites[s].unmask(request, coordinator.confirmations) for s in request.survivors}
    liar = request.survivors[0]
    target = request.survivors[1]
    answers[liar]["self-seed"][target] ^= 1
    exact = SecAggCoordinator(coordinator.session, coordinator.fixed, coordinator.threshold, None,
                              coordinator.advertisements, coordinator.shares, coordinator.commitments,
                              {k: v.copy() for k, v in coordinator.sums.items()}, set(coordinator.masked_from),
                              dict(coordinator.confirmations))
    for s in [liar, *[s for s in request.survivors if s not in (liar, target)]][:3]:  # exactly t, one lying
        exact.add_unmask_reply(s, answers[s])
    with pytest.raises(SecAggError, match="tampered share"):
        exact.result()
    for s in request.survivors:  # all 4 survivors answer: a subset without the liar rebuilds the seed
        coordinator.add_unmask_reply(s, answers[s])
    sums, survivors = coordinator.result()
    assert np.allclose(coordinator.fixed.decode(sums["x"]), 4.0, atol=1e-6)


def test_a_site_state_survives_a_restart_between_steps():
    sites, coordinator, fixed = keys_shared(3, "run-s", 3)
    for site_id, site in sites.items():
        restored = SecAggSite(site_id, site.identity_key, coordinator.session, verify_peer=trust_everyone)
        restored.load_state_dict(site.state_dict())
        sites[site_id] = restored
    for site_id, site in sites.items():
        coordinator.add_masked_input(site_id, site.masked_input(
            coordinator.shares_for(site_id), coordinator.sharers(),
            {"x": fixed.encode(np.full(3, 0.5), np.random.default_rng())}, fixed))
    confirm_all(sites, coordinator)
    request = coordinator.unmask_request()
    for site_id in request.survivors:
        coordinator.add_unmask_reply(site_id, sites[site_id].unmask(request, coordinator.confirmations))
    sums, _ = coordinator.result()
    assert np.allclose(fixed.decode(sums["x"]), 1.5, atol=1e-6)


# ---- distributed DP ------------------------------------------------------------------------------
def test_the_discrete_gaussian_sampler_has_the_discrete_gaussian_pmf():
    from privacy.distributed_dp import discrete_gaussian

    sigma = 1.5
    draws = discrete_gaussian(sigma, 200_000, np.random.default_rng(4))
    support = np.arange(-8, 9)
    pmf = np.exp(-support.astype(float) ** 2 / (2 * sigma**2))
    pmf /= pmf.sum()
    observed = np.array([(draws == x).sum() for x in support])
    assert observed.sum() > 199_990  # hardly anything beyond ±8σ/1.5
    assert stats.chisquare(observed, pmf * observed.sum()).pvalue > 1e-4


def test_the_distributed_noise_on_the_sum_has_the_target_variance():
    from privacy.distributed_dp import DistributedGaussian

    fixed = FixedPoint.sized(sites=10, bound=1.0, bits=32, margin=8 * 2 * 0.8 * 1.0)
    mechanism = DistributedGaussian(clip=1.0, noise_multiplier=0.8, threshold=6)
    d = 60_000
    rng = np.random.default_rng(5)
    total = sum(mechanism.noised_integers(np.zeros(d), fixed.scale, rng) for _ in range(6)).astype(np.float64)
    target = (0.8 * mechanism.sensitivity(fixed.scale, d)) ** 2
    assert abs(total.var() / target - 1) < 0.02
    assert abs(total.mean()) < 4 * math.sqrt(target / d)
    assert abs(mechanism.sum_std(fixed.scale, d) - 2 * 0.8 * 1.0) < 0.01  # ≈ 2zC in value units


# ---- through the real ClientApp handlers: what a hostile coordinator can ask ------------------------
from fedclient.wire import CONFIG, from_recorddict, refusal_reason, to_recorddict  # noqa: E402
from tests.test_hostile_coordinator import _deliver, _policy, _train_content  # noqa: E402

ROUND = {"secagg": True, "secagg-nonce": "ab" * 16, "secagg-sites": 3, "secagg-bits": 32, "secagg-clip": 10.0,
         "secagg-max-weight": 10000, "secagg-threshold": 2, "secagg-noise": 0.0}
OPEN_SECURE = """
    [privacy]
    required = false
    [secure-aggregation]
    required = true
    min-sites = 3
"""


@pytest.fixture(scope="module")
def app():
    from fedclient.app import build_client_app

    return build_client_app({"task": "tiny"})


def _step_message(step: str, session: str, **config) -> RecordDict:
    from aggregators.base import RecordParts

    return to_recorddict(RecordParts(config={"secagg-step": step, "secagg-session": session, **config}))


def _three_sites(tmp_path, policy_text: str = OPEN_SECURE):
    from fedclient.keys import create_site_keys

    tmp_path.mkdir(parents=True, exist_ok=True)
    policy = _policy(tmp_path, policy_text)
    sites = {}
    for index, site_id in enumerate((101, 202, 303)):
        key, _ = create_site_keys(tmp_path / f"site{index}" / "site.key")
        node = {"partition-id": index, "num-partitions": 3, "policy": policy, "site-key": str(key),
                "state-dir": str(tmp_path / f"state{index}")}
        sites[site_id] = (node, RecordDict())
    return sites


def _advertise(app, sites):
    replies = {}
    for site_id, (node, state) in sites.items():
        reply = _deliver(app, "train", _train_content({**ROUND, "secagg-site": site_id}), node, state=state)
        assert refusal_reason(reply.content) is None, refusal_reason(reply.content)
        replies[site_id] = from_recorddict(reply.content).config
    return replies


def test_a_site_sends_only_its_masked_update_and_the_coordinator_learns_the_sum(app, tmp_path, flower_identity):
    from privacy.secure_aggregation import Advertisement, weighted_means

    sites = _three_sites(tmp_path)
    replies = _advertise(app, sites)
    assert all(set(r) == {"secagg-advertisement", "secagg-session"} for r in replies.values())  # no update, no loss
    session = replies[101]["secagg-session"]
    fixed = SecureSumSettings_from_round().fixed()
    coordinator = SecAggCoordinator(bytes.fromhex(session), fixed, 2)
    for r in replies.values():
        coordinator.add_advertisement(Advertisement.from_json(r["secagg-advertisement"]))
    roster, t = coordinator.roster()
    ads = [ad.to_json() for ad in roster]
    for site_id, (node, state) in sites.items():
        answer = from_recorddict(_deliver(app, "query.secagg", _step_message("share", session, roster=ads, threshold=t),
                                          node, state=state).content).config
        coordinator.add_shares(site_id, dict(zip(answer["share-to"], answer["share-ct"])), answer["commitment"])
        # the same step again: a replay, refused
        again = _deliver(app, "query.secagg", _step_message("share", session, roster=ads, threshold=t), node, state=state)
        assert "once, in order" in refusal_reason(again.content)
    sharers = coordinator.sharers()
    masked = {}
    for site_id, (node, state) in sites.items():
        relayed = coordinator.shares_for(site_id)
        reply = _deliver(app, "query.secagg", _step_message("mask", session, sharers=sharers,
                         **{"share-from": sorted(relayed), "share-ct": [relayed[s] for s in sorted(relayed)]}),
                         node, state=state)
        masked[site_id] = from_recorddict(reply.content).arrays
        coordinator.add_masked_input(site_id, masked[site_id])
    survivors = coordinator.survivors()
    for site_id, (node, state) in sites.items():
        answer = from_recorddict(_deliver(app, "query.secagg", _step_message("confirm", session, survivors=survivors),
                                          node, state=state).content).config
        coordinator.add_confirmation(site_id, answer["signature"])
    request = coordinator.unmask_request()
    signed = {"signers": sorted(coordinator.confirmations),
              "signatures": [coordinator.confirmations[s] for s in sorted(coordinator.confirmations)]}
    node, state = sites[202]
    both = _deliver(app, "query.secagg", _step_message("unmask", session, survivors=list(request.survivors),
                                                       dropped=[101], **signed), node, state=state)
    assert "both" in refusal_reason(both.content)  # and site 202 is done with this aggregation
    for site_id in (101, 303):
        node, state = sites[site_id]
        answer = from_recorddict(_deliver(app, "query.secagg", _step_message(
            "unmask", session, survivors=list(request.survivors), dropped=[], **signed), node, state=state).content).config
        coordinator.add_unmask_reply(site_id, {
            "self-seed": {u: int.from_bytes(v, "big") for u, v in zip(answer["self-seed-sites"], answer["self-seed-shares"])},
            "mask-key": {}})
    sums, survivors = coordinator.result()
    assert survivors == [101, 202, 303]
    means, weight = weighted_means(sums, fixed, coordinator.advertisements, survivors, weighted=True)
    assert weight == sum(ad.weight for ad in coordinator.advertisements.values()) > 3  # the sites' example counts
    assert all(np.isfinite(m).all() for m in means.values()) and 0 < means["metric/train-loss"][0] < 10
    # one site's masked update looks nothing like its weighted update (uniform residues)
    some = next(k for k in masked[101] if not k.startswith("metric/"))
    assert np.asarray(masked[101][some]).astype(np.float64).std() > 2**30


def SecureSumSettings_from_round():
    from privacy.secure_aggregation import SecureSumSettings

    return SecureSumSettings.from_config(ROUND)


def test_a_site_refuses_rounds_its_secure_aggregation_policy_forbids(app, tmp_path, flower_identity):
    sites = _three_sites(tmp_path, OPEN_SECURE + 'peers = ["SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"]\n')
    node, state = sites[101]
    plain = _deliver(app, "train", _train_content({}), node, state=RecordDict())
    assert refusal_reason(plain.content).startswith("site policy secure-aggregation.required")
    distributed = _deliver(app, "train", _train_content({"dp": "distributed", "dp-epsilon": 4.0, "dp-delta": 1e-6,
                                                         "clip": 1.0}), node, state=RecordDict())
    assert "privacy.mechanisms" in refusal_reason(distributed.content)  # the built-in list has no distributed
    replies = _advertise(app, sites)
    session = replies[101]["secagg-session"]
    ads = [replies[s]["secagg-advertisement"] for s in sorted(replies)]
    for site_id in sites:  # the peers' keys are not the one the policy pins
        node, state = sites[site_id]
        refused = _deliver(app, "query.secagg", _step_message("share", session, roster=ads, threshold=2), node,
                           state=state)
        assert "not one this site trusts" in refusal_reason(refused.content)
    other = _deliver(app, "query.secagg", _step_message("share", "00" * 32, roster=ads, threshold=2), sites[202][0],
                     state=sites[202][1])
    assert "not part of" in refusal_reason(other.content)
    too_few = _three_sites(tmp_path / "few", OPEN_SECURE)
    replies = _advertise(app, too_few)
    two = [replies[s]["secagg-advertisement"] for s in (101, 202)]
    refused = _deliver(app, "query.secagg", _step_message("share", replies[101]["secagg-session"], roster=two,
                                                          threshold=2), too_few[101][0], state=too_few[101][1])
    assert "masks only among 3" in refusal_reason(refused.content)


def test_the_run_config_check_refuses_what_cannot_be_summed():
    from fedclient.runconfig import resolve_run_config
    from fedserver.run_config import RunConfigError, check_run_config

    def problems(**overrides) -> str:
        try:
            check_run_config(resolve_run_config({}, {"task": "tiny", "fraction-evaluate": 0.0, **overrides}),
                             num_clients=4)
        except RunConfigError as err:
            return "\n".join(err.problems)
        return ""

    assert problems(secagg=True) == "" and problems(secagg=True, strategy="ferret") == ""
    assert problems(dp="distributed") == "" and problems(dp="central") == ""
    assert "FRL's server votes" in problems(secagg=True, strategy="frl", **{"train-layers": "head"})
    assert "top-k keeps a different set of positions" in problems(secagg=True, codec="topk:0.1")
    assert "ferret-seeds=client" in problems(secagg=True, strategy="ferret", **{"ferret-seeds": "client"})
    assert "trusted-coordinator reference" in problems(secagg=True, dp="central")
    assert "a seed only one site drew" in problems(dp="distributed", strategy="fedkseed")
    assert "a seed only one site drew" in problems(secagg=True, strategy="one-byte")


def test_a_site_joins_one_secure_sum_per_round(app, tmp_path, flower_identity):
    """A second train request for a round already aggregated (a replay, or the same round with another
    nonce to sum over another set of sites and difference the two) is refused."""
    sites = _three_sites(tmp_path)
    node, state = sites[101]
    first = _deliver(app, "train", _train_content({**ROUND, "secagg-site": 101}), node, state=state)
    assert refusal_reason(first.content) is None
    for nonce in ("ab" * 16, "cd" * 16):
        again = _deliver(app, "train", _train_content({**ROUND, "secagg-site": 101, "secagg-nonce": nonce}), node,
                         state=state)
        assert "already joined" in refusal_reason(again.content)
    later = _deliver(app, "train", _train_content({**ROUND, "secagg-site": 101}, server_round=3), node, state=state)
    assert refusal_reason(later.content) is None
    earlier = _deliver(app, "train", _train_content({**ROUND, "secagg-site": 101}, server_round=2), node, state=state)
    assert "already joined" in refusal_reason(earlier.content)  # rounds only increase


# ---- the contract: an algorithm given the summed mean reaches the state its replies give ----------
def _replies_and_sum(algorithm, state, instructions, payloads):
    """The sites' replies, and the one summed reply secure aggregation would hand the algorithm
    (computed in float: the fixed point's rounding is tested above)."""
    from aggregators.base import SUM_CLIENT, Reply
    from privacy.secure_aggregation import federation_payload, summed_fields

    sums, weights = {}, {}
    for client, payload in payloads.items():
        kinds = {n: algorithm.payload_kind(n, state.keys()) for n in payload.arrays}
        for name, vector in summed_fields(kinds, payload.arrays, instructions[client].arrays,
                                          algorithm.update_kind).items():
            sums[name] = sums.get(name, 0) + payload.num_examples * vector
            weights[name] = weights.get(name, 0) + payload.num_examples
    means = {name: total / weights[name] for name, total in sums.items()}
    summed = federation_payload(algorithm, state, means, max(weights.values()))
    return [Reply(c, p) for c, p in payloads.items()], [Reply(SUM_CLIENT, summed)]


@pytest.mark.parametrize("name", ["fedavg", "ferret", "selective-layer"])
def test_an_algorithm_given_the_summed_mean_reaches_the_state_its_replies_give(name):
    import copy

    from aggregators import make_algorithm

    if name == "selective-layer":
        from tests.test_selective_layer import Data, Stack, _client_round, _setup

        model, algorithm, state = _setup(selection="random")
        clients = [3, 5, 8]
        instructions, caches = _client_round(algorithm, state, clients, [1, 2, 3])
        payloads = {c: algorithm.local(Stack(), Data(seed=c), instructions[c], caches[c]) for c in clients}
        assert len({frozenset(p.arrays) for p in payloads.values()}) > 1  # sites send different layers
    else:
        from tests.toy import ToyData, ToyModel, toy_state

        model = ToyModel()
        algorithm = make_algorithm(name, {"local-steps": 2, "batch-size": 8, "lr": 0.01, "ferret-bases": 64,
                                          "ferret-block-size": 256, "max-site-weight": 1.0})
        state = algorithm.init_state(toy_state(model))
        clients = [3, 5, 8]
        instructions = algorithm.plan(1, clients, state)
        payloads = {c: algorithm.local(copy.deepcopy(model), ToyData(n=20 + 10 * c, seed=c), instructions[c], {})
                    for c in clients}
    assert algorithm.secure_aggregation_incompatibility == ""
    replies, summed = _replies_and_sum(algorithm, state, instructions, payloads)
    by_site = copy.deepcopy(algorithm).aggregate(1, state, replies)
    by_sum = copy.deepcopy(algorithm).aggregate(1, state, summed)
    assert by_sum.accepted == [0] and not by_sum.rejected
    for key in state:
        assert torch.allclose(by_site.state[key], by_sum.state[key], atol=1e-6), key
    assert any(not torch.equal(by_site.state[k], state[k]) for k in state)  # the round did change the model


def test_the_console_form_asks_for_secure_aggregation_and_is_checked_like_a_run():
    from fedserver.console.control import FormError, RunRequest

    assert RunRequest(secagg=True, dp="distributed").run_config()["secagg"] is True
    with pytest.raises(FormError, match="FRL's server votes"):
        RunRequest(strategy="frl", secagg=True)


def test_a_roster_with_one_identity_twice_or_other_training_terms_is_refused():
    session = session_id("run-i", 1)
    key = Ed25519PrivateKey.generate()
    twins = {s: SecAggSite(s, key, session, verify_peer=trust_everyone) for s in (1, 2, 3)}
    ads = [site.advertise({"x": 1}) for site in twins.values()]  # one pinned key signing as three sites
    with pytest.raises(SecAggRefusal, match="share one identity key"):
        twins[1].share_keys(ads, 2)
    sites = make_sites(3, session)
    ads = [site.advertise({"x": 1}, terms="lr=0.0005" if i else "lr=0") for i, site in enumerate(sites.values())]
    with pytest.raises(SecAggRefusal, match="same training terms"):
        sites[max(sites)].share_keys(ads, 2)
    coordinator = SecAggCoordinator(session, FixedPoint.sized(3, 1.0))
    coordinator.add_advertisement(ads[0])
    with pytest.raises(SecAggError, match="other training terms"):
        coordinator.add_advertisement(ads[1])


def test_the_coordinator_refuses_layouts_and_masked_inputs_that_would_not_sum():
    from privacy.secure_aggregation import check_summed_layout

    sizes = {"w": 4}.get
    check_summed_layout({"w": 4, "metric/train-loss": 1}, sizes)
    for bad, reason in (({"w": 3}, "expected 4"), ({"v": 4}, "no such vector"), ({"metric/x": 2}, "expected 1")):
        with pytest.raises(SecAggError, match=reason):
            check_summed_layout(bad, sizes)
    sites, coordinator, fixed = keys_shared(3, "run-l", 4)
    first, second, _ = sorted(sites)
    coordinator.add_masked_input(first, sites[first].masked_input(
        coordinator.shares_for(first), coordinator.sharers(), {"x": fixed.encode(np.ones(4), np.random.default_rng())},
        fixed))
    folded = coordinator.sums["x"].copy()
    with pytest.raises(SecAggError, match="not 4"):
        coordinator.add_masked_input(second, {"x": np.zeros(1, fixed.wire_dtype)})  # would broadcast
    assert np.array_equal(coordinator.sums["x"], folded)
    session = session_id("run-l2", 1)
    other = make_sites(2, session)
    ads = [site.advertise({"x": 4 + i}) for i, site in enumerate(other.values())]
    coordinator = SecAggCoordinator(session, fixed)
    coordinator.add_advertisement(ads[0])
    with pytest.raises(SecAggError, match="differ in length"):
        coordinator.add_advertisement(ads[1])


def test_with_fresh_seeds_a_repeated_round_does_not_train_the_same_update(app, tmp_path, flower_identity):
    """A coordinator repeating a round (same model, same seed) over another set of sites would
    subtract the sums; a site with ``fresh-seeds`` (the built-in policy) trains with its own seed."""
    from fedclient.secure_aggregation import PENDING
    from fedclient.wire import unpack_array_record

    def pending(policy_text: str) -> list[dict[str, np.ndarray]]:
        sites = _three_sites(tmp_path / str(abs(hash(policy_text))), policy_text)
        node, _ = sites[101]
        updates = []
        for _ in range(2):  # the same instruction to the same site, as two runs would see it
            state = RecordDict()
            reply = _deliver(app, "train", _train_content({**ROUND, "secagg-site": 101}), node, state=state)
            assert refusal_reason(reply.content) is None, refusal_reason(reply.content)
            updates.append(unpack_array_record(state[PENDING]))
        return updates

    first, second = pending(OPEN_SECURE)
    assert any(not np.array_equal(first[k], second[k]) for k in first)
    first, second = pending(OPEN_SECURE + "fresh-seeds = false\n")
    assert all(np.array_equal(first[k], second[k]) for k in first)


def test_sites_shown_different_rosters_or_too_low_a_threshold_for_the_colluders_refuse():
    """A coordinator that leaves a heavy site out of one site's roster (so that site's weight share,
    and the sum, is mostly its own) is caught when the shares meet: each share carries its dealer's
    roster digest. With max-colluders c, the threshold must exceed (n + c) / 2."""
    session = session_id("run-d", 1)
    sites = make_sites(4, session)
    ads = {s: sites[s].advertise({"x": 2}) for s in sorted(sites)}
    victim, heavy, *rest = sorted(sites)
    full, partial = list(ads.values()), [ads[s] for s in (victim, *rest)]
    cipher_victim, _ = sites[victim].share_keys(partial, 2)  # the victim's roster lacks the heavy site
    others = {s: sites[s].share_keys(full, 3)[0] for s in (heavy, *rest)}
    receiver = rest[0]
    relayed = {victim: cipher_victim[receiver], **{s: others[s][receiver] for s in (heavy, rest[1])}}
    with pytest.raises(SecAggRefusal, match=f"site {victim} was shown another roster"):
        sites[receiver].masked_input(relayed, sorted(sites), {"x": np.zeros(2, np.uint32)}, FixedPoint.sized(4, 1.0))
    colluded = make_sites(4, session, max_colluders=1)
    ads = [site.advertise({"x": 2}) for site in colluded.values()]
    with pytest.raises(SecAggRefusal, match="needs at least 3"):  # (4 + 1) // 2 + 1 = 3
        colluded[min(colluded)].share_keys(ads, 2)
    assert colluded[max(colluded)].share_keys(ads, 3)
