r"""FRL, Federated Rank Learning: clients learn supermask scores and send only edge rankings;
the server takes a vote.

Mozaffari, Shejwalkar, Houmansadr, "Every Vote Counts: Ranking-Based Training of Federated
Learning to Resist Poisoning Attacks", USENIX Security 2023 (arXiv 2110.04350).

**Supermask layers.** For every weight matrix :math:`W_l` of the chosen linear layers (its
:math:`n_l` entries are the *edges*) the forward pass uses :math:`W_l \odot M_l` with
:math:`M_l = \text{top-}k(S_l)` (the fraction ``frl-sparsity`` of edges with the highest scores)
and a straight-through gradient to the scores :math:`S_l`; nothing else trains. :math:`W_l` is
frozen: the pretrained weights (``frl-mode = "finetune"``: the masks choose which pretrained
weights stay active) or FRL's random signed constants :math:`\operatorname{sign}(w)\sqrt{2/\text{fan\_in}}`
(``"original"``), drawn from a seed. The initial scores :math:`S_l^{(0)}` are
Kaiming-uniform, :math:`U(-1/\sqrt{\text{fan\_in}}, 1/\sqrt{\text{fan\_in}})`, drawn from a seed by
:func:`~aggregators.shared_randomness.seeded_noise`, so every party derives the same values; their
sorted values are the layer's fixed *codebook* :math:`c_l`.

**Round.** Client :math:`u` rebuilds :math:`S_l` from the global ranking :math:`R_g` (below),
trains the scores for ``local-steps`` SGD steps (momentum 0.9, weight decay 1e-4 and the lr decay
0.999 per round as in the paper; ``frl-lr`` 4, not the paper's 0.4 for Conv8 on CIFAR-10: on
``minilm-bbc`` with masks over the head, 3 rounds reached 0.41 at 0.4, 0.83 at 4, 0.82 at 15 and 50),
and sends :math:`R_{u,l} = \operatorname{argsort}(S_{u,l})` (ascending, stable), a permutation of
the edge ids packed in :math:`\lceil\log_2 n_l\rceil` bits per edge. The server votes:

.. math:: A_l = \sum_u \operatorname{pos}(R_{u,l}),\qquad \operatorname{pos}(R)[R[q]] = q,\qquad
   R_{g,l} = \operatorname{argsort}_{\text{stable}}(A_l),\qquad S_l[R_{g,l}[q]] = c_l[q],

so the edge with the :math:`q`-th smallest total vote gets the :math:`q`-th smallest initial score.
Votes are unweighted: one client, one vote, whatever its example count. A single ranking moves
an edge's total by at most :math:`n_l - 1`, however it was crafted.

**Clipped votes (``frl-vote = "clipped"``, the default; ``"sum"`` is the paper's vote).** Not in
the paper. With the sum vote, rank-reversing attackers do not merely lose their votes: each
reversed ranking pushes every edge *against* the attackers' own training signal, so the vote
un-learns whatever the attackers' data teaches. When they hold a large share of one class (a
skewed federation) that class collapses (``bench/rank_based.py``: the recall of a class whose
data is 46 % the attackers' fell from 0.83 to 0.33). The clipped vote is the rank-space analogue
of update-norm bounding (Sun et al., "Can You Really Backdoor Federated Learning?", 2019): with
:math:`p_g` the positions of the current global ranking (every client started from it) and
:math:`\delta_u = \operatorname{pos}(R_{u}) - p_g` client :math:`u`'s deviation over all its
layers,

.. math:: A = \sum_u \Big(p_g + \min\big(1, \tfrac{B}{\lVert\delta_u\rVert_2}\big)\,\delta_u\Big),
   \qquad B = \operatorname{median}_u \lVert\delta_u\rVert_2,

and :math:`R_g = \operatorname{argsort}_{\text{stable}}(A)`. With fewer than half the voters
malicious :math:`B` is an honest deviation, so no vote moves the ranking further than an honest one
does. A reversed ranking's deviation is mostly :math:`-2p_g + \text{const}`, a direction that
rescales the global order without reordering it; scaled down to :math:`B` what is left of its
anti-learning part is small. An attacker who knows the rule can still spend the full budget
:math:`B` on anti-learning (the bench's norm-matched attack); it then weighs as much as one honest
client, never more. A client's own term still moves an edge's total by at most :math:`n_l - 1`
(:math:`|\delta_u| \le n_l - 1`); through the median it can also move :math:`B` to a
neighbouring client's norm. The server keeps every client's positions until the vote (int32,
4 bytes per edge and client); the sum vote streams.

**Ranking convention: S, not |S|.** The released code masks by :math:`|S|` but ranks by the signed
:math:`S` and hands the sorted signed codebook back out, so after a vote it keeps the edges at
*both* extremes of the vote (an edge every client voted lowest gets a large negative score and
survives). Here the mask and the ranking use the same signed :math:`S`: the edges kept are exactly
the top :math:`k` of the vote.

**State.** The server's global state holds the effective weights :math:`W_l \odot M_l` of the
global subnetwork, so central evaluation and checkpoints see an ordinary model; the global
ranking is what travels (download = upload size). Not copied from the reference code: int64
index tensors on the wire (8 bytes per edge), the whole float model returned in simulation,
resampling rounds until attackers are under half.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.func import functional_call

from aggregators.base import (
    FieldKind,
    AggregateResult,
    Algorithm,
    ClientId,
    GlobalState,
    Instruction,
    LocalData,
    Payload,
    PayloadError,
    Reply,
    check_weight,
)
from aggregators.compression import index_bits, pack_uint, unpack_uint
from aggregators.fedavg import derive_seed
from aggregators.local_training import batch_loss, to_device
from aggregators.shared_randomness import Manifest, seeded_noise
from aggregators.streaming import WeightedMetricMeans

MODES = ("finetune", "original")
VOTES = ("clipped", "sum")
RANK_PREFIX = "rank/"


def ranked_parameter(name: str) -> str:
    """The parameter whose edges the payload array ``name`` ranks."""
    return name[len(RANK_PREFIX):]
SCORE_SLOT, WEIGHT_SLOT = 0, 1  # the index slots of the seeded draws (initial scores, random weights)


@dataclass
class RankBasedConfig:
    """Hyper-parameters (run-config keys: ``frl-mode``, ``frl-sparsity``, ``frl-lr``, ``local-steps``...)."""

    frl_mode: str = "original"
    frl_sparsity: float = 0.5
    frl_lr: float = 4.0
    frl_vote: str = "clipped"
    local_steps: int = 4
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.frl_mode not in MODES:
            raise ValueError(f"frl-mode must be one of {', '.join(MODES)}, got '{self.frl_mode}'")
        if not 0.0 < self.frl_sparsity <= 1.0:
            raise ValueError(f"frl-sparsity (fraction of edges kept) must be in (0, 1], got {self.frl_sparsity}")
        if not self.frl_lr > 0:
            raise ValueError(f"frl-lr must be positive, got {self.frl_lr}")
        if self.frl_vote not in VOTES:
            raise ValueError(f"frl-vote must be one of {', '.join(VOTES)}, got '{self.frl_vote}'")
        if self.local_steps < 1 or self.batch_size < 1:
            raise ValueError("local-steps and batch-size must be at least 1")


# ---- ranking packing ----------------------------------------------------------------------------
rank_bits = index_bits
"""Bits per edge id of a layer with ``n`` edges: ⌈log₂ n⌉ (at least 1)."""


def pack_ranking(ranking: np.ndarray, n: int) -> np.ndarray:
    """A permutation of ``0..n-1`` as ⌈log₂ n⌉-bit little-endian fields in a uint8 array."""
    return pack_uint(np.asarray(ranking, dtype=np.uint32), rank_bits(n))


def unpack_ranking(packed: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`pack_ranking`; raises ValueError unless it holds a permutation of 0..n-1."""
    bits = rank_bits(n)
    expected = -(-n * bits // 8)
    if packed.dtype != np.uint8 or packed.shape != (expected,):
        raise ValueError(f"a packed ranking of {n} edges is {expected} uint8 bytes, got {packed.dtype} {packed.shape}")
    values = unpack_uint(packed, n, bits).astype(np.int64)
    if values.max(initial=0) >= n or np.bincount(values, minlength=n).max(initial=0) != 1:
        raise ValueError(f"the ranking is not a permutation of the {n} edge ids")
    return values


# ---- the vote ---------------------------------------------------------------------------------
def positions(ranking: np.ndarray) -> np.ndarray:
    """pos[ranking[q]] = q: each edge's place in an ascending ranking."""
    out = np.empty(len(ranking), dtype=np.int64)
    out[ranking] = np.arange(len(ranking), dtype=np.int64)
    return out


def vote(total_positions: np.ndarray) -> np.ndarray:
    """The global ranking: edges by ascending total vote; ties keep edge-id order (stable)."""
    return np.argsort(total_positions, kind="stable")


def deviation_norm(client_positions: Mapping[str, np.ndarray], global_positions: Mapping[str, np.ndarray]) -> float:
    r""":math:`\lVert \operatorname{pos}(R_u) - p_g \rVert_2` over all of a client's layers."""
    return math.sqrt(sum(float(np.sum(np.square(client_positions[k] - g, dtype=np.float64)))
                         for k, g in global_positions.items()))


def clipped_total(global_positions: Mapping[str, np.ndarray],
                  client_positions: Sequence[Mapping[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], list[float]]:
    """The clipped vote's totals (module docstring): each client's deviation from the global
    positions, over all its layers, scaled down to the median deviation norm, added to the
    global positions and summed over clients (float64; only the order counts); and the factor
    each client's deviation was scaled by (1 unless it was above the median)."""
    norms = np.array([deviation_norm(p, global_positions) for p in client_positions])
    bound = float(np.median(norms))
    totals = {k: len(client_positions) * g.astype(np.float64) for k, g in global_positions.items()}
    factors = [1.0 if norm <= bound else bound / norm for norm in norms]
    for client, factor in zip(client_positions, factors):
        for key, g in global_positions.items():
            totals[key] += factor * (client[key] - g)
    return totals, factors


def scores_from_ranking(ranking: np.ndarray, codebook: torch.Tensor) -> torch.Tensor:
    """:math:`S[R[q]] = c[q]`: the sorted initial values reassigned in ranking order."""
    scores = torch.empty_like(codebook)
    scores[torch.from_numpy(np.ascontiguousarray(ranking))] = codebook
    return scores


def kept_edges(ranking: np.ndarray, sparsity: float) -> np.ndarray:
    """Edge ids the global mask keeps: the top ``sparsity`` fraction of the ranking."""
    keep = keep_count(len(ranking), sparsity)
    return ranking[len(ranking) - keep :]


def keep_count(n: int, sparsity: float) -> int:
    return max(1, round(sparsity * n))


# ---- seeded initial values --------------------------------------------------------------------
def _draw(key: str, shape: Sequence[int], run_seed: int, slot: int, distribution: str) -> torch.Tensor:
    """One seeded draw over a whole tensor (its own one-block manifest keyed by name and shape)."""
    manifest = Manifest((key,), (tuple(shape),), block_size=math.prod(shape))
    return seeded_noise(manifest, run_seed, 0, -1, 0, slot, distribution=distribution)


def initial_scores(shapes: Mapping[str, Sequence[int]], run_seed: int) -> dict[str, torch.Tensor]:
    """Kaiming-uniform initial scores U(-1/√fan_in, 1/√fan_in) of every edge tensor (flat fp32)."""
    return {k: _draw(k, s, run_seed, SCORE_SLOT, "uniform").mul_(1.0 / math.sqrt(s[1])) for k, s in shapes.items()}


def signed_constant_weights(shapes: Mapping[str, Sequence[int]], run_seed: int) -> dict[str, torch.Tensor]:
    """FRL's random frozen weights: ±sqrt(2 / fan_in) with random signs, from the run seed."""
    return {
        k: _draw(k, s, run_seed, WEIGHT_SLOT, "rademacher").mul_(math.sqrt(2.0 / s[1])).view(*s)
        for k, s in shapes.items()
    }


class _TopKMask(torch.autograd.Function):
    """Binary mask of the ``keep`` highest scores; the gradient passes straight through."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, keep: int) -> torch.Tensor:  # type: ignore[override]
        flat = scores.reshape(-1)
        mask = torch.zeros_like(flat)
        mask[torch.topk(flat, keep, sorted=False).indices] = 1.0
        return mask.view_as(scores)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None


def masked(weight: torch.Tensor, scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """:math:`W \\odot \\text{top-}k(S)` with a straight-through gradient to :math:`S`."""
    return weight * _TopKMask.apply(scores, keep_count(scores.numel(), sparsity))


class RankBased(Algorithm):
    """FRL (see module docstring)."""

    name = "frl"
    config_class = RankBasedConfig
    default_layers = "output"  # masks over the head; half-pruning pretrained encoder layers costs accuracy
    adapter_incompatibility = ("FRL learns which of a layer's fixed weights to keep; a LoRA adapter's B matrix "
                               "starts at zero, so every mask over it selects nothing. Run FRL without an adapter")
    secure_aggregation_incompatibility = "FRL's server votes on each site's ranking; a sum of rankings is no vote"

    def payload_kind(self, name: str, parameters: Collection[str]) -> FieldKind | None:
        return FieldKind.RANKING if name.startswith(RANK_PREFIX) else None

    def __init__(self, config: RankBasedConfig | None = None) -> None:
        self.config = config or RankBasedConfig()
        self.shapes: dict[str, tuple[int, int]] = {}
        self.weights: dict[str, torch.Tensor] = {}
        self.codebooks: dict[str, torch.Tensor] = {}
        self.packed_ranking: dict[str, np.ndarray] = {}
        self.global_positions: dict[str, np.ndarray] = {}

    # ---- server half -------------------------------------------------------------------------
    def init_state(self, initial, layers=None) -> GlobalState:
        state = super().init_state(initial)
        self.shapes = {k: tuple(v.shape) for k, v in state.items() if v.ndim == 2}
        if not self.shapes:
            raise ValueError("frl needs at least one weight matrix among the trained parameters")
        self.weights = self._frozen({k: state[k] for k in self.shapes}, self.config.frl_mode, self.config.seed)
        scores = initial_scores(self.shapes, self.config.seed)
        self.codebooks = {k: torch.sort(v).values for k, v in scores.items()}
        self.packed_ranking = {}
        self.global_positions = {k: positions(np.argsort(v.numpy(), kind="stable")) for k, v in scores.items()}
        return {**state, **{k: self._effective(k, scores[k]) for k in self.shapes}}

    @staticmethod
    def _frozen(pretrained: Mapping[str, torch.Tensor], mode: str, seed: int) -> dict[str, torch.Tensor]:
        if mode == "finetune":
            return {k: v.detach().to("cpu", torch.float32).clone() for k, v in pretrained.items()}
        return signed_constant_weights({k: tuple(v.shape) for k, v in pretrained.items()}, seed)

    def _effective(self, key: str, flat_scores: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return masked(self.weights[key], flat_scores.view(self.shapes[key]), self.config.frl_sparsity)

    def plan(self, server_round, clients, state, probes=None) -> dict[ClientId, Instruction]:
        cfg = self.config
        arrays = {RANK_PREFIX + k: v for k, v in self.packed_ranking.items()}  # shared: encoded once
        return {
            client: Instruction(arrays, {
                "frl-keys": list(self.shapes), "frl-mode": cfg.frl_mode, "frl-sparsity": cfg.frl_sparsity,
                "frl-lr": cfg.frl_lr * 0.999 ** (server_round - 1), "local-steps": cfg.local_steps,
                "batch-size": cfg.batch_size, "noise-seed": cfg.seed,
                "seed": derive_seed(cfg.seed, server_round, client),
            })
            for client in clients
        }

    def aggregate(self, server_round: int, state: GlobalState, replies: Iterable[Reply]) -> AggregateResult:
        result = AggregateResult(state=state)
        totals = {k: np.zeros(math.prod(s), dtype=np.int64) for k, s in self.shapes.items()}
        kept: list[dict[str, np.ndarray]] = []  # the clipped vote needs every client's positions
        losses = WeightedMetricMeans()
        for reply in replies:
            try:
                check_weight(reply.client, reply.payload.num_examples)
                votes = self.decode(reply)
            except PayloadError as err:
                result.rejected[reply.client] = str(err)
                continue
            if self.config.frl_vote == "clipped":
                kept.append({k: v.astype(np.int32) for k, v in votes.items()})
            else:
                for key, vote_positions in votes.items():
                    totals[key] += vote_positions
            result.accepted.append(reply.client)
            losses.add(reply.payload.metrics, 1.0)
        result.metrics.update(losses.means())
        if not result.accepted:
            return result
        if self.config.frl_vote == "clipped":
            totals, factors = clipped_total(self.global_positions, kept)
            # an operator's alarm: a vote scaled far down deviated far more than the median site's
            result.metrics["votes-scaled-down"] = float(sum(f < 1.0 for f in factors))
            result.metrics["smallest-vote-scale"] = min(factors)
        new_state = dict(state)
        for key, total in totals.items():
            ranking = vote(total)
            self.global_positions[key] = positions(ranking)
            self.packed_ranking[key] = pack_ranking(ranking, len(ranking))
            new_state[key] = self._effective(key, scores_from_ranking(ranking, self.codebooks[key]))
        result.state = new_state
        return result

    def decode(self, reply: Reply) -> dict[str, np.ndarray]:
        """A reply's per-tensor edge positions; raises PayloadError naming the client."""
        arrays = reply.payload.arrays
        expected = {RANK_PREFIX + k for k in self.shapes}
        if set(arrays) != expected:
            raise PayloadError(f"client {reply.client}: expected rankings {sorted(expected)}, got {sorted(arrays)}")
        out = {}
        for key, shape in self.shapes.items():
            try:
                ranking = unpack_ranking(arrays[RANK_PREFIX + key], math.prod(shape))
            except ValueError as err:
                raise PayloadError(f"client {reply.client}: '{RANK_PREFIX + key}': {err}") from err
            out[key] = positions(ranking)
        return out

    # ---- client half -------------------------------------------------------------------------
    def local(self, model: torch.nn.Module, data: LocalData, instruction: Instruction,
              client_state: dict[str, Any]) -> Payload:
        cfg = instruction.config
        keys = [str(k) for k in cfg["frl-keys"]]
        params = dict(model.named_parameters())
        missing = [k for k in keys if k not in params]
        if missing:
            raise KeyError(f"instruction names parameters this model lacks: {missing[:5]}")
        device = next(model.parameters()).device
        shapes = {k: tuple(params[k].shape) for k in keys}
        run_seed, sparsity = int(cfg["noise-seed"]), float(cfg["frl-sparsity"])
        weights = self._frozen({k: params[k] for k in keys}, str(cfg["frl-mode"]), run_seed)
        start = initial_scores(shapes, run_seed)
        scores = {}
        for key in keys:
            packed = instruction.arrays.get(RANK_PREFIX + key)
            flat = start[key] if packed is None else scores_from_ranking(
                unpack_ranking(np.asarray(packed), start[key].numel()), torch.sort(start[key]).values
            )
            scores[key] = flat.view(shapes[key]).to(device).requires_grad_(True)
        weights = {k: v.to(device) for k, v in weights.items()}
        for param in model.parameters():
            param.requires_grad_(False)
        optimizer = torch.optim.SGD(scores.values(), lr=float(cfg["frl-lr"]), momentum=0.9, weight_decay=1e-4)
        batches = data.batches(int(cfg["batch-size"]), int(cfg["seed"]))
        model.train()
        loss_sum, seen = 0.0, 0
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(int(cfg["seed"]))
            for _ in range(int(cfg["local-steps"])):
                inputs, labels = to_device(next(batches), device)
                effective = {k: masked(weights[k], scores[k], sparsity) for k in keys}
                loss = batch_loss(model, functional_call(model, effective, args=(), kwargs=inputs), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += float(loss.detach()) * len(labels)
                seen += len(labels)
        arrays = {
            RANK_PREFIX + k: pack_ranking(np.argsort(s.detach().reshape(-1).cpu().numpy(), kind="stable"), s.numel())
            for k, s in scores.items()
        }
        return Payload(arrays, data.num_examples, {"train-loss": loss_sum / max(seen, 1)})
