"""Real Flower simulations (Ray) of the tiny task. Few and slow on purpose: ~20 s each."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
from flwr.simulation import run_simulation

from fedclient.app import build_client_app
from fedclient.runconfig import resolve_run_config
from fedserver.app import build_server_app
from fedserver.store import RunStore

pytestmark = pytest.mark.simulation

BACKEND = {  # one actor (a process importing torch and transformers: ~10 s of CPU) serves all virtual sites
    "client_resources": {"num_cpus": 2, "num_gpus": 0.0},
    "init_args": {"num_cpus": 2, "include_dashboard": False, "log_to_driver": False},
}


def _simulate(tmp_path, client_app_factory, rounds=2, clients=3, **overrides):
    config = resolve_run_config(
        {},
        {"task": "tiny", "num-server-rounds": rounds, "fraction-evaluate": 1.0, "local-steps": 2,
         "store": f"sqlite:///{tmp_path / 'store.db'}", **overrides},
    )
    created = {}
    server = build_server_app(config, num_clients=clients, on_run_created=lambda rid: created.setdefault("id", rid))
    run_simulation(server_app=server, client_app=client_app_factory(config), num_supernodes=clients,
                   backend_config=BACKEND)
    return RunStore(config["store"]), created["id"]


@pytest.fixture(autouse=True)
def no_stray_ray_processes():
    """Stop Ray actors this test started and left behind (none are expected): descendants of this
    process only, so a Ray run elsewhere on the machine (a benchmark) is never touched. The session's
    shared cluster itself (raylet, gcs_server, idle workers; see conftest.py) is left running."""
    import os

    yield
    table = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    children: dict[int, list[tuple[int, str]]] = {}
    for line in table.splitlines():
        pid, ppid, args = line.split(None, 2)
        children.setdefault(int(ppid), []).append((int(pid), args))
    pending, ours = [os.getpid()], []
    while pending:
        for pid, args in children.get(pending.pop(), []):
            pending.append(pid)
            ours.append((pid, args))
    for pid, args in ours:
        if "ray::ClientAppActor" in args:  # a leftover actor (the cluster's own agents stay)
            subprocess.run(["kill", "-9", str(pid)], check=False)


def test_tiny_simulation_records_every_client_every_round(tmp_path):
    store, run_id = _simulate(tmp_path, build_client_app)
    run = store.get_run(run_id)
    assert run.status == "completed"
    rounds = store.rounds(run_id)
    assert [r.round for r in rounds] == [1, 2]
    for r in rounds:
        assert r.num_sampled == r.num_accepted == 3
        assert r.bytes_down > 0 and r.bytes_up > 0 and r.central_accuracy is not None
        train = [c for c in store.client_rounds(run_id, r.round) if c.phase == "train"]
        evaluate = [c for c in store.client_rounds(run_id, r.round) if c.phase == "evaluate"]
        assert len(train) == len(evaluate) == 3
        assert sorted(c.site for c in train) == ["partition-0", "partition-1", "partition-2"]
        for c in train:
            assert c.status == "ok" and c.num_examples > 0
            # down: the 1.8 M trained parameters as fp32; up: the same keys back
            assert 7_000_000 < c.bytes_down < 7_300_000 and 7_000_000 < c.bytes_up < 7_300_000
            assert math.isfinite(c.metrics["train-loss"]) and "partition-id" in c.metrics
        for c in evaluate:
            assert c.status == "ok" and 0.0 <= c.metrics["accuracy"] <= 1.0 and c.bytes_up < 2_000
    assert run.initial_metrics["accuracy"] is not None
    assert rounds[-1].central_accuracy > run.initial_metrics["accuracy"]  # 2 rounds of training help
    assert store.checkpoint_rounds(run_id) == [1, 2]
    _, state = store.load_checkpoint(run_id)
    assert state and all(v.isfinite().all() for v in state.values())


def test_corrupt_replies_are_rejected_and_the_run_goes_on(tmp_path):
    from tests.apps import corrupting_client_app

    store, run_id = _simulate(tmp_path, corrupting_client_app)
    assert store.get_run(run_id).status == "completed"
    rounds = {r.round: r for r in store.rounds(run_id)}
    assert (rounds[1].num_accepted, rounds[1].num_rejected) == (2, 1)
    assert (rounds[2].num_accepted, rounds[2].num_rejected) == (1, 2)
    rejected = [c for c in store.client_rounds(run_id) if c.status == "rejected"]
    errors = sorted(c.error for c in rejected)
    assert len(errors) == 3
    assert all(f"site '{c.site}' (node {c.node_id})" in c.error for c in rejected)
    assert sorted(c.site for c in rejected) == ["partition-0", "partition-1", "partition-2"]
    assert any("shape" in e for e in errors) and any("NaN" in e for e in errors)
    assert any("unknown key 'classifier.extra.weight'" in e for e in errors)
    _, state = store.load_checkpoint(run_id)
    assert all(v.isfinite().all() for v in state.values())
    assert all(r.central_loss is not None and math.isfinite(r.central_loss) for r in rounds.values())


def test_selective_layer_with_different_budgets(tmp_path):
    store, run_id = _simulate(tmp_path, build_client_app, strategy="selective-layer", **{"layer-budget": "uniform:0:1"})
    assert store.get_run(run_id).status == "completed"
    rows = store.client_rounds(run_id)
    budgets = {c.site: int(c.metrics["layer-budget"]) for c in rows if c.phase == "probe"}
    assert sorted(set(budgets.values())) == [0, 1]  # the sites really differ
    trained = [c for c in rows if c.phase == "train"]
    assert len(trained) == 6 and all(c.status == "ok" for c in trained)
    for c in trained:
        chosen = [layer for layer in c.details["layers"] if layer != "head"]
        assert len(chosen) <= budgets[c.site]
        if not chosen:  # head only: 5 classes x 384 + 5 floats, not the 1.8 M-parameter layer
            assert c.bytes_up < 20_000
        else:
            assert c.bytes_up > 7_000_000
    for r in store.rounds(run_id):
        assert "selection-objective" in r.metrics and r.central_accuracy is not None


@pytest.mark.parametrize(
    "strategy, max_up",
    [("ferret", 64_000), ("fedkseed", 4_000), ("fedkseed-pro", 4_000), ("one-byte", 4_000)],
)
def test_shared_randomness_methods_run_on_flower_and_keep_clients_in_sync(tmp_path, strategy, max_up):
    """2 of 3 clients per round for 3 rounds, so some client skips a round and catches up from the
    ledger; every instruction carries the weights hash, so any divergence would fail the run."""
    store, run_id = _simulate(tmp_path, build_client_app, rounds=3, strategy=strategy, **{
        "fraction-train": 0.67, "fraction-evaluate": 0.0, "zo-steps": 4, "seed-pool": 256, "zo-lr": 1e-3,
    })
    run = store.get_run(run_id)
    assert run.status == "completed", run.error
    trained = [c for c in store.client_rounds(run_id) if c.phase == "train"]
    assert len(trained) == 6 and all(c.status == "ok" for c in trained)
    by_round: dict[int, set[str]] = {}
    for c in store.client_rounds(run_id):
        by_round.setdefault(c.round, set()).add(c.site)
    skipped_and_returned = {
        site for site in by_round[3] if site not in by_round[2] and site in by_round[1]
    } | {site for site in by_round[3] if site not in by_round[1] or site not in by_round[2]}
    assert skipped_and_returned, "the sampling never made a client skip a round"
    for c in trained:
        assert c.bytes_up < max_up, (c.site, c.bytes_up)
        assert c.bytes_down < 200_000  # never the 7 MB of weights
    rounds = store.rounds(run_id)
    assert all(r.central_accuracy is not None for r in rounds)
    assert store.load_checkpoint(run_id)[1]  # the server's replayed weights are checkpointed


def test_a_client_whose_weights_diverge_stops_the_run_with_a_clear_error(tmp_path):
    from fedserver.strategy import RunAborted
    from tests.apps import diverging_client_app

    with pytest.raises(RunAborted, match="WeightsMismatchError"):
        _simulate(tmp_path, diverging_client_app, rounds=3, strategy="ferret", **{"fraction-evaluate": 0.0})
    store = RunStore(f"sqlite:///{tmp_path / 'store.db'}")
    (run,) = store.list_runs()
    run_id = run.id
    assert run.status == "failed"
    assert "site 'partition-1'" in run.error and "WeightsMismatchError" in run.error
    assert [r.round for r in store.rounds(run_id)] == [1, 2]  # completed rounds are kept


def test_frl_runs_on_flower_with_bit_packed_rankings(tmp_path):
    store, run_id = _simulate(tmp_path, build_client_app, strategy="frl", **{
        "fraction-evaluate": 0.0, "train-layers": "encoder.layer.0,head", "frl-mode": "finetune",
    })
    assert store.get_run(run_id).status == "completed"
    trained = [c for c in store.client_rounds(run_id) if c.phase == "train"]
    assert len(trained) == 6 and all(c.status == "ok" for c in trained)
    # tiny: 4 attention matrices of 147 456 edges (18 bits each) + 2 FFN matrices of 589 824 (20 bits)
    # + the 1 920-edge head (11 bits) = 4.28 MB of rankings, vs 7.1 MB of fp32 weights for FedAvg
    rankings = 4 * 147_456 * 18 // 8 + 2 * 589_824 * 20 // 8 + 1_920 * 11 // 8
    for c in trained:
        assert rankings < c.bytes_up < rankings * 1.01
        assert c.bytes_down < 5_000 if c.round == 1 else rankings < c.bytes_down < rankings * 1.01
    assert all(r.central_accuracy is not None for r in store.rounds(run_id))
    for r in store.rounds(run_id):  # the clipped vote (default) reports how far it scaled votes down
        assert 0 <= r.metrics["votes-scaled-down"] <= 1 and 0 < r.metrics["smallest-vote-scale"] <= 1


@pytest.mark.parametrize(
    "strategy, codec, min_ratio",
    [("fedavg", "topk:0.01+q8", 50), ("scafcom", "topk:0.01+q8", 50)],  # scallion: unit tests
)
def test_compressed_updates_run_on_flower(tmp_path, strategy, codec, min_ratio):
    """2 of 3 clients per round for 3 rounds (so residuals and control variates wait out skipped
    rounds); every reply decodes, and the measured uplink is the codec's, not fp32's."""
    store, run_id = _simulate(tmp_path, build_client_app, rounds=3, strategy=strategy, codec=codec, **{
        "fraction-train": 0.67, "fraction-evaluate": 0.0, "sgd-lr": 0.05,
    })
    run = store.get_run(run_id)
    assert run.status == "completed", run.error
    trained = [c for c in store.client_rounds(run_id) if c.phase == "train"]
    assert len(trained) == 6 and all(c.status == "ok" for c in trained), [(c.site, c.error) for c in trained]
    fp32_bytes = 7_100_000  # tiny's trained tensors (encoder.layer.0 + head) in fp32
    for c in trained:
        assert c.bytes_up < fp32_bytes / min_ratio, (c.site, c.bytes_up)
        assert "codec-relative-error" in c.metrics
    assert all(r.central_accuracy is not None for r in store.rounds(run_id))


@pytest.mark.parametrize("strategy, extra", [
    ("fedavg", {}), ("ferret", {}), ("frl", {"train-layers": "head"}),
])
def test_local_dp_runs_on_flower_and_each_site_accounts_its_budget(tmp_path, strategy, extra):
    """Sites calibrate their noise to spend ε = 4 over the run's 2 releases; every reply carries
    the ledger's figures and nothing data-dependent."""
    from fedserver.report import run_summary

    store, run_id = _simulate(tmp_path, build_client_app, strategy=strategy, dp="gaussian", **{
        "fraction-evaluate": 0.0, "dp-epsilon": 4.0, **extra,
    })
    assert store.get_run(run_id).status == "completed", store.get_run(run_id).error
    trained = [c for c in store.client_rounds(run_id) if c.phase == "train"]
    assert len(trained) == 6 and all(c.status == "ok" for c in trained), [(c.site, c.error) for c in trained]
    for c in trained:
        assert "train-loss" not in c.metrics and "train-seconds" not in c.metrics and c.num_examples == 1
        assert 0 < c.metrics["dp-epsilon-spent"] <= 4.0
    privacy = run_summary(store, run_id)["privacy"]
    assert len(privacy) == 3
    for site in privacy:
        assert site["releases"] == 2 and 0.97 * 4.0 <= site["epsilon_spent"] <= 4.0  # the budget, spent
    assert all(r.central_accuracy is not None for r in store.rounds(run_id))


