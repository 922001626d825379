"""The shared-randomness building blocks: seeded noise, manifests, weight hashes, one-byte codec."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from aggregators.shared_randomness import (
    Manifest,
    OneByteCodec,
    WeightsMismatchError,
    check_same_weights,
    seeded_noise,
    state_hash,
)


def _state():
    return {"a.weight": torch.zeros(3, 4), "a.bias": torch.zeros(3), "b.weight": torch.zeros(5, 3)}


def test_manifest_blocks_and_digest():
    manifest = Manifest.from_state(_state(), max_block_numel=15)
    assert manifest.blocks == (("a.weight", "a.bias"), ("b.weight",))
    assert manifest.block_numel(0) == 15
    assert Manifest.from_state(_state()).blocks == (("a.weight",), ("a.bias",), ("b.weight",))
    other = {**_state(), "b.weight": torch.zeros(5, 4)}
    assert Manifest.from_state(other, 15).digest != manifest.digest  # a shape change is a new manifest
    assert Manifest.from_state(_state(), 15).digest == manifest.digest


def test_split_and_flatten_are_inverse():
    manifest = Manifest.from_state(_state(), max_block_numel=15)
    vector = torch.arange(15, dtype=torch.float32)
    parts = manifest.split(0, vector)
    assert parts["a.weight"].shape == (3, 4) and parts["a.bias"].tolist() == [12.0, 13.0, 14.0]
    assert torch.equal(manifest.flatten(0, parts), vector)
    with pytest.raises(ValueError, match="has 15 elements"):
        manifest.split(0, torch.zeros(4))


def test_noise_is_bit_identical_for_a_key_and_differs_across_keys():
    manifest = Manifest.from_state(_state(), max_block_numel=15)
    first = seeded_noise(manifest, 7, 3, 11, 0, 5)
    assert first.dtype == torch.float32 and first.shape == (15,)
    assert torch.equal(first, seeded_noise(manifest, 7, 3, 11, 0, 5))
    for changed in [(8, 3, 11, 0, 5), (7, 4, 11, 0, 5), (7, 3, 12, 0, 5), (7, 3, 11, 0, 6)]:
        assert not torch.equal(first, seeded_noise(manifest, *changed))
    signs = seeded_noise(manifest, 7, 3, 11, 1, 0, distribution="rademacher")
    assert set(signs.tolist()) <= {-1.0, 1.0}


def test_noise_is_bit_identical_in_a_separate_process():
    manifest = Manifest.from_state(_state(), max_block_numel=15)
    here = seeded_noise(manifest, 1, 2, 3, 1, 4).numpy().tobytes().hex()
    code = (
        "import torch\n"
        "from aggregators.shared_randomness import Manifest, seeded_noise\n"
        "state = {'a.weight': torch.zeros(3, 4), 'a.bias': torch.zeros(3), 'b.weight': torch.zeros(5, 3)}\n"
        "torch.manual_seed(999)  # the global RNG must not matter\n"
        "print(seeded_noise(Manifest.from_state(state, 15), 1, 2, 3, 1, 4).numpy().tobytes().hex())\n"
    )
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert there == here


def test_state_hash_detects_any_change():
    state = {"w": torch.ones(4), "b": torch.zeros(2)}
    digest = state_hash(state)
    assert digest == state_hash({"b": torch.zeros(2), "w": torch.ones(4)})  # key order does not matter
    check_same_weights(digest, state, "client 3")
    changed = {"w": torch.tensor([1.0, 1.0, 1.0, 1.0 + 1e-7]), "b": torch.zeros(2)}
    with pytest.raises(WeightsMismatchError, match="client 3"):
        check_same_weights(digest, changed, "client 3")


def test_one_byte_codec_round_trips_within_its_stated_error():
    codec = OneByteCodec(low=1e-6, high=1e2)
    rng = np.random.default_rng(0)
    values = np.sign(rng.standard_normal(10_000)) * np.exp(rng.uniform(np.log(1e-6), np.log(1e2), 10_000))
    codes = codec.encode(values)
    assert codes.dtype == np.uint8 and codes.nbytes == len(values)  # one byte per scalar
    decoded = codec.decode(codes)
    relative = np.abs(decoded - values) / np.abs(values)
    assert relative.max() <= codec.max_relative_error + 1e-6
    assert codec.max_relative_error < 0.08
    assert np.array_equal(np.sign(decoded), np.sign(values))
    assert codec.decode(codec.encode(np.array([0.0, 1e-12, 1e9, -1e9]))).tolist() == [0.0, 0.0, 100.0, -100.0]
    with pytest.raises(ValueError, match="NaN"):
        codec.encode(np.array([np.nan]))
