"""FedAvg's math and validation, called directly (no Flower)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aggregators import make_algorithm
from aggregators.base import Payload, Reply
from aggregators.fedavg import FedAvg, FedAvgConfig


def _state():
    return {
        "a": torch.tensor([1.0, 2.0, 3.0]),
        "b": torch.tensor([[10.0, 20.0], [30.0, 40.0]]),
        "c": torch.tensor([-5.0]),
    }


def _reply(client, n, **arrays):
    return Reply(client, Payload({k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}, n))


def test_partial_keys_give_per_key_weighted_means_and_untouched_keys_stay():
    state = _state()
    replies = [
        _reply(1, 10, a=[2.0, 4.0, 6.0], b=[[0.0, 0.0], [0.0, 0.0]]),  # sends a and b
        _reply(2, 30, a=[6.0, 8.0, 10.0]),  # sends only a
    ]
    result = FedAvg().aggregate(1, state, iter(replies))
    # a: (10*[2,4,6] + 30*[6,8,10]) / 40
    torch.testing.assert_close(result.state["a"], torch.tensor([5.0, 7.0, 9.0]))
    # b: only client 1 sent it, so its value wins whatever its weight
    torch.testing.assert_close(result.state["b"], torch.zeros(2, 2))
    # c: nobody sent it
    torch.testing.assert_close(result.state["c"], torch.tensor([-5.0]))
    assert result.accepted == [1, 2] and result.rejected == {}
    assert all(v.dtype == torch.float32 for v in result.state.values())


@pytest.mark.parametrize(
    "bad, reason",
    [
        (_reply(7, 5, a=[1.0, 2.0]), "shape"),
        (_reply(7, 5, a=[np.nan, 0.0, 0.0]), "NaN"),
        (_reply(7, 5, a=[np.inf, 0.0, 0.0]), "NaN or infinite"),
        (_reply(7, 5, a=[0.0, 0.0, 0.0], zzz=[1.0]), "unknown key 'zzz'"),
        (_reply(7, 0, a=[0.0, 0.0, 0.0]), "num-examples"),
        (Reply(7, Payload({"a": np.array([1, 2, 3], dtype=np.int64)}, 5)), "dtype"),
        (Reply(7, Payload({}, 5)), "no arrays"),
    ],
)
def test_a_bad_reply_is_rejected_naming_the_client_and_the_others_still_count(bad, reason):
    state = _state()
    good = _reply(3, 10, a=[3.0, 3.0, 3.0])
    result = FedAvg().aggregate(1, state, iter([bad, good]))
    assert list(result.rejected) == [7]
    assert "client 7" in result.rejected[7] and reason in result.rejected[7]
    assert result.accepted == [3]
    # the rejected reply left no trace: a is exactly the good client's value
    torch.testing.assert_close(result.state["a"], torch.tensor([3.0, 3.0, 3.0]))
    torch.testing.assert_close(result.state["b"], state["b"])


def test_a_reply_is_rejected_whole_even_if_some_keys_are_fine():
    state = _state()
    half_bad = _reply(9, 10, b=[[1.0, 1.0], [1.0, 1.0]], a=[1.0])  # b fine, a wrong shape
    result = FedAvg().aggregate(1, state, iter([half_bad]))
    assert 9 in result.rejected
    torch.testing.assert_close(result.state["b"], state["b"])  # b not folded either


def test_no_usable_reply_leaves_the_state_unchanged():
    state = _state()
    result = FedAvg().aggregate(1, state, iter([_reply(1, 3, a=[np.nan] * 3)]))
    assert result.accepted == []
    for key in state:
        torch.testing.assert_close(result.state[key], state[key])


def test_aggregate_streams_replies_one_at_a_time():
    """aggregate pulls replies lazily from an iterator and never asks for one it has not folded."""
    state = _state()
    pulled = []

    def replies():
        for i in range(5):
            pulled.append(i)
            yield _reply(i, 1, a=[float(i)] * 3)

    result = FedAvg().aggregate(1, state, replies())
    assert pulled == [0, 1, 2, 3, 4]
    torch.testing.assert_close(result.state["a"], torch.full((3,), 2.0))


def test_plan_sends_the_global_state_with_distinct_reproducible_seeds():
    state = _state()
    algorithm = FedAvg(FedAvgConfig(lr=0.01, local_steps=2, batch_size=4, seed=3))
    plan = algorithm.plan(2, [11, 12], state)
    assert set(plan) == {11, 12}
    assert set(plan[11].arrays) == set(state)
    assert plan[11].config["lr"] == 0.01 and plan[11].config["local-steps"] == 2
    assert plan[11].config["seed"] != plan[12].config["seed"]
    assert algorithm.plan(2, [11], state)[11].config["seed"] == plan[11].config["seed"]
    assert algorithm.plan(3, [11], state)[11].config["seed"] != plan[11].config["seed"]


def test_make_algorithm_reads_kebab_case_run_config_and_rejects_bad_values():
    algorithm = make_algorithm("fedavg", {"lr": 0.1, "local-steps": 7, "task": "ignored"})
    assert algorithm.config.lr == 0.1 and algorithm.config.local_steps == 7
    with pytest.raises(ValueError, match="unknown strategy 'nope'"):
        make_algorithm("nope")
    with pytest.raises(ValueError, match="lr must be positive"):
        make_algorithm("fedavg", {"lr": -1.0})


def test_local_trains_exactly_the_instructed_keys(tiny_task, fresh_tiny_model):
    model = fresh_tiny_model
    keys = tiny_task.trainable_keys(model, ["head"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    algorithm = FedAvg(FedAvgConfig(lr=1e-2, local_steps=2, batch_size=8))
    state = algorithm.init_state({k: before[k] for k in keys})
    instruction = algorithm.plan(1, [0], state)[0]
    data = tiny_task.load_data().train
    payload = algorithm.local(model, data, instruction, {})
    assert set(payload.arrays) == set(keys)
    assert payload.num_examples == data.num_examples
    assert np.isfinite(payload.metrics["train-loss"])
    after = model.state_dict()
    for name, value in after.items():
        if name in keys:
            assert not torch.equal(value, before[name]), name
            np.testing.assert_array_equal(payload.arrays[name], value.numpy())
        else:
            assert torch.equal(value, before[name]), f"{name} changed but was not instructed"


def test_fedavg_of_one_client_is_that_clients_model(tiny_task, fresh_tiny_model):
    model = fresh_tiny_model
    keys = tiny_task.trainable_keys(model, ["head"])
    algorithm = FedAvg(FedAvgConfig(lr=1e-2, local_steps=1, batch_size=8))
    state = algorithm.init_state({k: v for k, v in model.state_dict().items() if k in keys})
    payload = algorithm.local(model, tiny_task.load_data().train, algorithm.plan(1, [0], state)[0], {})
    result = algorithm.aggregate(1, state, iter([Reply(0, payload)]))
    for key in keys:
        np.testing.assert_array_equal(result.state[key].numpy(), payload.arrays[key])


def test_local_is_reproducible_for_the_same_instruction(tiny_task, tiny_model):
    import copy

    algorithm = FedAvg(FedAvgConfig(lr=1e-3, local_steps=2, batch_size=8))
    keys = tiny_task.trainable_keys(tiny_model)
    state = algorithm.init_state({k: v for k, v in tiny_model.state_dict().items() if k in keys})
    instruction = algorithm.plan(1, [5], state)[5]
    data = tiny_task.load_data().train
    first = algorithm.local(copy.deepcopy(tiny_model), data, instruction, {})
    second = algorithm.local(copy.deepcopy(tiny_model), data, instruction, {})
    for key in keys:
        np.testing.assert_array_equal(first.arrays[key], second.arrays[key])
    other = algorithm.local(copy.deepcopy(tiny_model), data, algorithm.plan(2, [5], state)[5], {})
    assert any(not np.array_equal(first.arrays[k], other.arrays[k]) for k in keys)


def test_one_site_claiming_a_billion_examples_gets_at_most_its_share() -> None:
    """``num-examples`` is self-reported: with ``max-site-weight`` 0.5 a liar claiming 10^9 examples
    moves the mean exactly as far as a site with half the total weight, no further; exact against a
    direct computation with the capped weights, for the streaming mean and the default run config."""
    from aggregators.streaming import share_cap
    from fedclient.runconfig import DEFAULT_RUN_CONFIG

    state = {"w": torch.zeros(4)}
    values = {1: np.full(4, 1.0, np.float32), 2: np.full(4, 3.0, np.float32), 3: np.full(4, 1000.0, np.float32)}
    counts = {1: 100, 2: 300, 3: 10**9}
    replies = [Reply(c, Payload({"w": v}, counts[c])) for c, v in values.items()]
    assert DEFAULT_RUN_CONFIG["max-site-weight"] == 0.5
    capped = make_algorithm("fedavg", DEFAULT_RUN_CONFIG).aggregate(1, state, iter(replies)).state["w"]
    threshold = share_cap(list(counts.values()), 0.5)
    weights = {c: min(n, threshold) for c, n in counts.items()}
    expected = sum(weights[c] * values[c] for c in values) / sum(weights.values())
    assert weights[3] / sum(weights.values()) == pytest.approx(0.5)
    assert torch.allclose(capped, torch.from_numpy(expected).float())
    uncapped = FedAvg().aggregate(1, state, iter(replies)).state["w"]  # the paper's weighting: the liar wins
    assert float(uncapped[0]) > 999 and float(capped[0]) == pytest.approx((100 + 900 + 400 * 1000) / 800)
