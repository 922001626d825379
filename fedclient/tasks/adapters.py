"""Parameter-efficient adapters, injected with Hugging Face PEFT into any task model.

A run chooses an adapter with the run-config keys ``adapter`` (``""``: none, ``lora``),
``lora-rank``, ``lora-alpha``, ``lora-dropout`` and ``lora-targets`` (module names, comma-separated;
empty: the model's attention query and value projections). LoRA (Hu et al., ICLR 2022) adds to a
frozen weight :math:`W_0 \\in \\mathbb{R}^{d\\times k}` the low-rank product
:math:`\\Delta W = \\frac{\\alpha}{r} B A` with :math:`B \\in \\mathbb{R}^{d\\times r}` (zeros at
the start) and :math:`A \\in \\mathbb{R}^{r\\times k}` (Kaiming-uniform), so the model starts as
the pretrained one and only :math:`r(d+k)` numbers per adapted matrix train and travel.

The injection is seeded (:data:`ADAPTER_SEED`): every process (the coordinator, each site, each
replay of a shared-randomness method) builds bit-identical initial adapters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

ADAPTER_SEED = 20261207
ADAPTERS = ("lora",)
DEFAULT_TARGETS = {  # attention query and value projections, by architecture (as in the LoRA paper)
    "llama": ("q_proj", "v_proj"),
    "bert": ("query", "value"),
}


class AdapterError(ValueError):
    """An adapter setting that cannot work with this model."""


@dataclass(frozen=True)
class AdapterSpec:
    """Which adapter a run trains: PEFT-style config (hashable, so models built with it cache)."""

    kind: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ADAPTERS:
            raise AdapterError(f"unknown adapter '{self.kind}'; use one of: {', '.join(ADAPTERS)} (or none)")
        if not 1 <= self.rank <= 1024:
            raise AdapterError(f"lora-rank must be in 1..1024, got {self.rank}")
        if not self.alpha > 0:
            raise AdapterError(f"lora-alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise AdapterError(f"lora-dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> AdapterSpec | None:
        """The adapter a run config asks for, or None for full-parameter training."""
        kind = str(config.get("adapter", "") or "").strip().lower()
        if kind in ("", "none"):
            return None
        targets = tuple(t.strip() for t in str(config.get("lora-targets", "") or "").split(",") if t.strip())
        return cls(kind=kind, rank=int(config.get("lora-rank", 8)), alpha=float(config.get("lora-alpha", 16.0)),
                   dropout=float(config.get("lora-dropout", 0.0)), targets=targets)

    def peft_config(self, model_type: str, task_type: str | None = None):
        """The ``peft.LoraConfig`` for a model of ``model_type`` (``config.model_type``)."""
        from peft import LoraConfig

        targets = self.targets or DEFAULT_TARGETS.get(model_type)
        if not targets:
            raise AdapterError(f"no default LoRA targets for a '{model_type}' model; name its modules with "
                               "lora-targets (e.g. lora-targets=\"q_proj,v_proj\")")
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(targets), bias="none", task_type=task_type)


def inject_adapter(module: torch.nn.Module, spec: AdapterSpec, task_type: str | None = None) -> torch.nn.Module:
    """``module`` (a Hugging Face ``PreTrainedModel``) wrapped as a ``peft.PeftModel`` with the
    adapter ``spec`` describes, its base weights frozen, initialised from :data:`ADAPTER_SEED`.

    Raises :class:`AdapterError` when a target module does not exist in the model."""
    from peft import get_peft_model

    config = spec.peft_config(str(getattr(module.config, "model_type", "")), task_type)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ADAPTER_SEED)
            return get_peft_model(module, config)
    except ValueError as err:  # PEFT: "Target modules {...} not found in the base model"
        raise AdapterError(f"cannot inject LoRA into this model: {err}") from err


def adapter_parameter_names(model: torch.nn.Module) -> list[str]:
    """Names of the adapter's own parameters in ``model`` (PEFT's ``lora_`` tensors)."""
    return [name for name, _ in model.named_parameters() if ".lora_" in name]


def has_adapter(model: torch.nn.Module) -> bool:
    return bool(adapter_parameter_names(model))


def peft_module(model: torch.nn.Module) -> torch.nn.Module | None:
    """The ``peft.PeftModel`` inside ``model`` (a task model whose backbone carries an adapter), if any."""
    for name, module in model.named_modules():
        if hasattr(module, "peft_config") and hasattr(module, "save_pretrained"):
            return module
    return None


def export_adapter(model: torch.nn.Module, directory, *, merged: bool = False, tokenizer=None) -> list[str]:
    """Write ``model``'s adapter as a PEFT adapter directory (``adapter_config.json`` and
    ``adapter_model.safetensors``, loadable with ``PeftModel.from_pretrained(base, directory)``);
    parameters outside the PEFT model (a classification head) go to ``task_head.safetensors``; with
    ``merged``, the base model with the adapter folded in (:math:`W_0 + \\frac{\\alpha}{r}BA`) goes
    to ``directory/merged`` as a plain Hugging Face model directory. Returns the files written."""
    import copy
    import pathlib

    from safetensors.torch import save_file

    peft = peft_module(model)
    if peft is None:
        raise AdapterError("this model carries no adapter; export its weights as a .safetensors file instead")
    directory = pathlib.Path(directory)
    peft.save_pretrained(str(directory))
    written = ["adapter_config.json", "adapter_model.safetensors"]
    inside = {id(p) for p in peft.parameters()}
    head = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if id(p) not in inside}
    if head:
        save_file(head, str(directory / "task_head.safetensors"))
        written.append("task_head.safetensors")
    if merged:
        folded = copy.deepcopy(peft).merge_and_unload()
        folded.save_pretrained(str(directory / "merged"))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(directory / "merged"))
        written.append("merged/")
    return written
