"""Sentence embeddings with MiniLM-L6 (all-MiniLM-L6-v2): mean pooling over real tokens, L2-normalised,
384-d; or with the fine-tuned encoder of a finished run. Used by the sites' vector stores and by the
querier, which must embed queries exactly as the sites embedded their documents."""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import numpy as np
import torch

MAX_TOKENS = 128


class EmbeddingError(ValueError):
    """The encoder weights cannot be used; the message says what to do."""


class Embedder:
    """MiniLM sentence embeddings (mean pooling, L2 norm), optionally with a run's fine-tuned encoder."""

    def __init__(self, encoder_run: str = "") -> None:
        from fedclient.tasks.text import pretrained_encoder, tokenizer

        self.tokenizer = tokenizer()
        if encoder_run:
            self.model, self.name = _run_encoder(encoder_run), f"weights:{pathlib.Path(encoder_run).name}"
        else:
            self.model, self.name = pretrained_encoder(6), "all-MiniLM-L6-v2"
        self.model.eval()

    def __call__(self, texts: list[str], batch_size: int = 32,
                 progress: Callable[[int], None] | None = None) -> np.ndarray:
        out = []
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                batch = self.tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                                       max_length=MAX_TOKENS, return_tensors="pt")
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                out.append(torch.nn.functional.normalize(pooled, dim=1).numpy().astype(np.float32))
                if progress:
                    progress(len(out[-1]))
        return np.concatenate(out) if out else np.zeros((0, 384), dtype=np.float32)


def _run_encoder(weights: str) -> torch.nn.Module:
    """The fine-tuned encoder of a finished run, from the file ``fedserver export RUN --out FILE``
    writes (safetensors; its metadata names the task)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from fedclient.tasks import get_task

    path = pathlib.Path(weights)
    if not path.is_file():
        raise EmbeddingError(f"no weights file {path}; the coordinator exports one with "
                               "`fedserver export RUN --out FILE.safetensors`")
    with safe_open(str(path), "pt") as handle:
        task = (handle.metadata() or {}).get("task", "")
    if not task:
        raise EmbeddingError(f"{path} does not name its task; export it with `fedserver export`")
    state = load_file(str(path))
    model = get_task(task).build_model()
    unknown = set(state) - set(model.state_dict())
    if unknown:
        raise EmbeddingError(f"{path} does not fit task {task}: unknown tensors {sorted(unknown)[:3]}")
    model.load_state_dict(state, strict=False)
    return model.bert
