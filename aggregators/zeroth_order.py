r"""Zeroth-order federated fine-tuning on a finite pool of shared seeds: FedKSeed, FedKSeed-Pro and
the one-byte scheme. Clients upload scalars, never weights; every party rebuilds the weights.

**FedKSeed** (Qin et al., "Federated Full-Parameter Tuning of Billion-Sized Language Models with
Communication Cost under 18 Kilobytes", ICML 2024, arXiv 2312.06353). Every party knows a pool of
:math:`K` seeds; seed :math:`k` names the direction :math:`z_k \sim N(0, I_d)` drawn by
:func:`~aggregators.shared_randomness.seeded_noise` (round slot 0: the pool is fixed for the run).
A client takes :math:`\tau` SPSA steps from the global weights, each on one mini-batch :math:`B_t`:

.. math:: k_t \sim p,\quad \hat g_t = \frac{\ell(\theta + \epsilon z_{k_t}; B_t) - \ell(\theta - \epsilon z_{k_t}; B_t)}{2\epsilon},
   \quad \theta \leftarrow \theta - \eta\, \hat g_t z_{k_t}

and uploads the pairs :math:`(k_t, \hat g_t)` (uint16 index + fp32 scalar: 6 bytes per step). The
server sums them per seed, :math:`a_i[k] = \sum_{t: k_t = k} \hat g_t`, averages over clients with
example weights, :math:`\bar a[k] = \sum_i \omega_i a_i[k]`, adds :math:`\bar a` to the accumulated
per-seed sums :math:`A` and every party applies :math:`w_r = w_{r-1} - \eta \sum_k \bar a[k] z_k`,
so that :math:`w_r = w_0 - \eta\sum_k A_r[k] z_k`: the model is the pretrained weights plus the
ledger. Replay is incremental (each round's touched seeds, in ascending order) rather than a
rebuild from :math:`w_0` each round: the same model in exact arithmetic at
:math:`\min(K, \tau|S|)\cdot d` instead of :math:`\mathrm{nnz}(A)\cdot d` generation per round; a
client that joins late replays the ledger from :math:`w_0` (or downloads the weights when that is
smaller). Perturbations are evaluated in eval mode (no dropout), so :math:`\ell(\theta\pm\epsilon
z)` differ only by the perturbation, and from an exact copy of :math:`\theta` (no drift from
adding and subtracting :math:`\epsilon z` in fp32).

**FedKSeed-Pro** samples :math:`k_t \sim p` instead of uniformly, with
:math:`p = \operatorname{softmax}(\operatorname{minmax}(\bar{|g|}))` where :math:`\bar{|g|}_k` is
the mean of :math:`|\operatorname{clip}(\hat g, -C, C)|` over every scalar the server has received
for seed :math:`k` (history initialised with one 0, :math:`C` = 1000, as in the released code).
The server keeps the histories and sends :math:`p` (:math:`4K` bytes) each round.

**One byte** (Zelikman et al., "Just One Byte (per gradient)", arXiv 2306.10015, 2023): all
:math:`\tau` estimates are taken at the same weights (the paper's gradient accumulation: no local
steps), the seed of step :math:`t` is drawn from the pool by a PRNG keyed by (run seed, round,
client), which the server re-derives, and each :math:`\hat g_t` travels as one byte
(:class:`~aggregators.shared_randomness.OneByteCodec`: sign + 7-bit log magnitude): the upload is
exactly :math:`\tau` bytes. The reference code's one-byte path was dead code and its 255-level
signed code needed 9 bits; this one is 8 bits.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

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
from aggregators.local_training import batch_loss, to_device
from aggregators.shared_randomness import (
    Manifest,
    OneByteCodec,
    ReplayAlgorithm,
    bind_parameters,
    for_each_block,
    seeded_noise,
)
from aggregators.streaming import WeightedMetricMeans, capped_weights

SEED_INDEX, SEED_SCALAR, SEED_CODE = "seed-index", "seed-scalar", "seed-code"
PROBABILITIES = "seed-probabilities"
POOL_ROUND, POOL_CLIENT = 0, -1  # the key slots of the fixed seed pool
PRO_CLIP = 1000.0
REPLAY_CHUNK = 16  # directions generated and applied together (fixes the summation order)


@dataclass
class ZerothOrderConfig:
    """Hyper-parameters (run-config keys: ``seed-pool``, ``zo-steps``, ``zo-lr``, ``zo-eps``...)."""

    seed_pool: int = 1024
    zo_steps: int = 100
    zo_lr: float = 2e-3
    zo_eps: float = 1e-3
    batch_size: int = 16
    seed: int = 0
    hash_every: int = 1
    zo_block_size: int = 1 << 18
    one_byte_low: float = 1e-6
    one_byte_high: float = 1e2
    max_site_weight: float = 1.0  # the largest share one site may have in the weighted mean (1: uncapped)

    def __post_init__(self) -> None:
        check_max_site_weight(self.max_site_weight)
        if not 1 <= self.seed_pool <= 2**32:
            raise ValueError(f"seed-pool must be between 1 and 2^32, got {self.seed_pool}")
        if self.zo_steps < 1:
            raise ValueError(f"zo-steps must be at least 1, got {self.zo_steps}")
        for name in ("zo_lr", "zo_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.batch_size < 1:
            raise ValueError(f"batch-size must be at least 1, got {self.batch_size}")
        if self.hash_every < 1:
            raise ValueError(f"hash-every must be at least 1, got {self.hash_every}")
        if self.zo_block_size < 1:
            raise ValueError(f"zo-block-size must be at least 1, got {self.zo_block_size}")
        OneByteCodec(self.one_byte_low, self.one_byte_high)  # validates the range


def index_dtype(pool: int) -> np.dtype:
    return np.dtype(np.uint16) if pool <= 2**16 else np.dtype(np.uint32)


def direction(manifest: Manifest, run_seed: int, seed_index: int) -> torch.Tensor:
    """:math:`z_k` over the whole weight vector (fp32, CPU)."""
    return torch.cat([
        seeded_noise(manifest, run_seed, POOL_ROUND, POOL_CLIENT, block, int(seed_index))
        for block in range(manifest.num_blocks)
    ])


def replay_steps(
    vector: torch.Tensor, manifest: Manifest, run_seed: int, indices: np.ndarray, steps: np.ndarray
) -> None:
    r"""``vector -= Σ_j steps[j] · z_{indices[j]}``, in the given order, block by block."""
    weights = torch.from_numpy(np.ascontiguousarray(steps, dtype=np.float32))
    seeds = [int(k) for k in indices]

    def work(block: int) -> None:
        piece = manifest.block_slice(block)
        for start in range(0, len(seeds), REPLAY_CHUNK):
            chunk = seeds[start : start + REPLAY_CHUNK]
            noise = torch.stack([seeded_noise(manifest, run_seed, POOL_ROUND, POOL_CLIENT, block, k) for k in chunk])
            vector[piece] -= weights[start : start + len(chunk)] @ noise

    for_each_block(manifest, work)


def pro_probabilities(abs_sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """FedKSeed-Pro: softmax of the min-max normalised mean absolute (clipped) scalar per seed,
    each seed's history starting with one 0."""
    amplitude = abs_sums / (counts + 1.0)
    normalised = (amplitude - amplitude.min()) / (amplitude.max() - amplitude.min() + 1e-10)
    weights = np.exp(normalised - normalised.max())
    return weights / weights.sum()


