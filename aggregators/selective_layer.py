r"""Selective-layer fine-tuning: each client trains a budgeted subset of layers chosen from its
local gradients, regulated across clients.

Sun, Xie, Ding, Li, Zhang, "Exploring Selective Layer Fine-Tuning in Federated Learning",
arXiv 2408.15600 (ISIT 2025). One round:

1. **Scores** (probe exchange, on the current global model :math:`w^t`): client :math:`i` returns
   :math:`s_{il} = \sum_b \lVert \nabla_{\theta_l} \ell(w^t; B_b) \rVert^2` for every selectable layer
   :math:`l`, gradients zeroed between batches (not the released code's cumulative variant), and its
   budget :math:`R_i` (number of layers it can train).
2. **Selection** (server): problem P1, maximise
   :math:`\sum_{i,l} m_{il}\hat s_{il} - \lambda \sum_l n_l (N-n_l)` s.t. :math:`\sum_l m_{il}\le R_i`,
   solved by :func:`aggregators.layer_selection.solve_selection` (never exceeds a budget). Scores are
   normalised per client (:math:`\hat s_{il} = s_{il}/\sum_l s_{il}`) so that :math:`\lambda` does not
   depend on the gradient scale; λ > 0 by default (the released code's default λ = 0 switches the
   regulariser off). The default λ = 0.05 comes from a sweep over {0.002, 0.01, 0.05} on
   ``minilm-bbc`` (BENCHMARKS.md): larger λ kept every client on the same, fewest layers and gave
   the best accuracy at the least uplink there. Baselines: ``client-top`` (λ = 0: each client its own top-:math:`R_i`), ``top``
   (output-side layers), ``bottom`` (input-side), ``random``, ``full`` (every layer: FedAvg).
3. **Local training** with real optimizer steps (the released code steps on zeroed gradients):
   only the selected layers plus the always-trained common layers (the head) get gradients; the
   client returns the *delta* of those layers only.
4. **Aggregation**: per layer, the example-weighted mean delta over the clients that trained it;
   untouched layers stay unchanged.

Scores are fresh by default (a separate probe exchange each round, as in the paper: a client's
scores from its last participation can be many rounds old under partial participation, and
scoring costs a few backward passes, not a training run). ``layer-scores = "stale"`` reuses the
scores each client sent with its previous training reply and probes only clients it has no scores
for, saving one exchange per round.

Downlink. A client's forward pass needs the current value of every trainable layer, not only of
those it trains. Clients keep a cache of the global trainable layers (``client_state``); the
server tracks the round each layer last changed and the state each client holds, and sends only
the layers that changed since (all of them on first contact). The client checks that its cache
is the version the server assumed and fails loudly otherwise; the server then forgets it and
resends everything next time.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from aggregators.base import (
    SUM_CLIENT,
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
    check_arrays,
    check_max_site_weight,
    check_weight,
)
from aggregators.fedavg import derive_seed
from aggregators.layer_selection import objective, solve_selection
from aggregators.local_training import (
    TrainerOptions,
    batch_loss,
    check_local_training,
    instructed_training,
    set_trainable,
    to_device,
    train_steps,
)
from aggregators.streaming import WeightedMeanPerKey, WeightedMetricMeans

SELECTIONS = ("regulated", "client-top", "top", "bottom", "random", "full")
SCORES_KEY = "layer-scores"
BUDGET_METRIC = "layer-budget"
SITE_BUDGET = "site.layer-budget"
CACHE_PREFIX = "global/"
CACHE_ROUND = "global-round"


class SyncError(RuntimeError):
    """The client's cached global layers are not the version the server assumed."""


