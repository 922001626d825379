"""Local DP: mechanisms, the ledger against dp-accounting, refusal at the budget, per-payload
privatization, and the rule that a site can only make privacy stronger."""

from __future__ import annotations

import json
import pathlib

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting import pld, rdp
from dp_accounting.pld import privacy_loss_mechanism

from aggregators import make_algorithm
from aggregators.base import FieldKind, Instruction, Payload
from aggregators.ferret import COEFFICIENTS
from aggregators.rank_based import (
    RANK_PREFIX,
    keep_count,
    kept_edges,
    pack_ranking,
    unpack_ranking,
)
from aggregators.selective_layer import SCORES_KEY
from aggregators.shared_randomness import OneByteCodec
from aggregators.zeroth_order import SEED_CODE, SEED_INDEX, SEED_SCALAR
from privacy.accounting import (
    LedgerFile,
    PrivacyBudgetExceeded,
    PrivacyLedger,
    Release,
    calibrate,
    epsilon,
)
from privacy.ldp import (
    LdpSettings,
    LocalPrivacy,
    SitePrivacy,
    clip_norm,
    noisy_vector,
    randomized_membership,
)
from privacy.refusal import PolicyRefusal
from tests.toy import ToyData, ToyModel, toy_state

RUN = {"dp": "gaussian", "dp-epsilon": 8.0, "dp-delta": 1e-5, "clip": 1.0, "dp-noise-multiplier": 0.0,
       "dp-releases": 5}


def settings(**changes) -> LdpSettings:
    return LdpSettings.resolve({**RUN, **changes})


# ---- mechanisms --------------------------------------------------------------------------------
@pytest.mark.parametrize("mechanism, sigma, clip", [("gaussian", 1.3, 0.5), ("gaussian", 0.2, 3.0), ("laplace", 0.7, 2.0)])
def test_noise_scale_matches_sigma_times_clip(mechanism: str, sigma: float, clip: float) -> None:
    s = settings(dp=mechanism, clip=clip)
    noise = noisy_vector(np.zeros(400_000, np.float32), s, sigma, np.random.default_rng(0))
    expected_std = sigma * clip * (np.sqrt(2) if mechanism == "laplace" else 1.0)  # Laplace(b): std = √2·b
    assert abs(noise.std() / expected_std - 1) < 0.01
    assert abs(noise.mean()) < 5 * expected_std / np.sqrt(len(noise))


def test_clipping_bounds_the_norm_and_leaves_small_vectors_alone() -> None:
    rng = np.random.default_rng(1)
    for scale in (0.01, 1.0, 100.0):
        v = (rng.standard_normal(1000) * scale).astype(np.float32)
        for order in (1, 2):
            clipped = clip_norm(v, 1.0, order=order)
            norm = np.linalg.norm(clipped.astype(np.float64), ord=order)
            assert norm <= 1.0 + 1e-5
            if np.linalg.norm(v.astype(np.float64), ord=order) <= 1.0:
                assert np.array_equal(clipped, v)
            else:
                assert norm == pytest.approx(1.0, rel=1e-5)
                assert np.allclose(clipped / norm, v / np.linalg.norm(v.astype(np.float64), ord=order), atol=1e-6)


def test_randomized_membership_keeps_the_mask_without_noise_and_forgets_it_with_full_noise() -> None:
    rng = np.random.default_rng(0)
    n, keep = 200, 100
    ranking = rng.permutation(n)
    exact = randomized_membership(ranking, keep, 0.0, rng)
    assert sorted(exact) == list(range(n))
    assert set(exact[n - keep:]) == set(ranking[n - keep:])
    overlaps = [len(set(randomized_membership(ranking, keep, 1.0, rng)[n - keep:]) & set(ranking[n - keep:]))
                for _ in range(200)]
    assert abs(np.mean(overlaps) - keep * keep / n) < 3  # no better than chance


