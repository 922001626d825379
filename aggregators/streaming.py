r"""Streaming per-key weighted means: the O(model)-memory core of averaging aggregators."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch


class WeightedMeanPerKey:
    r"""Running per-key weighted mean over replies that may cover different key subsets.

    For every key :math:`k`, after folding replies :math:`i` with weights :math:`w_i`,

    .. math:: \bar x_k = \frac{\sum_{i \ni k} w_i x_{i,k}}{\sum_{i \ni k} w_i},

    where the sums run over the replies that contain :math:`k`. Memory is one float64 buffer
    per key that was sent at least once, never one per reply.
    """

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._weights: dict[str, float] = {}

    def add(self, arrays: Mapping[str, np.ndarray], weight: float) -> None:
        """Fold one reply's arrays, all with the same ``weight``."""
        for key, value in arrays.items():
            term = torch.from_numpy(np.asarray(value))
            if key not in self._sums:
                self._sums[key] = torch.zeros(term.shape, dtype=torch.float64)
                self._weights[key] = 0.0
            self._sums[key].add_(term, alpha=weight)  # casts on the fly: no full-size temporary
            self._weights[key] += weight

    @property
    def keys(self) -> set[str]:
        return set(self._sums)

    def means(self) -> dict[str, torch.Tensor]:
        """The weighted mean of every key folded so far, as float32."""
        return {k: (s / self._weights[k]).to(torch.float32) for k, s in self._sums.items()}


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
