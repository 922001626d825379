"""A task made of the user's own model directory and data directory (``fedsim run --model DIR
--data DIR``): any local Hugging Face directory (``config.json``, safetensors weights, a tokenizer)
of either kind:

- a **causal LM** (``architectures`` naming a ``…ForCausalLM``), trained on ``{"prompt",
  "completion"}`` JSON Lines (loss on the completion) or on labelled text (``{text, label}`` rows,
  CSV or JSON Lines: the text is the prompt, the label the answer);
- a **BERT-style encoder** (``model_type`` one of :data:`ENCODER_TYPES`, e.g. a
  ``…ForSequenceClassification`` checkpoint, whose base encoder is kept), classifying labelled text
  with fedtune's mean-pooled head (:class:`~fedclient.tasks.text.EncoderClassifier`) over the
  classes the data names.

Such a task is named ``dir:MODEL_DIR::DATA_DIR`` (absolute paths), so every process of a
simulation (the ServerApp, each Ray actor) rebuilds the same task from its name. **A real site
never resolves one from a coordinator's run config** (:func:`fedclient.local.site_task` refuses it
outside Flower's simulation engine): a run config cannot point a site at directories of its disk.
Weights load with ``use_safetensors=True`` and without remote code.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import pathlib
from dataclasses import dataclass

import numpy as np
import torch

from fedclient.tasks.adapters import AdapterSpec, inject_adapter
from fedclient.tasks.causal_lm import CausalLMTask, lm_layer_names
from fedclient.tasks.data import Corpus
from fedclient.tasks.site_data import holds_prompt_completions, read_site_examples
from fedclient.tasks.text import EncoderClassifier, TextTask, model_cache

PREFIX = "dir:"
SEPARATOR = "::"


class ModelDirectoryError(ValueError):
    """A model or data directory fedtune cannot use; the message says what is wrong."""


def directory_task_name(model_dir: str | pathlib.Path, data_dir: str | pathlib.Path) -> str:
    """The task name of ``model_dir`` trained on ``data_dir`` (checked to exist)."""
    model, data = pathlib.Path(model_dir).expanduser().resolve(), pathlib.Path(data_dir).expanduser().resolve()
    _architecture(model)
    if not data.is_dir():
        raise ModelDirectoryError(f"--data {data_dir}: not a directory (give one of *.jsonl prompt/completion pairs, "
                                  "or of *.csv / *.jsonl text,label rows)")
    return f"{PREFIX}{model}{SEPARATOR}{data}"


def is_directory_task(name: str) -> bool:
    return name.startswith(PREFIX)


ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "mpnet")


def _architecture(model: pathlib.Path) -> dict:
    try:
        config = json.loads((model / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ModelDirectoryError(f"--model {model}: no readable config.json ({err}); give a Hugging Face model "
                                  "directory (what save_pretrained writes)") from err
    architectures = config.get("architectures") or []
    if not _is_causal_lm(config) and config.get("model_type") not in ENCODER_TYPES:
        raise ModelDirectoryError(f"--model {model}: architectures {architectures} (model_type "
                                  f"{config.get('model_type')!r}) is neither a …ForCausalLM nor a BERT-style encoder "
                                  f"({', '.join(ENCODER_TYPES)}); other models need a task plugin")
    if not any(model.glob("*.safetensors")):
        raise ModelDirectoryError(f"--model {model}: no *.safetensors weights (pickled weights are not loaded)")
    return config


def _is_causal_lm(config: dict) -> bool:
    return any(str(a).endswith("ForCausalLM") for a in config.get("architectures") or [])


def verbatim_prompt(text: str, condition: str | None, classes) -> str:
    """The prompt as the data gives it."""
    return text


@model_cache
@functools.lru_cache(maxsize=8)
def _directory_corpus(data_dir: str, signature: str = "") -> Corpus:
    """The data directory's examples: prompt/completion pairs or labelled text (classes in sorted
    order). ``signature`` (:func:`files_signature`) keys this and the tokenized cache to the files."""
    corpus = read_site_examples(data_dir, None)
    return Corpus(corpus.texts, np.asarray(corpus.labels), corpus.classes)


@model_cache
@functools.lru_cache(maxsize=4)
def _encoder(directory: str) -> torch.nn.Module:
    from transformers import AutoModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    model = AutoModel.from_pretrained(directory, dtype=torch.float32, use_safetensors=True, trust_remote_code=False,
                                      )
    if not (hasattr(model, "embeddings") and hasattr(getattr(model, "encoder", None), "layer")):
        raise ModelDirectoryError(f"--model {directory}: {type(model).__name__} has no embeddings and encoder.layer")
    return model.eval()


@model_cache
@functools.lru_cache(maxsize=4)
def _encoder_tokenizer(directory: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


@dataclass(frozen=True)
class EncoderDirectoryTask(TextTask):
    """A BERT-style encoder from a directory classifying the data directory's labelled text."""

    model_directory: str = ""

    def build_model(self, adapter: AdapterSpec | None = None) -> torch.nn.Module:
        model = EncoderClassifier(copy.deepcopy(_encoder(self.model_directory)), len(self.load_data().classes))
        if adapter is not None:
            model.bert = inject_adapter(model.bert, adapter, task_type="FEATURE_EXTRACTION")
        return model

    def tokenizer(self):
        return _encoder_tokenizer(self.model_directory)

    def model_sources(self) -> list[pathlib.Path]:
        return [pathlib.Path(self.model_directory)]

    def max_positions(self) -> int:
        return int(_architecture(pathlib.Path(self.model_directory)).get("max_position_embeddings", 512))

    def cache_fields(self) -> dict[str, object]:
        return {**super().cache_fields(), "architecture": "encoder", "model": self.model_directory}


