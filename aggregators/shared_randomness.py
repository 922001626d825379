r"""Shared randomness: the one way every party generates the same random tensors, and the
machinery that keeps every party's copy of the global weights identical.

Seed-based methods (Ferret, FedKSeed, one-byte zeroth-order, FRL's initial scores) never send
their random directions: server and clients regenerate them. That only works if every party
produces bit-identical fp32 tensors, so all of them come from :func:`seeded_noise`, which derives
a CPU ``torch.Generator`` seed from

    (manifest digest, run seed, round, client, block, index)

with SHA-256 and draws fp32 noise on the CPU (move it to the GPU afterwards). The
:class:`Manifest` fixes, and versions, the parameter names and shapes the noise is laid over and
cuts their concatenation into fixed-size blocks (a block may span or split tensors); its digest is
part of every key, so parties with different manifests never silently use different directions
under the same key. Blocks are the unit of generation and reconstruction: memory is
O(largest block × rows), and generation work splits across threads by block.

:class:`ReplayAlgorithm` is the base of the methods whose clients keep their own copy of the global
weights and *replay* each round's aggregate (coefficients or seed scalars) instead of downloading
the model. The server keeps a per-round ledger; an instruction carries the entries a client misses
(or, when those would be larger than the weights, the weights themselves), and every
``hash-every`` rounds the hash of the weights the client must now hold (:func:`state_hash`); a
mismatch raises :class:`WeightsMismatchError`, which stops the run.

Exact replay needs every party to do the same floating-point work: replay happens on the CPU in
fp32, in a fixed order, through the same function on server and client. That is bit-exact between
processes on one machine (simulation, tests) and between machines with the same torch build and
CPU instruction set; where BLAS kernels differ the hash check catches the divergence.

:class:`OneByteCodec` is the 8-bit scalar codec of the one-byte zeroth-order scheme (Zelikman et
al., "Just One Byte (per gradient)", 2023): 1 sign bit and a 7-bit index into log-spaced
magnitudes between ``low`` and ``high``.
"""

from __future__ import annotations

import hashlib
import math
import os
from abc import abstractmethod
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

from aggregators.base import (
    AggregateResult,
    Algorithm,
    ClientId,
    ConfigValue,
    GlobalState,
    Instruction,
    Reply,
)

MANIFEST_VERSION = 2
DISTRIBUTIONS = ("normal", "uniform", "rademacher", "truncated-normal")


@dataclass(frozen=True)
class Manifest:
    """Parameter names and shapes in a fixed order; their concatenation (the *vector*, ``numel``
    fp32 values) is cut into blocks of ``block_size`` elements (the last may be shorter)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    block_size: int
    version: int = MANIFEST_VERSION

    def __post_init__(self) -> None:
        if len(self.names) != len(self.shapes):
            raise ValueError(f"{len(self.names)} names but {len(self.shapes)} shapes")
        if len(set(self.names)) != len(self.names):
            raise ValueError("manifest names must be unique")
        if self.block_size < 1:
            raise ValueError(f"block size must be at least 1, got {self.block_size}")
        if not self.names:
            raise ValueError("a manifest needs at least one parameter")

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], block_size: int) -> Manifest:
        """The tensors of ``state`` in its order."""
        return cls(tuple(state), tuple(tuple(int(d) for d in t.shape) for t in state.values()), int(block_size))

    @cached_property
    def numel(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)

    @property
    def num_blocks(self) -> int:
        return -(-self.numel // self.block_size)

    def block_slice(self, block: int) -> slice:
        if not 0 <= block < self.num_blocks:
            raise IndexError(f"block {block} out of range (the manifest has {self.num_blocks})")
        return slice(block * self.block_size, min((block + 1) * self.block_size, self.numel))

    def block_numel(self, block: int) -> int:
        piece = self.block_slice(block)
        return piece.stop - piece.start

    @cached_property
    def digest(self) -> str:
        """sha256 over the version, names, shapes and block size."""
        text = f"v{self.version};b{self.block_size};"
        text += ";".join(f"{n}:{s}" for n, s in zip(self.names, self.shapes, strict=True))
        return hashlib.sha256(text.encode()).hexdigest()

    def flatten(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The manifest's tensors of ``state`` as one new flat fp32 CPU vector."""
        return torch.cat([state[name].detach().reshape(-1).to("cpu", torch.float32) for name in self.names])

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """``vector`` as named tensors of their manifest shapes (views, no copy)."""
        if vector.numel() != self.numel:
            raise ValueError(f"the manifest has {self.numel} elements, got a vector of {vector.numel()}")
        out, offset = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            size = math.prod(shape)
            out[name] = vector[offset : offset + size].view(shape)
            offset += size
        return out

    def to_config(self) -> dict[str, ConfigValue]:
        return {"manifest-names": list(self.names), "manifest-block-size": self.block_size,
                "manifest-digest": self.digest}