# ---- accounting --------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma, rounds", [(1.0, 10), (2.5, 20), (0.6, 3)])
def test_ledger_epsilon_equals_dp_accounting_for_the_same_mechanism(sigma: float, rounds: int) -> None:
    """T Gaussian releases with noise σ·C on a 2C-sensitive vector = GaussianDpEvent(σ/2) T times."""
    ledger = PrivacyLedger(budget=1e9, delta=1e-5)
    for t in range(rounds):
        ledger.charge(t + 1, "run", [Release("gaussian", sigma / 2)])
    accountant = pld.PLDAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(sigma / 2), rounds)
    discretized = accountant.get_epsilon(1e-5)  # a pessimistic (upper) estimate of the same thing
    assert ledger.spent() == pytest.approx(discretized, rel=1e-6)
    exact = privacy_loss_mechanism.GaussianPrivacyLoss(sigma / 2 / np.sqrt(rounds), sensitivity=1.0)
    assert exact.get_delta_for_epsilon(ledger.spent()) == pytest.approx(1e-5, rel=1e-4)
    renyi = rdp.RdpAccountant()
    renyi.compose(dp_accounting.GaussianDpEvent(sigma / 2), rounds)
    assert ledger.spent() <= renyi.get_epsilon(1e-5)  # PLD is the tighter of the two


def test_laplace_and_randomized_response_ledgers_match_their_closed_forms() -> None:
    accountant = pld.PLDAccountant()
    accountant.compose(dp_accounting.LaplaceDpEvent(0.5), 4)
    assert epsilon([Release("laplace", 0.5)] * 4, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-6)
    assert epsilon([Release("laplace", 0.5)] * 4, 1e-9) <= 4 * 2.0 + 1e-3  # pure ε = Δ/b per release
    p = 0.2  # binary RR: ε₀ = ln((1 − p/2)/(p/2)) = ln 9
    assert epsilon([Release("randomized-response", p)], 1e-9) == pytest.approx(np.log(9), rel=1e-3)
    exact = epsilon([Release("randomized-response", 0.6, 30)] * 2, 1e-5)  # closed form (binomial)
    from dp_accounting.pld import privacy_loss_distribution as library

    discretized = library.from_randomized_response(0.6, 2).self_compose(60).get_epsilon_for_delta(1e-5)
    assert exact <= discretized and exact == pytest.approx(discretized, rel=2e-3)  # dp-accounting's PLD bounds it
    small = np.log((1 - 0.95 / 2) / (0.95 / 2))  # p = 0.95: ε₀ ≈ 0.1 per bit
    assert epsilon([Release("randomized-response", 0.95, 400)], 1e-5) < 0.5 * 400 * small  # far below n·ε₀


def test_the_ledger_refuses_exactly_the_release_that_would_exceed_the_budget() -> None:
    release = Release("gaussian", 0.5)
    budget = (epsilon([release] * 3, 1e-5) + epsilon([release] * 4, 1e-5)) / 2
    ledger = PrivacyLedger(budget=budget, delta=1e-5)
    for t in range(3):
        ledger.charge(t + 1, "run", [release])
    spent = ledger.spent()
    with pytest.raises(PrivacyBudgetExceeded, match="budget"):
        ledger.charge(4, "run", [release])
    assert len(ledger.entries) == 3 and ledger.spent() == spent  # nothing recorded


def test_calibration_spends_the_budget_over_the_planned_releases() -> None:
    for mechanism in ("gaussian", "laplace"):
        z = calibrate(mechanism, 4.0, 1e-5, releases=10)
        assert 0.99 * 4.0 <= epsilon([Release(mechanism, z)] * 10, 1e-5) <= 4.0
    spent = [Release("gaussian", 3.0)] * 3
    z_after = calibrate("gaussian", 4.0, 1e-5, releases=10, spent=spent)
    assert z_after > calibrate("gaussian", 4.0, 1e-5, releases=10)  # less left: more noise
    p = calibrate("randomized-response", 8.0, 1e-5, releases=2, count=100)
    assert 0.98 * 8.0 <= epsilon([Release("randomized-response", p, 100)] * 2, 1e-5) <= 8.0


def test_a_ledger_file_persists_and_caps_both_the_run_and_the_lifetime(tmp_path) -> None:
    path = tmp_path / "site" / "ledger.json"
    store = LedgerFile(path, budget=4.0, delta=1e-5)
    with store.transaction() as ledger:
        ledger.charge(1, "run-a", [Release("gaussian", 2.0)])
    assert json.loads(path.read_text())["entries"][0]["run"] == "run-a"
    assert path.stat().st_mode & 0o777 == 0o600
    again = LedgerFile(path, budget=4.0, delta=1e-5).read()  # another process
    assert again.spent() == pytest.approx(epsilon([Release("gaussian", 2.0)], 1e-5))
    one = epsilon([Release("gaussian", 2.0)], 1e-5)
    with pytest.raises(PrivacyBudgetExceeded, match="this run's"):
        again.check("run-a", [Release("gaussian", 2.0)], run_budget=1.2 * one)
    again.check("run-b", [Release("gaussian", 2.0)], run_budget=1.2 * one)  # another run has its own cap ...
    with pytest.raises(PrivacyBudgetExceeded, match="lifetime"):
        LedgerFile(path, budget=1.2 * one, delta=1e-5).read().check("run-b", [Release("gaussian", 2.0)])  # ... not
    path.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        LedgerFile(path, budget=4.0, delta=1e-5).read()