def files_signature(*directories: pathlib.Path) -> str:
    """Name, size, modification and change times and inode of every file in ``directories``: a
    task's cached tokens, and a model a site runtime keeps loaded, are made again when the user
    edits the data or replaces the model in place (even by a copy that keeps modification times:
    the change time and inode still differ)."""
    entries = []
    for directory in directories:
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            stat = path.stat()
            entries.append(f"{path}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}:{stat.st_ino}")
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def directory_task(name: str) -> TextTask:
    """The task ``name`` (see :func:`directory_task_name`) describes."""
    model_part, _, data_part = name.removeprefix(PREFIX).partition(SEPARATOR)
    if not model_part or not data_part:
        raise ModelDirectoryError(f"task '{name}' is not of the form dir:MODEL_DIR::DATA_DIR")
    model = pathlib.Path(model_part)
    config = _architecture(model)
    signature = files_signature(model, pathlib.Path(data_part))
    corpus = _directory_corpus(data_part, signature)
    layers = int(config.get("num_hidden_layers") or 0)
    if layers < 1:
        raise ModelDirectoryError(f"--model {model}: config.json gives no num_hidden_layers")
    common = {"name": name, "load_corpus": functools.partial(_directory_corpus, data_part, signature),
              "num_layers": layers,
              "max_length": 128, "test_size": max(1, len(corpus) // 10)}
    if _is_causal_lm(config):
        return CausalLMTask(
            description=f"{model.name} on the examples in {data_part}", train_layers=lm_layer_names(layers),
            model_directory=functools.partial(pathlib.Path, model_part), make_prompt=verbatim_prompt, **common)
    if holds_prompt_completions(data_part):
        raise ModelDirectoryError(f"--data {data_part} holds prompt/completion pairs; the encoder in {model} "
                                  "classifies text: give {text, label} rows, or a causal-LM --model")
    return EncoderDirectoryTask(
        description=f"{model.name} classifying the labelled text in {data_part}",
        train_layers=(f"encoder.layer.{layers - 1}", "head"), model_directory=model_part, **common)
