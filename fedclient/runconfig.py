"""The run config: Flower's ``[tool.flwr.app.config]`` keys (kebab-case) and their defaults.

``pyproject.toml`` carries the same table for ``flwr run``; a test keeps the two identical.
Both the coordinator and the client read it, so it lives in the client package (the coordinator
may import ``fedclient.tasks``, ``fedclient.wire`` and ``fedclient.runconfig``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

DEFAULT_RUN_CONFIG: dict[str, Any] = {
    "task": "minilm-bbc",
    "strategy": "fedavg",
    "num-server-rounds": 3,
    "fraction-train": 1.0,
    "fraction-evaluate": 0.0,
    "min-train-nodes": 1,
    "partition": "dirichlet",
    "alpha": 0.5,
    "seed": 0,
    "lr": 0.0005,
    "local-steps": 4,
    "batch-size": 16,
    "max-length": 0,
    "train-layers": "",
    "adapter": "",
    "lora-rank": 8,
    "lora-alpha": 16.0,
    "lora-dropout": 0.0,
    "lora-targets": "",
    "grad-accumulation": 1,
    "warmup-steps": 0,
    "lr-schedule": "constant",
    "precision": "fp32",
    "gradient-checkpointing": False,
    "selection": "regulated",
    "selection-lambda": 0.05,
    "layer-scores": "fresh",
    "score-batches": 4,
    "common-layers": "head",
    "layer-budget": "",
    "server-lr": 1.0,
    "hash-every": 1,
    "ferret-bases": 15000,
    "ferret-block-size": 4096,
    "ferret-seeds": "round",
    "seed-pool": 1024,
    "zo-steps": 100,
    "zo-lr": 0.002,
    "zo-eps": 0.001,
    "zo-block-size": 262144,
    "one-byte-low": 1e-06,
    "one-byte-high": 100.0,
    "frl-mode": "original",
    "frl-sparsity": 0.5,
    "frl-lr": 4.0,
    "frl-vote": "clipped",
    "codec": "",
    "sgd-lr": 0.2,
    "scaffold-alpha": 0.0,
    "scafcom-beta": 0.2,
    "dp": "off",
    "dp-epsilon": 8.0,
    "dp-delta": 1e-05,
    "clip": 1.0,
    "dp-noise-multiplier": 0.0,
    "secagg": False,
    "secagg-threshold": 0,
    "secagg-clip": 1000.0,
    "secagg-bits": 32,
    "secagg-max-weight": 10000,
    "checkpoint-every": 1,
    "keep-checkpoints": 3,
    "max-site-weight": 0.5,
    "round-timeout": 3600.0,
    "store": "sqlite:///fedtune-runs.db",
    "run-name": "",
    "resume": "",
    "mode": "train",
    "search-request": "",
    "search-idle-timeout": 1800.0,
    "fab-signature": "",
}

# Flower must not reach for the internet (telemetry, update checks, per-run `uv sync` of a
# multi-GB CUDA torch); Ray must bind loopback only. Set before Flower or Ray start.
QUIET_ENVIRONMENT = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TQDM_DISABLE": "1",
}


def quiet_environment() -> None:
    """Apply :data:`QUIET_ENVIRONMENT` (values already set by the user win)."""
    for key, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(key, value)


def resolve_run_config(run_config: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Defaults, then Flower's run config, then ``overrides``; unknown keys are an error."""
    merged = dict(DEFAULT_RUN_CONFIG)
    for source in (run_config, overrides or {}):
        unknown = set(source) - set(DEFAULT_RUN_CONFIG)
        if unknown:
            raise ValueError(f"unknown run-config key(s) {sorted(unknown)}; known keys: {', '.join(DEFAULT_RUN_CONFIG)}")
        merged.update(source)
    return merged


def csv_list(value: str) -> list[str]:
    """Split a comma-separated run-config string (run config values cannot be lists)."""
    return [item.strip() for item in str(value).split(",") if item.strip()]
