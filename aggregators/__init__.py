"""fedtune's federated algorithms: one module per method, each with its server and client half.

Pure torch/numpy; nothing here imports Flower. Look algorithms up by name with
:func:`make_algorithm`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from aggregators.base import Algorithm, Instruction, Payload, PayloadError, Reply
from aggregators.compression import Codec, CompressedUpdates
from aggregators.controlled_averaging import Scafcom, Scallion
from aggregators.fedavg import FedAvg
from aggregators.local_training import TrainerOptions
from aggregators.ferret import Ferret
from aggregators.rank_based import RankBased
from aggregators.selective_layer import SelectiveLayer
from aggregators.zeroth_order import FedKSeed, FedKSeedPro, OneByte

ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls
    for cls in (FedAvg, SelectiveLayer, Ferret, FedKSeed, FedKSeedPro, OneByte, RankBased, Scallion, Scafcom)
}


def make_algorithm(
    name: str, config: Mapping[str, Any] | None = None, wrap: Callable[[Algorithm], Algorithm] | None = None
) -> Algorithm:
    """Build the algorithm registered as ``name`` from a run config.

    ``config`` uses the run config's kebab-case keys (``local-steps``); keys the algorithm's
    config class does not have are ignored, so one run config can serve every algorithm. A
    ``codec`` other than ``none`` wraps a dense-update algorithm in
    :class:`~aggregators.compression.CompressedUpdates` (SCALLION/SCAFCOM take it themselves).
    ``wrap`` (e.g. the client's local-DP wrapper) goes around the bare algorithm, inside the
    codec, so a site privatizes its update before compressing it.
    """
    if name not in ALGORITHMS:
        raise ValueError(f"unknown strategy '{name}'; choose one of: {', '.join(sorted(ALGORITHMS))}")
    cls = ALGORITHMS[name]
    config = dict(config or {})
    config_class = getattr(cls, "config_class", None)
    fields = {f.name for f in dataclasses.fields(config_class)} if config_class else set()
    kwargs = {key.replace("-", "_"): value for key, value in config.items() if key.replace("-", "_") in fields}
    if "trainer" in fields:  # an algorithm that trains with gradients takes the trainer options
        kwargs["trainer"] = TrainerOptions.from_config(config)
    algorithm = cls(config_class(**kwargs)) if config_class else cls()
    if wrap is not None:
        algorithm = wrap(algorithm)
    codec = Codec.parse(str(config.get("codec", "")))
    if "codec" in fields or codec.is_identity:
        return algorithm
    return CompressedUpdates(algorithm, codec, seed=int(config.get("seed", 0)))


def takes_trainer_options(name: str) -> bool:
    """Whether strategy ``name`` trains with gradients through :func:`~aggregators.local_training.train_steps`
    and so honours :class:`~aggregators.local_training.TrainerOptions` (its config has ``trainer``)."""
    config_class = getattr(ALGORITHMS[name], "config_class", None)
    return config_class is not None and "trainer" in {f.name for f in dataclasses.fields(config_class)}


__all__ = ["ALGORITHMS", "Algorithm", "Codec", "Instruction", "Payload", "PayloadError", "Reply", "make_algorithm"]