class FedKSeed(ReplayAlgorithm):
    """FedKSeed: τ sequential SPSA steps on pool seeds drawn uniformly (see module docstring)."""

    name = "fedkseed"
    config_class = ZerothOrderConfig
    pro: ClassVar[bool] = False
    one_byte: ClassVar[bool] = False
    secure_aggregation_incompatibility = (
        "each site's scalars sit at pool seeds it drew from its own seed; a seed only one site drew would be that "
        "site's scalar in the sum (summing needs seeds common to the round's sites: not yet)")

    def payload_kind(self, name: str, parameters: Collection[str]) -> FieldKind | None:
        return {SEED_INDEX: FieldKind.PUBLIC_INDEX, SEED_SCALAR: FieldKind.SCALARS,
                SEED_CODE: FieldKind.ONE_BYTE_CODES}.get(name)


    def __init__(self, config: ZerothOrderConfig | None = None) -> None:
        super().__init__()
        self.config = config or ZerothOrderConfig()
        self.block_size = self.config.zo_block_size
        self.hash_every = self.config.hash_every
        self.codec = OneByteCodec(self.config.one_byte_low, self.config.one_byte_high)
        pool = self.config.seed_pool
        self.accumulated = np.zeros(pool, dtype=np.float64)  # A[k]: the per-seed sums of every round
        self.abs_sums = np.zeros(pool, dtype=np.float64)  # Pro: history of |clip(g)| per seed
        self.counts = np.zeros(pool, dtype=np.float64)

    # ---- server half -------------------------------------------------------------------------
    def replay_config(self) -> dict[str, Any]:
        return {"noise-seed": self.config.seed}

    def round_config(self, server_round: int, client: ClientId) -> dict[str, Any]:
        cfg = self.config
        return {
            "seed-pool": cfg.seed_pool, "zo-steps": cfg.zo_steps, "zo-lr": cfg.zo_lr, "zo-eps": cfg.zo_eps,
            "batch-size": cfg.batch_size, "seed": derive_seed(cfg.seed, server_round, client),
            "one-byte-low": cfg.one_byte_low, "one-byte-high": cfg.one_byte_high,
        }

    def round_arrays(self, server_round: int) -> dict[str, np.ndarray]:
        if not self.pro:
            return {}
        return {PROBABILITIES: pro_probabilities(self.abs_sums, self.counts).astype(np.float32)}

    def round_entry(
        self, server_round: int, state: GlobalState, replies: Iterable[Reply], result: AggregateResult
    ) -> dict[str, np.ndarray]:
        pool = self.config.seed_pool
        sums = np.zeros(pool, dtype=np.float64)
        touched = np.zeros(pool, dtype=bool)
        losses = WeightedMetricMeans()
        accepted: dict[ClientId, tuple[float, np.ndarray, np.ndarray]] = {}  # τ pairs each
        for reply in replies:
            try:
                weight = check_weight(reply.client, reply.payload.num_examples)
                indices, scalars = self._decode(server_round, reply)
            except PayloadError as err:
                result.rejected[reply.client] = str(err)
                continue
            accepted[reply.client] = (weight, indices, scalars)
            touched[indices] = True
            if self.pro:
                np.add.at(self.abs_sums, indices, np.abs(np.clip(scalars, -PRO_CLIP, PRO_CLIP)))
                np.add.at(self.counts, indices, 1.0)
            result.accepted.append(reply.client)
            losses.add(reply.payload.metrics, weight)
        result.metrics.update(losses.means())
        if not result.accepted:
            return {}
        weights = capped_weights({c: w for c, (w, _, _) in accepted.items()}, self.config.max_site_weight)
        for client, (_, indices, scalars) in accepted.items():
            np.add.at(sums, indices, weights[client] * scalars)
        mean = sums / sum(weights.values())
        self.accumulated += mean
        seeds = np.flatnonzero(touched & (mean != 0.0))
        result.metrics["seeds-touched"] = float(len(seeds))
        return {
            SEED_INDEX: seeds.astype(np.uint32),
            "step": (self.config.zo_lr * mean[seeds]).astype(np.float32),
        }

    def one_byte_indices(self, server_round: int, client: ClientId) -> np.ndarray:
        """The seed of each step of a one-byte client, re-derivable by the server."""
        return _keyed_indices(derive_seed(self.config.seed, server_round, client), self.config.seed_pool,
                              self.config.zo_steps)

    def _decode(self, server_round: int, reply: Reply) -> tuple[np.ndarray, np.ndarray]:
        """A reply's (seed index, scalar) pairs, validated; raises PayloadError."""
        client, arrays, steps = reply.client, reply.payload.arrays, self.config.zo_steps
        if self.one_byte:
            if set(arrays) != {SEED_CODE}:
                raise PayloadError(f"client {client}: expected exactly '{SEED_CODE}', got {sorted(arrays)}")
            codes = arrays[SEED_CODE]
            if codes.dtype != np.uint8 or codes.shape != (steps,):
                raise PayloadError(f"client {client}: '{SEED_CODE}' must be uint8 of shape ({steps},), "
                                   f"got {codes.dtype} {codes.shape}")
            return self.one_byte_indices(server_round, client), self.codec.decode(codes).astype(np.float64)
        if set(arrays) != {SEED_INDEX, SEED_SCALAR}:
            raise PayloadError(f"client {client}: expected '{SEED_INDEX}' and '{SEED_SCALAR}', got {sorted(arrays)}")
        indices, scalars = arrays[SEED_INDEX], arrays[SEED_SCALAR]
        if indices.dtype.kind != "u" or indices.ndim != 1 or len(indices) > steps:
            raise PayloadError(f"client {client}: '{SEED_INDEX}' must be at most {steps} unsigned integers")
        if scalars.dtype != np.float32 or scalars.shape != indices.shape:
            raise PayloadError(f"client {client}: '{SEED_SCALAR}' must be float32 of shape {indices.shape}")
        if len(indices) and int(indices.max()) >= self.config.seed_pool:
            raise PayloadError(f"client {client}: seed index {int(indices.max())} is outside the pool of "
                               f"{self.config.seed_pool}")
        if not np.isfinite(scalars).all():
            raise PayloadError(f"client {client}: '{SEED_SCALAR}' contains NaN or infinite values")
        return indices.astype(np.int64), scalars.astype(np.float64)

    @staticmethod
    def apply_entry(vector, manifest, server_round, entry, replay) -> None:
        indices, steps = entry[SEED_INDEX], entry["step"]
        if indices.shape != steps.shape:
            raise ValueError(f"round {server_round}: ledger entry has {indices.shape} seeds and {steps.shape} steps")
        replay_steps(vector, manifest, int(replay["noise-seed"]), indices, steps)

    def rebuild(self, pretrained: GlobalState) -> GlobalState:
        r""":math:`w_0 - \eta \sum_k A[k] z_k` from the accumulated per-seed sums (one pass; equal to
        the replayed model up to fp32 rounding)."""
        assert self.manifest is not None, "init_state first"
        vector = self.manifest.flatten(pretrained)
        seeds = np.flatnonzero(self.accumulated)
        replay_steps(vector, self.manifest, self.config.seed, seeds, self.config.zo_lr * self.accumulated[seeds])
        return {k: v.clone() for k, v in self.manifest.unflatten(vector).items()}

    # ---- client half -------------------------------------------------------------------------
    def local(self, model, data, instruction, client_state: dict[str, Any]) -> Payload:
        manifest, start = self.synced_vector(model, instruction, client_state)
        cfg = instruction.config
        run_seed, pool, steps = int(cfg["noise-seed"]), int(cfg["seed-pool"]), int(cfg["zo-steps"])
        lr, eps = float(cfg["zo-lr"]), float(cfg["zo-eps"])
        seed = int(cfg["seed"])
        if PROBABILITIES in instruction.arrays:  # FedKSeed-Pro
            p = np.asarray(instruction.arrays[PROBABILITIES], dtype=np.float64)
            if p.shape != (pool,) or not np.isfinite(p).all() or (p < 0).any():
                raise ValueError(f"seed probabilities must be {pool} finite non-negative numbers")
            indices = np.random.default_rng(seed).choice(pool, size=steps, p=p / p.sum())
        else:
            indices = _keyed_indices(seed, pool, steps)
        device = next(model.parameters()).device
        theta = start.to(device, copy=True)  # the local iterate: the model's parameters are views of it
        base = theta.clone()
        bind_parameters(model, manifest, theta)
        model.eval()  # the two evaluations of a step must differ only by the perturbation
        batches = data.batches(int(cfg["batch-size"]), seed)
        scalars = np.zeros(steps, dtype=np.float64)
        valid = np.ones(steps, dtype=bool)
        loss_sum = 0.0
        with torch.no_grad():
            for t, k in enumerate(indices.tolist()):
                z = direction(manifest, run_seed, k).to(device)
                inputs, labels = to_device(next(batches), device)
                theta.copy_(base).add_(z, alpha=eps)
                plus = float(batch_loss(model, model(**inputs), labels))
                theta.copy_(base).sub_(z, alpha=eps)
                minus = float(batch_loss(model, model(**inputs), labels))
                estimate = (plus - minus) / (2 * eps)
                if not np.isfinite(estimate):
                    valid[t] = False
                    continue
                scalars[t] = estimate
                loss_sum += (plus + minus) / 2
                if not self.one_byte:  # FedKSeed: sequential local steps
                    base.add_(z, alpha=-lr * estimate)
        theta.copy_(base)
        metrics = {"train-loss": loss_sum / max(1, int(valid.sum())), "zo-skipped": float((~valid).sum())}
        if self.one_byte:
            codec = OneByteCodec(float(cfg["one-byte-low"]), float(cfg["one-byte-high"]))
            return Payload({SEED_CODE: codec.encode(np.where(valid, scalars, 0.0))}, data.num_examples, metrics)
        return Payload(
            {SEED_INDEX: indices[valid].astype(index_dtype(pool)), SEED_SCALAR: scalars[valid].astype(np.float32)},
            data.num_examples,
            metrics,
        )


class FedKSeedPro(FedKSeed):
    """FedKSeed-Pro: seeds sampled with probabilities from the server's scalar histories."""

    name = "fedkseed-pro"
    pro = True


class OneByte(FedKSeed):
    """One byte per estimate: τ estimates at the global weights, keyed seeds, 8-bit scalars."""

    name = "one-byte"
    one_byte = True


def _keyed_indices(seed: int, pool: int, steps: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, pool, size=steps)
