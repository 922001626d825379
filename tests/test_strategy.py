"""The Flower adapters (wire format, AlgorithmStrategy) with real Flower messages, no Ray."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from aggregators import Instruction, Payload, PayloadError
from aggregators.fedavg import FedAvg, FedAvgConfig
from fedclient.wire import (
    PACKED_DATA,
    PACKED_INDEX,
    array_record,
    from_recorddict,
    message_wire_bytes,
    to_recorddict,
    unpack_array_record,
)
from fedserver.store import RunStore
from fedserver.strategy import AlgorithmStrategy, StrategySettings, stable_client_id
from tests.grids import IdentifyingGrid


def test_instruction_and_payload_survive_the_flower_records(flower_identity):
    instruction = Instruction({"w": np.ones((2, 3), np.float32)}, {"lr": 0.1, "layers": ["a", "b"]})
    back = Instruction.from_record(from_recorddict(to_recorddict(instruction.to_record())))
    np.testing.assert_array_equal(back.arrays["w"], instruction.arrays["w"])
    assert back.config == {"lr": 0.1, "layers": ["a", "b"]}
    payload = Payload({"w": np.zeros(4, np.float32)}, num_examples=12, metrics={"train-loss": 0.3})
    back = Payload.from_record(from_recorddict(to_recorddict(payload.to_record())))
    assert back.num_examples == 12 and back.metrics == {"train-loss": 0.3}


def test_malformed_records_are_payload_errors():
    with pytest.raises(PayloadError, match="unexpected record"):
        from_recorddict(RecordDict({"weights": ArrayRecord()}))
    with pytest.raises(PayloadError, match="num-examples"):
        Payload.from_record(from_recorddict(RecordDict({"metrics": MetricRecord({"loss": 1.0})})))
    with pytest.raises(PayloadError, match="expected an ArrayRecord"):
        from_recorddict(RecordDict({"arrays": ConfigRecord({"a": 1})}))


def test_arrays_travel_packed_in_two_flower_objects_and_come_back_exactly(flower_identity):
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    arrays = {f"layer.{i}.weight": np.arange(i * 7, dtype=np.float32).reshape(i, 7) / 3 for i in range(40)}
    arrays.update({"scalar": np.array(2.5, np.float64), "mask": np.array([True, False, True]),
                   "codes": np.array([-3, 7], np.int8), "empty": np.zeros((0, 4), np.float16)})
    record = array_record(arrays)
    assert sorted(record) == [PACKED_DATA, PACKED_INDEX]
    back = unpack_array_record(record)
    assert list(back) == list(arrays)  # order kept
    for key, value in arrays.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape
        np.testing.assert_array_equal(back[key], value)
    message = Message(to_recorddict(Payload(arrays, num_examples=3).to_record()), dst_node_id=1, message_type="train")
    assert len(get_all_nested_objects(message)) <= 8  # 44 tensors; one Flower object each before packing
    assert unpack_array_record(ArrayRecord({"w": torch.ones(2)}))["w"].tolist() == [1.0, 1.0]  # Flower's own layout


def _npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    """The .npy header a hostile sender writes (numpy's own format, any shape it likes)."""
    import io

    from numpy.lib import format as npy_format

    stream = io.BytesIO()
    npy_format.write_array_header_1_0(stream, {"descr": descr, "fortran_order": False, "shape": shape})
    return stream.getvalue()


def _raw_array(data: bytes, stype: str = "numpy.ndarray") -> Array:
    return Array(dtype="float32", shape=(1,), stype=stype, data=data)


def _packed(index, data: np.ndarray | None = None) -> ArrayRecord:
    text = index if isinstance(index, bytes) else json.dumps(index).encode()
    return ArrayRecord({PACKED_INDEX: Array(np.frombuffer(text, dtype=np.uint8)),
                        PACKED_DATA: Array(np.zeros(8, np.uint8) if data is None else data)})


@pytest.mark.parametrize(("record", "says"), [
    (lambda: _packed(b"{not json"), "not JSON"),
    (lambda: _packed({"w": 1}), "must list"),
    (lambda: _packed([["w", "|O", [1]]]), "bad packed index entry"),  # an object dtype would unpickle
    (lambda: _packed([["w", ">f4", [2]]]), "bad packed index entry"),
    (lambda: _packed([["w", "<f4", [-2]]]), "bad shape"),
    (lambda: _packed([["w", "<f4", [2.0]]]), "bad shape"),
    (lambda: _packed([["", "<f4", [2]]]), "bad packed index entry"),
    (lambda: _packed([["w", "<f4", [1]], ["w", "<f4", [1]]], np.zeros(12, np.uint8)), "names an array twice"),
    (lambda: _packed([["w", "<f4", [3]]]), "describes 12 bytes but 8 came"),
    (lambda: _packed([["w", "<f4", [1 << 39]]]), "describes"),  # a huge shape allocates nothing
    (lambda: _packed([["w", "<f4", [2]]], np.zeros(2, np.float32)), "two 1-D uint8"),
    (lambda: ArrayRecord({PACKED_DATA: array_record({"w": np.ones(2, np.float32)})[PACKED_DATA]}), "exactly"),
    (lambda: ArrayRecord({**array_record({"w": np.ones(2, np.float32)}), "x": Array(np.ones(1))}), "exactly"),
    (lambda: _packed([["w", "<f4", [1 << 32, 1 << 32]]], np.zeros(0, np.uint8)), "bad shape"),  # no int64 wrap to 0
    (lambda: _packed([["w", "<f4", [(1 << 40) - 1] * 2]]), "bad shape"),
    (lambda: _packed([["w", "<f4", [0, 10**30]]], np.zeros(0, np.uint8)), "bad shape"),  # empty, but numpy refuses it
    (lambda: _packed([["w", "<f4", [1 << 19, 1 << 19]]]), "describes"),  # 1 TiB claimed, 8 bytes came
    (lambda: _packed([["w", "<f4", [1] * 33]], np.zeros(4, np.uint8)), "bad shape"),  # more dims than numpy takes
    (lambda: _packed(b"[" * 200_000), "not JSON"),  # nested past the recursion limit
    (lambda: ArrayRecord({"w": _raw_array(b"PK\x03\x04" + b"\0" * 60)}), "not an .npy array"),  # np.load: a zip
    (lambda: ArrayRecord({"w": _raw_array(_npy_header("<f4", (1 << 50,)))}), "bad shape"),  # allocates nothing
    (lambda: ArrayRecord({"w": _raw_array(_npy_header("<f4", (1 << 30,)))}), "describes"),
    (lambda: ArrayRecord({"w": _raw_array(_npy_header("|O", (1,)) + b"x" * 8)}), "not an .npy array|dtype"),
    (lambda: ArrayRecord({"w": _raw_array(_npy_header("<f4", (2,)) + b"\0" * 8, stype="torch.Tensor")}), "not a numpy"),
])
def test_a_hostile_packed_record_is_refused_naming_the_fault(record, says):
    with pytest.raises(PayloadError, match=says):
        from_recorddict(RecordDict({"arrays": record()}))


def test_wire_bytes_are_measured_on_the_serialized_message(flower_identity):
    small = Message(to_recorddict(Instruction({"w": np.zeros(10, np.float32)}).to_record()), dst_node_id=1,
                    message_type="train")
    big = Message(to_recorddict(Instruction({"w": np.zeros(1_000_000, np.float32)}).to_record()), dst_node_id=1,
                  message_type="train")
    assert 40 < message_wire_bytes(small) < 2_000
    # 4 MB of float32 plus headers, the same whatever the values (no estimate from shapes involved)
    assert 4_000_000 < message_wire_bytes(big) < 4_010_000


def _replies_for(messages, contents):
    return [Message(content, reply_to=msg) for msg, content in zip(messages, contents, strict=True)]


def _content(arrays, n=10):
    return to_recorddict(Payload({k: np.asarray(v, np.float32) for k, v in arrays.items()}, n).to_record())


def test_bad_replies_are_rejected_naming_the_client_and_the_round_completes(tmp_path, flower_identity):
    store = RunStore(f"sqlite:///{tmp_path / 's.db'}")
    run_id = store.create_run(task="unit", strategy="fedavg", num_rounds=1, config={})
    strategy = AlgorithmStrategy(FedAvg(FedAvgConfig()), StrategySettings(), store=store, run_id=run_id)
    initial = ArrayRecord({"w": torch.zeros(3), "b": torch.zeros(1)})
    strategy.state = strategy.algorithm.init_state(initial.to_torch_state_dict())
    messages = list(strategy.configure_train(1, initial, ConfigRecord(),
                                             IdentifyingGrid([101, 102, 103, 104, 105, 106, 107, 108])))
    assert [m.metadata.dst_node_id for m in messages] == [101, 102, 103, 104, 105, 106, 107, 108]  # by site name
    replies = _replies_for(
        messages,
        [
            _content({"w": [1.0, 1.0, 1.0]}, n=10),  # good
            _content({"w": [1.0, 1.0]}),  # wrong shape
            _content({"w": [np.nan, 0.0, 0.0]}),  # NaN
            _content({"w": [0.0, 0.0, 0.0], "extra.weight": [1.0]}),  # unknown key
            _content({"w": [4.0, 4.0, 4.0]}, n=30),  # good
            RecordDict({"arrays": ArrayRecord({"w": _raw_array(_npy_header("<f4", (1 << 50,)))}),
                        "metrics": MetricRecord({"num-examples": 10})}),  # a header that would allocate 4 PiB
            RecordDict({"metrics": MetricRecord({"num-examples": 10, "train-loss": [1.0, 2.0]})}),  # a list metric
            RecordDict({"metrics": MetricRecord({"num-examples": 1.7e308})}),  # would overflow the weighted sums
        ],
    )
    arrays, _ = strategy.aggregate_train(1, iter(replies))
    np.testing.assert_allclose(arrays["w"].numpy(), [3.25, 3.25, 3.25])  # (10*1 + 30*4) / 40
    clients = {c.node_id: c for c in strategy._ledger.clients.values()}
    assert clients[101].status == clients[105].status == "ok"
    assert "site 'partition-1' (node 102)" in clients[102].error and "shape" in clients[102].error
    assert "site 'partition-2' (node 103)" in clients[103].error and "NaN" in clients[103].error
    assert "(node 104)" in clients[104].error and "unknown key 'extra.weight'" in clients[104].error
    assert clients[104].site == "partition-3"
    assert clients[106].status == "rejected" and "(node 106)" in clients[106].error
    assert clients[107].status == "rejected" and "metric 'train-loss' must be a number" in clients[107].error
    assert clients[108].status == "rejected" and "'num-examples' must be in" in clients[108].error
    assert all(c.bytes_down > 0 and c.bytes_up > 0 for c in clients.values())
    assert np.isfinite(strategy.state["w"].numpy()).all()


def test_error_replies_and_undecodable_replies_are_recorded(flower_identity):
    strategy = AlgorithmStrategy(FedAvg())
    initial = ArrayRecord({"w": torch.zeros(2)})
    strategy.state = strategy.algorithm.init_state(initial.to_torch_state_dict())
    messages = list(strategy.configure_train(1, initial, ConfigRecord(), IdentifyingGrid([1, 2, 3])))
    from flwr.app import Error

    replies = [
        Message(_content({"w": [2.0, 2.0]}), reply_to=messages[0]),
        Message(Error(code=0, reason="ClientAppException: out of memory"), reply_to=messages[1]),
        Message(RecordDict({"arrays": ArrayRecord({"w": torch.ones(2)})}), reply_to=messages[2]),  # no num-examples
    ]
    arrays, _ = strategy.aggregate_train(1, iter(replies))
    np.testing.assert_allclose(arrays["w"].numpy(), [2.0, 2.0])
    status = {c.node_id: (c.status, c.error) for c in strategy._ledger.clients.values()}
    assert status[1] == ("ok", None)
    assert status[2][0] == "failed" and "out of memory" in status[2][1]
    assert status[3][0] == "rejected" and "num-examples" in status[3][1]


def test_sampling_is_seeded_by_site_names_not_node_ids(flower_identity):
    def sampled(node_ids, rnd):
        strategy = AlgorithmStrategy(FedAvg(), StrategySettings(fraction_train=0.5, seed=4))
        return [site.name for site in strategy._sample(IdentifyingGrid(node_ids), rnd, 0.5, "train")]

    first = sampled(range(10), 1)
    assert len(first) == 5
    # Flower draws new random node ids every simulation: the same sites must be sampled
    assert sampled([7_000_000 + 13 * n for n in range(10)], 1) == first
    assert sampled(range(10), 2) != first


def test_sites_get_stable_client_ids_and_duplicates_are_told_apart(flower_identity):
    strategy = AlgorithmStrategy(FedAvg())
    strategy._identify(IdentifyingGrid({5: "hospital-a", 6: "hospital-a", 7: ""}), [5, 6, 7])
    assert strategy._sites[5].client_id == stable_client_id("hospital-a")
    assert strategy._sites[6].name == "hospital-a@node-6"
    assert strategy._sites[7].name == "node-7"  # a site that gives no name keeps its node id


def test_settings_refuse_impossible_fractions():
    with pytest.raises(ValueError, match="fraction-train must be between 0 and 1"):
        StrategySettings(fraction_train=1.5)
    with pytest.raises(ValueError, match="no client would train"):
        StrategySettings(fraction_train=0.0)


def test_a_stop_request_ends_waiting_for_clients_at_once(flower_identity):
    import threading
    import time

    from fedserver.strategy import RunStopped

    strategy = AlgorithmStrategy(FedAvg(), StrategySettings(min_available_nodes=5))
    threading.Timer(0.2, strategy.stop_event.set).start()
    started = time.monotonic()
    with pytest.raises(RunStopped):
        strategy._sample(IdentifyingGrid([1, 2]), 1, 1.0, "train")  # 2 of 5 nodes: would wait 120 s
    assert time.monotonic() - started < 5


class _OneNodeGoesOffline(IdentifyingGrid):
    """Node 2's train message is answered by the SuperLink itself, as Flower 1.39 does once the
    node misses its heartbeats (src_node_id is the SuperLink's, not the site's)."""

    def push_messages(self, messages):
        messages = list(messages)
        if messages[0].metadata.message_type == "query.identify":
            return super().push_messages(messages)
        from flwr.server.superlink.linkstate.utils import (
            create_message_error_unavailable_res_message,
        )

        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = f"m{message.metadata.dst_node_id}"
            if message.metadata.dst_node_id == 2:
                reply = create_message_error_unavailable_res_message(message.metadata, "node_unavail")
            else:
                reply = Message(_content({"w": [2.0, 2.0]}), reply_to=message)
            self._replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids


def test_a_reply_written_by_the_superlink_for_an_offline_node_is_charged_to_that_site(flower_identity):
    strategy = AlgorithmStrategy(FedAvg())
    initial = ArrayRecord({"w": torch.zeros(2)})
    strategy.state = strategy.algorithm.init_state(initial.to_torch_state_dict())
    grid = _OneNodeGoesOffline([1, 2, 3])
    messages = list(strategy.configure_train(1, initial, ConfigRecord(), grid))
    arrays, _ = strategy.aggregate_train(1, strategy.exchange(grid, messages, "train", 1))
    np.testing.assert_allclose(arrays["w"].numpy(), [2.0, 2.0])
    status = {c.node_id: (c.status, c.error) for c in strategy._ledger.clients.values()}
    assert status[1][0] == status[3][0] == "ok"
    assert status[2][0] == "failed" and "(node 2)" in status[2][1]
    assert strategy._recipients == {}  # nothing left behind


def test_a_stop_requested_through_the_store_ends_waiting_within_a_second(tmp_path, flower_identity):
    import threading
    import time

    from fedserver.strategy import RunStopped

    store = RunStore(f"sqlite:///{tmp_path / 's.db'}")
    run_id = store.create_run(task="unit", strategy="fedavg", num_rounds=3, config={})
    strategy = AlgorithmStrategy(FedAvg(), StrategySettings(min_available_nodes=5), store=store, run_id=run_id)
    threading.Timer(0.3, store.request_stop, args=(run_id, "operator ana")).start()
    started = time.monotonic()
    with pytest.raises(RunStopped, match="stopped by operator ana"):
        strategy._sample(IdentifyingGrid([1, 2]), 1, 1.0, "train")  # 2 of 5 nodes: would wait 120 s
    assert time.monotonic() - started < 3
    store.finish_run(run_id, "stopped", "test")
    with pytest.raises(Exception, match="not running"):
        store.request_stop(run_id)


def test_the_servers_wait_for_a_replys_parts_is_short_and_ends_with_the_exchange():
    """Flower's grid waits 1 s, 2 s, ... for a reply part the SuperLink lacks, for up to 2 h, inside
    one blocking call; the ServerApp's waits 20-250 ms and never past the exchange's deadline."""
    import time

    from flwr.superlink.grid import http_grid
    from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, ObjectUnavailableError

    from fedserver.grid_waits import replies_due_by, shorten_reply_pull_backoff

    original = http_grid.pull_objects  # an in-process ServerApp of an earlier test may have wrapped it already
    flower = getattr(original, "flower_pull_objects", original)
    asked: list[float] = []

    def withheld(_object_id: str) -> bytes:  # a site that pushed a reply's head and withholds its arrays
        asked.append(time.monotonic())
        raise ObjectUnavailableError(_object_id)

    try:
        shorten_reply_pull_backoff(3600.0)
        shorten_reply_pull_backoff(3600.0)  # idempotent: wraps Flower's function once
        assert http_grid.pull_objects.flower_pull_objects is flower
        started = time.monotonic()
        with replies_due_by(started + 0.6), pytest.raises(ObjectPullError):
            http_grid.pull_objects(["ab" * 32], pull_object_fn=withheld)
        assert 0.5 < time.monotonic() - started < 1.5 and len(asked) >= 3  # Flower: 1 call, then 1 s asleep
    finally:
        http_grid.pull_objects = original
