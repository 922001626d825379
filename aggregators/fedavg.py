r"""FedAvg: federated averaging weighted by example counts.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
AISTATS 2017. Each sampled client :math:`i` starts from the global parameters :math:`\theta^t`,
runs :math:`E` local optimizer steps on its data, and returns :math:`\theta_i^{t+1}`; the server sets

.. math:: \theta^{t+1}_k = \frac{\sum_{i \in S_k} n_i\, \theta^{t+1}_{i,k}}{\sum_{i \in S_k} n_i}

for every parameter tensor :math:`k`, where :math:`n_i` is client :math:`i`'s example count and
:math:`S_k` the clients whose reply carries :math:`k`. Example counts are self-reported, so
``max-site-weight`` :math:`c` caps any one client's share :math:`n_i / \sum_j n_j` at :math:`c`
(weights above the threshold :func:`~aggregators.streaming.share_cap` finds are lowered to it). Unlike Flower's built-in strategies, replies
may cover different key subsets; a key nobody sent keeps its value. Aggregation streams: each
reply is validated, folded into per-key running sums and dropped (memory O(model)).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from aggregators.base import (
    AggregateResult,
    Algorithm,
    ClientId,
    GlobalState,
    Instruction,
    LocalData,
    Payload,
    PayloadError,
    Reply,
    check_arrays,
    check_max_site_weight,
    check_weight,
)
from aggregators.local_training import TrainerOptions, check_local_training, instructed_training, train_steps
from aggregators.streaming import WeightedMeanPerKey, WeightedMetricMeans


def derive_seed(*parts: int) -> int:
    """A 31-bit seed determined by ``parts`` (run seed, round, client...)."""
    return int(np.random.SeedSequence([p % (2**63) for p in parts]).generate_state(1)[0] >> 1)


@dataclass
class FedAvgConfig:
    """Hyper-parameters of FedAvg's local training."""

    lr: float = 5e-4
    local_steps: int = 4
    batch_size: int = 16
    weight_decay: float = 0.0
    seed: int = 0
    num_server_rounds: int = 0  # the run's length, for a learning-rate schedule over all its rounds
    trainer: TrainerOptions = field(default_factory=TrainerOptions)
    max_site_weight: float = 1.0  # the largest share one site may have in the weighted mean (1: uncapped)

    def __post_init__(self) -> None:
        check_local_training(self.lr, self.local_steps, self.batch_size)
        check_max_site_weight(self.max_site_weight)


class FedAvg(Algorithm):
    """Federated averaging over the parameters the federation owns (see module docstring)."""

    name = "fedavg"
    config_class = FedAvgConfig
    update_kind = "weights"
    resumable = True
    secure_aggregation_incompatibility = ""  # its aggregate is the example-weighted mean of the replies

    def __init__(self, config: FedAvgConfig | None = None) -> None:
        self.config = config or FedAvgConfig()

    # ---- server half -------------------------------------------------------------------------
    def plan(
        self,
        server_round: int,
        clients: Sequence[ClientId],
        state: GlobalState,
        probes: Mapping[ClientId, Payload] | None = None,
    ) -> dict[ClientId, Instruction]:
        arrays = {k: v.numpy() for k, v in state.items()}  # one shared dict: encoded once
        cfg = self.config
        return {
            client: Instruction(
                arrays=arrays,
                config={
                    "lr": cfg.lr,
                    "local-steps": cfg.local_steps,
                    "batch-size": cfg.batch_size,
                    "weight-decay": cfg.weight_decay,
                    "seed": derive_seed(cfg.seed, server_round, client),
                    **cfg.trainer.instruction(server_round, cfg.local_steps, cfg.num_server_rounds),
                },
            )
            for client in clients
        }

    def aggregate(
        self, server_round: int, state: GlobalState, replies: Iterable[Reply]
    ) -> AggregateResult:
        mean = WeightedMeanPerKey(self.config.max_site_weight)
        result = AggregateResult(state=state)
        losses = WeightedMetricMeans()
        for reply in replies:
            try:
                weight = self._validate(reply, state)
            except PayloadError as err:
                result.rejected[reply.client] = str(err)
                continue
            mean.add(reply.payload.arrays, weight)
            result.accepted.append(reply.client)
            losses.add(reply.payload.metrics, weight)
        result.state = {**state, **mean.means()}
        result.metrics.update(losses.means())
        return result

    @staticmethod
    def _validate(reply: Reply, state: GlobalState) -> float:
        """Check a whole reply before any of it is folded; return its weight."""
        weight = check_weight(reply.client, reply.payload.num_examples)
        check_arrays(reply.client, reply.payload.arrays, state)
        return weight

    # ---- client half -------------------------------------------------------------------------
    def local(
        self,
        model: torch.nn.Module,
        data: LocalData,
        instruction: Instruction,
        client_state: dict[str, Any],
    ) -> Payload:
        cfg = instruction.config
        keys = list(instruction.arrays)
        params = dict(model.named_parameters())
        unknown = [k for k in keys if k not in params]
        if unknown:
            raise KeyError(f"instruction names parameters this model lacks: {unknown[:5]}")
        with torch.no_grad():
            for key in keys:
                params[key].copy_(torch.from_numpy(np.asarray(instruction.arrays[key])))
        stats = train_steps(model, data, trainable=keys, **instructed_training(cfg))
        arrays = {k: params[k].detach().to("cpu", torch.float32).numpy().copy() for k in keys}
        return Payload(
            arrays=arrays,
            num_examples=data.num_examples,
            metrics={"train-loss": stats.mean_loss, "train-seconds": stats.seconds},
        )
