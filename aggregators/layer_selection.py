r"""The server's layer-selection problem P1 of Sun et al. (arXiv 2408.15600) and its solver.

Given clients :math:`i=1..N` with layer scores :math:`s_{il}` and budgets :math:`R_i`, choose a binary
:math:`m \in \{0,1\}^{N\times L}` that maximises

.. math:: F(m) = \sum_i \sum_l m_{il}\, s_{il} \;-\; \lambda \sum_l \sum_{i<i'} (m_{il}-m_{i'l})^2
          \quad\text{s.t.}\quad \sum_l m_{il} \le R_i \;\; \forall i .

For binary :math:`m`, :math:`\sum_{i<i'} (m_{il}-m_{i'l})^2 = n_l (N-n_l)` with :math:`n_l=\sum_i m_{il}`,
so the penalty depends on per-layer counts only.

Solver. Relaxing the budgets with multipliers :math:`\mu_i \ge 0` decouples the layers, and each
layer's subproblem :math:`\max_S \sum_{i\in S}(s_{il}-\mu_i) - \lambda |S|(N-|S|)` is solved exactly
by sorting (for a fixed size :math:`k` the best :math:`S` is the top-:math:`k`), so the Lagrangian dual
:math:`D(\mu)=\sum_i \mu_i R_i + \sum_l \max_S(\cdot)` is an upper bound on the optimum for every
:math:`\mu`. We minimise it by projected subgradient steps, build a feasible selection from the
relaxed one (drop a client's least valuable layers until it meets its budget), improve it by local
search (add / drop / swap one layer of one client), and close the gap by branch and bound on
:math:`m_{il}` with the same bound. The result is exact when the search finishes within its time
limit (always for small instances); otherwise it is the best selection found, with a certified
bound: ``Selection.upper_bound - Selection.objective`` is the largest possible shortfall.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np


@dataclass
class Selection:
    mask: np.ndarray  # bool, N x L
    objective: float
    upper_bound: float
    exact: bool

    @property
    def gap(self) -> float:
        return max(0.0, self.upper_bound - self.objective)


def disagreement(mask: np.ndarray) -> np.ndarray:
    """Per layer, sum over client pairs i<i' of (m_il - m_i'l)^2, computed pairwise."""
    m = mask.astype(np.int64)
    diff = m[:, None, :] - m[None, :, :]
    return (diff**2).sum(axis=(0, 1)) // 2


def objective(scores: np.ndarray, mask: np.ndarray, lam: float) -> float:
    """F(m) via the count form of the penalty."""
    n = mask.sum(axis=0)
    return float((scores * mask).sum() - lam * (n * (len(mask) - n)).sum())


def _check(scores: np.ndarray, budgets: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    budgets = np.asarray(budgets, dtype=np.int64)
    if scores.ndim != 2 or budgets.shape != (scores.shape[0],):
        raise ValueError(f"scores must be N x L and budgets length N; got {scores.shape} and {budgets.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("layer scores must be finite")
    if (budgets < 0).any():
        raise ValueError("layer budgets must be non-negative")
    if lam < 0:
        raise ValueError(f"lambda must be non-negative, got {lam}")
    return scores, budgets


def _best_responses(values: np.ndarray, lam: float, fixed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every layer at once: max over S of sum_{i in S} values_il - lam |S| (N-|S|), with S
    containing the forced-in (fixed == 1) and none of the forced-out (fixed == 0) clients. For a
    given size the best S is the forced-in plus the best free clients, so sorting solves it."""
    n_clients, n_layers = values.shape
    key = np.where(fixed == 1, np.inf, np.where(fixed == 0, -np.inf, values))
    order = np.argsort(-key, axis=0, kind="stable")
    ranked = np.take_along_axis(values, order, axis=0)
    sizes = np.arange(n_clients + 1)[:, None]
    gains = np.vstack([np.zeros((1, n_layers)), np.cumsum(ranked, axis=0)]) - lam * sizes * (n_clients - sizes)
    low = (fixed == 1).sum(axis=0)
    high = n_clients - (fixed == 0).sum(axis=0)
    gains[(sizes < low) | (sizes > high)] = -np.inf
    best = np.argmax(gains, axis=0)
    chosen_sorted = np.arange(n_clients)[:, None] < best[None, :]
    mask = np.zeros((n_clients, n_layers), dtype=bool)
    np.put_along_axis(mask, order, chosen_sorted, axis=0)
    return mask, gains[best, np.arange(n_layers)]


