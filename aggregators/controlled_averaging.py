r"""SCALLION and SCAFCOM: stochastic controlled averaging with compressed uplinks.

Huang, Li and Li, "Stochastic Controlled Averaging for Federated Learning with Communication
Compression", ICLR 2024 (arXiv 2308.08165). Both build on the paper's single-vector form of
SCAFFOLD (Karimireddy et al., ICML 2020). State: the global model :math:`x`, a control variate
:math:`c_i` per client (kept by the client) and :math:`c = \frac1N \sum_i c_i` (kept by the server,
:math:`N` the number of sites in the federation, sampled or not). In round :math:`r` each sampled
client :math:`i \in S` runs :math:`K` SGD steps from :math:`y = x`,

.. math:: y \leftarrow y - \eta_l\,(\nabla F_i(y;\xi) - c_i + c),

and forms :math:`g_i = (x - y)/(K\eta_l) - c + c_i`, its mean corrected local gradient. It sends
one compressed vector :math:`\tilde\delta_i` and sets :math:`c_i \leftarrow c_i + \alpha\tilde\delta_i`:

* **SCALLION** (unbiased codec, e.g. random-k or stochastic quantization):
  :math:`\tilde\delta_i = \mathcal{C}(g_i - c_i)`, default :math:`\alpha = 1/(1+\omega)`;
* **SCAFCOM** (biased, contractive codec, e.g. top-k or scaled sign) adds local momentum
  :math:`v_i \leftarrow (1-\beta) v_i + \beta g_i` and sends :math:`\tilde\delta_i = \mathcal{C}(v_i - c_i)`,
  default :math:`\alpha = 1`; :math:`v_i` starts at the first :math:`g_i` (no shrinkage towards
  zero in the first rounds). The :math:`c_i` recursion acts as error feedback: :math:`c_i` tracks
  :math:`v_i` through compressed differences.

The server, with :math:`\bar\delta = \frac1{|S|}\sum_{i\in S}\tilde\delta_i`, sets

.. math:: x \leftarrow x - \eta_g K \eta_l\,(c + \bar\delta), \qquad
          c \leftarrow c + \frac{\alpha}{N}\sum_{i \in S}\tilde\delta_i .

With the identity codec and :math:`\alpha = \beta = 1` both reduce to SCAFFOLD (option II):
:math:`\tilde\delta_i = \Delta c_i` and :math:`x + \eta_g\,\mathrm{mean}(y_i - x)`; the tests check this
against a direct two-vector SCAFFOLD.

**Keeping** :math:`c = \frac1N\sum_i c_i` **exact.** The server keeps :math:`\Sigma = \sum_i c_i`
(adding :math:`\alpha\tilde\delta_i` for every reply it folds in) and sends :math:`c = \Sigma/N`; a
site that joins later raises :math:`N` and enters with :math:`c_i = 0`. A client must not count an
update the server never folded in (its reply was lost, late or rejected), so it keeps
:math:`\tilde\delta_i` *pending* and commits :math:`c_i \leftarrow c_i + \alpha\tilde\delta_i` only when
the next instruction says the server accepted that round's reply. :math:`c_i`, :math:`v_i` and the
pending update live in the client state and survive rounds the client is not sampled.

Downlink per round is :math:`x` and :math:`c` (2d floats); uplink is one compressed d-vector.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
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
    check_weight,
)
from aggregators.compression import Codec, CodecError, key_seed
from aggregators.fedavg import derive_seed
from aggregators.local_training import check_local_training, train_steps
from aggregators.streaming import WeightedMetricMeans

CONTROL_PREFIX = "control/"
"""Instruction arrays holding the server control variate c, one per parameter tensor."""

CLIENT_CONTROL = "scaffold.c/"
CLIENT_MOMENTUM = "scaffold.v/"
PENDING = "scaffold.pending/"
PENDING_ROUND = "scaffold.pending-round"
PENDING_SEED = "scaffold.pending-seed"
PENDING_CODEC = "scaffold.pending-codec"
PENDING_ALPHA = "scaffold.pending-alpha"


@dataclass
class ControlledAveragingConfig:
    """Hyper-parameters of SCALLION / SCAFCOM.

    ``codec`` empty means the method's default; ``scaffold_alpha`` 0 means the default α
    (1/(1+ω) for SCALLION, 1 for SCAFCOM).
    """

    sgd_lr: float = 0.2
    local_steps: int = 4
    batch_size: int = 16
    server_lr: float = 1.0
    codec: str = ""
    scaffold_alpha: float = 0.0
    scafcom_beta: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        check_local_training(self.sgd_lr, self.local_steps, self.batch_size)
        if not self.server_lr > 0:
            raise ValueError(f"server-lr must be positive, got {self.server_lr}")
        if not 0 <= self.scaffold_alpha <= 1:
            raise ValueError(f"scaffold-alpha must be in (0, 1] (0 = the method's default), got {self.scaffold_alpha}")
        if not 0 < self.scafcom_beta <= 1:
            raise ValueError(f"scafcom-beta must be in (0, 1], got {self.scafcom_beta}")


class ControlledAveraging(Algorithm):
    """The shared machinery of SCALLION and SCAFCOM (see the module docstring)."""

    config_class = ControlledAveragingConfig
    supports_local_dp = False  # the uplink is a compressed control-variate difference: no mechanism yet
    default_codec: str = "none"
    momentum: bool = False

    def __init__(self, config: ControlledAveragingConfig | None = None) -> None:
        self.config = config or ControlledAveragingConfig()
        self.codec = Codec.parse(self.config.codec or self.default_codec)
        self.check_codec(self.codec)
        self.population = 0
        self._control_sum: dict[str, torch.Tensor] = {}
        self._accepted_round: dict[ClientId, int] = {}
        self._contributors: set[ClientId] = set()

    def check_codec(self, codec: Codec) -> None:
        """Refuse a codec the method's analysis does not cover."""

    def alpha(self, d: int) -> float:
        """The control-variate step α (the config's, else the method's default)."""
        return self.config.scaffold_alpha or 1.0

    # ---- server half -------------------------------------------------------------------------
    def init_state(self, initial, layers=None) -> GlobalState:
        state = super().init_state(initial, layers)
        self._control_sum = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in state.items()}
        return state

    def set_population(self, count: int) -> None:
        self.population = int(count)

    @property
    def num_sites(self) -> int:
        """N: the sites in the federation (every site that ever contributed counts)."""
        return max(self.population, len(self._contributors), 1)

    def control(self) -> dict[str, torch.Tensor]:
        """The server control variate c = Σ_i c_i / N."""
        return {k: (s / self.num_sites).to(torch.float32) for k, s in self._control_sum.items()}

    def plan(self, server_round, clients, state, probes=None) -> dict[ClientId, Instruction]:
        arrays = {k: v.numpy() for k, v in state.items()}
        arrays.update({CONTROL_PREFIX + k: v.numpy() for k, v in self.control().items()})
        d = sum(v.numel() for v in state.values())
        cfg = self.config
        return {
            client: Instruction(
                arrays=arrays,
                config={
                    "sgd-lr": cfg.sgd_lr,
                    "local-steps": cfg.local_steps,
                    "batch-size": cfg.batch_size,
                    "seed": derive_seed(cfg.seed, server_round, client),
                    "codec": self.codec.spec,
                    "codec-seed": derive_seed(cfg.seed, server_round, client, 1),
                    "scaffold-alpha": self.alpha(d),
                    "scafcom-beta": cfg.scafcom_beta,
                    "momentum": self.momentum,
                    "round": server_round,
                    "committed-round": self._accepted_round.get(client, -1),
                },
            )
            for client in clients
        }

    def aggregate(self, server_round: int, state: GlobalState, replies: Iterable[Reply]) -> AggregateResult:
        result = AggregateResult(state=state)
        sums = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in state.items()}
        losses = WeightedMetricMeans()
        count = 0
        for reply in replies:
            try:
                weight = check_weight(reply.client, reply.payload.num_examples)
                deltas = self._decode(server_round, state, reply)
            except PayloadError as err:
                result.rejected[reply.client] = str(err)
                continue
            for key, delta in deltas.items():
                sums[key].add_(torch.from_numpy(delta))
            count += 1
            result.accepted.append(reply.client)
            self._accepted_round[reply.client] = server_round
            self._contributors.add(reply.client)
            losses.add(reply.payload.metrics, weight)
        result.metrics.update(losses.means())
        if not count:
            return result
        cfg = self.config
        control = self.control()  # c before this round's update, as the clients used it
        step = cfg.server_lr * cfg.local_steps * cfg.sgd_lr
        d = sum(v.numel() for v in state.values())
        alpha = self.alpha(d)
        new_state = {}
        for key, total in sums.items():
            new_state[key] = (state[key].double() - step * (control[key].double() + total / count)).float()
            self._control_sum[key].add_(total, alpha=alpha)
        result.state = new_state
        return result

    def _decode(self, server_round: int, state: GlobalState, reply: Reply) -> dict[str, np.ndarray]:
        arrays = reply.payload.arrays
        missing, extra = set(state) - set(arrays), set(arrays) - set(state)
        if missing or extra:
            raise PayloadError(
                f"client {reply.client}: a reply carries one update per trained tensor; "
                f"missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}"
            )
        seed = derive_seed(self.config.seed, server_round, reply.client, 1)
        out = {}
        for key, buffer in arrays.items():
            try:
                flat = self.codec.decode(buffer, state[key].numel(), key_seed(seed, key))
            except CodecError as err:
                raise CodecError(f"client {reply.client}: '{key}': {err}") from None
            out[key] = flat.reshape(tuple(state[key].shape)).astype(np.float64)
        return out

    # ---- client half -------------------------------------------------------------------------
    def local(self, model: torch.nn.Module, data: LocalData, instruction: Instruction,
              client_state: dict[str, Any]) -> Payload:
        cfg = instruction.config
        keys = [k for k in instruction.arrays if not k.startswith(CONTROL_PREFIX)]
        params = dict(model.named_parameters())
        unknown = [k for k in keys if k not in params]
        if unknown:
            raise KeyError(f"instruction names parameters this model lacks: {unknown[:5]}")
        x = {k: torch.from_numpy(np.asarray(instruction.arrays[k], dtype=np.float32)) for k in keys}
        commit_pending(client_state, int(cfg["committed-round"]), {k: tuple(v.shape) for k, v in x.items()})
        c = {k: torch.from_numpy(np.asarray(instruction.arrays[CONTROL_PREFIX + k], dtype=np.float32)) for k in keys}
        c_i = {k: torch.from_numpy(client_control(client_state, k, tuple(x[k].shape))) for k in keys}
        with torch.no_grad():
            for key in keys:
                params[key].copy_(x[key])
        steps, lr = int(cfg["local-steps"]), float(cfg["sgd-lr"])
        stats = train_steps(
            model, data, trainable=keys, steps=steps, batch_size=int(cfg["batch-size"]), lr=lr,
            seed=int(cfg["seed"]), optimizer="sgd", gradient_correction={k: c[k] - c_i[k] for k in keys},
        )
        codec = Codec.parse(str(cfg["codec"]))
        beta = float(cfg["scafcom-beta"])
        arrays: dict[str, np.ndarray] = {}
        error_sq = sent_sq = 0.0
        for key in keys:
            y = params[key].detach().to("cpu", torch.float32)
            g_i = (x[key] - y) / (steps * lr) - c[key] + c_i[key]  # mean corrected local gradient
            if cfg.get("momentum"):
                v_i = client_state.get(CLIENT_MOMENTUM + key)
                v_i = g_i if v_i is None else (1 - beta) * torch.from_numpy(v_i) + beta * g_i
                client_state[CLIENT_MOMENTUM + key] = v_i.numpy()
                target = v_i - c_i[key]
            else:
                target = g_i - c_i[key]
            encoded = codec.encode(target.numpy().reshape(-1), key_seed(int(cfg["codec-seed"]), key))
            arrays[key] = encoded.buffer
            client_state[PENDING + key] = encoded.buffer
            error_sq += float(np.sum((encoded.decoded - target.numpy().reshape(-1)) ** 2))
            sent_sq += float(np.dot(encoded.decoded, encoded.decoded))
        client_state.update({PENDING_ROUND: int(cfg["round"]), PENDING_SEED: int(cfg["codec-seed"]),
                             PENDING_CODEC: codec.spec, PENDING_ALPHA: float(cfg["scaffold-alpha"])})
        return Payload(arrays, data.num_examples, {
            "train-loss": stats.mean_loss, "train-seconds": stats.seconds,
            "codec-relative-error": (error_sq / sent_sq) ** 0.5 if sent_sq > 0 else 0.0,
        })


