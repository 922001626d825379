"""Ferret: unbiased block-wise projection, replay ledger, catch-up, hostile replies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aggregators import make_algorithm
from aggregators.base import Payload, Reply
from aggregators.ferret import (
    Ferret,
    FerretConfig,
    bases_per_block,
    project,
    reconstruct_into,
)
from aggregators.shared_randomness import (
    HELD_VECTOR,
    Manifest,
    WeightsMismatchError,
    state_hash,
)
from tests.toy import ToyData, ToyModel, run_replay_rounds, toy_state


def test_reconstruction_is_unbiased_monte_carlo():
    r"""E[Vᵀγ] = Δ with γ = VΔ/(ρK). 2 blocks of 64 with K_l = 2048 bases, averaged over 20 rounds:
    the relative error of the mean has standard deviation ≈ sqrt(d_l/(K_l·20)) ≈ 0.04; we allow 4σ.
    The reference code's d/K scaling (ρ = 1/d) would give a mean of Δ/3 (relative error 0.67)."""
    manifest = Manifest.from_state({"w": torch.zeros(128)}, block_size=64)
    delta = torch.randn(128, generator=torch.Generator().manual_seed(0))
    total = 4096
    assert bases_per_block(manifest, total).tolist() == [2048, 2048]
    rounds = 20
    mean = torch.zeros(128, dtype=torch.float64)
    for server_round in range(rounds):
        coefficients = project(delta, manifest, 0, server_round, -1, total)
        assert coefficients.dtype == np.float32 and coefficients.shape == (total,)
        reconstruction = torch.zeros(128)
        reconstruct_into(reconstruction, manifest, 0, server_round, np.array([-1]), coefficients[None], total, sign=1.0)
        mean += reconstruction.double() / rounds
    relative = float((mean - delta.double()).norm() / delta.double().norm())
    sigma = (64 / (2048 * rounds)) ** 0.5
    assert relative < 4 * sigma
    one = torch.zeros(128)
    reconstruct_into(one, manifest, 0, 0, np.array([-1]), project(delta, manifest, 0, 0, -1, total)[None], total, sign=1.0)
    assert float((one - delta).norm() / delta.norm()) > relative  # a single projection is noisier


def test_replay_does_not_depend_on_the_thread_count():
    manifest = Manifest.from_state({"w": torch.zeros(5000)}, block_size=512)
    n = int(bases_per_block(manifest, 300).sum())
    coefficients = np.random.default_rng(0).standard_normal((2, n)).astype(np.float32)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        vector = torch.ones(5000)
        reconstruct_into(vector, manifest, 3, 1, np.array([5, 9]), coefficients, 300)
        results.append(vector)
    torch.set_num_threads(2)
    assert torch.equal(results[0], results[1])


def test_uplink_is_the_coefficients_only_and_clients_stay_hash_equal_with_the_server():
    server = Ferret(FerretConfig(ferret_bases=40, ferret_block_size=32, local_steps=3, lr=0.05, seed=1))
    state, clients, _ = run_replay_rounds(server, "ferret", {}, [[1, 2], [1, 2], [1, 2]])
    for client_state in clients.values():
        held = torch.from_numpy(client_state[HELD_VECTOR])
        # clients hold the weights of round 2 (synced at the start of round 3); the server is at round 3
        assert held.numel() == server.manifest.numel
    assert clients[1][HELD_VECTOR].tobytes() == clients[2][HELD_VECTOR].tobytes()
    assert server.num_coefficients == int(bases_per_block(server.manifest, 40).sum())
    initial = toy_state(ToyModel())
    assert state_hash(state) != state_hash(initial)  # training moved the weights


