"""Problem P1 of selective-layer fine-tuning and its solver (no Flower)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from aggregators.layer_selection import disagreement, objective, solve_selection


def brute_force(scores, budgets, lam):
    n_clients, n_layers = scores.shape
    options = []
    for budget in budgets:
        rows = []
        for size in range(budget + 1):
            for chosen in itertools.combinations(range(n_layers), size):
                row = np.zeros(n_layers, dtype=bool)
                row[list(chosen)] = True
                rows.append(row)
        options.append(rows)
    return max(objective(scores, np.array(combo), lam) for combo in itertools.product(*options))


@pytest.mark.parametrize("seed", range(20))
def test_pairwise_disagreement_reduces_to_counts(seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((rng.integers(1, 9), rng.integers(1, 7))) < 0.5
    n = mask.sum(axis=0)
    np.testing.assert_array_equal(disagreement(mask), n * (len(mask) - n))


@pytest.mark.parametrize("seed", range(60))
def test_solver_matches_brute_force_and_respects_budgets(seed):
    rng = np.random.default_rng(seed)
    n_clients, n_layers = int(rng.integers(2, 5)), int(rng.integers(2, 5))
    scores = rng.random((n_clients, n_layers))
    scores /= scores.sum(axis=1, keepdims=True)
    budgets = rng.integers(0, n_layers + 1, n_clients)
    lam = float(rng.choice([0.0, 0.01, 0.05, 0.2, 1.0]))
    selection = solve_selection(scores, budgets, lam, time_limit=5.0)
    assert selection.exact
    assert (selection.mask.sum(axis=1) <= budgets).all()
    assert selection.objective == pytest.approx(brute_force(scores, budgets, lam), abs=1e-9)
    assert selection.objective == pytest.approx(objective(scores, selection.mask, lam))


def test_large_instances_are_fast_feasible_and_certified():
    rng = np.random.default_rng(0)
    scores = rng.random((100, 48)) ** 3
    scores /= scores.sum(axis=1, keepdims=True)
    budgets = rng.integers(1, 7, 100)
    for lam in (0.0005, 0.002, 0.01):
        selection = solve_selection(scores, budgets, lam, time_limit=0.05)
        assert (selection.mask.sum(axis=1) <= budgets).all()
        assert selection.upper_bound >= selection.objective > 0
    # timing is a benchmark matter; see bench/selective_layer.py


def test_a_huge_lambda_makes_equal_budget_clients_pick_identical_layers():
    rng = np.random.default_rng(3)
    scores = rng.random((8, 6))
    scores /= scores.sum(axis=1, keepdims=True)
    selection = solve_selection(scores, np.full(8, 2), lam=1e6)
    assert (selection.mask == selection.mask[0]).all()
    assert selection.mask[0].sum() == 2
    assert set(np.flatnonzero(selection.mask[0])) == set(np.argsort(-scores.sum(axis=0))[:2])


def test_lambda_zero_is_each_clients_top_r():
    rng = np.random.default_rng(4)
    scores = rng.random((10, 8))
    budgets = rng.integers(0, 8, 10)
    selection = solve_selection(scores, budgets, lam=0.0)
    for i in range(10):
        assert set(np.flatnonzero(selection.mask[i])) == set(np.argsort(-scores[i])[: budgets[i]])


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="budgets length N"):
        solve_selection(np.ones((3, 2)), np.ones(2, dtype=int), 0.1)
    with pytest.raises(ValueError, match="finite"):
        solve_selection(np.array([[np.nan, 1.0]]), np.ones(1, dtype=int), 0.1)
    with pytest.raises(ValueError, match="non-negative"):
        solve_selection(np.ones((1, 2)), -np.ones(1, dtype=int), 0.1)
