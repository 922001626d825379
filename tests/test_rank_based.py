"""FRL: packing, the vote, its robustness bound, stable ties, the S ranking convention, hostile replies."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from aggregators import make_algorithm
from aggregators.base import Payload, Reply
from aggregators.rank_based import (
    RankBased,
    RankBasedConfig,
    clipped_total,
    deviation_norm,
    initial_scores,
    kept_edges,
    pack_ranking,
    positions,
    rank_bits,
    scores_from_ranking,
    unpack_ranking,
    vote,
)
from tests.toy import ToyData, ToyModel, toy_state


@pytest.mark.parametrize("n", [1, 2, 3, 255, 256, 257, 1000, 65536, 65537])
def test_packing_round_trips_in_ceil_log2_n_bits(n):
    ranking = np.random.default_rng(n).permutation(n)
    packed = pack_ranking(ranking, n)
    assert packed.dtype == np.uint8 and packed.nbytes == -(-n * rank_bits(n) // 8)
    assert rank_bits(n) == (max(1, int(np.ceil(np.log2(n)))) if n > 1 else 1)
    assert np.array_equal(unpack_ranking(packed, n), ranking)


def test_unpacking_refuses_anything_but_a_permutation():
    n = 100
    good = pack_ranking(np.arange(n), n)
    with pytest.raises(ValueError, match="uint8 bytes"):
        unpack_ranking(good[:-1], n)
    with pytest.raises(ValueError, match="uint8 bytes"):
        unpack_ranking(good.astype(np.int64), n)
    duplicate = np.arange(n)
    duplicate[5] = 6
    with pytest.raises(ValueError, match="not a permutation"):
        unpack_ranking(pack_ranking(duplicate, n), n)
    out_of_range = np.arange(n)
    out_of_range[0] = 127  # fits in 7 bits but is not an edge id
    with pytest.raises(ValueError, match="not a permutation"):
        unpack_ranking(pack_ranking(out_of_range, n), n)


def test_vote_equals_a_brute_force_computation():
    rng = np.random.default_rng(0)
    n, clients = 12, 5
    rankings = [rng.permutation(n) for _ in range(clients)]
    totals = sum(positions(r) for r in rankings)
    brute = {edge: 0 for edge in range(n)}
    for ranking in rankings:
        for place, edge in enumerate(ranking.tolist()):
            brute[edge] += place
    assert totals.tolist() == [brute[e] for e in range(n)]
    expected = sorted(range(n), key=lambda edge: (brute[edge], edge))  # ties: lower edge id first
    assert vote(totals).tolist() == expected
    codebook = torch.arange(n, dtype=torch.float32) / n
    scores = scores_from_ranking(vote(totals), codebook)
    for place, edge in enumerate(expected):
        assert scores[edge] == codebook[place]


def test_one_malicious_ranking_moves_each_edge_by_at_most_one_vote():
    rng = np.random.default_rng(1)
    n, honest = 50, 9
    rankings = [rng.permutation(n) for _ in range(honest)]
    base = sum(positions(r) for r in rankings)
    attacker_honest = rng.permutation(n)
    reversed_aggregate = vote(base + positions(attacker_honest))[::-1].copy()  # FRL's rank-reversal attack
    with_honest = base + positions(attacker_honest)
    with_attack = base + positions(reversed_aggregate)
    assert np.abs(with_attack - with_honest).max() <= n - 1  # one vote spans 0..n-1
    # and an edge's global position only moves as far as that bounded change allows
    place_honest = positions(vote(with_honest))
    place_attack = positions(vote(with_attack))
    for edge in range(n):
        lowest = np.sum(with_honest < with_honest[edge] - (n - 1) - (n - 1))
        highest = np.sum(with_honest <= with_honest[edge] + 2 * (n - 1))
        assert lowest <= place_attack[edge] <= highest
    assert (place_attack != place_honest).any()


def test_clipped_vote_equals_a_brute_force_computation():
    rng = np.random.default_rng(3)
    n, clients = 30, 6
    global_positions = {"a": positions(rng.permutation(n)), "b": positions(rng.permutation(n // 2))}
    votes = [{"a": positions(rng.permutation(n)), "b": positions(rng.permutation(n // 2))} for _ in range(clients)]
    norms = []
    for client in votes:
        squared = sum((client[k][e] - global_positions[k][e]) ** 2 for k in client for e in range(len(client[k])))
        norms.append(squared**0.5)
        assert deviation_norm(client, global_positions) == pytest.approx(norms[-1])
    bound = sorted(norms)[clients // 2 - 1 : clients // 2 + 1]
    bound = (bound[0] + bound[1]) / 2  # the median of an even count
    totals, factors = clipped_total(global_positions, votes)
    assert factors == pytest.approx([min(1.0, bound / norm) for norm in norms])
    for key in ("a", "b"):
        for edge in range(len(global_positions[key])):
            expected = sum(
                global_positions[key][edge] + min(1.0, bound / norm) * (client[key][edge] - global_positions[key][edge])
                for client, norm in zip(votes, norms)
            )
            assert totals[key][edge] == pytest.approx(expected)


def test_clipped_vote_keeps_a_minority_from_pushing_an_edge_across_the_mask_boundary():
    """Three of ten voters move edge 40 (below the keep-half boundary at 50) to the top; the
    honest seven keep the global ranking but for one adjacent swap each. The sum vote lets the
    edge in; the clipped vote scales the three deviations down to an honest one's size."""
    n = 100
    global_ranking = np.arange(n)  # edge e holds position e
    honest = []
    for i in range(7):
        ranking = global_ranking.copy()
        ranking[[60 + i, 61 + i]] = ranking[[61 + i, 60 + i]]
        honest.append(ranking)
    pushed = np.concatenate([np.delete(global_ranking, 40), [40]])  # edge 40 to the top, the rest slide down
    rankings = honest + [pushed] * 3
    summed = vote(sum(positions(r) for r in rankings))
    assert 40 in kept_edges(summed, 0.5)
    clipped, factors = clipped_total({"w": positions(global_ranking)}, [{"w": positions(r)} for r in rankings])
    assert factors[:7] == [1.0] * 7 and max(factors[7:]) < 0.05
    assert 40 not in kept_edges(vote(clipped["w"]), 0.5)
    server = RankBased(RankBasedConfig(frl_sparsity=0.5, frl_mode="finetune"))
    state = server.init_state({"w": torch.ones(10, 10)})
    server.global_positions = {"w": positions(global_ranking)}
    replies = [Reply(c, Payload({"rank/w": pack_ranking(r, n)}, 5)) for c, r in enumerate(rankings)]
    result = server.aggregate(1, state, iter(replies))
    assert result.state["w"].reshape(-1)[40] == 0.0  # edge 40 stays masked out
    assert result.metrics["votes-scaled-down"] == 3 and result.metrics["smallest-vote-scale"] < 0.05
    assert np.array_equal(server.global_positions["w"], positions(vote(clipped["w"])))
    summing = RankBased(RankBasedConfig(frl_sparsity=0.5, frl_mode="finetune", frl_vote="sum"))
    result = summing.aggregate(1, summing.init_state({"w": torch.ones(10, 10)}), iter(replies))
    assert result.state["w"].reshape(-1)[40] == 1.0


