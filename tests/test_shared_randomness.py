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
    truncated_normal_variance,
)


def _state():
    return {"a.weight": torch.zeros(3, 4), "a.bias": torch.zeros(3), "b.weight": torch.zeros(5, 3)}


def test_manifest_cuts_the_flat_vector_into_fixed_blocks_and_versions_its_layout():
    manifest = Manifest.from_state(_state(), block_size=8)
    assert manifest.numel == 30 and manifest.num_blocks == 4
    assert [manifest.block_numel(b) for b in range(4)] == [8, 8, 8, 6]
    assert manifest.block_slice(3) == slice(24, 30)
    with pytest.raises(IndexError, match="out of range"):
        manifest.block_slice(4)
    other = {**_state(), "b.weight": torch.zeros(5, 4)}
    assert Manifest.from_state(other, 8).digest != manifest.digest  # a shape change is a new manifest
    assert Manifest.from_state(_state(), 16).digest != manifest.digest  # so is a new block size
    assert Manifest.from_state(_state(), 8).digest == manifest.digest


def test_flatten_and_unflatten_are_inverse():
    manifest = Manifest.from_state(_state(), block_size=8)
    vector = torch.arange(30, dtype=torch.float32)
    parts = manifest.unflatten(vector)
    assert parts["a.weight"].shape == (3, 4) and parts["a.bias"].tolist() == [12.0, 13.0, 14.0]
    assert torch.equal(manifest.flatten(parts), vector)
    parts["a.bias"][0] = -1.0  # views: writes reach the vector
    assert vector[12] == -1.0
    with pytest.raises(ValueError, match="has 30 elements"):
        manifest.unflatten(torch.zeros(4))


def test_noise_is_bit_identical_for_a_key_and_differs_across_keys():
    manifest = Manifest.from_state(_state(), block_size=16)
    first = seeded_noise(manifest, 7, 3, 11, 0, 5)
    assert first.dtype == torch.float32 and first.shape == (16,)
    assert torch.equal(first, seeded_noise(manifest, 7, 3, 11, 0, 5))
    for changed in [(8, 3, 11, 0, 5), (7, 4, 11, 0, 5), (7, 3, 12, 0, 5), (7, 3, 11, 1, 5), (7, 3, 11, 0, 6)]:
        noise = seeded_noise(manifest, *changed)
        assert noise.shape != first.shape or not torch.equal(first, noise)
    signs = seeded_noise(manifest, 7, 3, 11, 1, 0, distribution="rademacher")
    assert set(signs.tolist()) <= {-1.0, 1.0}
    rows = seeded_noise(manifest, 7, 3, 11, 0, 5, rows=4, distribution="truncated-normal")
    assert rows.shape == (4, 16) and torch.equal(rows, seeded_noise(manifest, 7, 3, 11, 0, 5, rows=4,
                                                                      distribution="truncated-normal"))
    with pytest.raises(ValueError, match="unknown distribution"):
        seeded_noise(manifest, 7, 3, 11, 0, 5, distribution="cauchy")


def test_truncated_normal_bases_have_unit_bounded_rows_and_the_stated_variance():
    manifest = Manifest.from_state({"w": torch.zeros(400)}, block_size=400)
    bases = seeded_noise(manifest, 0, 1, -1, 0, 0, rows=2000, distribution="truncated-normal")
    bound = 1 / 400**0.5
    assert bases.abs().max() <= bound * (1 + 1e-6)
    assert bases.norm(dim=1).max() <= 1.0 + 1e-5
    rho = truncated_normal_variance(bound)
    assert rho == pytest.approx(bound**2 / 3, rel=1e-3)  # ≈ 1/(3 d)
    # 800 000 draws: the sample variance is within 1% of rho (its standard error is ~0.1%)
    assert float(bases.double().var()) == pytest.approx(rho, rel=0.01)
    assert abs(float(bases.double().mean())) < 4 * (rho / bases.numel()) ** 0.5
    assert truncated_normal_variance(1.0) == pytest.approx(0.2911, abs=1e-4)  # textbook value


def test_noise_is_bit_identical_in_a_separate_process():
    manifest = Manifest.from_state(_state(), block_size=16)
    here = [
        seeded_noise(manifest, 1, 2, 3, 1, 4).numpy().tobytes().hex(),
        seeded_noise(manifest, 1, 2, -1, 0, 0, rows=3, distribution="truncated-normal").numpy().tobytes().hex(),
    ]
    code = (
        "import torch\n"
        "from aggregators.shared_randomness import Manifest, seeded_noise\n"
        "state = {'a.weight': torch.zeros(3, 4), 'a.bias': torch.zeros(3), 'b.weight': torch.zeros(5, 3)}\n"
        "torch.manual_seed(999)  # the global RNG must not matter\n"
        "torch.set_num_threads(1)\n"
        "m = Manifest.from_state(state, 16)\n"
        "print(seeded_noise(m, 1, 2, 3, 1, 4).numpy().tobytes().hex())\n"
        "print(seeded_noise(m, 1, 2, -1, 0, 0, rows=3, distribution='truncated-normal').numpy().tobytes().hex())\n"
    )
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
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
