"""Plain-torch local training shared by the client halves of the algorithms."""

from __future__ import annotations

import math
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from aggregators.base import Batch, LocalData


@dataclass
class TrainStats:
    """What a local training run did."""

    mean_loss: float
    steps: int
    examples_seen: int
    seconds: float


def check_local_training(lr: float, local_steps: int, batch_size: int) -> None:
    """Refuse local-training hyper-parameters no optimizer can run with."""
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if local_steps < 1:
        raise ValueError(f"local-steps must be at least 1, got {local_steps}")
    if batch_size < 1:
        raise ValueError(f"batch-size must be at least 1, got {batch_size}")


def set_trainable(model: torch.nn.Module, trainable: Collection[str]) -> list[torch.nn.Parameter]:
    """Make exactly the parameters named in ``trainable`` require gradients; return them."""
    names = set(trainable)
    params = []
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
        if name in names:
            params.append(param)
    missing = names - {n for n, _ in model.named_parameters()}
    if missing:
        raise KeyError(f"the model has no parameters named {sorted(missing)[:5]}")
    return params


def batch_loss(model: torch.nn.Module, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The training objective of ``outputs`` (what ``model`` computed for a batch) against
    ``labels``: the model's own ``objective(outputs, labels)`` where it declares one (a causal LM:
    cross-entropy on answer tokens only, ``fedclient/tasks/causal_lm.py``), else cross-entropy over
    class logits. Every trainer and estimator in ``aggregators/`` computes its loss here."""
    objective = getattr(model, "objective", None)
    if objective is not None:
        return objective(outputs, labels)
    return F.cross_entropy(outputs, labels)


def to_device(batch: Batch, device: torch.device) -> Batch:
    inputs, labels = batch
    return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}, labels.to(device)


def train_steps(
    model: torch.nn.Module,
    data: LocalData,
    *,
    trainable: Collection[str],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    weight_decay: float = 0.0,
    optimizer: str = "adamw",
    gradient_correction: Mapping[str, torch.Tensor] | None = None,
) -> TrainStats:
    """Run ``steps`` optimizer steps of cross-entropy on mini-batches of ``data``.

    Only the parameters named in ``trainable`` are updated; the optimizer state starts fresh,
    so the client carries no optimizer state between rounds. ``seed`` fixes the batch order and
    the dropout masks, so the same instruction on the same data gives the same result.
    ``optimizer`` is ``adamw`` or ``sgd`` (plain :math:`y \\leftarrow y - \\eta g`); with
    ``gradient_correction`` (a tensor per trainable name, SGD only) each step uses
    :math:`g + \text{correction}` (SCAFFOLD's :math:`g - c_i + c`).
    """
    if steps < 1:
        raise ValueError(f"local steps must be at least 1, got {steps}")
    device = next(model.parameters()).device
    params = set_trainable(model, trainable)
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    elif optimizer == "adamw":
        if gradient_correction:
            raise ValueError("a gradient correction needs plain SGD steps")
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"unknown optimizer '{optimizer}'; use adamw or sgd")
    named = dict(model.named_parameters())
    corrections = [(named[k], v.to(device)) for k, v in (gradient_correction or {}).items()]
    model.train()
    start = time.perf_counter()
    total_loss, seen = 0.0, 0
    batches = data.batches(batch_size, seed)
    # dropout draws from the global RNG: seed it (without disturbing the caller's RNG state)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for _ in range(steps):
            inputs, labels = to_device(next(batches), device)
            opt.zero_grad(set_to_none=True)
            loss = batch_loss(model, model(**inputs), labels)
            loss.backward()
            for param, correction in corrections:
                if param.grad is None:
                    param.grad = correction.clone()
                else:
                    param.grad.add_(correction)
            opt.step()
            total_loss += float(loss.detach()) * len(labels)
            seen += len(labels)
    if not math.isfinite(total_loss):
        raise FloatingPointError(f"local training diverged (loss {total_loss}); lower the learning rate")
    return TrainStats(total_loss / seen, steps, seen, time.perf_counter() - start)
