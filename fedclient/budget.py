"""Simulated per-site layer budgets (how many layers a site can afford to train).

A real site declares its budget with ``--node-config layer-budget=N``. In simulation each virtual
site draws one from the run config's ``layer-budget`` spec, reproducibly from (seed, partition):

- ``"N"``: every site can train N layers;
- ``"uniform:LOW:HIGH"``: uniform over the integers LOW..HIGH;
- ``"truncnorm:LOW:HIGH"``: round(x) with x ~ Normal(LOW, 1) truncated to [LOW, HIGH], the paper's
  distribution (Sun et al. draw truncnorm(a=n_layers-1, b=n_layers_inc+1, loc=1, scale=1), i.e.
  most sites at the low end), e.g. ``truncnorm:1:6``.
"""

from __future__ import annotations

import numpy as np


def draw_budget(spec: str, seed: int, partition_id: int) -> int:
    """The budget of simulated site ``partition_id`` under ``spec`` (see module docstring)."""
    kind, _, bounds = spec.partition(":")
    try:
        if not bounds:
            budget = int(kind)
            if budget < 0:
                raise ValueError
            return budget
        low, high = (int(b) for b in bounds.split(":"))
    except ValueError as err:
        raise ValueError(
            f"layer-budget '{spec}' is not N, uniform:LOW:HIGH or truncnorm:LOW:HIGH with whole numbers"
        ) from err
    if not 0 <= low <= high:
        raise ValueError(f"layer-budget '{spec}': need 0 <= LOW <= HIGH")
    rng = np.random.default_rng([seed, partition_id, 7919])
    if kind == "uniform":
        return int(rng.integers(low, high + 1))
    if kind == "truncnorm":
        while True:
            x = rng.normal(low, 1.0)
            if low <= x <= high:
                return int(min(high, max(low, round(x))))
    raise ValueError(f"layer-budget '{spec}': unknown distribution '{kind}'; use uniform or truncnorm")