@pytest.mark.parametrize("bases, expect_full", [(40, False), (400, True)])
def test_a_client_that_missed_three_rounds_catches_up_hash_equal(bases, expect_full):
    """Client 3 trains in rounds 1-2, misses 3-5 and returns in round 6: it replays the ledger of
    rounds 2-5 (or, when those entries outweigh the weights, downloads them) and then holds exactly
    the server's weights of round 5, as do clients 1 and 2 that never missed a round."""
    server = Ferret(FerretConfig(ferret_bases=bases, ferret_block_size=32, local_steps=2, lr=0.05, seed=2))
    schedule = [[1, 2, 3], [1, 2, 3], [1, 2], [1, 2], [1, 2], [1, 2, 3]]
    _, clients, instructions = run_replay_rounds(server, "ferret", {}, schedule)
    sixth = instructions[5][3].config
    assert (sixth["sync-from"] == -1) is expect_full
    if not expect_full:
        assert sixth["sync-from"] == 1 and sorted({k.split(".")[1] for k in instructions[5][3].arrays}) == ["2", "3", "4", "5"]
    held = {c: clients[c][HELD_VECTOR] for c in (1, 2, 3)}
    assert held[3].tobytes() == held[1].tobytes() == held[2].tobytes()
    # the instruction carried the server's hash of round 5 and the client checked it: equal
    assert sixth["weights-hash"] == state_hash(server.manifest.unflatten(torch.from_numpy(held[3].copy())))


def test_a_diverged_client_is_caught_by_the_hash_check():
    server = Ferret(FerretConfig(ferret_bases=40, ferret_block_size=32, local_steps=2, lr=0.05))
    states: dict = {}
    state, _, _ = run_replay_rounds(server, "ferret", {}, [[1], [1]], states)
    states[1][HELD_VECTOR][0] += 1e-6  # e.g. a different BLAS rounding on this site
    plan = server.plan(3, [1], state)
    assert plan[1].config["sync-from"] == 1  # it replays round 2 onto its (diverged) copy
    with pytest.raises(WeightsMismatchError, match="diverged"):
        make_algorithm("ferret").local(ToyModel(), ToyData(), plan[1], states[1])


def test_hostile_replies_are_rejected_naming_the_client():
    server = Ferret(FerretConfig(ferret_bases=40, ferret_block_size=32))
    state = server.init_state(toy_state(ToyModel()))
    server.plan(1, [1, 2, 3, 4, 5], state)
    n = server.num_coefficients
    good = np.ones(n, dtype=np.float32)
    replies = [
        Reply(1, Payload({"coefficients": good}, 10)),
        Reply(2, Payload({"coefficients": np.ones(n + 1, dtype=np.float32)}, 10)),
        Reply(3, Payload({"coefficients": np.full(n, np.nan, dtype=np.float32)}, 10)),
        Reply(4, Payload({"coefficients": good, "head.weight": np.ones(3, dtype=np.float32)}, 10)),
        Reply(5, Payload({"coefficients": good.astype(np.float64)}, 10)),
    ]
    result = server.aggregate(1, state, iter(replies))
    assert result.accepted == [1]
    assert set(result.rejected) == {2, 3, 4, 5}
    assert all(f"client {c}" in reason for c, reason in result.rejected.items())


def test_per_client_bases_match_the_paper_and_replay_one_basis_set_per_client():
    server = Ferret(FerretConfig(ferret_bases=40, ferret_block_size=32, ferret_seeds="client", local_steps=2, lr=0.05))
    _, clients, instructions = run_replay_rounds(server, "ferret", {}, [[1, 2], [1, 2]])
    entry = server.ledger[1]
    assert entry["coefficients"].shape == (2, server.num_coefficients)
    assert entry["clients"].tolist() == [1, 2]
    assert clients[1][HELD_VECTOR].tobytes() == clients[2][HELD_VECTOR].tobytes()
    assert instructions[0][1].config["basis-slot"] == 1 and instructions[0][2].config["basis-slot"] == 2


def test_config_errors_name_the_setting():
    with pytest.raises(ValueError, match="ferret-seeds"):
        FerretConfig(ferret_seeds="everyone")
    with pytest.raises(ValueError, match="ferret-bases"):
        FerretConfig(ferret_bases=0)
    with pytest.raises(ValueError, match="server-lr"):
        FerretConfig(server_lr=0)
