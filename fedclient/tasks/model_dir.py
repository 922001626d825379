"""A task made of the user's own model directory and data directory (``fedsim run --model DIR
--data DIR``): any local Hugging Face causal-LM directory (``config.json`` naming a
``…ForCausalLM`` architecture, safetensors weights, a tokenizer) and JSON Lines of
``{"prompt", "completion"}`` pairs.

Such a task is named ``dir:MODEL_DIR::DATA_DIR`` (absolute paths), so every process of a
simulation (the ServerApp, each Ray actor) rebuilds the same task from its name. **A real site
never resolves one from a coordinator's run config** (:func:`fedclient.local.site_task` refuses it
outside Flower's simulation engine): a run config cannot point a site at directories of its disk.
Weights load with ``use_safetensors=True`` and without remote code.
"""

from __future__ import annotations

import functools
import json
import pathlib

import numpy as np

from fedclient.tasks.causal_lm import CausalLMTask, lm_layer_names
from fedclient.tasks.data import Corpus
from fedclient.tasks.site_data import read_prompt_completions

PREFIX = "dir:"
SEPARATOR = "::"


class ModelDirectoryError(ValueError):
    """A model or data directory fedtune cannot use; the message says what is wrong."""


def directory_task_name(model_dir: str | pathlib.Path, data_dir: str | pathlib.Path) -> str:
    """The task name of ``model_dir`` trained on ``data_dir`` (checked to exist)."""
    model, data = pathlib.Path(model_dir).expanduser().resolve(), pathlib.Path(data_dir).expanduser().resolve()
    _architecture(model)
    if not data.is_dir():
        raise ModelDirectoryError(f"--data {data_dir}: not a directory of *.jsonl prompt/completion files")
    return f"{PREFIX}{model}{SEPARATOR}{data}"


def is_directory_task(name: str) -> bool:
    return name.startswith(PREFIX)


def _architecture(model: pathlib.Path) -> dict:
    try:
        config = json.loads((model / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ModelDirectoryError(f"--model {model}: no readable config.json ({err}); give a Hugging Face model "
                                  "directory (what save_pretrained writes)") from err
    architectures = config.get("architectures") or []
    if not any(str(a).endswith("ForCausalLM") for a in architectures):
        raise ModelDirectoryError(f"--model {model}: architectures {architectures} has no …ForCausalLM; fedtune "
                                  "trains causal LMs from a directory (sequence classification: a task plugin)")
    if not any(model.glob("*.safetensors")):
        raise ModelDirectoryError(f"--model {model}: no *.safetensors weights (pickled weights are not loaded)")
    return config


def verbatim_prompt(text: str, condition: str | None, classes) -> str:
    """The prompt as the data gives it."""
    return text


@functools.lru_cache(maxsize=8)
def _prompt_corpus(data_dir: str) -> Corpus:
    corpus = read_prompt_completions(data_dir)
    return Corpus(corpus.texts, np.asarray(corpus.labels), corpus.classes)


def directory_task(name: str) -> CausalLMTask:
    """The task ``name`` (see :func:`directory_task_name`) describes."""
    model_part, _, data_part = name.removeprefix(PREFIX).partition(SEPARATOR)
    if not model_part or not data_part:
        raise ModelDirectoryError(f"task '{name}' is not of the form dir:MODEL_DIR::DATA_DIR")
    model = pathlib.Path(model_part)
    config = _architecture(model)
    corpus = _prompt_corpus(data_part)
    layers = int(config.get("num_hidden_layers") or 0)
    if layers < 1:
        raise ModelDirectoryError(f"--model {model}: config.json gives no num_hidden_layers")
    return CausalLMTask(
        name=name,
        description=f"{model.name} on the prompt/completion pairs in {data_part}",
        load_corpus=functools.partial(_prompt_corpus, data_part),
        num_layers=layers,
        max_length=128,
        train_layers=lm_layer_names(layers),
        test_size=max(1, len(corpus) // 10),
        model_directory=functools.partial(pathlib.Path, model_part),
        make_prompt=verbatim_prompt,
    )
