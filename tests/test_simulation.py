"""Real Flower simulations (Ray) of the tiny task. Few and slow on purpose: ~20 s each."""

from __future__ import annotations

import math
import subprocess
import time

import pytest
from flwr.simulation import run_simulation

from fedclient.app import build_client_app
from fedclient.runconfig import resolve_run_config
from fedserver.app import build_server_app
from fedserver.store import RunStore

pytestmark = pytest.mark.simulation

BACKEND = {
    "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
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
    """Stop Ray processes this test started and left behind (none are expected)."""
    started = time.monotonic()
    yield
    age_limit = time.monotonic() - started + 1
    table = subprocess.run(["ps", "-eo", "pid=,etimes=,args="], capture_output=True, text=True).stdout
    for line in table.splitlines():
        pid, age, args = line.split(None, 2)
        if int(age) <= age_limit and any(t in args for t in ("ray::", "raylet", "gcs_server")):
            subprocess.run(["kill", "-9", pid], check=False)


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
