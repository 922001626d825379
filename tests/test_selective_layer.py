"""Selective-layer fine-tuning, both halves, called directly on a small layered model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aggregators import make_algorithm
from aggregators.base import Payload, Reply
from aggregators.selective_layer import SCORES_KEY, SITE_BUDGET, SelectiveLayer, SelectiveLayerConfig, SyncError, layer_scores
from fedclient.budget import draw_budget
from tests.toy import ToyData

N_LAYERS = 4


class Stack(torch.nn.Module):
    """x -> 4 tanh(Linear) blocks -> head; layers 'block.0'..'block.3' and 'head'."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.block = torch.nn.ModuleList(torch.nn.Linear(6, 6) for _ in range(N_LAYERS))
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):
        for layer in self.block:
            x = torch.tanh(layer(x))
        return self.head(x)

    def layer_prefixes(self):
        return {**{f"block.{i}": f"block.{i}." for i in range(N_LAYERS)}, "head": "head."}


class Data(ToyData):
    """6 random features, random labels (ToyData's batching)."""

    def __init__(self, n=40, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 6, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)


def _setup(**config):
    model = Stack()
    algorithm = SelectiveLayer(SelectiveLayerConfig(batch_size=8, local_steps=2, lr=1e-2, **config))
    layers = {name: [k for k in model.state_dict() if k.startswith(prefix)] for name, prefix in model.layer_prefixes().items()}
    state = algorithm.init_state(model.state_dict(), layers)
    return model, algorithm, state


def _client_round(algorithm, state, clients, budgets, rnd=1, caches=None):
    """Run the probe and plan halves for ``clients``; return instructions and client caches."""
    caches = caches if caches is not None else {c: {SITE_BUDGET: b} for c, b in zip(clients, budgets, strict=True)}
    probes = {}
    for client, instruction in algorithm.probe(rnd, clients, state).items():
        payload = algorithm.local_probe(Stack(), Data(seed=client), instruction, caches[client])
        algorithm.check_probe(client, payload)
        probes[client] = payload
    return algorithm.plan(rnd, clients, state, probes), caches


def test_scores_sum_per_batch_squared_gradient_norms_not_the_cumulative_variant():
    model, data = Stack(), Data()
    layers = {f"block.{i}": [f"block.{i}.weight", f"block.{i}.bias"] for i in range(N_LAYERS)}
    scores = layer_scores(model, data, layers, batches=3, batch_size=8, seed=5)
    expected = np.zeros(N_LAYERS)
    stream = data.batches(8, 5)
    for _ in range(3):
        model.zero_grad()
        inputs, labels = next(stream)
        torch.nn.functional.cross_entropy(model(**inputs), labels).backward()
        for i in range(N_LAYERS):
            expected[i] += sum(float(p.grad.pow(2).sum()) for p in model.block[i].parameters())
    np.testing.assert_allclose(scores, expected, rtol=1e-5)


@pytest.mark.parametrize("selection", ["regulated", "client-top", "top", "bottom", "random", "full"])
def test_every_selection_respects_budgets_and_always_trains_the_head(selection):
    _, algorithm, state = _setup(selection=selection)
    instructions, _ = _client_round(algorithm, state, [1, 2, 3], [1, 2, 3])
    for client, budget in zip([1, 2, 3], [1, 2, 3], strict=True):
        layers = instructions[client].config["train-layers"]
        assert layers[-1] == "head"
        chosen = [name for name in layers if name != "head"]
        if selection == "regulated":  # the consistency penalty may leave budget unused
            assert len(chosen) <= budget
        else:
            assert len(chosen) == (N_LAYERS if selection == "full" else budget)
        if selection == "top":
            assert chosen == [f"block.{i}" for i in range(N_LAYERS - budget, N_LAYERS)]
        if selection == "bottom":
            assert chosen == [f"block.{i}" for i in range(budget)]


def test_local_trains_only_the_assigned_layers_and_sends_their_deltas():
    _, algorithm, state = _setup(selection="bottom")
    instructions, caches = _client_round(algorithm, state, [7], [1])
    model = Stack()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    payload = algorithm.local(model, Data(seed=7), instructions[7], caches[7])
    assert set(payload.arrays) == {"block.0.weight", "block.0.bias", "head.weight", "head.bias"}
    after = model.state_dict()
    for key in payload.arrays:
        np.testing.assert_allclose(payload.arrays[key], (after[key] - before[key]).numpy(), atol=1e-7)
    assert torch.equal(after["block.2.weight"], before["block.2.weight"])


def test_aggregation_is_a_per_layer_weighted_mean_of_deltas_over_the_clients_that_trained_it():
    _, algorithm, state = _setup(selection="bottom")
    _client_round(algorithm, state, [1, 2], [1, 2])  # client 1 trains block.0; client 2 block.0 + block.1
    shape = state["block.0.weight"].shape

    def delta(value, *keys):
        return {k: np.full(state[k].shape, value, np.float32) for k in keys}

    replies = [
        Reply(1, Payload(delta(1.0, "block.0.weight", "head.bias"), 10)),
        Reply(2, Payload(delta(4.0, "block.0.weight", "block.1.weight", "head.bias"), 30)),
    ]
    result = algorithm.aggregate(1, state, iter(replies))
    np.testing.assert_allclose(result.state["block.0.weight"] - state["block.0.weight"], np.full(shape, 3.25))
    np.testing.assert_allclose(result.state["block.1.weight"] - state["block.1.weight"], np.full(shape, 4.0))
    assert torch.equal(result.state["block.3.weight"], state["block.3.weight"])  # nobody trained it
    assert result.details[1] == {"layers": ["block.0", "head"]}


