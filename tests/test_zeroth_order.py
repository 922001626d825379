"""FedKSeed, FedKSeed-Pro and one-byte: scalar uploads, seed-pool replay, catch-up, hostile replies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aggregators import make_algorithm
from aggregators.base import Payload, Reply
from aggregators.shared_randomness import (
    HELD_VECTOR,
    Manifest,
    OneByteCodec,
    state_hash,
)
from aggregators.zeroth_order import (
    FedKSeed,
    FedKSeedPro,
    OneByte,
    ZerothOrderConfig,
    direction,
    pro_probabilities,
    replay_steps,
)
from tests.toy import ToyData, ToyModel, run_replay_rounds, toy_state

CONFIG = {"seed_pool": 64, "zo_steps": 12, "zo_lr": 0.02, "zo_eps": 1e-3, "batch_size": 8, "zo_block_size": 40, "seed": 3}


def test_fedkseed_uploads_index_scalar_pairs_and_clients_follow_the_server():
    server = FedKSeed(ZerothOrderConfig(**CONFIG))
    state, clients, _ = run_replay_rounds(server, "fedkseed", {}, [[1, 2], [1, 2], [1, 2]])
    entry = server.ledger[1]
    assert entry["seed-index"].dtype == np.uint32 and np.all(np.diff(entry["seed-index"].astype(int)) > 0)
    assert clients[1][HELD_VECTOR].tobytes() == clients[2][HELD_VECTOR].tobytes()
    assert state_hash(state) != state_hash(toy_state(ToyModel()))
    # 12 steps: 12 uint16 indices + 12 fp32 scalars = 72 bytes of arrays
    payload = make_algorithm("fedkseed").local(ToyModel(), ToyData(seed=1), server.plan(4, [1], state)[1], clients[1])
    assert payload.arrays["seed-index"].dtype == np.uint16 and payload.arrays["seed-scalar"].dtype == np.float32
    assert sum(a.nbytes for a in payload.arrays.values()) == 12 * 6


def test_a_client_that_missed_three_rounds_and_a_new_client_rebuild_the_same_weights():
    """Client 3 misses rounds 3-5; client 4 first appears in round 6 and rebuilds the model from the
    pretrained weights plus the ledger of rounds 1-5. Both end hash-equal to clients 1 and 2."""
    server = FedKSeed(ZerothOrderConfig(**CONFIG))
    schedule = [[1, 2, 3], [1, 2, 3], [1, 2], [1, 2], [1, 2], [1, 2, 3, 4]]
    _, clients, instructions = run_replay_rounds(server, "fedkseed", {}, schedule)
    assert instructions[5][3].config["sync-from"] == 1 and instructions[5][4].config["sync-from"] == 0
    assert sorted({k.split(".")[1] for k in instructions[5][4].arrays if k.startswith("ledger.")}) == list("12345")
    held = [clients[c][HELD_VECTOR].tobytes() for c in (1, 2, 3, 4)]
    assert len(set(held)) == 1


def test_the_model_is_the_pretrained_weights_plus_the_accumulated_per_seed_sums():
    r"""w_r = w_0 − η Σ_k A_r[k] z_k: one rebuild from the accumulated sums equals the replayed
    model up to fp32 rounding."""
    server = FedKSeed(ZerothOrderConfig(**CONFIG))
    state, _, _ = run_replay_rounds(server, "fedkseed", {}, [[1, 2], [1, 2], [2, 3]])
    rebuilt = server.rebuild(toy_state(ToyModel()))
    for key, value in rebuilt.items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=1e-5)
    assert np.count_nonzero(server.accumulated) > 0


def test_replay_applies_exactly_the_sum_of_scaled_directions():
    manifest = Manifest.from_state({"w": torch.zeros(100)}, block_size=30)
    vector = torch.zeros(100)
    replay_steps(vector, manifest, 5, np.array([2, 7]), np.array([0.5, -1.0], dtype=np.float32))
    expected = -(0.5 * direction(manifest, 5, 2) - 1.0 * direction(manifest, 5, 7))
    torch.testing.assert_close(vector, expected)


def test_pro_probabilities_prefer_large_amplitudes_by_at_most_e():
    uniform = pro_probabilities(np.zeros(8), np.zeros(8))
    np.testing.assert_allclose(uniform, np.full(8, 1 / 8))
    p = pro_probabilities(np.array([0.0, 1.0, 4.0, 2.0]), np.array([0.0, 1.0, 1.0, 3.0]))
    assert p.argmax() == 2 and p.argmin() == 0
    assert p.max() / p.min() == pytest.approx(np.e, rel=1e-6)
    assert p.sum() == pytest.approx(1.0)


def test_fedkseed_pro_sends_probabilities_learnt_from_the_scalars():
    server = FedKSeedPro(ZerothOrderConfig(**CONFIG))
    _, _, instructions = run_replay_rounds(server, "fedkseed-pro", {}, [[1, 2], [1, 2]])
    first = instructions[0][1].arrays["seed-probabilities"]
    np.testing.assert_allclose(first, np.full(64, 1 / 64), rtol=1e-6)
    second = instructions[1][1].arrays["seed-probabilities"]
    assert second.dtype == np.float32 and not np.allclose(second, first)
    assert server.counts.sum() == 2 * 2 * 12  # every scalar of 2 clients x 2 rounds entered the history


def test_one_byte_uploads_exactly_one_byte_per_estimate_and_the_server_derives_the_seeds():
    server = OneByte(ZerothOrderConfig(**CONFIG))
    state = server.init_state(toy_state(ToyModel()))
    plan = server.plan(1, [7], state)
    payload = make_algorithm("one-byte").local(ToyModel(), ToyData(seed=7), plan[7], {})
    assert set(payload.arrays) == {"seed-code"}
    codes = payload.arrays["seed-code"]
    assert codes.dtype == np.uint8 and codes.nbytes == 12
    result = server.aggregate(1, state, iter([Reply(7, payload)]))
    assert result.accepted == [7]
    entry = server.ledger[1]
    expected = OneByteCodec().decode(codes)
    derived = server.one_byte_indices(1, 7)
    sums = np.zeros(64)
    np.add.at(sums, derived, expected.astype(np.float64))
    np.testing.assert_allclose(entry["step"], (0.02 * sums[entry["seed-index"]]).astype(np.float32))


def test_hostile_replies_are_rejected_naming_the_client():
    server = FedKSeed(ZerothOrderConfig(**CONFIG))
    state = server.init_state(toy_state(ToyModel()))
    server.plan(1, [1, 2, 3, 4, 5, 6], state)
    idx = np.arange(4, dtype=np.uint16)
    val = np.ones(4, dtype=np.float32)
    replies = [
        Reply(1, Payload({"seed-index": idx, "seed-scalar": val}, 10)),
        Reply(2, Payload({"seed-index": np.array([64], dtype=np.uint16), "seed-scalar": val[:1]}, 10)),
        Reply(3, Payload({"seed-index": idx, "seed-scalar": np.array([1, np.inf, 1, 1], dtype=np.float32)}, 10)),
        Reply(4, Payload({"seed-index": idx.astype(np.int64), "seed-scalar": val}, 10)),
        Reply(5, Payload({"seed-index": np.zeros(13, dtype=np.uint16), "seed-scalar": np.ones(13, dtype=np.float32)}, 10)),
        Reply(6, Payload({"seed-index": idx, "seed-scalar": val[:3]}, 10)),
    ]
    result = server.aggregate(1, state, iter(replies))
    assert result.accepted == [1]
    assert set(result.rejected) == {2, 3, 4, 5, 6}
    assert "outside the pool" in result.rejected[2]
    assert all(f"client {c}" in reason for c, reason in result.rejected.items())
    one_byte = OneByte(ZerothOrderConfig(**CONFIG))
    one_byte.plan(1, [1], one_byte.init_state(toy_state(ToyModel())))
    bad = one_byte.aggregate(1, state, iter([Reply(1, Payload({"seed-code": np.zeros(5, dtype=np.uint8)}, 10))]))
    assert "uint8 of shape (12,)" in bad.rejected[1]


def test_config_errors_name_the_setting():
    with pytest.raises(ValueError, match="seed-pool"):
        ZerothOrderConfig(seed_pool=0)
    with pytest.raises(ValueError, match="zo-eps"):
        ZerothOrderConfig(zo_eps=0)
    with pytest.raises(ValueError, match="low < high"):
        ZerothOrderConfig(one_byte_low=1.0, one_byte_high=0.5)
