"""Tasks (a pretrained model plus a corpus), registered by name.

| task | model | data | default trained layers |
|---|---|---|---|
| ``minilm-bbc`` | MiniLM-L6 (6 layers), 64 tokens | BBC News, 2,225 articles, 5 topics | encoder.layer.4, encoder.layer.5, head |
| ``minilm-drugs`` | MiniLM-L6, 96 tokens | Drug reviews, 3 sentiments, natural split by condition | encoder.layer.4, encoder.layer.5, head |
| ``tiny`` | MiniLM cut to 1 layer, 32 tokens | 300 BBC News articles | encoder.layer.0, head |
| ``smollm2-drugs`` | SmolLM2-135M-Instruct (causal LM), 128 tokens | drug review → its sentiment, one site per condition | all (with an adapter: the adapted blocks) |
| ``smollm2-bbc`` | SmolLM2-135M-Instruct, 128 tokens | BBC News article → its topic | all (adapter: adapted blocks) |
| ``tiny-lm`` | SmolLM2 cut to 2 blocks, 64 tokens | 300 drug reviews → sentiment (for tests) | all (adapter: adapted blocks) |

The causal-LM tasks (:mod:`fedclient.tasks.causal_lm`) train on answer tokens only and report
answer loss, perplexity and exact match of greedy answers; ``--adapter lora`` trains a PEFT LoRA
adapter on any of them (:mod:`fedclient.tasks.adapters`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from fedclient.tasks.causal_lm import CausalLMTask, bbc_prompt, drug_review_prompt, lm_layer_names
from fedclient.tasks.data import MissingDataError, load_bbc_news, load_drug_reviews
from fedclient.tasks.model_dir import directory_task, is_directory_task
from fedclient.tasks.partition import SCHEMES, PartitionSpec
from fedclient.tasks.site_data import SiteCorpus, SiteDataError, read_site_corpus
from fedclient.tasks.text import ClientData, TextTask, evaluate_model

BBC_LICENCE = "BBC News article text (c) BBC, for non-commercial and research purposes only"
DRUGS_LICENCE = "UCI Drug Review data (Drugs.com), CC BY 4.0"

BUILT_IN_TASKS: dict[str, TextTask] = {
    task.name: task
    for task in (
        TextTask(
            name="minilm-bbc",
            description="MiniLM-L6 fine-tuned to classify BBC News articles into 5 topics",
            load_corpus=load_bbc_news,
            num_layers=6,
            max_length=64,
            train_layers=("encoder.layer.4", "encoder.layer.5", "head"),
            test_size=300,
            licence=BBC_LICENCE,
        ),
        TextTask(
            name="minilm-drugs",
            description="MiniLM-L6 fine-tuned on drug-review sentiment, one client per medical condition",
            load_corpus=load_drug_reviews,
            num_layers=6,
            max_length=96,
            train_layers=("encoder.layer.4", "encoder.layer.5", "head"),
            test_size=96,
            default_partition="natural",
            licence=DRUGS_LICENCE,
        ),
        TextTask(
            name="tiny",
            description="MiniLM cut to 1 encoder layer on 300 BBC News articles, 32 tokens (for tests)",
            load_corpus=load_bbc_news,
            num_layers=1,
            max_length=32,
            train_layers=("encoder.layer.0", "head"),
            test_size=60,
            max_documents=300,
            licence=BBC_LICENCE,
        ),
        CausalLMTask(
            name="smollm2-drugs",
            description="SmolLM2-135M-Instruct answers a drug review's sentiment, one site per condition",
            load_corpus=load_drug_reviews,
            num_layers=30,
            max_length=128,
            train_layers=lm_layer_names(30),
            test_size=96,
            default_partition="natural",
            licence=DRUGS_LICENCE,
            make_prompt=drug_review_prompt,
        ),
        CausalLMTask(
            name="smollm2-bbc",
            description="SmolLM2-135M-Instruct answers a BBC News article's topic",
            load_corpus=load_bbc_news,
            num_layers=30,
            max_length=128,
            train_layers=lm_layer_names(30),
            test_size=300,
            licence=BBC_LICENCE,
            make_prompt=bbc_prompt,
        ),
        CausalLMTask(
            name="tiny-lm",
            description="SmolLM2 cut to 2 blocks answering 300 drug reviews' sentiment, 64 tokens (for tests)",
            load_corpus=load_drug_reviews,
            num_layers=2,
            max_length=64,
            train_layers=lm_layer_names(2),
            test_size=60,
            max_documents=300,
            licence=DRUGS_LICENCE,
            make_prompt=drug_review_prompt,
        ),
    )
}


ENTRY_POINT_GROUP = "fedtune.tasks"


class TaskRegistry(Mapping[str, TextTask]):
    """The built-in tasks plus those installed packages register under the entry-point group
    ``fedtune.tasks`` (``[project.entry-points."fedtune.tasks"] my-task = "pkg.module:TASK"``; the
    object is a :class:`TextTask` / :class:`CausalLMTask`, or a function returning one, and its
    ``name`` must be the entry point's). Plugins load on first use. A site runs a plugin only if it
    installed the package itself and its policy's ``tasks`` allows the name: the coordinator can
    name a task, never ship one."""

    def __init__(self, built_in: Mapping[str, TextTask]) -> None:
        self._built_in = dict(built_in)
        self._plugins: dict[str, object] | None = None
        self._loaded: dict[str, TextTask] = {}

    def _entry_points(self) -> dict[str, object]:
        if self._plugins is None:
            from importlib.metadata import entry_points

            self._plugins = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)
                             if ep.name not in self._built_in}
        return self._plugins

    def __getitem__(self, name: str) -> TextTask:
        if name in self._built_in:
            return self._built_in[name]
        if name in self._loaded:
            return self._loaded[name]
        if is_directory_task(name):  # the user's own model and data (fedsim --model/--data), as the files are now
            return directory_task(name)
        entry = self._entry_points()[name]  # KeyError for an unknown name, as a Mapping does
        try:
            found = entry.load()  # type: ignore[attr-defined]
            task = found if isinstance(found, TextTask) else found()
        except Exception as err:  # noqa: BLE001 - a broken plugin is named, not a crash elsewhere
            raise ValueError(f"task plugin '{name}' ({entry.value}) failed to load: {err}") from err  # type: ignore[attr-defined]
        if not isinstance(task, TextTask) or task.name != name:
            raise ValueError(f"task plugin '{name}' ({entry.value}) must give a TextTask named '{name}'")  # type: ignore[attr-defined]
        self._loaded[name] = task
        return task

    def __iter__(self) -> Iterator[str]:
        return iter([*self._built_in, *self._entry_points()])

    def __len__(self) -> int:
        return len(self._built_in) + len(self._entry_points())

    def refresh(self) -> None:
        """Forget the plugins found so far (after installing or removing one in this process)."""
        self._plugins = None
        self._loaded.clear()


TASKS = TaskRegistry(BUILT_IN_TASKS)


def run_task(config: Mapping[str, Any]) -> TextTask:
    """The task a run config names, with its ``max-length`` where the run sets one (> 0)."""
    task = get_task(str(config["task"]))
    max_length = int(config.get("max-length", 0) or 0)
    return task.with_max_length(max_length) if max_length else task


def get_task(name: str) -> TextTask:
    """The task registered as ``name``, or a clear error listing the known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}'; choose one of: {', '.join(sorted(TASKS))}")
    return TASKS[name]


__all__ = [
    "SCHEMES",
    "run_task",
    "CausalLMTask",
    "TASKS",
    "ClientData",
    "MissingDataError",
    "PartitionSpec",
    "SiteCorpus",
    "SiteDataError",
    "TextTask",
    "evaluate_model",
    "get_task",
    "read_site_corpus",
]
