"""fedtune's federated algorithms: one module per method, each with its server and client half.

Pure torch/numpy; nothing here imports Flower. Look algorithms up by name with
:func:`make_algorithm`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from aggregators.base import Algorithm, Instruction, Payload, PayloadError, Reply
from aggregators.fedavg import FedAvg
from aggregators.ferret import Ferret
from aggregators.rank_based import RankBased
from aggregators.selective_layer import SelectiveLayer
from aggregators.zeroth_order import FedKSeed, FedKSeedPro, OneByte

ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (FedAvg, SelectiveLayer, Ferret, FedKSeed, FedKSeedPro, OneByte, RankBased)
}


def make_algorithm(name: str, config: Mapping[str, Any] | None = None) -> Algorithm:
    """Build the algorithm registered as ``name`` from a run config.

    ``config`` uses the run config's kebab-case keys (``local-steps``); keys the algorithm's
    config class does not have are ignored, so one run config can serve every algorithm.
    """
    if name not in ALGORITHMS:
        raise ValueError(f"unknown strategy '{name}'; choose one of: {', '.join(sorted(ALGORITHMS))}")
    cls = ALGORITHMS[name]
    config_class = getattr(cls, "config_class", None)
    if config_class is None:
        return cls()
    fields = {f.name for f in dataclasses.fields(config_class)}
    kwargs = {}
    for key, value in (config or {}).items():
        attr = key.replace("-", "_")
        if attr in fields:
            kwargs[attr] = value
    return cls(config_class(**kwargs))


__all__ = ["ALGORITHMS", "Algorithm", "Instruction", "Payload", "PayloadError", "Reply", "make_algorithm"]
