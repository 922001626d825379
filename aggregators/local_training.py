"""Plain-torch local training shared by the client halves of the algorithms."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from aggregators.base import Batch, LocalData


@dataclass
class TrainStats:
    """What a local training run did."""

    mean_loss: float
    steps: int  # optimizer steps taken (fp16 skips a step whose gradients overflowed)
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


LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("fp32", "bf16", "fp16")
MAX_GRAD_ACCUMULATION = 64


@dataclass(frozen=True)
class TrainerOptions:
    r"""How a site runs its optimizer steps, beyond ``lr``, ``local-steps`` and ``batch-size``.

    - ``grad_accumulation`` :math:`A`: each optimizer step averages the gradients of :math:`A`
      mini-batches of ``batch-size`` (an effective batch :math:`A\cdot B` in the memory of one of
      :math:`B`); ``local-steps`` counts optimizer steps.
    - ``warmup_steps`` :math:`W` and ``lr_schedule``: step :math:`s` of the run (counted over all
      rounds, :math:`s = (t-1)E + j` for local step :math:`j` of round :math:`t`, out of
      :math:`S = TE`) uses :math:`\eta_s = \eta\,\frac{s+1}{W}` while :math:`s < W`, then
      :math:`\eta` (``constant``) or :math:`\eta\,\tfrac12\bigl(1+\cos\pi\frac{s-W}{S-W}\bigr)`
      (``cosine``, as Hugging Face's ``get_cosine_schedule_with_warmup`` without its step of
      zero). Each round's optimizer starts afresh; only the learning rate follows the run.
    - ``precision``: ``bf16`` or ``fp16`` runs forward and loss under ``torch.autocast`` on a
      CUDA device (fp16 with a gradient scaler); weights, optimizer and what is sent stay fp32.
      On a CPU it is ignored (fp32), since CPU autocast is slower than fp32 there.
    - ``gradient_checkpointing``: recompute each block's activations in the backward pass
      (Hugging Face models' ``gradient_checkpointing_enable``), trading compute for memory.

    The coordinator sets these per run (run-config keys in :data:`TRAINER_CONFIG_KEYS`); values
    outside these ranges raise ValueError wherever they are read. What a site will spend on a round
    (steps, batch size, accumulation, sequence length) is its policy's to bound
    (:meth:`fedclient.policy.SitePolicy.check_workload`), checked before any training.
    """

    grad_accumulation: int = 1
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    precision: str = "fp32"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if not 1 <= int(self.grad_accumulation) <= MAX_GRAD_ACCUMULATION:
            raise ValueError(f"grad-accumulation must be between 1 and {MAX_GRAD_ACCUMULATION}, "
                             f"got {self.grad_accumulation}")
        if int(self.warmup_steps) < 0:
            raise ValueError(f"warmup-steps must be 0 or more, got {self.warmup_steps}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TrainerOptions:
        """Read the kebab-case keys of a run config or an instruction (absent keys: defaults)."""
        defaults = cls()
        return cls(
            grad_accumulation=int(config.get("grad-accumulation", defaults.grad_accumulation)),
            warmup_steps=int(config.get("warmup-steps", defaults.warmup_steps)),
            lr_schedule=str(config.get("lr-schedule", defaults.lr_schedule)),
            precision=str(config.get("precision", defaults.precision)),
            gradient_checkpointing=bool(config.get("gradient-checkpointing", defaults.gradient_checkpointing)),
        )

    def instruction(self, server_round: int, local_steps: int, num_rounds: int) -> dict[str, Any]:
        """What a round's instruction carries: these options and where the round's steps sit in
        the run's schedule (``schedule-step``, ``schedule-steps``)."""
        return {
            "grad-accumulation": self.grad_accumulation, "warmup-steps": self.warmup_steps,
            "lr-schedule": self.lr_schedule, "precision": self.precision,
            "gradient-checkpointing": self.gradient_checkpointing,
            "schedule-step": max(0, server_round - 1) * local_steps,
            "schedule-steps": max(num_rounds, server_round) * local_steps,
        }

    def lr_factor(self, step: int, total_steps: int) -> float:
        r""":math:`\eta_s / \eta` for step ``step`` (0-based) of ``total_steps`` (formula above)."""
        step = max(0, step)
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.lr_schedule == "constant" or total_steps <= self.warmup_steps:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / (total_steps - self.warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        """The autocast dtype on ``device``, or None for fp32 (always on a CPU)."""
        if device.type != "cuda" or self.precision == "fp32":
            return None
        return torch.bfloat16 if self.precision == "bf16" else torch.float16


TRAINER_CONFIG_KEYS = ("grad-accumulation", "warmup-steps", "lr-schedule", "precision", "gradient-checkpointing")


def instructed_training(config: Mapping[str, Any]) -> dict[str, Any]:
    """The :func:`train_steps` keyword arguments an instruction's config asks for (``local-steps``,
    ``batch-size``, ``lr``, ``weight-decay``, ``seed`` and the :class:`TrainerOptions` keys); a
    value outside its range raises ValueError, so a site refuses it."""
    return {
        "steps": int(config["local-steps"]), "batch_size": int(config["batch-size"]), "lr": float(config["lr"]),
        "weight_decay": float(config.get("weight-decay", 0.0)), "seed": int(config["seed"]),
        "options": TrainerOptions.from_config(config),
        "schedule_step": int(config.get("schedule-step", 0)), "schedule_steps": int(config.get("schedule-steps", 0)),
    }


@contextlib.contextmanager
def gradient_checkpointing(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Turn activation checkpointing on for every Hugging Face model inside ``model`` for the
    duration (a model without support raises ValueError naming it), and off again after."""
    if not enabled:
        yield
        return
    supported: list[torch.nn.Module] = []
    outer: list[str] = []
    for name, module in model.named_modules():
        if getattr(module, "supports_gradient_checkpointing", False) and not any(
                prefix == "" or name.startswith(prefix + ".") for prefix in outer):
            supported.append(module)
            outer.append(name)
    if not supported:
        raise ValueError(f"gradient-checkpointing: {type(model).__name__} has no Hugging Face model that supports it")
    hooked_before = [bool(getattr(module, "_require_grads_hooks", None)) for module in supported]
    for module in supported:  # transformers 5 renamed gradient_* to activation_checkpointing_*
        if hasattr(module, "activation_checkpointing_enable"):
            module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        for module, hooked in zip(supported, hooked_before, strict=True):
            (getattr(module, "activation_checkpointing_disable", None) or module.gradient_checkpointing_disable)()
            if not hooked and getattr(module, "_require_grads_hooks", None):  # enable's input-grad hook goes too
                module.disable_input_require_grads()


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
    options: TrainerOptions | None = None,
    schedule_step: int = 0,
    schedule_steps: int = 0,
) -> TrainStats:
    """Run ``steps`` optimizer steps of cross-entropy on mini-batches of ``data``.

    Only the parameters named in ``trainable`` are updated; the optimizer state starts fresh,
    so the client carries no optimizer state between rounds. ``seed`` fixes the batch order and
    the dropout masks, so the same instruction on the same data gives the same result.
    ``optimizer`` is ``adamw`` or ``sgd`` (plain :math:`y \\leftarrow y - \\eta g`); with
    ``gradient_correction`` (a tensor per trainable name, SGD only) each step uses
    :math:`g + \text{correction}` (SCAFFOLD's :math:`g - c_i + c`). ``options``
    (:class:`TrainerOptions`) adds gradient accumulation, the learning-rate schedule (this call's
    steps are ``schedule_step`` … of the run's ``schedule_steps``; 0: just these ``steps``),
    autocast and gradient checkpointing.
    """
    if steps < 1:
        raise ValueError(f"local steps must be at least 1, got {steps}")
    if schedule_step < 0 or (schedule_steps and schedule_steps < schedule_step + steps):
        raise ValueError(f"schedule-step {schedule_step} and schedule-steps {schedule_steps} do not hold this "
                         f"round's {steps} steps (0 <= schedule-step, schedule-step + steps <= schedule-steps)")
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
    options = options or TrainerOptions()
    total_steps = schedule_steps or schedule_step + steps
    lr_factor = [options.lr_factor(schedule_step + i, total_steps) for i in range(steps)]
    base_lrs = [group["lr"] for group in opt.param_groups]
    autocast_dtype = options.autocast_dtype(device)
    # fp16: a loss scaler, starting low (each round's scaler is new: a high start skips the first steps)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10) if autocast_dtype == torch.float16 else None
    skipped = 0
    named = dict(model.named_parameters())
    corrections = [(named[k], v.to(device)) for k, v in (gradient_correction or {}).items()]
    model.train()
    start = time.perf_counter()
    total_loss, seen = 0.0, 0
    batches = data.batches(batch_size, seed)
    accumulate = options.grad_accumulation
    # dropout draws from the global RNG: seed it (without disturbing the caller's RNG state)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            gradient_checkpointing(model, options.gradient_checkpointing):
        torch.manual_seed(seed)
        for step in range(steps):
            for group, base in zip(opt.param_groups, base_lrs, strict=True):
                group["lr"] = base * lr_factor[step]
            opt.zero_grad(set_to_none=True)
            for _ in range(accumulate):
                inputs, labels = to_device(next(batches), device)
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    loss = batch_loss(model, model(**inputs), labels)
                scaled = loss / accumulate
                (scaler.scale(scaled) if scaler else scaled).backward()
                total_loss += float(loss.detach()) * len(labels)
                seen += len(labels)
            if scaler:
                scaler.unscale_(opt)
            for param, correction in corrections:
                if param.grad is None:
                    param.grad = correction.clone()
                else:
                    param.grad.add_(correction)
            if scaler:
                scale = scaler.get_scale()
                scaler.step(opt)
                scaler.update()
                skipped += scaler.get_scale() < scale  # an overflow: this step was skipped, the scale halved
            else:
                opt.step()
    if not math.isfinite(total_loss):
        raise FloatingPointError(f"local training diverged (loss {total_loss}); lower the learning rate")
    return TrainStats(total_loss / seen, steps - skipped, seen, time.perf_counter() - start)