def test_site_policy_only_makes_privacy_stronger() -> None:
    run = {**RUN, "dp-noise-multiplier": 1.0}
    looser = LdpSettings.resolve(run, SitePrivacy(max_epsilon_per_run=20.0, max_delta=1e-3, max_clip=5.0,
                                                  min_noise_multiplier=0.5))
    assert (looser.epsilon, looser.delta, looser.clip, looser.noise_multiplier) == (8.0, 1e-5, 1.0, 1.0)
    stricter = LdpSettings.resolve(run, SitePrivacy(max_epsilon_per_run=2.0, max_delta=1e-7, max_clip=0.5,
                                                    min_noise_multiplier=3.0, max_epsilon_lifetime=6.0))
    assert (stricter.epsilon, stricter.delta, stricter.clip, stricter.noise_multiplier) == (2.0, 1e-7, 0.5, 3.0)
    assert (stricter.lifetime_epsilon, stricter.lifetime_delta) == (6.0, 1e-7)
    with pytest.raises(PolicyRefusal, match="privacy.required"):
        LdpSettings.resolve({**RUN, "dp": "off"}, SitePrivacy(required=True))
    with pytest.raises(PolicyRefusal, match="privacy.mechanisms"):
        LdpSettings.resolve({**RUN, "dp": "laplace"}, SitePrivacy(mechanisms=("gaussian",)))
    assert not LdpSettings.resolve({**RUN, "dp": "off"}).enabled
    with pytest.raises(ValueError, match="dp-epsilon"):
        LdpSettings.resolve({**RUN, "dp-epsilon": -1})
    with pytest.raises(ValueError, match="dp must be"):
        LdpSettings.resolve({**RUN, "dp": "magic"})


# ---- the wrapper on each payload type ----------------------------------------------------------
class Canned:
    """An inner algorithm whose client half returns a fixed payload (and counts its calls)."""

    def __init__(self, payload: Payload, update_kind=None, name="canned") -> None:
        self.payload, self.update_kind, self.name, self.calls = payload, update_kind, name, 0
        self.default_layers, self.releases_per_round, self.resumable = "task", 1, False
        self.supports_local_dp = True
        self.adapter_incompatibility = self.secure_aggregation_incompatibility = ""
        self.public_metrics = ()

    def payload_kind(self, name, parameters):
        """What the real algorithms declare the array to be (the one that sends it)."""
        for algorithm in (make_algorithm("ferret", {}), make_algorithm("fedkseed", {}), make_algorithm("frl", {}),
                          make_algorithm("selective-layer", {})):
            kind = algorithm.payload_kind(name, ())
            if kind is not None:
                return kind
        return FieldKind.MODEL_UPDATE if self.update_kind and name in parameters else None

    def local(self, model, data, instruction, client_state):
        self.calls += 1
        return Payload(dict(self.payload.arrays), self.payload.num_examples, dict(self.payload.metrics))


def _run(inner, arrays=None, config=None, client_state=None, model=None, site=None, ledger_path=None, run="run-a"):
    instruction = Instruction(arrays or {}, {**RUN, "server-round": 1, **(config or {})})
    return LocalPrivacy(inner, site=site, ledger_path=ledger_path, run=run).local(
        model or ToyModel(), ToyData(), instruction, {} if client_state is None else client_state)


def test_fedavg_update_is_clipped_and_noised_as_one_vector_and_metrics_are_withheld() -> None:
    state = {k: v.numpy() for k, v in toy_state(ToyModel()).items()}
    trained = {k: v + 10.0 for k, v in state.items()}  # a huge update: must be clipped to C
    inner = Canned(Payload(trained, 57, {"train-loss": 0.3, "train-seconds": 1.0}), update_kind="weights")
    payload = _run(inner, arrays=state, config={"clip": 0.5, "dp-noise-multiplier": 1e-4, "dp-epsilon": 1e12})
    update = np.concatenate([(payload.arrays[k] - state[k]).reshape(-1) for k in state])
    assert np.linalg.norm(update) == pytest.approx(0.5, rel=1e-3)
    assert payload.num_examples == 1
    assert "train-loss" not in payload.metrics and "train-seconds" not in payload.metrics
    assert payload.metrics["dp-epsilon-spent"] > 0 and payload.metrics["dp-noise-multiplier"] == 1e-4