def noise_seed(manifest: Manifest, run_seed: int, server_round: int, client: int, block: int, index: int) -> int:
    """The 63-bit generator seed of one noise draw (see module docstring)."""
    key = f"{manifest.digest}|{run_seed}|{server_round}|{client}|{block}|{index}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") >> 1


def truncated_normal_variance(bound: float) -> float:
    r"""Variance of N(0, 1) truncated to :math:`[-a, a]`: :math:`1 - 2a\varphi(a)/(2\Phi(a) - 1)`
    (≈ :math:`a^2/3` for small :math:`a`)."""
    a = float(bound)
    if a < 1e-3:  # the closed form cancels catastrophically; its series is exact to fp64 here
        return a * a / 3.0 - 2.0 * a**4 / 45.0
    phi = math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
    return 1.0 - 2.0 * a * phi / math.erf(a / math.sqrt(2))


def seeded_noise(
    manifest: Manifest, run_seed: int, server_round: int, client: int, block: int, index: int,
    *, rows: int | None = None, distribution: str = "normal",
) -> torch.Tensor:
    r"""fp32 noise over ``block`` for the key (run seed, round, client, block, index), on the CPU.

    Shape ``(block_numel,)``, or ``(rows, block_numel)`` when ``rows`` is given (one generator draws
    all rows). ``distribution``: ``normal`` N(0, 1); ``rademacher`` ±1; ``truncated-normal``
    N(0, 1) truncated to :math:`[-1/\sqrt{d_b}, 1/\sqrt{d_b}]` (:math:`d_b` the block size, so
    every row has norm ≤ 1; drawn by inverting the CDF, variance
    :func:`truncated_normal_variance`). ``client`` is -1 for noise shared by all clients.
    """
    generator = torch.Generator(device="cpu").manual_seed(
        noise_seed(manifest, run_seed, server_round, client, block, index)
    )
    numel = manifest.block_numel(block)
    shape = (numel,) if rows is None else (int(rows), numel)
    if distribution == "normal":
        return torch.randn(shape, generator=generator, dtype=torch.float32)
    if distribution == "uniform":
        return torch.rand(shape, generator=generator, dtype=torch.float32).mul_(2).sub_(1)
    if distribution == "rademacher":
        return torch.randint(0, 2, shape, generator=generator, dtype=torch.int8).to(torch.float32).mul_(2).sub_(1)
    if distribution == "truncated-normal":
        # u ~ U(0, 1); x = Φ⁻¹(Φ(-a) + u (Φ(a) - Φ(-a))) = √2 erfinv(erf(a/√2) (2u - 1))
        scale = math.erf(1.0 / math.sqrt(2.0 * numel))
        values = torch.rand(shape, generator=generator, dtype=torch.float32)
        return values.mul_(2.0 * scale).sub_(scale).erfinv_().mul_(math.sqrt(2.0))
    raise ValueError(f"unknown distribution '{distribution}'; use one of {', '.join(DISTRIBUTIONS)}")