def _relax(scores, budgets, lam, fixed, mu, iterations, target):
    """Minimise the Lagrangian dual D(mu) by projected subgradient steps with Polyak's step size
    towards ``target`` (the best known objective); returns (best bound, its mu, its relaxed mask)."""
    best = (np.inf, mu, None)
    stalled = 0
    for _ in range(iterations):
        mask, gains = _best_responses(scores - mu[:, None], lam, fixed)
        value = float(mu @ budgets + gains.sum())
        if value < best[0] - 1e-4 * abs(best[0] if np.isfinite(best[0]) else value):
            stalled = 0
        else:
            stalled += 1
            if stalled >= 25:  # no real progress for a while: the bound has converged
                break
        if value < best[0]:
            best = (value, mu.copy(), mask)
        excess = mask.sum(axis=1) - budgets  # D's subgradient is budgets - used
        norm = float(excess @ excess)
        if norm == 0 or value <= target + 1e-12:
            break
        step = max(value - target, 1e-9) / norm
        mu = np.maximum(0.0, mu + step * excess)
    return best


def _repair(scores, budgets, lam, mask, fixed):
    """Make ``mask`` meet every budget (respecting forced-in entries), dropping least valuable layers."""
    mask = mask.copy()
    n_clients = len(mask)
    counts = mask.sum(axis=0)
    for i in np.argsort(-(mask.sum(axis=1) - budgets)):
        while mask[i].sum() > budgets[i]:
            layers = np.flatnonzero(mask[i] & (fixed[i] != 1))
            if not len(layers):
                return None
            loss = scores[i, layers] - lam * (n_clients - 2 * counts[layers] + 1)  # value lost by dropping
            drop = layers[int(np.argmin(loss))]
            mask[i, drop] = False
            counts[drop] -= 1
    return mask


def _count_knapsack_bound(scores: np.ndarray, budgets: np.ndarray, lam: float) -> float:
    """Upper bound: a layer picked by k clients is worth at most h_l(k) = (its k best scores) -
    lam k (N-k), and the counts of any feasible selection add up to at most sum_i R_i; maximise
    sum_l h_l(k_l) under that one constraint by dynamic programming over the total count."""
    n_clients, n_layers = scores.shape
    total = int(min(budgets.sum(), n_clients * n_layers))
    sizes = np.arange(n_clients + 1)
    best = np.full(total + 1, -np.inf)
    best[0] = 0.0
    for layer in range(n_layers):
        column = np.sort(scores[:, layer])[::-1]
        h = np.concatenate([[0.0], np.cumsum(column)]) - lam * sizes * (n_clients - sizes)
        new = best.copy()  # k = 0
        for k in range(1, n_clients + 1):
            if k > total:
                break
            new[k:] = np.maximum(new[k:], best[:-k] + h[k])
        best = new
    return float(best.max())


def _starting_points(scores: np.ndarray, budgets: np.ndarray) -> list[np.ndarray]:
    """Feasible selections to start from: each client's own top layers, and for every depth d the
    consensus where each client takes the first min(R_i, d) layers of one common ranking (by total
    score), which has no disagreement among clients that can afford d layers."""
    n_clients, n_layers = scores.shape
    common = np.argsort(-scores.sum(axis=0), kind="stable")
    own = np.zeros((n_clients, n_layers), dtype=bool)
    for i in range(n_clients):
        own[i, np.argsort(-scores[i], kind="stable")[: budgets[i]]] = True
    starts = [own]
    for depth in range(1, int(budgets.max(initial=0)) + 1):
        shared = np.zeros((n_clients, n_layers), dtype=bool)
        for i in range(n_clients):
            shared[i, common[: min(budgets[i], depth)]] = True
        starts.append(shared)
    return starts