def test_every_payload_type_is_privatized_and_accounted() -> None:
    rng = np.random.default_rng(0)
    codec = OneByteCodec(1e-6, 100.0)
    cases = [
        ({COEFFICIENTS: rng.standard_normal(300).astype(np.float32) * 5}, {}),
        ({SEED_INDEX: np.arange(10, dtype=np.uint16), SEED_SCALAR: rng.standard_normal(10).astype(np.float32)}, {}),
        ({SEED_CODE: codec.encode(rng.standard_normal(10))}, {"one-byte-low": 1e-6, "one-byte-high": 100.0}),
        ({SCORES_KEY: np.abs(rng.standard_normal(5)).astype(np.float32)}, {}),
    ]
    for arrays, config in cases:
        payload = _run(Canned(Payload(arrays, 9)), config=config)
        assert payload.metrics["dp-epsilon-spent"] > 0 and payload.num_examples == 1
        for key, value in arrays.items():
            if key == SEED_INDEX:
                assert np.array_equal(payload.arrays[key], value)  # seeds are data-independent
            else:
                assert payload.arrays[key].dtype == value.dtype and payload.arrays[key].shape == value.shape
                assert not np.array_equal(payload.arrays[key], value)
    with pytest.raises(ValueError, match="no local DP mechanism"):
        _run(Canned(Payload({"mystery": np.ones(3, np.float32)}, 9)))


def test_frl_rankings_go_through_randomized_response() -> None:
    model = ToyModel()
    n = model.head.weight.numel()
    ranking = np.random.default_rng(0).permutation(n)
    inner = Canned(Payload({RANK_PREFIX + "head.weight": pack_ranking(ranking, n)}, 9), name="frl")
    payload = _run(inner, config={"frl-sparsity": 0.5, "dp-epsilon": 100.0, "dp-releases": 1}, model=model)
    sent = unpack_ranking(payload.arrays[RANK_PREFIX + "head.weight"], n)
    assert sorted(sent) == list(range(n))
    flip = payload.metrics["dp-flip-probability"]
    assert 0 < flip < 1
    overlap = len(set(kept_edges(sent, 0.5)) & set(kept_edges(ranking, 0.5))) / keep_count(n, 0.5)
    assert overlap > 0.55  # chance is 0.5; a generous budget keeps much of the mask


def test_a_site_refuses_before_training_once_the_next_release_would_exceed_its_budget() -> None:
    release = Release("gaussian", 0.5)  # σ = 1 on a 2C-sensitive vector
    budget = (epsilon([release] * 2, 1e-5) + epsilon([release] * 3, 1e-5)) / 2
    inner = Canned(Payload({COEFFICIENTS: np.ones(20, np.float32)}, 9))
    client_state: dict = {}
    spent = []
    for server_round in (1, 2):
        payload = _run(inner, config={"dp-noise-multiplier": 1.0, "dp-epsilon": budget, "server-round": server_round},
                       client_state=client_state)
        spent.append(payload.metrics["dp-epsilon-spent"])
    assert spent == pytest.approx([epsilon([release], 1e-5), epsilon([release] * 2, 1e-5)])
    with pytest.raises(PrivacyBudgetExceeded):
        _run(inner, config={"dp-noise-multiplier": 1.0, "dp-epsilon": budget, "server-round": 3},
             client_state=client_state)
    assert inner.calls == 2  # refused before training


def test_a_site_with_a_smaller_budget_refuses_earlier() -> None:
    inner = Canned(Payload({COEFFICIENTS: np.ones(20, np.float32)}, 9))
    site = SitePrivacy(max_epsilon_per_run=epsilon([Release("gaussian", 0.5)], 1e-5) * 1.01)
    client_state: dict = {}
    _run(inner, config={"dp-noise-multiplier": 1.0, "dp-epsilon": 100.0}, client_state=client_state, site=site)
    with pytest.raises(PrivacyBudgetExceeded):
        _run(inner, config={"dp-noise-multiplier": 1.0, "dp-epsilon": 100.0, "server-round": 2},
             client_state=client_state, site=site)