def test_ties_resolve_identically_in_a_separate_process():
    totals = np.array([3, 1, 3, 1, 2, 3, 1, 2] * 100, dtype=np.int64)
    here = vote(totals).tolist()
    code = (
        "import numpy as np\n"
        "from aggregators.rank_based import vote\n"
        "print(vote(np.array([3, 1, 3, 1, 2, 3, 1, 2] * 100, dtype=np.int64)).tolist())\n"
    )
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(there) == here


def test_kept_edges_are_the_top_of_the_vote_not_both_extremes():
    """The |S|-vs-S pitfall: an edge every client ranks lowest must be dropped, not kept."""
    n = 10
    rankings = [np.arange(n)] * 3  # every client: edge 0 lowest, edge 9 highest
    global_ranking = vote(sum(positions(r) for r in rankings))
    assert sorted(kept_edges(global_ranking, 0.5).tolist()) == [5, 6, 7, 8, 9]
    server = RankBased(RankBasedConfig(frl_sparsity=0.5, frl_mode="finetune"))  # W = the given ones
    state = server.init_state({"w": torch.ones(2, 5)})
    reply = Reply(1, Payload({"rank/w": pack_ranking(np.arange(n), n)}, 3))
    result = server.aggregate(1, state, iter([reply]))
    assert result.state["w"].reshape(-1).tolist() == [0.0] * 5 + [1.0] * 5