def test_sites_decline_when_their_budget_is_spent_and_the_run_ends(tmp_path):
    """Fixed noise σ = 2 (Gaussian z = 1 on the 2C-sensitive update) and a budget that fits two
    releases but not three: rounds 1–2 train, every site declines in round 3, the run stops."""
    from fedserver.report import run_summary
    from privacy.accounting import Release, epsilon

    release = Release("gaussian", 1.0)
    budget = (epsilon([release] * 2, 1e-5) + epsilon([release] * 3, 1e-5)) / 2
    store, run_id = _simulate(tmp_path, build_client_app, rounds=5, dp="gaussian", **{
        "fraction-evaluate": 0.0, "dp-epsilon": budget, "dp-noise-multiplier": 2.0,
    })
    run = store.get_run(run_id)
    assert run.status == "stopped" and "declined" in run.error and "privacy budget" in run.error
    assert [r.round for r in store.rounds(run_id)] == [1, 2, 3]
    by_round = {r: [c for c in store.client_rounds(run_id, r) if c.phase == "train"] for r in (1, 2, 3)}
    assert all(c.status == "ok" for r in (1, 2) for c in by_round[r])
    assert len(by_round[3]) == 3 and all(c.status == "refused" and "privacy budget" in c.error for c in by_round[3])
    privacy = run_summary(store, run_id)["privacy"]
    assert [s["declined_round"] for s in privacy] == [3, 3, 3]
    assert all(s["epsilon_spent"] == pytest.approx(epsilon([release] * 2, 1e-5)) for s in privacy)
    shown = subprocess.run([sys.executable, "-m", "simulations.cli", "show", run_id, "--store", store.url,
                            "--runs-dir", str(tmp_path / "none")], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "local differential privacy" in shown.stdout and f"{epsilon([release] * 2, 1e-5):.3f}" in shown.stdout


@pytest.mark.parametrize("strategy", ["fedavg", "ferret"])
def test_secure_aggregation_gives_the_plain_mean(tmp_path, strategy):
    """The same seeded round with and without secure aggregation: the coordinator, seeing only the
    masked sum, reaches the same global weights up to the fixed point's rounding."""
    uncapped = {"fraction-evaluate": 0.0, "max-site-weight": 1.0, "strategy": strategy}  # the cap needs each update
    plain_store, plain_run = _simulate(tmp_path / "plain", build_client_app, rounds=1, **uncapped)
    secure_store, secure_run = _simulate(tmp_path / "secure", build_client_app, rounds=1, secagg=True, **uncapped)
    assert secure_store.get_run(secure_run).status == "completed", secure_store.get_run(secure_run).error
    trained = [c for c in secure_store.client_rounds(secure_run) if c.phase == "train"]
    assert len(trained) == 3 and all(c.status == "ok" and c.details["secagg-survivors"] == 3 for c in trained)
    plain_up = sum(c.bytes_up for c in plain_store.client_rounds(plain_run) if c.phase == "train")
    assert sum(c.bytes_up for c in trained) < 1.05 * plain_up + 3 * 12_000  # uint32 residues, as large as float32,
    # and five small exchanges per site
    _, plain = plain_store.load_checkpoint(plain_run, 1)
    _, secure = secure_store.load_checkpoint(secure_run, 1)
    assert max(float((plain[k] - secure[k]).abs().max()) for k in plain) < 2e-5


def test_ferret_with_distributed_dp_runs_on_flower_and_each_site_charges_its_ledger(tmp_path):
    from fedserver.report import run_summary

    store, run_id = _simulate(tmp_path, build_client_app, strategy="ferret", dp="distributed", clients=4, **{
        "fraction-evaluate": 0.0, "dp-epsilon": 4.0})
    assert store.get_run(run_id).status == "completed", store.get_run(run_id).error
    trained = [c for c in store.client_rounds(run_id) if c.phase == "train"]
    assert len(trained) == 8 and all(c.status == "ok" and c.details["secagg-survivors"] == 4 for c in trained)
    for c in trained:  # the site's own accounting only: no loss, no timing
        assert set(c.metrics) == {"dp-epsilon-spent", "dp-epsilon-budget", "dp-delta", "dp-clip",
                                  "dp-noise-multiplier", "dp-threshold"}
        assert c.metrics["dp-threshold"] == 3  # a majority of 4
    privacy = run_summary(store, run_id)["privacy"]
    assert len(privacy) == 4 and all(0.97 * 4.0 <= site["epsilon_spent"] <= 4.0 for site in privacy)
