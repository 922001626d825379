"""Choosing where a client trains."""

from __future__ import annotations

import torch


def best_device(preference: str = "auto") -> torch.device:
    """CUDA when present (or asked for), else CPU. ``preference``: auto, cpu, cuda, cuda:N."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device '{preference}' requested but CUDA is not available; use 'auto' or 'cpu'")
    return device
