r"""Ferret: first-order local training, updates sent as coefficients on seeded random bases.

Shu, Hu, Ng, Low, Yu, "Ferret: Federated Full-Parameter Tuning at Scale for Large Language
Models", ICML 2025 (arXiv 2409.06277). Round :math:`r`, client :math:`i`:

1. Bring the global weights to :math:`w_{r-1}` by replaying the aggregated coefficients of the
   rounds it has not applied yet (:class:`~aggregators.shared_randomness.ReplayAlgorithm`).
2. Take :math:`T` first-order local steps (AdamW here; the paper allows any optimizer) from
   :math:`w_{r-1}` to :math:`w_{r,T}`; :math:`\Delta_i = w_{r-1} - w_{r,T}`.
3. Block-wise projection: the weight vector is cut into blocks :math:`l` of :math:`d_l` elements;
   block :math:`l` gets :math:`K_l \approx K d_l / d` bases :math:`V_l \in \mathbb{R}^{K_l\times d_l}`
   with i.i.d. entries from N(0, 1) truncated to :math:`[-1/\sqrt{d_l}, 1/\sqrt{d_l}]`, generated
   from a derived seed (never sent), and the client sends

   .. math:: \gamma_{i,l} = \frac{1}{\rho_l K_l} V_l \Delta_{i,l},
      \qquad \rho_l = \operatorname{Var}[v] = 1 - \frac{2a\varphi(a)}{2\Phi(a) - 1},\ a = d_l^{-1/2}

   (:math:`\rho_l \approx 1/(3 d_l)`): :math:`\sum_l K_l` fp32 values, independent of :math:`d`.
   Since :math:`E[V_l^\top V_l] = \rho_l K_l I`, the reconstruction :math:`V_l^\top\gamma_{i,l}` is an
   unbiased estimate of :math:`\Delta_{i,l}` (Thm. 1) with error :math:`O(d_l/K_l)`.
4. The server averages coefficients with example weights :math:`\omega_i = n_i/\sum_j n_j` and
   every party applies :math:`w_r = w_{r-1} - \eta_s \sum_i \omega_i V_{i}^\top \gamma_i`
   (:math:`\eta_s` = ``server-lr``, 1 in the paper).

Bases. ``ferret-seeds = "client"`` is the paper: each client projects on its own bases, so a
round's ledger entry holds one coefficient vector per client and every party regenerates
:math:`|S|` basis sets to replay it. ``"round"`` (default) is the released code's shared pool, per
round: all clients of a round use the same bases, so the server averages the coefficients and a
replay costs one basis set (:math:`|S|`× less download and generation). Both reconstructions are
unbiased; per-client bases average :math:`|S|` independent projection errors.

Costs. Generating the bases of one round is :math:`\sum_l K_l d_l \approx K \cdot` ``block-size``
numbers, so small blocks keep it cheap; the error is :math:`\sum_l (d_l/K_l)\lVert\Delta_l\rVert^2
\approx (d/K)\lVert\Delta\rVert^2` whatever the block size. Not copied from the reference code: its
:math:`d_l/K_l` scaling (biased by 1/3, compensated by a server lr of 10), its data-dependent
:math:`K_l` (leaks per-block update norms), its per-(seed, block) clipping and server momentum, and
its fp16 server model.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from aggregators.base import (
    FieldKind,
    AggregateResult,
    ClientId,
    GlobalState,
    Payload,
    PayloadError,
    Reply,
    check_max_site_weight,
    check_weight,
)
from aggregators.fedavg import derive_seed
from aggregators.local_training import TrainerOptions, check_local_training, instructed_training, train_steps
from aggregators.shared_randomness import (
    Manifest,
    ReplayAlgorithm,
    bind_parameters,
    for_each_block,
    seeded_noise,
    truncated_normal_variance,
)
from aggregators.streaming import WeightedMetricMeans, capped_weights

COEFFICIENTS = "coefficients"
SEED_MODES = ("round", "client")
SHARED = -1  # the client slot of bases shared by every client of a round


@dataclass
class FerretConfig:
    """Hyper-parameters (run-config keys: ``lr``, ``local-steps``, ``ferret-bases``...)."""

    lr: float = 5e-4
    local_steps: int = 4
    batch_size: int = 16
    weight_decay: float = 0.0
    seed: int = 0
    num_server_rounds: int = 0  # the run's length, for a learning-rate schedule over all its rounds
    trainer: TrainerOptions = field(default_factory=TrainerOptions)
    ferret_bases: int = 15000
    ferret_block_size: int = 4096
    ferret_seeds: str = "round"
    server_lr: float = 1.0
    hash_every: int = 1
    max_site_weight: float = 1.0  # the largest share one site may have in the weighted mean (1: uncapped)

    def __post_init__(self) -> None:
        check_local_training(self.lr, self.local_steps, self.batch_size)
        check_max_site_weight(self.max_site_weight)
        if self.ferret_bases < 1:
            raise ValueError(f"ferret-bases must be at least 1, got {self.ferret_bases}")
        if self.ferret_block_size < 1:
            raise ValueError(f"ferret-block-size must be at least 1, got {self.ferret_block_size}")
        if self.ferret_seeds not in SEED_MODES:
            raise ValueError(f"ferret-seeds must be one of {', '.join(SEED_MODES)}, got '{self.ferret_seeds}'")
        if not self.server_lr > 0:
            raise ValueError(f"server-lr must be positive, got {self.server_lr}")
        if self.hash_every < 1:
            raise ValueError(f"hash-every must be at least 1, got {self.hash_every}")


def bases_per_block(manifest: Manifest, total: int) -> np.ndarray:
    """:math:`K_l = \\max(1, \\operatorname{round}(K d_l / d))` for every block (depends only on the
    manifest and :math:`K`, never on data)."""
    sizes = np.array([manifest.block_numel(b) for b in range(manifest.num_blocks)], dtype=np.float64)
    return np.maximum(1, np.rint(total * sizes / manifest.numel)).astype(np.int64)


def _offsets(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)])


def bases(manifest: Manifest, run_seed: int, server_round: int, client: int, block: int, rows: int) -> torch.Tensor:
    """The ``rows`` × ``d_l`` truncated-normal bases of one block, round and client slot."""
    return seeded_noise(manifest, run_seed, server_round, client, block, 0, rows=rows, distribution="truncated-normal")


def project(
    delta: torch.Tensor, manifest: Manifest, run_seed: int, server_round: int, client: int, total: int
) -> np.ndarray:
    r""":math:`\gamma_l = V_l \Delta_l / (\rho_l K_l)` for every block, concatenated (fp32)."""
    counts = bases_per_block(manifest, total)
    offsets = _offsets(counts)
    out = torch.empty(int(offsets[-1]), dtype=torch.float32)

    def work(block: int) -> None:
        rows, piece = int(counts[block]), manifest.block_slice(block)
        rho = truncated_normal_variance(1.0 / math.sqrt(piece.stop - piece.start))
        basis = bases(manifest, run_seed, server_round, client, block, rows)
        out[offsets[block] : offsets[block + 1]] = (basis @ delta[piece]) / (rho * rows)

    for_each_block(manifest, work)
    return out.numpy()


def reconstruct_into(
    vector: torch.Tensor, manifest: Manifest, run_seed: int, server_round: int,
    clients: np.ndarray, coefficients: np.ndarray, total: int, *, sign: float = -1.0,
) -> None:
    r"""``vector += sign · Σ_i V_iᵀ γ_i`` block by block (``clients[i]`` the basis slot of row ``i``)."""
    counts = bases_per_block(manifest, total)
    offsets = _offsets(counts)
    coefficients = torch.from_numpy(np.ascontiguousarray(coefficients, dtype=np.float32))

    def work(block: int) -> None:
        rows, piece = int(counts[block]), manifest.block_slice(block)
        for row, client in enumerate(clients.tolist()):
            basis = bases(manifest, run_seed, server_round, int(client), block, rows)
            vector[piece] += sign * (coefficients[row, offsets[block] : offsets[block + 1]] @ basis)

    for_each_block(manifest, work)


class Ferret(ReplayAlgorithm):
    """Ferret (see module docstring)."""

    name = "ferret"
    config_class = FerretConfig

    def __init__(self, config: FerretConfig | None = None) -> None:
        super().__init__()
        self.config = config or FerretConfig()
        self.block_size = self.config.ferret_block_size
        self.hash_every = self.config.hash_every
        self.secure_aggregation_incompatibility = (  # type: ignore[misc]
            "" if self.config.ferret_seeds == "round" else
            "ferret-seeds=client gives each site bases of its own, so sites' coefficients do not line up; "
            "use ferret-seeds=round")

    def payload_kind(self, name: str, parameters: Collection[str]) -> FieldKind | None:
        return FieldKind.SUMMED if name == COEFFICIENTS else None

    def summed_length(self, name: str) -> int:
        return self.num_coefficients if name == COEFFICIENTS and self.manifest is not None else 0

    @property
    def num_coefficients(self) -> int:
        assert self.manifest is not None, "init_state first"
        return int(bases_per_block(self.manifest, self.config.ferret_bases).sum())

    # ---- server half -------------------------------------------------------------------------
    def replay_config(self) -> dict[str, Any]:
        return {"noise-seed": self.config.seed, "ferret-bases": self.config.ferret_bases}

    def _slot(self, client: ClientId) -> int:
        return int(client) if self.config.ferret_seeds == "client" else SHARED

    def round_config(self, server_round: int, client: ClientId) -> dict[str, Any]:
        cfg = self.config
        return {
            "lr": cfg.lr, "local-steps": cfg.local_steps, "batch-size": cfg.batch_size,
            "weight-decay": cfg.weight_decay, "seed": derive_seed(cfg.seed, server_round, client),
            "basis-slot": self._slot(client),
            **cfg.trainer.instruction(server_round, cfg.local_steps, cfg.num_server_rounds),
        }

    def round_entry(
        self, server_round: int, state: GlobalState, replies: Iterable[Reply], result: AggregateResult
    ) -> dict[str, np.ndarray]:
        accepted: dict[ClientId, tuple[float, np.ndarray]] = {}  # K coefficients each: kept until the cap is known
        losses = WeightedMetricMeans()
        for reply in replies:
            try:
                weight = self._validate(reply)
            except PayloadError as err:
                result.rejected[reply.client] = str(err)
                continue
            accepted[reply.client] = (weight, reply.payload.arrays[COEFFICIENTS])
            result.accepted.append(reply.client)
            losses.add(reply.payload.metrics, weight)
        result.metrics.update(losses.means())
        if not accepted:
            return {}
        weights = capped_weights({c: w for c, (w, _) in accepted.items()}, self.config.max_site_weight)
        rows: dict[int, np.ndarray] = {}  # basis slot -> example-weighted coefficient sum
        for client, (_, values) in accepted.items():
            slot, coefficients = self._slot(client), values.astype(np.float64) * weights[client]
            rows[slot] = rows[slot] + coefficients if slot in rows else coefficients
        total_weight = sum(weights.values())
        slots = sorted(rows)
        scale = self.config.server_lr / total_weight
        entry = {COEFFICIENTS: np.stack([rows[s] * scale for s in slots]).astype(np.float32)}
        if self.config.ferret_seeds == "client":
            entry["clients"] = np.asarray(slots, dtype=np.uint64)
        return entry

    def _validate(self, reply: Reply) -> float:
        weight = check_weight(reply.client, reply.payload.num_examples)
        arrays = reply.payload.arrays
        if set(arrays) != {COEFFICIENTS}:
            raise PayloadError(f"client {reply.client}: expected exactly '{COEFFICIENTS}', got {sorted(arrays)}")
        value = arrays[COEFFICIENTS]
        if value.dtype != np.float32 or value.shape != (self.num_coefficients,):
            raise PayloadError(
                f"client {reply.client}: '{COEFFICIENTS}' must be float32 of shape ({self.num_coefficients},), "
                f"got {value.dtype} {value.shape}"
            )
        if not np.isfinite(value).all():
            raise PayloadError(f"client {reply.client}: '{COEFFICIENTS}' contains NaN or infinite values")
        return weight

    @staticmethod
    def apply_entry(vector, manifest, server_round, entry, replay) -> None:
        coefficients = entry[COEFFICIENTS]
        clients = entry["clients"].astype(np.int64) if "clients" in entry else np.full(1, SHARED, dtype=np.int64)
        if coefficients.ndim != 2 or coefficients.shape[0] != len(clients):
            raise ValueError(f"round {server_round}: ledger entry has {coefficients.shape} coefficients "
                             f"for {len(clients)} basis sets")
        reconstruct_into(vector, manifest, int(replay["noise-seed"]), server_round, clients, coefficients,
                         int(replay["ferret-bases"]))

    # ---- client half -------------------------------------------------------------------------
    def local(self, model, data, instruction, client_state: dict[str, Any]) -> Payload:
        manifest, start = self.synced_vector(model, instruction, client_state)
        cfg = instruction.config
        device = next(model.parameters()).device
        weights = start.to(device, copy=True)
        bind_parameters(model, manifest, weights)
        stats = train_steps(model, data, trainable=manifest.names, **instructed_training(cfg))
        delta = start - weights.detach().to("cpu")
        coefficients = project(delta, manifest, int(cfg["noise-seed"]), int(cfg["server-round"]),
                               int(cfg["basis-slot"]), int(cfg["ferret-bases"]))
        return Payload(
            {COEFFICIENTS: coefficients},
            data.num_examples,
            {"train-loss": stats.mean_loss, "train-seconds": stats.seconds,
             "update-norm": float(delta.norm())},
        )