def _local_search(scores, budgets, lam, mask, fixed, deadline):
    """Best-improvement moves of one client: add, drop, or swap one layer, until none improves."""
    mask = mask.copy()
    n_clients = len(mask)
    counts = mask.sum(axis=0).astype(np.int64)
    improved = True
    while improved and time.perf_counter() < deadline:
        improved = False
        for i in range(n_clients):
            inside = mask[i]
            add_gain = np.where(~inside & (fixed[i] != 0), scores[i] - lam * (n_clients - 2 * counts - 1), -np.inf)
            drop_gain = np.where(inside & (fixed[i] != 1), -scores[i] + lam * (n_clients - 2 * counts + 1), -np.inf)
            best_add, best_drop = int(np.argmax(add_gain)), int(np.argmax(drop_gain))
            candidates = [(drop_gain[best_drop], None, best_drop)]
            if inside.sum() < budgets[i]:
                candidates.append((add_gain[best_add], best_add, None))
            candidates.append((add_gain[best_add] + drop_gain[best_drop], best_add, best_drop))  # swap
            gain, add, drop = max(candidates, key=lambda c: c[0])
            if gain > 1e-12:
                if drop is not None:
                    mask[i, drop] = False
                    counts[drop] -= 1
                if add is not None:
                    mask[i, add] = True
                    counts[add] += 1
                improved = True
    return mask


def solve_selection(
    scores: np.ndarray, budgets: np.ndarray, lam: float, *, time_limit: float = 0.02, iterations: int = 300
) -> Selection:
    """Solve P1 (see module docstring). ``time_limit`` seconds bound the branch and bound."""
    scores, budgets = _check(scores, budgets, lam)
    n_clients, n_layers = scores.shape
    deadline = time.perf_counter() + time_limit
    free = np.full((n_clients, n_layers), -1, dtype=np.int8)
    if lam == 0.0:  # decouples per client: its top-R layers with positive score (exact)
        mask = np.zeros((n_clients, n_layers), dtype=bool)
        for i in range(n_clients):
            top = np.argsort(-scores[i], kind="stable")[: budgets[i]]
            mask[i, top[scores[i, top] > 0]] = True
        value = objective(scores, mask, 0.0)
        return Selection(mask, value, value, True)

    best_mask, best_value = np.zeros((n_clients, n_layers), dtype=bool), 0.0
    for start in _starting_points(scores, budgets):  # consensus and per-client selections
        candidate = _local_search(scores, budgets, lam, start, free, deadline)
        value = objective(scores, candidate, lam)
        if value > best_value:
            best_mask, best_value = candidate, value
    stack = [(free, np.zeros(n_clients))]
    root_bound = None
    exhausted = True
    while stack:
        if time.perf_counter() > deadline and root_bound is not None:
            exhausted = False
            break
        fixed, mu = stack.pop()
        if ((fixed == 1).sum(axis=1) > budgets).any():
            continue
        bound, mu, relaxed = _relax(scores, budgets, lam, fixed, mu, iterations, best_value)
        if root_bound is None:
            root_bound = bound
        if bound <= best_value + 1e-9:
            continue
        candidate = _repair(scores, budgets, lam, relaxed, fixed)
        if candidate is not None:
            candidate = _local_search(scores, budgets, lam, candidate, fixed, deadline + time_limit)
            value = objective(scores, candidate, lam)
            if value > best_value:
                best_mask, best_value = candidate, value
        if bound <= best_value + 1e-9:
            continue
        over = np.flatnonzero(relaxed.sum(axis=1) > budgets)
        if len(over):  # branch on the over-budget client's layer of least reduced value
            i = int(over[0])
            layers = np.flatnonzero(relaxed[i] & (fixed[i] == -1))
            layer = int(layers[np.argmin(scores[i, layers] - mu[i])])
        else:  # relaxation feasible but complementary slackness fails: branch on any free entry
            free_entries = np.argwhere(fixed == -1)
            if not len(free_entries):
                continue
            i, layer = (int(v) for v in free_entries[0])
        for value in (1, 0):  # explore "in" last-pushed-first: 0 branch first
            child = fixed.copy()
            child[i, layer] = value
            stack.append((child, mu.copy()))
    if exhausted:
        upper = best_value
    else:  # the penalty is >= 0, so the lambda = 0 optimum (each client's top-R) bounds F too
        top_r = sum(float(np.sort(np.maximum(scores[i], 0.0))[::-1][: budgets[i]].sum()) for i in range(n_clients))
        upper = max(best_value, min(float(root_bound), top_r, _count_knapsack_bound(scores, budgets, lam)))
    return Selection(best_mask, best_value, upper, exhausted)
