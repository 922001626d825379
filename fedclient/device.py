"""Choosing where a client trains."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def best_device(preference: str = "auto") -> torch.device:
    """CUDA when present (or asked for), else CPU. ``preference``: auto, cpu, cuda, cuda:N."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device '{preference}' requested but CUDA is not available; use 'auto' or 'cpu'")
    return device


def describe_device(node_config: Mapping[str, Any]) -> str:
    """What this site trains on, as it tells the coordinator (e.g. ``cuda:0 NVIDIA H100``); torch
    only, so a ClientApp answering ``query.identify`` does not import the training stack."""
    device = best_device(str(node_config.get("device", "auto")))
    return f"{device} {torch.cuda.get_device_name(device)}" if device.type == "cuda" else str(device)