def test_initial_scores_are_seeded_and_kaiming_uniform():
    shapes = {"a": (4, 100), "b": (3, 25)}
    first = initial_scores(shapes, 7)
    assert torch.equal(first["a"], initial_scores(shapes, 7)["a"])
    assert not torch.equal(first["a"], initial_scores(shapes, 8)["a"])
    assert first["a"].abs().max() <= 1 / 100**0.5 and first["b"].abs().max() <= 1 / 25**0.5


def test_clients_send_packed_rankings_and_the_federation_learns_the_toy_task():
    server = RankBased(RankBasedConfig(local_steps=10, frl_mode="original"))
    state = server.init_state(toy_state(ToyModel()))
    test = ToyData(n=400, seed=100)

    def accuracy(state):
        model = ToyModel()
        model.load_state_dict(state, strict=False)
        with torch.no_grad():
            return float((model(test.x).argmax(1) == test.y).float().mean())

    before = accuracy(state)
    for server_round in range(1, 5):
        plan = server.plan(server_round, [1, 2, 3], state)
        replies = [Reply(c, make_algorithm("frl").local(ToyModel(), ToyData(seed=c), plan[c], {})) for c in (1, 2, 3)]
        for reply in replies:
            assert set(reply.payload.arrays) == {"rank/body.weight", "rank/head.weight"}
            assert reply.payload.arrays["rank/body.weight"].nbytes == 512 * 9 // 8  # 9 bits per edge id
        result = server.aggregate(server_round, state, iter(replies))
        assert result.accepted == [1, 2, 3]
        state = result.state
    assert accuracy(state) > before + 0.3
    assert plan[1].arrays["rank/head.weight"].nbytes == 192 * 8 // 8  # the global ranking travels down


def test_hostile_replies_are_rejected_naming_the_client():
    server = RankBased()
    state = server.init_state({"w": torch.ones(4, 8), "b": torch.zeros(4)})
    n = 32
    good = pack_ranking(np.random.default_rng(0).permutation(n), n)
    not_permutation = pack_ranking(np.zeros(n, dtype=np.int64), n)
    replies = [
        Reply(1, Payload({"rank/w": good}, 5)),
        Reply(2, Payload({"rank/w": good[:-1]}, 5)),
        Reply(3, Payload({"rank/w": not_permutation}, 5)),
        Reply(4, Payload({"rank/w": good, "rank/b": good}, 5)),
        Reply(5, Payload({"w": np.ones((4, 8), dtype=np.float32)}, 5)),
    ]
    result = server.aggregate(1, state, iter(replies))
    assert result.accepted == [1]
    assert set(result.rejected) == {2, 3, 4, 5}
    assert all(f"client {c}" in reason for c, reason in result.rejected.items())


def test_config_errors_name_the_setting():
    with pytest.raises(ValueError, match="frl-mode"):
        RankBasedConfig(frl_mode="random")
    with pytest.raises(ValueError, match="frl-sparsity"):
        RankBasedConfig(frl_sparsity=0.0)
    with pytest.raises(ValueError, match="frl-vote must be one of clipped, sum"):
        RankBasedConfig(frl_vote="median")


def test_original_mode_masks_seeded_signed_constants_and_keeps_the_given_fraction():
    server = RankBased(RankBasedConfig(frl_mode="original", frl_sparsity=0.25))
    state = server.init_state({"w": torch.ones(4, 8)})
    values = state["w"].reshape(-1)
    assert int((values != 0).sum()) == 8  # 25 % of 32 edges
    torch.testing.assert_close(values[values != 0].abs(), torch.full((8,), (2 / 8) ** 0.5))
    again = RankBased(RankBasedConfig(frl_mode="original", frl_sparsity=0.25)).init_state({"w": torch.ones(4, 8)})
    assert torch.equal(again["w"], state["w"])  # every party derives the same weights and scores
