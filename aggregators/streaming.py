r"""Streaming per-key weighted means: the O(model)-memory core of averaging aggregators, and the
cap on any one site's share of a weighted mean (``max-site-weight``)."""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch


def share_cap(weights: Sequence[float], max_share: float) -> float:
    r"""The largest threshold :math:`t` such that with capped weights :math:`w'_i = \min(w_i, t)`
    no reply's share :math:`w'_i / \sum_j w'_j` exceeds ``max_share`` (:math:`c`); ``inf`` when no
    weight needs capping. When :math:`c \cdot n < 1` no weighting can meet the cap and every weight
    is capped to the smallest (equal weights, share :math:`1/n`).

    With the :math:`j` largest weights capped, :math:`t / (j t + R_j) = c` gives
    :math:`t = c R_j / (1 - c j)`, :math:`R_j` the sum of the others; the answer is the first
    :math:`j` for which :math:`w_{(j+1)} \le t \le w_{(j)}`. At most :math:`\lceil 1/c \rceil - 1`
    weights are ever capped, which is what lets a streaming mean keep only that many replies.
    """
    ordered = sorted((float(w) for w in weights), reverse=True)
    if not ordered or max_share >= 1 or ordered[0] <= max_share * sum(ordered):
        return math.inf
    rest = sum(ordered)
    for j in range(1, len(ordered)):
        rest -= ordered[j - 1]
        if 1 - max_share * j <= 0:
            break
        threshold = max_share * rest / (1 - max_share * j)
        if ordered[j] <= threshold <= ordered[j - 1]:
            return threshold
    return ordered[-1]


def capped_weights(weights: Mapping[int, float], max_share: float) -> dict[int, float]:
    """``weights`` with :func:`share_cap` applied (for aggregators that keep every reply anyway)."""
    threshold = share_cap(list(weights.values()), max_share)
    return {client: min(weight, threshold) for client, weight in weights.items()}


class WeightedMeanPerKey:
    r"""Running per-key weighted mean over replies that may cover different key subsets.

    For every key :math:`k`, after folding replies :math:`i` with weights :math:`w_i`,

    .. math:: \bar x_k = \frac{\sum_{i \ni k} w_i x_{i,k}}{\sum_{i \ni k} w_i},

    where the sums run over the replies that contain :math:`k`. Memory is one float64 buffer
    per key that was sent at least once, never one per reply.

    ``max_share`` :math:`c < 1` caps every reply's share of each key's mean at :math:`c`
    (:func:`share_cap`): replies' weights are capped at the threshold :math:`t` the round's weights
    imply, ``w'_i = min(w_i, t)``. Since at most :math:`\lceil 1/c\rceil - 1` replies per key are
    ever capped, only the :math:`\lceil 1/c \rceil` heaviest replies per key are kept besides the
    sums (two extra copies at the default 0.5), and the mean is corrected from them exactly.
    """

    def __init__(self, max_share: float = 1.0) -> None:
        if not 0 < max_share <= 1:
            raise ValueError(f"max-site-weight must be in (0, 1], got {max_share}")
        self.max_share = max_share
        self._keep = math.ceil(1 / max_share) if max_share < 1 else 0
        self._sums: dict[str, torch.Tensor] = {}
        self._weights: dict[str, float] = {}
        self._all_weights: dict[str, list[float]] = {}
        self._heaviest: dict[str, list[tuple[float, int, np.ndarray]]] = {}  # min-heap by weight
        self._order = itertools.count()

    def add(self, arrays: Mapping[str, np.ndarray], weight: float) -> None:
        """Fold one reply's arrays, all with the same ``weight``."""
        for key, value in arrays.items():
            term = torch.from_numpy(np.asarray(value))
            if key not in self._sums:
                self._sums[key] = torch.zeros(term.shape, dtype=torch.float64)
                self._weights[key] = 0.0
                self._all_weights[key], self._heaviest[key] = [], []
            self._sums[key].add_(term, alpha=weight)  # casts on the fly: no full-size temporary
            self._weights[key] += weight
            if self._keep:
                self._all_weights[key].append(weight)
                entry = (weight, next(self._order), np.array(value, copy=True))
                if len(self._heaviest[key]) < self._keep:
                    heapq.heappush(self._heaviest[key], entry)
                elif weight > self._heaviest[key][0][0]:
                    heapq.heapreplace(self._heaviest[key], entry)

    def capped_shares(self) -> dict[str, float]:
        """Per key, the largest share any reply has after the cap (1.0 for a single reply)."""
        out = {}
        for key, weights in self._all_weights.items():
            threshold = share_cap(weights, self.max_share)
            capped = [min(w, threshold) for w in weights]
            out[key] = max(capped) / sum(capped)
        return out

    @property
    def keys(self) -> set[str]:
        return set(self._sums)

    def means(self) -> dict[str, torch.Tensor]:
        """The (share-capped) weighted mean of every key folded so far, as float32."""
        out = {}
        for key, total in self._sums.items():
            weight = self._weights[key]
            threshold = share_cap(self._all_weights[key], self.max_share) if self._keep else math.inf
            if math.isfinite(threshold):
                total = total.clone()
                for heavy, _, value in self._heaviest[key]:
                    if heavy > threshold:
                        total.add_(torch.from_numpy(value), alpha=threshold - heavy)
                        weight -= heavy - threshold
            out[key] = (total / weight).to(torch.float32)
        return out


class WeightedMetricMeans:
    """Running weighted means of the named scalar metrics of replies (absent ones are skipped)."""

    def __init__(self, names: tuple[str, ...] = ("train-loss",)) -> None:
        self._sums = {name: 0.0 for name in names}
        self._weights = {name: 0.0 for name in names}

    def add(self, metrics: Mapping[str, float], weight: float) -> None:
        for name in self._sums:
            if name in metrics:
                self._sums[name] += weight * float(metrics[name])
                self._weights[name] += weight

    def means(self) -> dict[str, float]:
        return {name: self._sums[name] / w for name, w in self._weights.items() if w > 0}