@dataclass
class SelectiveLayerConfig:
    """Hyper-parameters (run-config keys in kebab-case: ``selection-lambda``, ``layer-scores``...)."""

    lr: float = 5e-4
    local_steps: int = 4
    batch_size: int = 16
    weight_decay: float = 0.0
    seed: int = 0
    num_server_rounds: int = 0  # the run's length, for a learning-rate schedule over all its rounds
    trainer: TrainerOptions = field(default_factory=TrainerOptions)
    selection: str = "regulated"
    selection_lambda: float = 0.05
    layer_scores: str = "fresh"
    score_batches: int = 4
    common_layers: str = "head"
    max_site_weight: float = 1.0  # the largest share one site may have in the weighted mean (1: uncapped)

    def __post_init__(self) -> None:
        check_max_site_weight(self.max_site_weight)
        if self.selection not in SELECTIONS:
            raise ValueError(f"unknown selection '{self.selection}'; choose one of: {', '.join(SELECTIONS)}")
        if self.layer_scores not in ("fresh", "stale"):
            raise ValueError(f"layer-scores must be 'fresh' or 'stale', got '{self.layer_scores}'")
        if self.selection_lambda < 0:
            raise ValueError(f"selection-lambda must be non-negative, got {self.selection_lambda}")
        if self.score_batches < 1:
            raise ValueError(f"score-batches must be at least 1, got {self.score_batches}")
        check_local_training(self.lr, self.local_steps, self.batch_size)


def layer_scores(
    model: torch.nn.Module, data: LocalData, layer_keys: Mapping[str, Sequence[str]], *, batches: int, batch_size: int,
    seed: int,
) -> np.ndarray:
    r""":math:`s_l = \sum_b \sum_{p \in l} \lVert \partial \ell(w; B_b) / \partial p \rVert^2`, one float per layer."""
    keys = [k for ks in layer_keys.values() for k in ks]
    set_trainable(model, keys)
    params = dict(model.named_parameters())
    device = next(model.parameters()).device
    scores = torch.zeros(len(layer_keys), dtype=torch.float64)
    stream = data.batches(batch_size, seed)
    model.train()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for _ in range(batches):
            model.zero_grad(set_to_none=True)  # per batch: not the cumulative variant
            inputs, labels = to_device(next(stream), device)
            batch_loss(model, model(**inputs), labels).backward()
            for index, layer_params in enumerate(layer_keys.values()):
                for key in layer_params:
                    grad = params[key].grad
                    if grad is not None:
                        scores[index] += float(grad.detach().double().pow(2).sum())
    model.zero_grad(set_to_none=True)
    return scores.numpy().astype(np.float32)


def _layers_of(model: torch.nn.Module, names: Sequence[str], owned: Iterable[str]) -> dict[str, list[str]]:
    """Parameter keys (among ``owned``) of each named layer of a model with ``layer_prefixes()``."""
    prefixes = model.layer_prefixes()  # type: ignore[operator]
    owned = list(owned)
    unknown = [n for n in names if n not in prefixes]
    if unknown:
        raise KeyError(f"the model has no layers {unknown}")
    return {name: [k for k in owned if k.startswith(prefixes[name])] for name in names}


