r"""Shared randomness: the one way every party generates the same random tensors, and its checks.

Seed-based methods (Ferret, FedKSeed, one-byte zeroth-order, FRL's initial scores) never send
their random directions: server and clients regenerate them. That only works if every party
produces bit-identical fp32 tensors, so all of them must come from :func:`seeded_noise`, which
derives a CPU ``torch.Generator`` seed from

    (manifest digest, run seed, round, client, block, index)

with SHA-256 and draws fp32 noise on the CPU (move to the GPU afterwards). The
:class:`Manifest` fixes, and versions, the parameter names, shapes and block boundaries the noise
is laid over; its digest is part of every key, so parties with different manifests can never
silently use different directions under the same key. :func:`state_hash` lets server and clients
compare their global weights every N rounds and fail loudly on a mismatch.

:class:`OneByteCodec` is the 8-bit scalar codec of the one-byte zeroth-order scheme (Zelikman et
al., "Just One Byte (per gradient)", 2023): 1 sign bit and a 7-bit index into log-spaced
magnitudes between ``low`` and ``high``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Manifest:
    """Parameter names and shapes in a fixed order, cut into blocks of whole tensors.

    Blocks are the unit of generation and reconstruction (memory O(largest block)).
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    blocks: tuple[tuple[str, ...], ...]
    version: int = MANIFEST_VERSION

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], max_block_numel: int | None = None) -> Manifest:
        """Tensors in ``state``'s order; a new block starts when the current one would exceed
        ``max_block_numel`` elements (``None``: one block per tensor)."""
        names = tuple(state)
        shapes = tuple(tuple(int(d) for d in state[n].shape) for n in names)
        blocks: list[tuple[str, ...]] = []
        current: list[str] = []
        size = 0
        for name, shape in zip(names, shapes, strict=True):
            numel = math.prod(shape)
            if current and (max_block_numel is None or size + numel > max_block_numel):
                blocks.append(tuple(current))
                current, size = [], 0
            current.append(name)
            size += numel
        if current:
            blocks.append(tuple(current))
        return cls(names, shapes, tuple(blocks))

    @property
    def digest(self) -> str:
        """sha256 over the version, names, shapes and block boundaries."""
        text = f"v{self.version};" + ";".join(f"{n}:{s}" for n, s in zip(self.names, self.shapes, strict=True))
        text += "|" + "|".join(",".join(block) for block in self.blocks)
        return hashlib.sha256(text.encode()).hexdigest()

    def block_numel(self, block: int) -> int:
        shape = dict(zip(self.names, self.shapes, strict=True))
        return sum(math.prod(shape[name]) for name in self.blocks[block])

    def split(self, block: int, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """A block's flat vector as named tensors of their manifest shapes (views, no copy)."""
        shape = dict(zip(self.names, self.shapes, strict=True))
        if vector.numel() != self.block_numel(block):
            raise ValueError(f"block {block} has {self.block_numel(block)} elements, got {vector.numel()}")
        out, offset = {}, 0
        for name in self.blocks[block]:
            numel = math.prod(shape[name])
            out[name] = vector[offset : offset + numel].view(shape[name])
            offset += numel
        return out

    def flatten(self, block: int, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The tensors of ``block`` in ``state`` as one flat fp32 CPU vector."""
        return torch.cat([state[name].detach().reshape(-1).to("cpu", torch.float32) for name in self.blocks[block]])


def noise_seed(manifest: Manifest, run_seed: int, server_round: int, client: int, block: int, index: int) -> int:
    """The 63-bit generator seed of one noise vector (see module docstring)."""
    key = f"{manifest.digest}|{run_seed}|{server_round}|{client}|{block}|{index}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") >> 1


def seeded_noise(
    manifest: Manifest, run_seed: int, server_round: int, client: int, block: int, index: int,
    *, distribution: str = "normal",
) -> torch.Tensor:
    """fp32 noise over ``block`` for the key (run seed, round, client, block, index), on the CPU.

    ``distribution``: ``normal`` (N(0, 1)) or ``rademacher`` (±1). ``client`` is -1 for noise
    shared by all clients of a round.
    """
    generator = torch.Generator(device="cpu").manual_seed(
        noise_seed(manifest, run_seed, server_round, client, block, index)
    )
    numel = manifest.block_numel(block)
    if distribution == "normal":
        return torch.randn(numel, generator=generator, dtype=torch.float32)
    if distribution == "rademacher":
        return torch.randint(0, 2, (numel,), generator=generator, dtype=torch.int8).to(torch.float32).mul_(2).sub_(1)
    raise ValueError(f"unknown distribution '{distribution}'; use normal or rademacher")


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


def check_same_weights(expected_hash: str, state: Mapping[str, torch.Tensor], who: str) -> None:
    """Raise :class:`WeightsMismatchError` unless ``state`` hashes to ``expected_hash``."""
    actual = state_hash(state)
    if actual != expected_hash:
        raise WeightsMismatchError(
            f"{who}: global weights hash {actual[:12]}… but the server's is {expected_hash[:12]}…; "
            "the parties' models diverged (different package versions, devices or a missed update)"
        )


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