def test_privacy_runs_inside_the_codec_so_sites_compress_the_noisy_update() -> None:
    from aggregators.compression import CompressedUpdates

    algorithm = make_algorithm("fedavg", {"codec": "topk:0.1+q8"}, wrap=LocalPrivacy)
    assert isinstance(algorithm, CompressedUpdates) and isinstance(algorithm.inner, LocalPrivacy)
    server = make_algorithm("fedavg", {"codec": "topk:0.1+q8", "lr": 0.05})
    state = server.init_state(toy_state(ToyModel()))
    plan = server.plan(1, [3], state)
    instruction = plan[3]
    instruction.config = {**instruction.config, **RUN, "server-round": 1}
    payload = algorithm.local(ToyModel(), ToyData(seed=3), instruction, {})
    assert all(v.dtype == np.uint8 for v in payload.arrays.values())
    assert payload.num_examples == 1 and payload.metrics["dp-epsilon-spent"] > 0
    from aggregators.base import Reply

    result = server.aggregate(1, state, iter([Reply(3, payload)]))
    assert result.accepted == [3]
    assert any(not torch.equal(result.state[k], state[k]) for k in state)


def test_ldp_is_refused_where_it_cannot_be_honoured() -> None:
    from fedclient.runconfig import resolve_run_config
    from fedserver.app import privacy_settings

    config = resolve_run_config({}, {"dp": "gaussian", "fraction-evaluate": 0.5})
    with pytest.raises(ValueError, match="central evaluation"):
        privacy_settings(config, make_algorithm("fedavg"))
    config = resolve_run_config({}, {"dp": "gaussian", "fraction-evaluate": 0.0})
    with pytest.raises(ValueError, match="scafcom"):
        privacy_settings(config, make_algorithm("scafcom"))
    assert privacy_settings(config, make_algorithm("selective-layer"))["dp-releases"] == 2 * config["num-server-rounds"]


def test_a_ledger_file_carries_spending_across_runs(tmp_path) -> None:
    """The site's ledger file covers every run: what run A spent counts against the lifetime budget
    in run B, whatever ε each run asks for."""
    path = str(tmp_path / "ledger.json")
    inner = Canned(Payload({COEFFICIENTS: np.ones(20, np.float32)}, 9))
    lifetime = epsilon([Release("gaussian", 0.5)] * 2, 1e-5) * 1.001
    site = SitePrivacy(max_epsilon_lifetime=lifetime, max_delta=1e-5)
    config = {"dp-noise-multiplier": 1.0, "dp-epsilon": 100.0}
    _run(inner, config=config, site=site, ledger_path=path, run="run-a")
    payload = _run(inner, config=config, site=site, ledger_path=path, run="run-b")  # a new run: fresh client state
    assert "dp-epsilon-lifetime" not in payload.metrics  # what other runs spent stays at the site
    assert LedgerFile(path, lifetime, 1e-5).read().spent() == pytest.approx(lifetime / 1.001, rel=1e-6)
    with pytest.raises(PrivacyBudgetExceeded):
        _run(inner, config={**config, "server-round": 2}, site=site, ledger_path=path, run="run-b")
    assert [e["run"] for e in json.loads(pathlib.Path(path).read_text())["entries"]] == ["run-a", "run-b"]


def test_a_new_run_is_not_refused_for_what_an_earlier_run_spent() -> None:
    """Run A spends ε ≈ 4 in one release; run B asks for ε = 2 and has spent nothing: its first
    release is calibrated to its own budget, and only the lifetime check looks at run A's."""
    inner = Canned(Payload({COEFFICIENTS: np.ones(20, np.float32)}, 9))
    client_state: dict = {}
    _run(inner, config={"dp-epsilon": 4.0, "dp-releases": 1}, client_state=client_state, run="run-a")
    payload = _run(inner, config={"dp-epsilon": 2.0, "dp-releases": 1}, client_state=client_state, run="run-b")
    assert 0 < payload.metrics["dp-epsilon-spent"] <= 2.0
    with pytest.raises(PrivacyBudgetExceeded) as refused:  # run B's own budget is spent now
        _run(inner, config={"dp-epsilon": 2.0, "dp-releases": 1, "server-round": 2}, client_state=client_state,
             run="run-b")
    assert refused.value.scope == "run"