class SelectiveLayer(Algorithm):
    """Gradient-scored, budgeted, cross-client-regulated layer selection (see module docstring)."""

    name = "selective-layer"
    config_class = SelectiveLayerConfig
    default_layers = "above-embeddings"  # it chooses among every layer above the embeddings, as in the paper
    update_kind = "delta"
    public_metrics = (BUDGET_METRIC,)  # the site's layer budget: its configuration, not its data

    def payload_kind(self, name: str, parameters: Collection[str]) -> FieldKind | None:
        return FieldKind.LAYER_SCORES if name == SCORES_KEY else super().payload_kind(name, parameters)
    resumable = True
    releases_per_round = 2  # layer scores (probe, or riding on the reply) and the layer deltas

    def __init__(self, config: SelectiveLayerConfig | None = None) -> None:
        self.config = config or SelectiveLayerConfig()
        self.layers: dict[str, list[str]] = {}
        self.selectable: list[str] = []
        self.common: list[str] = []
        self.layer_version: dict[str, int] = {}
        self.client_sync: dict[ClientId, int] = {}
        self.known_scores: dict[ClientId, np.ndarray] = {}
        self.known_budgets: dict[ClientId, int] = {}
        self.assigned: dict[ClientId, list[str]] = {}
        self.last_objective: float | None = None
        # summed per key, each layer's mean is over the sites that trained it: the per-layer mean below
        self.secure_aggregation_incompatibility = (  # type: ignore[misc]
            "" if self.config.layer_scores == "fresh" else
            "layer-scores=stale sends each site's layer scores with its update, and scores are not summed; use "
            "layer-scores=fresh (scores travel in the probe)")

    # ---- server half -------------------------------------------------------------------------
    def init_state(self, initial, layers=None) -> GlobalState:
        if not layers:
            raise ValueError("selective-layer needs the model's layers (name -> parameter keys)")
        self.layers = {name: list(keys) for name, keys in layers.items() if keys}
        common = [c.strip() for c in self.config.common_layers.split(",") if c.strip()]
        self.common = [name for name in self.layers if name in common]
        self.selectable = [name for name in self.layers if name not in common]
        if not self.selectable:
            raise ValueError("no selectable layers: every trained layer is a common layer")
        self.layer_version = {name: 0 for name in self.layers}
        return super().init_state(initial)

    def forget(self, client: ClientId) -> None:
        """The coordinator lost track of ``client`` (failure, timeout, rejection): resend all."""
        self.client_sync.pop(client, None)

    def _sync(self, client: ClientId, server_round: int, state: GlobalState) -> tuple[dict[str, np.ndarray], dict]:
        """Arrays a client lacks (layers changed since its cache) and the sync fields."""
        held = self.client_sync.get(client, -1)
        layers = [n for n in self.layers if held < 0 or self.layer_version[n] > held]
        arrays = {k: state[k].numpy() for n in layers for k in self.layers[n]}
        self.client_sync[client] = server_round - 1
        return arrays, {"sync-from": held, "sync-to": server_round - 1}

    def _needs_scores(self) -> bool:
        return self.config.selection in ("regulated", "client-top")

    def probe(self, server_round: int, clients: Sequence[ClientId], state: GlobalState) -> dict[ClientId, Instruction]:
        fresh = self.config.layer_scores == "fresh" and self._needs_scores()
        probed = [
            c for c in clients
            if fresh or c not in self.known_budgets or (self._needs_scores() and c not in self.known_scores)
        ]
        instructions = {}
        for client in probed:
            arrays, sync = self._sync(client, server_round, state)
            instructions[client] = Instruction(
                arrays=arrays,
                config={
                    **sync,
                    "score-layers": self.selectable if self._needs_scores() else [],
                    "score-batches": self.config.score_batches,
                    "batch-size": self.config.batch_size,
                    "seed": derive_seed(self.config.seed, server_round, client, 1),
                },
            )
        return instructions

    def select(self, server_round: int, clients: Sequence[ClientId]) -> dict[ClientId, list[str]]:
        """The selectable layers each client trains this round."""
        n_layers = len(self.selectable)
        if not clients:
            return {}
        budgets = np.asarray([min(self.known_budgets.get(c, n_layers), n_layers) for c in clients], dtype=np.int64)
        method = self.config.selection
        self.last_objective = None
        if method == "full":
            masks = np.ones((len(clients), n_layers), dtype=bool)
        elif method in ("top", "bottom", "random"):
            masks = np.zeros((len(clients), n_layers), dtype=bool)
            for row, (client, budget) in enumerate(zip(clients, budgets, strict=True)):
                if method == "top":
                    masks[row, n_layers - budget:] = True
                elif method == "bottom":
                    masks[row, :budget] = True
                else:
                    rng = np.random.default_rng(derive_seed(self.config.seed, server_round, client, 2))
                    masks[row, rng.choice(n_layers, size=budget, replace=False)] = True
        else:
            scores = np.stack([self.known_scores[c] for c in clients]).astype(np.float64)
            totals = scores.sum(axis=1, keepdims=True)
            normalized = np.divide(scores, totals, out=np.full_like(scores, 1.0 / n_layers), where=totals > 0)
            lam = self.config.selection_lambda if method == "regulated" else 0.0
            selection = solve_selection(normalized, budgets, lam)
            masks = selection.mask
            self.last_objective = objective(normalized, masks, lam)
        return {c: [self.selectable[j] for j in np.flatnonzero(masks[row])] for row, c in enumerate(clients)}

    def plan(self, server_round, clients, state, probes=None) -> dict[ClientId, Instruction]:
        for client, payload in (probes or {}).items():
            self._remember(client, payload)
        usable = [c for c in clients if c in self.known_budgets and (not self._needs_scores() or c in self.known_scores)]
        chosen = self.select(server_round, usable)
        cfg = self.config
        self.assigned = {}
        instructions = {}
        for client in usable:
            if probes and client in probes:  # synced by this round's probe: nothing changed since
                arrays, sync = {}, {"sync-from": server_round - 1, "sync-to": server_round - 1}
            else:
                arrays, sync = self._sync(client, server_round, state)
            layers = chosen[client] + self.common
            self.assigned[client] = layers
            config: dict[str, Any] = {
                **sync,
                "train-layers": layers,
                "lr": cfg.lr,
                "local-steps": cfg.local_steps,
                "batch-size": cfg.batch_size,
                "weight-decay": cfg.weight_decay,
                "seed": derive_seed(cfg.seed, server_round, client),
                **cfg.trainer.instruction(server_round, cfg.local_steps, cfg.num_server_rounds),
            }
            if cfg.layer_scores == "stale" and self._needs_scores():
                config.update({"score-layers": self.selectable, "score-batches": cfg.score_batches})
            instructions[client] = Instruction(arrays=arrays, config=config)
        return instructions

    def _remember(self, client: ClientId, payload: Payload) -> None:
        if BUDGET_METRIC in payload.metrics:
            budget = payload.metrics[BUDGET_METRIC]
            if not float(budget).is_integer() or budget < 0:
                raise PayloadError(f"client {client}: layer budget must be a whole number >= 0, got {budget}")
            self.known_budgets[client] = int(budget)
        if SCORES_KEY in payload.arrays:
            scores = payload.arrays[SCORES_KEY]
            if scores.shape != (len(self.selectable),) or not np.isfinite(scores).all() or (scores < 0).any():
                raise PayloadError(
                    f"client {client}: '{SCORES_KEY}' must be {len(self.selectable)} finite non-negative floats"
                )
            self.known_scores[client] = scores.astype(np.float64)

    def check_probe(self, client: ClientId, payload: Payload) -> None:
        """Validate a probe reply (raises PayloadError); the strategy drops refused clients."""
        unexpected = set(payload.arrays) - {SCORES_KEY}
        if unexpected:
            raise PayloadError(f"client {client}: unexpected arrays {sorted(unexpected)} in a probe reply")
        if self._needs_scores() and SCORES_KEY not in payload.arrays:
            raise PayloadError(f"client {client}: probe reply has no '{SCORES_KEY}'")
        self._remember(client, payload)

    def aggregate(self, server_round: int, state: GlobalState, replies: Iterable[Reply]) -> AggregateResult:
        mean = WeightedMeanPerKey(self.config.max_site_weight)
        result = AggregateResult(state=state)
        losses = WeightedMetricMeans()
        for reply in replies:
            try:
                weight = self._validate(reply, state)
                self._remember(reply.client, reply.payload)
            except PayloadError as err:
                result.rejected[reply.client] = str(err)
                self.forget(reply.client)
                continue
            mean.add({k: v for k, v in reply.payload.arrays.items() if k != SCORES_KEY}, weight)
            result.accepted.append(reply.client)
            for client in (self.assigned if reply.client == SUM_CLIENT else [reply.client]):  # a sum: every site's
                result.details[client] = {"layers": self.assigned.get(client, [])}
            losses.add(reply.payload.metrics, weight)
        deltas = mean.means()
        result.state = {**state, **{k: state[k] + d for k, d in deltas.items()}}
        for name, keys in self.layers.items():
            if any(k in deltas for k in keys):
                self.layer_version[name] = server_round
        result.metrics.update(losses.means())
        result.metrics["layers-changed"] = float(sum(v == server_round for v in self.layer_version.values()))
        if self.last_objective is not None:
            result.metrics["selection-objective"] = self.last_objective
        return result

    def _validate(self, reply: Reply, state: GlobalState) -> float:
        weight = check_weight(reply.client, reply.payload.num_examples)
        assigned = ([name for names in self.assigned.values() for name in names] if reply.client == SUM_CLIENT
                    else self.assigned.get(reply.client, []))  # a sum: the layers of every site of the round
        allowed = {k for name in assigned for k in self.layers[name]}
        deltas = {k: v for k, v in reply.payload.arrays.items() if k != SCORES_KEY}
        check_arrays(reply.client, deltas, state, allowed=allowed, what="layer deltas")
        return weight

    # ---- client half -------------------------------------------------------------------------
    @staticmethod
    def _apply_sync(model: torch.nn.Module, instruction: Instruction, client_state: dict[str, Any]) -> list[str]:
        """Update the cached global layers, check their version, load them; return the owned keys."""
        cfg = instruction.config
        held = int(client_state.get(CACHE_ROUND, -1))
        if int(cfg["sync-from"]) != held:
            raise SyncError(
                f"this client holds global layers of round {held}, the server assumed {cfg['sync-from']}; "
                "it will resend them"
            )
        for key, value in instruction.arrays.items():
            client_state[CACHE_PREFIX + key] = np.array(value, dtype=np.float32, copy=True)
        client_state[CACHE_ROUND] = int(cfg["sync-to"])
        owned = [k[len(CACHE_PREFIX):] for k in client_state if k.startswith(CACHE_PREFIX)]
        params = dict(model.named_parameters())
        with torch.no_grad():
            for key in owned:
                params[key].copy_(torch.from_numpy(client_state[CACHE_PREFIX + key]))
        return owned

    @staticmethod
    def _budget(client_state: Mapping[str, Any], n_layers: int) -> int:
        return int(client_state.get(SITE_BUDGET, n_layers))

    def local_probe(self, model, data, instruction, client_state) -> Payload:
        owned = self._apply_sync(model, instruction, client_state)
        cfg = instruction.config
        names = list(cfg.get("score-layers", []))
        arrays = {}
        if names:
            arrays[SCORES_KEY] = layer_scores(
                model, data, _layers_of(model, names, owned), batches=int(cfg["score-batches"]),
                batch_size=int(cfg["batch-size"]), seed=int(cfg["seed"]),
            )
        n_selectable = len(model.layer_prefixes())  # type: ignore[operator]
        return Payload(arrays, data.num_examples, {BUDGET_METRIC: self._budget(client_state, n_selectable)})

    def local(self, model, data, instruction, client_state) -> Payload:
        owned = self._apply_sync(model, instruction, client_state)
        cfg = instruction.config
        arrays: dict[str, np.ndarray] = {}
        if cfg.get("score-layers"):  # stale mode: scores on the global model, sent for next time
            arrays[SCORES_KEY] = layer_scores(
                model, data, _layers_of(model, list(cfg["score-layers"]), owned),
                batches=int(cfg["score-batches"]), batch_size=int(cfg["batch-size"]), seed=int(cfg["seed"]) + 1,
            )
        keys = [k for keys in _layers_of(model, list(cfg["train-layers"]), owned).values() for k in keys]
        params = dict(model.named_parameters())
        before = {k: params[k].detach().clone() for k in keys}
        stats = train_steps(model, data, trainable=keys, **instructed_training(cfg))
        for key in keys:
            arrays[key] = (params[key].detach() - before[key]).to("cpu", torch.float32).numpy()
        n_selectable = len(model.layer_prefixes())  # type: ignore[operator]
        return Payload(
            arrays,
            data.num_examples,
            {"train-loss": stats.mean_loss, "train-seconds": stats.seconds,
             BUDGET_METRIC: self._budget(client_state, n_selectable)},
        )
