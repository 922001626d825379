"""Tasks (a pretrained model plus a corpus), registered by name.

| task | model | data | default trained layers |
|---|---|---|---|
| ``minilm-bbc`` | MiniLM-L6 (6 layers), 64 tokens | BBC News, 2,225 articles, 5 topics | encoder.layer.4, encoder.layer.5, head |
| ``minilm-drugs`` | MiniLM-L6, 96 tokens | Drug reviews, 3 sentiments, natural split by condition | encoder.layer.4, encoder.layer.5, head |
| ``tiny`` | MiniLM cut to 1 layer, 32 tokens | 300 BBC News articles | encoder.layer.0, head |
"""

from __future__ import annotations

from fedclient.tasks.data import MissingDataError, load_bbc_news, load_drug_reviews
from fedclient.tasks.partition import SCHEMES, PartitionSpec
from fedclient.tasks.site_data import SiteCorpus, SiteDataError, read_site_corpus
from fedclient.tasks.text import ClientData, TextTask, evaluate_model

BBC_LICENCE = "BBC News article text (c) BBC, for non-commercial and research purposes only"

TASKS: dict[str, TextTask] = {
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
            licence="UCI Drug Review data (Drugs.com), CC BY 4.0",
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
    )
}


def get_task(name: str) -> TextTask:
    """The task registered as ``name``, or a clear error listing the known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}'; choose one of: {', '.join(sorted(TASKS))}")
    return TASKS[name]


__all__ = [
    "SCHEMES",
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