def client_control(client_state: Mapping[str, Any], key: str, shape: tuple[int, ...]) -> np.ndarray:
    """This client's c_i for ``key`` (zeros before its first committed update)."""
    held = client_state.get(CLIENT_CONTROL + key)
    return np.zeros(tuple(shape), dtype=np.float32) if held is None else np.asarray(held, dtype=np.float32)


def commit_pending(client_state: dict[str, Any], committed_round: int, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Fold the pending update into c_i if the server accepted it (``committed_round`` is the last
    round whose reply it folded in); drop it either way."""
    pending_round = client_state.pop(PENDING_ROUND, None)
    seed = client_state.pop(PENDING_SEED, None)
    spec = client_state.pop(PENDING_CODEC, None)
    alpha = client_state.pop(PENDING_ALPHA, None)
    buffers = {k[len(PENDING):]: client_state.pop(k) for k in [k for k in client_state if k.startswith(PENDING)]}
    if pending_round is None or int(pending_round) != committed_round:
        return
    codec = Codec.parse(str(spec))
    for key, buffer in buffers.items():
        if key not in shapes:
            continue
        delta = codec.decode(np.asarray(buffer, dtype=np.uint8), int(np.prod(shapes[key])), key_seed(int(seed), key))
        held = client_control(client_state, key, shapes[key])
        client_state[CLIENT_CONTROL + key] = held + np.float32(alpha) * delta.reshape(shapes[key])


class Scallion(ControlledAveraging):
    """SCALLION: controlled averaging with an unbiased codec (default ``randk:0.05+q8``)."""

    name = "scallion"
    default_codec = "randk:0.05+q8"

    def check_codec(self, codec: Codec) -> None:
        if not codec.unbiased:
            raise ValueError(
                f"scallion needs an unbiased codec (none, randk:R, qB or randk:R+qB); '{codec.spec}' is "
                "biased: use scafcom for top-k or sign"
            )

    def alpha(self, d: int) -> float:
        omega = self.codec.omega(d) or 0.0
        return self.config.scaffold_alpha or 1.0 / (1.0 + omega)


class Scafcom(ControlledAveraging):
    """SCAFCOM: controlled averaging with local momentum and a biased codec (default ``topk:0.02+q8``)."""

    name = "scafcom"
    default_codec = "topk:0.02+q8"
    momentum = True


__all__: Sequence[str] = ("ControlledAveraging", "ControlledAveragingConfig", "Scafcom", "Scallion")