def test_a_delta_for_a_layer_the_client_was_not_assigned_is_rejected():
    _, algorithm, state = _setup(selection="bottom")
    _client_round(algorithm, state, [1], [1])
    sneaky = {"block.3.weight": np.zeros(tuple(state["block.3.weight"].shape), np.float32)}
    result = algorithm.aggregate(1, state, iter([Reply(1, Payload(sneaky, 10))]))
    assert "not in a layer it was assigned" in result.rejected[1]
    assert torch.equal(result.state["block.3.weight"], state["block.3.weight"])


def test_only_layers_changed_since_a_clients_cache_travel_down():
    _, algorithm, state = _setup(selection="bottom")
    instructions, caches = _client_round(algorithm, state, [1], [1])
    payload = algorithm.local(Stack(), Data(seed=1), instructions[1], caches[1])
    result = algorithm.aggregate(1, state, iter([Reply(1, payload)]))
    instruction = algorithm.plan(2, [1], result.state)[1]  # round 2: only block.0 and head changed
    assert {k.rsplit(".", 1)[0] for k in instruction.arrays} == {"block.0", "head"}
    algorithm.local(Stack(), Data(seed=1), instruction, caches[1])
    assert np.array_equal(caches[1]["global/block.0.weight"], result.state["block.0.weight"].numpy())


def test_a_client_whose_cache_is_not_what_the_server_assumed_fails_loudly():
    _, algorithm, state = _setup()
    instructions, caches = _client_round(algorithm, state, [1], [2])
    lost = {SITE_BUDGET: 2}  # the site restarted and lost its cache
    with pytest.raises(SyncError, match="it will resend"):
        algorithm.local(Stack(), Data(seed=1), algorithm.plan(2, [1], state)[1], lost)
    algorithm.forget(1)
    assert len(algorithm.probe(2, [1], state)[1].arrays) == len(state)  # everything again


def test_bad_probe_replies_are_refused():
    _, algorithm, state = _setup()
    algorithm.probe(1, [1], state)
    from aggregators.base import PayloadError

    with pytest.raises(PayloadError, match="finite non-negative"):
        algorithm.check_probe(1, Payload({SCORES_KEY: np.array([1.0, -1.0, 0.0, 0.0], np.float32)}, 5))
    with pytest.raises(PayloadError, match="no 'layer-scores'"):
        algorithm.check_probe(1, Payload({}, 5, {"layer-budget": 2}))


def test_config_is_read_from_the_run_config_and_checked():
    algorithm = make_algorithm("selective-layer", {"selection": "top", "selection-lambda": 0.5, "layer-scores": "stale"})
    assert (algorithm.config.selection, algorithm.config.selection_lambda) == ("top", 0.5)
    with pytest.raises(ValueError, match="unknown selection"):
        make_algorithm("selective-layer", {"selection": "middle"})
    with pytest.raises(ValueError, match="layer-scores"):
        make_algorithm("selective-layer", {"layer-scores": "old"})


def test_simulated_budgets_follow_their_spec():
    assert draw_budget("3", 0, 5) == 3
    draws = [draw_budget("truncnorm:1:6", 0, p) for p in range(400)]
    assert min(draws) >= 1 and max(draws) <= 6 and np.mean(draws) < 2.5  # mass at the low end
    assert draws == [draw_budget("truncnorm:1:6", 0, p) for p in range(400)]
    assert {draw_budget("uniform:2:3", 1, p) for p in range(50)} == {2, 3}
    with pytest.raises(ValueError, match="not N, uniform"):
        draw_budget("lots", 0, 0)


def test_stale_scores_probe_only_new_clients_and_ride_on_training_replies():
    _, algorithm, state = _setup(layer_scores="stale")
    instructions, caches = _client_round(algorithm, state, [1, 2], [2, 2])  # round 1: both new, probed
    assert "score-layers" in instructions[1].config
    replies = [Reply(c, algorithm.local(Stack(), Data(seed=c), instructions[c], caches[c])) for c in (1, 2)]
    assert all(SCORES_KEY in r.payload.arrays for r in replies)  # scores for next time
    result = algorithm.aggregate(1, state, iter(replies))
    assert SCORES_KEY not in result.state
    assert algorithm.probe(2, [1, 2], result.state) == {}  # known clients: no probe exchange
    assert set(algorithm.probe(2, [1, 2, 3], result.state)) == {3}  # a newcomer is probed
    fresh_algorithm = _setup(layer_scores="fresh")[1]
    fresh_algorithm.init_state(state, {n: [k for k in state if k.startswith(n + ".")] for n in
                                       [*(f"block.{i}" for i in range(N_LAYERS)), "head"]})
    assert set(fresh_algorithm.probe(1, [1, 2], state)) == {1, 2}
