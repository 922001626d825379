"""The run store on a real SQLite file."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy
import torch

from fedserver.store import ClientRecord, RoundRecord, RunStore, StoreError


@pytest.fixture
def store(tmp_path):
    return RunStore(f"sqlite:///{tmp_path / 'runs.db'}")


def _record(rnd, clients=2):
    return RoundRecord(
        round=rnd,
        started_at=dt.datetime(2026, 1, 1),
        seconds=1.5,
        clients=[
            ClientRecord(node_id=2**63 + i, phase="train", status="ok", num_examples=10 + i,
                         bytes_down=1000, bytes_up=900 + i, metrics={"train-loss": 0.5})
            for i in range(clients)
        ],
        train_loss=0.5,
        central={"loss": 0.4, "accuracy": 0.9},
    )


def test_runs_rounds_and_clients_round_trip(store):
    run_id = store.create_run(task="tiny", strategy="fedavg", num_rounds=2, config={"lr": 0.1}, num_clients=2)
    store.record_round(run_id, _record(1))
    store.finish_run(run_id, "completed")
    run = store.get_run(run_id[:12])
    assert run.status == "completed" and run.config == {"lr": 0.1} and run.finished_at is not None
    (row,) = store.rounds(run_id)
    assert (row.bytes_down, row.bytes_up, row.num_accepted, row.central_accuracy) == (2000, 1801, 2, 0.9)
    clients = store.client_rounds(run_id, 1)
    assert [int(c.node_id) for c in clients] == [2**63, 2**63 + 1]  # uint64 node ids survive
    assert clients[1].num_examples == 11 and clients[1].metrics == {"train-loss": 0.5}


def test_a_round_is_written_atomically(store):
    run_id = store.create_run(task="tiny", strategy="fedavg", num_rounds=2, config={})
    store.record_round(run_id, _record(1))
    with pytest.raises(sqlalchemy.exc.IntegrityError):
        store.record_round(run_id, _record(1, clients=3))  # the same round again
    assert store.count_rows()["client_rounds"] == 2  # none of the 3 new client rows landed
    assert len(store.rounds(run_id)) == 1


def test_checkpoints_round_trip_and_detect_corruption(store):
    run_id = store.create_run(task="tiny", strategy="fedavg", num_rounds=2, config={})
    state = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}
    store.save_checkpoint(run_id, 1, state)
    store.save_checkpoint(run_id, 2, {k: v * 2 for k, v in state.items()})
    assert store.checkpoint_rounds(run_id) == [1, 2]
    rnd, loaded = store.load_checkpoint(run_id)
    assert rnd == 2 and torch.equal(loaded["w"], state["w"] * 2)
    _, first = store.load_checkpoint(run_id, 1)
    assert torch.equal(first["b"], state["b"])
    with store.engine.begin() as conn:  # flip a byte of the stored tensor data
        blob = conn.execute(sqlalchemy.text("SELECT data FROM checkpoints WHERE round=1")).scalar_one()
        conn.execute(sqlalchemy.text("UPDATE checkpoints SET data=:d WHERE round=1"),
                     {"d": blob[:-1] + bytes([blob[-1] ^ 1])})
    with pytest.raises(StoreError, match="corrupt"):
        store.load_checkpoint(run_id, 1)


def test_other_schema_versions_and_bad_urls_are_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    RunStore(url)
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("UPDATE meta SET value='999' WHERE key='schema_version'"))
    with pytest.raises(StoreError, match="schema version 999"):
        RunStore(url)
    with pytest.raises(StoreError, match="not a database URL"):
        RunStore("runs.db")


def test_unknown_and_ambiguous_run_references(store):
    store.create_run(task="tiny", strategy="fedavg", num_rounds=1, config={}, name="alpha")
    store.create_run(task="tiny", strategy="fedavg", num_rounds=1, config={}, name="beta")
    assert store.get_run("alpha").name == "alpha"
    with pytest.raises(StoreError, match="no run 'gamma'"):
        store.get_run("gamma")
    with pytest.raises(StoreError, match="matches 2 runs"):
        store.get_run("20")


def test_the_store_file_is_private_and_keeps_only_the_latest_checkpoints(tmp_path):
    store = RunStore(f"sqlite:///{tmp_path / 'private.db'}")
    run_id = store.create_run(task="tiny", strategy="fedavg", num_rounds=5, config={})
    assert (tmp_path / "private.db").stat().st_mode & 0o777 == 0o600
    state = {"w": torch.ones(3)}
    for rnd in range(1, 6):
        store.save_checkpoint(run_id, rnd, {"w": state["w"] * rnd}, keep=2)
    assert store.checkpoint_rounds(run_id) == [4, 5]  # keep-checkpoints = 2: older rounds deleted
    other = store.create_run(task="tiny", strategy="fedavg", num_rounds=2, config={})
    store.save_checkpoint(other, 1, state, keep=1)
    assert store.checkpoint_rounds(run_id) == [4, 5]  # per run
    store.save_checkpoint(run_id, 6, state, keep=0)
    assert store.checkpoint_rounds(run_id) == [4, 5, 6]  # 0 keeps every round's


def test_enrolled_names_come_from_the_store_registry(tmp_path):
    from fedserver.app import enrolled_names

    store = RunStore(f"sqlite:///{tmp_path / 'coord.db'}")
    assert enrolled_names(store) is None  # nobody enrolled: a simulation, sites name themselves
    store.enrol_site("site-a", 2**63 + 5, "SHA256:aaa", "ecdsa-sha2-nistp384 AAAA")
    store.enrol_site("site-b", 17, "SHA256:bbb", "ecdsa-sha2-nistp384 BBBB")
    assert enrolled_names(store) == {2**63 + 5: "site-a", 17: "site-b"}  # uint64 node ids survive
    with pytest.raises(StoreError, match="already enrolled"):
        store.enrol_site("site-a", 99, "SHA256:ccc", "ecdsa-sha2-nistp384 CCCC")
