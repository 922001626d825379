"""The ClientApp's on-disk cache: same data as computing it, keyed by what it depends on, damaged
entries recomputed, and a warm process that no longer imports flwr-datasets or tokenizes."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from fedclient.tasks import cache


def test_a_value_is_computed_once_then_read_back(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDTUNE_CACHE_DIR", str(tmp_path))
    calls = []

    def compute() -> dict:
        calls.append(1)
        return {"x": torch.arange(5), "names": ["a", "b"]}

    key = cache.cache_key("unit", size=5)
    first, second = cache.cached(key, compute), cache.cached(key, compute)
    assert len(calls) == 1
    assert torch.equal(first["x"], second["x"]) and second["names"] == ["a", "b"]
    assert cache.cache_key("unit", size=6) != key != cache.cache_key("other", size=5)
    (tmp_path / key).write_bytes(b"not a torch file")  # damaged: recomputed and replaced
    assert torch.equal(cache.cached(key, compute)["x"], torch.arange(5)) and len(calls) == 2
    assert torch.equal(cache.cached(key, compute)["x"], torch.arange(5)) and len(calls) == 2
    assert [p.suffix for p in tmp_path.iterdir()] == [".pt"]  # no temporary files left


def test_off_disables_it(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDTUNE_CACHE_DIR", "off")
    calls = []
    for _ in range(2):
        cache.cached("k.pt", lambda: calls.append(1) or {"v": 1})
    assert len(calls) == 2 and cache.cache_dir() is None


_PROBE = """
import json, sys
from fedclient.tasks import PartitionSpec, get_task
task = get_task("tiny")
data = task.client_data(PartitionSpec("dirichlet", 3, 0.5, 0), 1)
print(json.dumps({"train": data.train.input_ids.sum().item(), "labels": data.train.labels.tolist(),
                  "flwr_datasets": "flwr_datasets" in sys.modules, "tokenized": "transformers" in sys.modules}))
"""


def test_a_warm_process_gets_the_same_share_without_partitioning_or_tokenizing(tmp_path: pathlib.Path) -> None:
    env = {**os.environ, "FEDTUNE_CACHE_DIR": str(tmp_path)}

    def probe() -> dict:
        out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    cold, warm = probe(), probe()
    assert cold["flwr_datasets"] and cold["tokenized"]
    assert not warm["flwr_datasets"] and not warm["tokenized"]
    assert (warm["train"], warm["labels"]) == (cold["train"], cold["labels"])
    assert len(list(tmp_path.glob("task-data-*.pt"))) == len(list(tmp_path.glob("partitions-*.pt"))) == 1