def for_each_block(manifest: Manifest, work: Callable[[int], None], threads: int | None = None) -> None:
    """Run ``work(block)`` for every block on a thread pool (torch releases the GIL while it
    generates). Each call must touch only its own block, which keeps results independent of the
    thread count."""
    threads = threads or min(8, os.cpu_count() or 1)
    if threads <= 1 or manifest.num_blocks == 1:
        for block in range(manifest.num_blocks):
            work(block)
        return
    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(work, block) for block in range(manifest.num_blocks)]:
            future.result()


def state_hash(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the keys, shapes and fp32 bytes of a state (independent of key order)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{key}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


class WeightsMismatchError(RuntimeError):
    """Server and client global weights differ: shared randomness would silently diverge."""


class SyncError(RuntimeError):
    """The client does not hold the weights the server assumed; the server will resend them."""


def check_same_weights(expected_hash: str, state: Mapping[str, torch.Tensor], who: str) -> None:
    """Raise :class:`WeightsMismatchError` unless ``state`` hashes to ``expected_hash``."""
    actual = state_hash(state)
    if actual != expected_hash:
        raise WeightsMismatchError(
            f"{who}: global weights hash {actual[:12]}… but the server's is {expected_hash[:12]}…; "
            "the parties' models diverged (different package versions, devices or a missed update)"
        )


def bind_parameters(model: torch.nn.Module, manifest: Manifest, vector: torch.Tensor) -> None:
    """Make the model's manifest parameters views into ``vector`` (on the model's device), so that
    updating the vector in place updates the model and training the model updates the vector."""
    params = dict(model.named_parameters())
    missing = [name for name in manifest.names if name not in params]
    if missing:
        raise KeyError(f"the model has no parameters named {missing[:5]}")
    for name, view in manifest.unflatten(vector).items():
        if tuple(params[name].shape) != tuple(view.shape):
            raise ValueError(f"'{name}' has shape {tuple(params[name].shape)}, the manifest says {tuple(view.shape)}")
        params[name].data = view


LEDGER_PREFIX = "ledger."
FULL_VECTOR = "full-vector"
HELD_VECTOR, HELD_ROUND, HELD_DIGEST = "replay.vector", "replay.round", "replay.digest"


class ReplayAlgorithm(Algorithm):
    """Base of the methods whose clients keep the global weights and replay each round's aggregate.

    Subclasses say what one round's aggregate (a ledger *entry*: named numpy arrays) is and how to
    apply it to the weight vector; this class keeps the per-round ledger, tells each client which
    entries it misses (or sends the weights when they are smaller), checks the weight hash every
    ``hash_every`` rounds and maintains the server's state by the very function clients use.
    Clients never seen are assumed to hold the pretrained weights (round 0), which every party
    has, so a new or forgotten client rebuilds the model from the pretrained weights plus the ledger.
    """

    block_size: int = 1 << 20
    hash_every: int = 1

    def __init__(self) -> None:
        self.manifest: Manifest | None = None
        self.ledger: dict[int, dict[str, np.ndarray]] = {}
        self.held: dict[ClientId, int] = {}

    # ---- what a subclass defines ---------------------------------------------------------------
    @abstractmethod
    def replay_config(self) -> dict[str, ConfigValue]:
        """Everything :meth:`apply_entry` needs besides the manifest (sent in every instruction)."""

    @abstractmethod
    def round_config(self, server_round: int, client: ClientId) -> dict[str, ConfigValue]:
        """The method's own fields of a client's instruction (steps, learning rate, seeds...)."""

    def round_arrays(self, server_round: int) -> dict[str, np.ndarray]:
        """Arrays every client gets this round besides the sync (e.g. seed probabilities)."""
        return {}

    @abstractmethod
    def round_entry(
        self, server_round: int, state: GlobalState, replies: Iterable[Reply], result: AggregateResult
    ) -> dict[str, np.ndarray]:
        """Validate and fold the replies (filling ``result.accepted``/``rejected``/``metrics``);
        return the round's ledger entry (``{}`` when nothing was accepted)."""

    @staticmethod
    @abstractmethod
    def apply_entry(
        vector: torch.Tensor, manifest: Manifest, server_round: int, entry: Mapping[str, np.ndarray],
        replay: Mapping[str, Any],
    ) -> None:
        """Apply round ``server_round``'s ``entry`` to ``vector`` in place (CPU, fp32)."""

    # ---- server half -------------------------------------------------------------------------
    def init_state(self, initial, layers=None) -> GlobalState:
        state = super().init_state(initial)
        self.manifest = Manifest.from_state(state, self.block_size)
        self.ledger, self.held = {}, {}
        return state

    def forget(self, client: ClientId) -> None:
        self.held.pop(client, None)

    def ledger_bytes(self, after: int, upto: int) -> int:
        """Bytes of the ledger entries of rounds ``after + 1 .. upto``."""
        return sum(a.nbytes for r in range(after + 1, upto + 1) for a in self.ledger.get(r, {}).values())

    def _sync(self, held: int, server_round: int, state: GlobalState) -> tuple[dict[str, np.ndarray], dict]:
        assert self.manifest is not None, "init_state first"
        latest = server_round - 1
        config: dict[str, ConfigValue] = {**self.manifest.to_config(), **self.replay_config(), "sync-to": latest}
        if self.ledger_bytes(held, latest) > 4 * self.manifest.numel:
            config["sync-from"] = -1
            arrays = {FULL_VECTOR: self.manifest.flatten(state).numpy()}
        else:
            config["sync-from"] = held
            arrays = {
                f"{LEDGER_PREFIX}{r}.{name}": value
                for r in range(held + 1, latest + 1) for name, value in self.ledger.get(r, {}).items()
            }
        return arrays, config

    def plan(self, server_round, clients, state, probes=None) -> dict[ClientId, Instruction]:
        common = self.round_arrays(server_round)
        check = {"weights-hash": state_hash(state)} if (server_round - 1) % self.hash_every == 0 else {}
        syncs: dict[int, tuple[dict[str, np.ndarray], dict]] = {}
        instructions = {}
        for client in clients:
            held = self.held.get(client, 0)
            if held not in syncs:  # clients in the same position share one arrays dict (encoded once)
                arrays, sync = self._sync(held, server_round, state)
                syncs[held] = ({**arrays, **common}, sync)
            arrays, sync = syncs[held]
            config = {**sync, **check, "server-round": server_round, **self.round_config(server_round, client)}
            instructions[client] = Instruction(arrays, config)
            self.held[client] = server_round - 1
        return instructions

    def aggregate(self, server_round: int, state: GlobalState, replies: Iterable[Reply]) -> AggregateResult:
        assert self.manifest is not None, "init_state first"
        result = AggregateResult(state=state)
        entry = self.round_entry(server_round, state, replies, result)
        self.ledger[server_round] = entry
        if entry:
            vector = self.manifest.flatten(state)
            self.apply_entry(vector, self.manifest, server_round, entry, self.replay_config())
            result.state = {**state, **{k: v.clone() for k, v in self.manifest.unflatten(vector).items()}}
        result.metrics["ledger-bytes"] = float(sum(a.nbytes for a in entry.values()))
        return result

    # ---- client half -------------------------------------------------------------------------
    def synced_vector(
        self, model: torch.nn.Module, instruction: Instruction, client_state: dict[str, Any]
    ) -> tuple[Manifest, torch.Tensor]:
        """Bring this client's copy of the global weights to the round the server says, check its
        hash when asked, remember it in ``client_state``; return the manifest and a CPU copy.

        ``model`` must hold the pretrained weights (the adapter passes a fresh model).
        """
        cfg, arrays = instruction.config, instruction.arrays
        params = dict(model.named_parameters())
        names = [str(n) for n in cfg["manifest-names"]]
        missing = [n for n in names if n not in params]
        if missing:
            raise SyncError(f"the server's manifest names parameters this model lacks: {missing[:5]}")
        manifest = Manifest(tuple(names), tuple(tuple(params[n].shape) for n in names), int(cfg["manifest-block-size"]))
        if manifest.digest != cfg["manifest-digest"]:
            raise SyncError(
                f"this client's model does not match the server's manifest (digest {manifest.digest[:12]}… vs "
                f"{str(cfg['manifest-digest'])[:12]}…): same task and fedtune version on both sides?"
            )
        sync_from, sync_to = int(cfg["sync-from"]), int(cfg["sync-to"])
        if sync_from < 0:
            full = np.asarray(arrays[FULL_VECTOR], dtype=np.float32)
            if full.shape != (manifest.numel,):
                raise SyncError(f"full weights have shape {full.shape}, expected ({manifest.numel},)")
            vector, first = torch.from_numpy(full.copy()), sync_to + 1
        elif sync_from == 0:
            vector, first = manifest.flatten(params), 1
        else:
            if client_state.get(HELD_ROUND) != sync_from or client_state.get(HELD_DIGEST) != manifest.digest:
                raise SyncError(
                    f"this client holds the weights of round {client_state.get(HELD_ROUND, 'none')}, the server "
                    f"assumed round {sync_from}; it will resend them"
                )
            vector, first = torch.from_numpy(np.array(client_state[HELD_VECTOR], dtype=np.float32, copy=True)), sync_from + 1
        entries: dict[int, dict[str, np.ndarray]] = {}
        for key, value in arrays.items():
            if key.startswith(LEDGER_PREFIX):
                round_text, name = key[len(LEDGER_PREFIX):].split(".", 1)
                entries.setdefault(int(round_text), {})[name] = value
        for server_round in range(first, sync_to + 1):
            entry = entries.get(server_round, {})
            if entry:
                self.apply_entry(vector, manifest, server_round, entry, cfg)
        if "weights-hash" in cfg:
            check_same_weights(str(cfg["weights-hash"]), manifest.unflatten(vector), "this client")
        client_state[HELD_VECTOR] = vector.numpy().copy()
        client_state[HELD_ROUND] = sync_to
        client_state[HELD_DIGEST] = manifest.digest
        return manifest, vector


@dataclass(frozen=True)
class OneByteCodec:
    r"""Scalars to one byte each: bit 7 is the sign, bits 0–6 an index :math:`q` into log-spaced
    magnitudes :math:`m_q = \text{low}\cdot r^{q-1}`, :math:`q = 1..127`, :math:`r =
    (\text{high}/\text{low})^{1/126}`; :math:`q = 0` encodes zero (and magnitudes below
    ``low``/√r). Rounding happens in log space, so for :math:`|x|` in [low, high] the relative
    error is at most :math:`\sqrt r - 1` (:attr:`max_relative_error`); magnitudes above ``high``
    are clipped to ``high``.
    """

    low: float = 1e-6
    high: float = 1e2

    def __post_init__(self) -> None:
        if not 0 < self.low < self.high:
            raise ValueError(f"need 0 < low < high, got low={self.low}, high={self.high}")

    @property
    def ratio(self) -> float:
        return (self.high / self.low) ** (1.0 / 126)

    @property
    def max_relative_error(self) -> float:
        return math.sqrt(self.ratio) - 1.0

    def encode(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        if not np.isfinite(values).all():
            raise ValueError("cannot encode NaN or infinite scalars")
        magnitude = np.abs(values)
        with np.errstate(divide="ignore"):
            q = np.rint(np.log(np.maximum(magnitude, 1e-300) / self.low) / math.log(self.ratio)) + 1
        q = np.where(magnitude < self.low / math.sqrt(self.ratio), 0, np.clip(q, 1, 127)).astype(np.uint8)
        return (q | np.where(values < 0, 0x80, 0).astype(np.uint8)).astype(np.uint8)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes, dtype=np.uint8)
        q = (codes & 0x7F).astype(np.float64)
        magnitude = np.where(q == 0, 0.0, self.low * self.ratio ** (q - 1))
        return np.where(codes & 0x80, -magnitude, magnitude).astype(np.float32)
